"""Tools for the crash test, loaded by the tool-runner with ``LOOM_TOOL_MODULES=crash_tools``
(``tests/e2e`` on ``PYTHONPATH``).

Every call leaves a trace of its effect in the file named by ``LOOM_TEST_EFFECTS``: a line
``start <key> <pid> <unix time>`` before the work and ``end <key> <pid> <unix time>`` after
it, each appended with O_APPEND and fsynced so a SIGKILL cannot lose or tear a line that
was written. The test reads this log to see how often each idempotency key really ran.

- ``effect``: the effect itself; returns ``{"label": label}``.
- ``crash_add``: ``acc + add`` (the arithmetic the reduce step of the test needs).
- ``crash_flaky``: fails (retryable) while ``ctx.attempt <= fail_attempts``; the outcome
  depends only on the attempt, so a re-run after a crash gives the same answer.

The names other than ``effect`` carry a ``crash_`` prefix so they never collide with
built-in tools (registering a name twice stops the tool-runner).
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
    path = os.environ.get(EFFECTS_ENV)
    if not path:
        raise ToolFailure("misconfigured", f"set {EFFECTS_ENV} to the effects log's path")
    line = f"{kind} {key} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of a short line under O_APPEND: never interleaved
        os.fsync(fd)
    finally:
        os.close(fd)


async def _effect(ctx: ToolContext, ms: int) -> None:
    _log("start", ctx.idempotency_key)
    await asyncio.sleep(ms / 1000)  # the "work": a kill may land here
    _log("end", ctx.idempotency_key)


class EffectInput(ToolInput):
    label: str
    ms: int = 20


class EffectOutput(ToolOutput):
    label: str


@tool("effect", "Record an effect in the test's effects log; return the label.")
async def effect(inp: EffectInput, ctx: ToolContext) -> EffectOutput:
    await _effect(ctx, inp.ms)
    return EffectOutput(label=inp.label)


class AddInput(ToolInput):
    acc: int
    add: int
    ms: int = 20


class AddOutput(ToolOutput):
    total: int


@tool("crash_add", "Record an effect; return acc + add.")
async def crash_add(inp: AddInput, ctx: ToolContext) -> AddOutput:
    await _effect(ctx, inp.ms)
    return AddOutput(total=inp.acc + inp.add)


class FlakyInput(ToolInput):
    label: str
    fail_attempts: int
    ms: int = 20


class FlakyOutput(ToolOutput):
    label: str
    attempt: int


@tool("crash_flaky", "Record an effect; fail (retryable) while attempt <= fail_attempts.")
async def crash_flaky(inp: FlakyInput, ctx: ToolContext) -> FlakyOutput:
    await _effect(ctx, inp.ms)
    if ctx.attempt <= inp.fail_attempts:
        raise ToolFailure("flaky", f"planned failure of attempt {ctx.attempt}", retryable=True)
    return FlakyOutput(label=inp.label, attempt=ctx.attempt)


def register(registry: ToolRegistry) -> None:
    for t in (effect, crash_add, crash_flaky):
        registry.register(t)
