"""Counting tools for the chaos suite (``bench/chaos.py``), loaded by the tool-runner with
``LOOM_TOOL_MODULES=chaos_tools`` (``tests/e2e`` on ``PYTHONPATH``).

Both take ``{label: str, ms: int = 20}`` and return ``{"label": label}``:
- ``tally`` is idempotent (the default): after a crash it may legitimately run again;
- ``charge`` is *not* idempotent: the tool-runner claims its key before running it, so it
  must never run twice for one idempotency key, whatever is killed when.

Each call appends ``start <tool> <idempotency key> <pid> <unix time>`` before its work
(sleeping ``ms``) and ``end …`` after it to the file named by ``LOOM_CHAOS_EFFECTS``, one
short ``O_APPEND`` write each, fsynced, so a SIGKILL can neither lose nor tear a line that
was written. The driver counts these lines per key.
"""

from __future__ import annotations

import asyncio

from crash_tools import append_effect  # type: ignore[import-not-found]

from loom_services.tools.registry import (
    ToolContext,
    ToolInput,
    ToolOutput,
    ToolRegistry,
    tool,
)

EFFECTS_ENV = "LOOM_CHAOS_EFFECTS"


def _log(kind: str, name: str, key: str) -> None:
    append_effect(EFFECTS_ENV, kind, name, key)


class CountInput(ToolInput):
    label: str
    ms: int = 20


class CountOutput(ToolOutput):
    label: str


async def _count(name: str, inp: CountInput, ctx: ToolContext) -> CountOutput:
    _log("start", name, ctx.idempotency_key)
    await asyncio.sleep(inp.ms / 1000)  # the "work": a kill may land here
    _log("end", name, ctx.idempotency_key)
    return CountOutput(label=inp.label)


@tool("tally", "Count an idempotent effect in the chaos effects log; return the label.")
async def tally(inp: CountInput, ctx: ToolContext) -> CountOutput:
    return await _count("tally", inp, ctx)


@tool(
    "charge",
    "Count a non-idempotent effect in the chaos effects log; return the label.",
    idempotent=False,
)
async def charge(inp: CountInput, ctx: ToolContext) -> CountOutput:
    return await _count("charge", inp, ctx)


def register(registry: ToolRegistry) -> None:
    registry.register(tally)
    registry.register(charge)
