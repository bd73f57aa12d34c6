"""The tool catalog as the planner reads it: the ``loom_tools`` bucket, read at most once
per ``max_age_s`` however many runs arrive.

Reading the bucket costs a listing (an ephemeral JetStream consumer) and one get per
tool: with ~30 tools (built-ins, memory tools, MCP servers) that was 60 JetStream calls
and 30 decodes per run, a third of a 20-step run's CPU. Cached, 50 runs arriving
together share one read.

What a cached catalog may get wrong, and why it does not matter:
- a tool published since the read is missing: :meth:`CatalogCache.get` with
  ``fresh=True`` reads the bucket again (started after the call, so it holds every tool
  published before it); the planner asks for that before it refuses a plan for an
  unknown tool, so a run naming a tool that was just registered is never refused;
- a spec changed since the read (schemas, access metadata) is seen at most
  ``max_age_s`` later: the same window a run submitted just before the change has.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

CATALOG_MAX_AGE_S = 1.0


class CatalogCache(Generic[T]):
    """``read`` (the bucket's specs by name) shared by concurrent callers, reused for
    ``max_age_s``. A failed read is not kept: the next call reads again."""

    def __init__(
        self,
        read: Callable[[], Awaitable[Mapping[str, T]]],
        max_age_s: float = CATALOG_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self.max_age_s = max_age_s
        self._clock = clock
        self._value: Mapping[str, T] | None = None
        self._read_at = float("-inf")  # when the read that produced _value started
        self._reading: asyncio.Future[Mapping[str, T]] | None = None
        self._reading_since = float("-inf")
        self.reads = 0  # how many times the bucket was read (tests, metrics)

    async def get(self, fresh: bool = False) -> Mapping[str, T]:
        """The catalog; ``fresh``: from a read started after this call."""
        asked = self._clock()
        if not fresh and self._value is not None and asked - self._read_at <= self.max_age_s:
            return self._value
        # join a read in flight only if it is recent enough for this caller
        oldest = asked if fresh else asked - self.max_age_s
        if self._reading is None or self._reading_since < oldest:
            self._reading_since = asked
            self._reading = asyncio.ensure_future(self._read_once(asked))
            # a failed read whose callers were all cancelled: retrieved, not warned about
            self._reading.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(self._reading)

    async def _read_once(self, started: float) -> Mapping[str, T]:
        self.reads += 1
        try:
            value = await self._read()
        finally:
            if self._reading_since == started:
                self._reading = None
        if started >= self._read_at:  # a slower, older read never replaces a newer one
            self._value, self._read_at = value, started
        return value
