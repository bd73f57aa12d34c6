"""Tools for the crash test, loaded by the tool-runner with ``LOOM_TOOL_MODULES=crash_tools``
(``tests/e2e`` on ``PYTHONPATH``).

``effect`` (input ``{label: str, ms: int = 20}``, output ``{"label": label}``) leaves a
trace of each call in the file named by ``LOOM_TEST_EFFECTS``: a line
``start <idempotency key> <pid> <unix time>`` before its work (sleeping ``ms``) and
``end <key> <pid> <unix time>`` after it, each appended with O_APPEND and fsynced so a
SIGKILL cannot lose or tear a line that was written. The test reads this log to see how
often each idempotency key really ran, and by which process.
"""

from __future__ import annotations

import asyncio
import os
import time

from loom_services.tools.registry import (
    ToolContext,
    ToolFailure,
    ToolInput,
    ToolOutput,
    ToolRegistry,
    tool,
)

EFFECTS_ENV = "LOOM_TEST_EFFECTS"


def _log(kind: str, key: str) -> None:
    append_effect(EFFECTS_ENV, kind, key)


def append_effect(env: str, *fields: str) -> None:
    """Append ``fields``, the pid and the time as one line to the file named by ``env``
    (the chaos tools use it too)."""
    path = os.environ.get(env)
    if not path:
        raise ToolFailure("misconfigured", f"set {env} to the effects log's path")
    line = f"{' '.join(fields)} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of a short line under O_APPEND: never interleaved
        os.fsync(fd)
    finally:
        os.close(fd)


class EffectInput(ToolInput):
    label: str
    ms: int = 20


class EffectOutput(ToolOutput):
    label: str


@tool("effect", "Record an effect in the test's effects log; return the label.")
async def effect(inp: EffectInput, ctx: ToolContext) -> EffectOutput:
    _log("start", ctx.idempotency_key)
    await asyncio.sleep(inp.ms / 1000)  # the "work": a kill may land here
    _log("end", ctx.idempotency_key)
    return EffectOutput(label=inp.label)


def register(registry: ToolRegistry) -> None:
    registry.register(effect)
