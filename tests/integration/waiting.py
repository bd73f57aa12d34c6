"""Bounded waits the integration tests share (the one helper module: a test does not
write its own wait loop): on a run's events (``until``, ``first``), or on a read model
that has no event to wait on (``eventually``, a poll with a deadline)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import TypeVar

from loom_core.contracts import EventRecord
from loom_infra.client import LoomClient

T = TypeVar("T")
BOUND_S = 10.0  # no wait below takes longer unless the caller says so


async def until(
    client: LoomClient,
    run_id: str,
    done: Callable[[list[EventRecord]], bool],
    bound_s: float = BOUND_S,
) -> list[EventRecord]:
    """Follow the run's events from the first until ``done(seen)`` holds (bounded)."""
    seen: list[EventRecord] = []
    async with asyncio.timeout(bound_s):
        async with aclosing(client.follow(run_id, timeout=bound_s)) as stream:
            async for record in stream:
                seen.append(record)
                if done(seen):
                    return seen
    raise AssertionError(f"run {run_id} ended first: {[r.kind for r in seen]}")


def having(kind: str, n: int = 1) -> Callable[[list[EventRecord]], bool]:
    return lambda seen: sum(r.kind == kind for r in seen) >= n


async def first(
    client: LoomClient,
    run_id: str,
    match: Callable[[EventRecord], bool],
    bound_s: float = BOUND_S,
) -> EventRecord:
    """The run's first event that ``match``es (bounded)."""
    return (await until(client, run_id, lambda seen: match(seen[-1]), bound_s))[-1]


async def eventually(
    probe: Callable[[], Awaitable[T | None] | T | None],
    what: str,
    bound_s: float = BOUND_S,
    every_s: float = 0.02,
) -> T:
    """Call ``probe`` (sync or async) until it returns something truthy; fails naming
    ``what`` after ``bound_s``. For read models updated asynchronously, which publish no
    event."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound_s
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(every_s)  # the polling interval of a bounded wait
