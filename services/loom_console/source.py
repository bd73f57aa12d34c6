"""Where the console's data comes from: only the declared routes, through the same
``LoomClient`` (and identity) as the CLI. A run's events are immutable once stored, so
each run read is kept (bounded, least recently used first out) and only the events after
the last one known are asked for again."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from datetime import datetime
from typing import Any

from loom_core import subjects
from loom_core.contracts import (
    EventRecord,
    RunEventsQuery,
    RunEventsReply,
    RunRequested,
    RunSummary,
    TracesQuery,
    TracesReply,
    UsageQuery,
    UsageReply,
)
from loom_infra import bus
from loom_infra.client import LoomClient, LoomError

CACHED_RUNS = 32  # runs whose events stay in memory (a 10,000-event run is ~10 MB)
MAX_EVENTS = 200_000  # a run longer than this is shown up to here (paged reads stay exact)


class RunSource:
    def __init__(self, client: LoomClient) -> None:
        self.client = client
        self._events: OrderedDict[str, list[EventRecord]] = OrderedDict()
        self._labels: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def events(self, run_id: str) -> list[EventRecord]:
        """Every stored event of the run (``[]``: no such run), the new ones read."""
        lock = self._locks.setdefault(run_id, asyncio.Lock())
        async with lock:
            known = self._events.pop(run_id, [])
            after = known[-1].seq if known else 0
            if len(known) < MAX_EVENTS:
                async for record in self.client.iter_events(run_id, after_seq=after):
                    known.append(record)
                    if len(known) >= MAX_EVENTS:
                        break
            if known:
                self._events[run_id] = known
                while len(self._events) > CACHED_RUNS:
                    old, _ = self._events.popitem(last=False)
                    self._locks.pop(old, None)
            return known

    async def events_page(
        self, run_id: str, after: int, limit: int
    ) -> tuple[list[EventRecord], int | None]:
        """One page straight from the executor (what the event list shows)."""
        query = RunEventsQuery(run_id=run_id, after_seq=after, limit=limit)
        reply = await bus.request(
            self.client.nc, subjects.API_RUN_EVENTS, query, RunEventsReply, 10.0
        )
        if reply.error is not None:
            raise LoomError(reply.error)
        return reply.events, reply.next_after_seq

    async def labels(self, run_id: str) -> dict[str, str]:
        """The run's labels, from its first event (asked once per run)."""
        if run_id in self._labels:
            return self._labels[run_id]
        events, _ = await self.events_page(run_id, 0, 1)
        first = events[0].event if events else None
        labels = dict(first.labels) if isinstance(first, RunRequested) else {}
        self._labels[run_id] = labels
        while len(self._labels) > 10_000:
            self._labels.popitem(last=False)
        return labels

    async def runs(
        self,
        limit: int,
        after: str,
        status: str | None,
        since: datetime | None = None,
        until: datetime | None = None,
        tool: str | None = None,
        model: str | None = None,
        error: str | None = None,
    ) -> tuple[list[RunSummary], str | None]:
        """A page of runs, newest first: the run list (loom.api.runs), or the traces
        query (loom.api.traces) when a time, tool, model or error filter is given."""
        if not any((since, until, tool, model, error)):
            return await self.client.runs_page(limit, status, after)
        query = TracesQuery(
            since=since, until=until, status=status, tool=tool, model=model, error=error,
            limit=limit, after=after,
        )  # fmt: skip
        reply = await bus.request(self.client.nc, subjects.API_TRACES, query, TracesReply, 10.0)
        if reply.error is not None:
            raise LoomError(reply.error)
        return reply.runs, reply.next_after

    async def usage_by_run(self, since: datetime | None) -> dict[str, dict[str, Any]]:
        """Tokens and cost per run started since ``since`` (loom.api.traces.usage)."""
        query = UsageQuery(by="run", since=since, limit=1000)
        reply = await bus.request(
            self.client.nc, subjects.API_TRACES_USAGE, query, UsageReply, 10.0
        )
        if reply.error is not None:
            raise LoomError(reply.error)
        return {
            row.key: {"input_tokens": row.input_tokens, "output_tokens": row.output_tokens,
                      "cost_usd": row.cost_usd}
            for row in reply.rows
        }  # fmt: skip
