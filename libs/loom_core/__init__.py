"""agentloom's pure kernel: contracts, plan validation, templating and the executor's
decide/evolve. Nothing here does I/O, reads a clock or draws a random number."""
