"""The memory service (v1): each run's request and final output are appended to the
run's conversation thread, durably, and a thread can be listed.

Appends are idempotent by the source event id, so a redelivered event never adds a
second entry. The thread of a finished run is found from the run's first event
(asked of the executor when this process did not see it, e.g. after a restart).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from nats.aio.msg import Msg

from loom_core import codec, routes, subjects
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    RunCompleted,
    RunEventsQuery,
    RunEventsReply,
    RunRequested,
    ThreadEntry,
    ThreadQuery,
    ThreadReply,
)
from loom_infra import bus, endpoints
from loom_infra.blocking import Blocking
from loom_infra.client import is_stored
from loom_infra.settings import Settings
from loom_infra.store import ThreadStore, open_thread_store
from loom_services.runtime import ServiceContext, run_main

log = logging.getLogger("loom.memory")


class MemoryService:
    name: routes.Identity = "memory"

    def __init__(self, settings: Settings, threads: ThreadStore | None = None) -> None:
        self.settings = settings
        self.threads = threads or open_thread_store(settings.store)
        self.io = Blocking("memory-store")
        self.thread_of: OrderedDict[str, str] = OrderedDict()

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        await endpoints.serve(
            ctx.nc, ctx.rejects, routes.API_THREAD, self.name, self.on_thread_query
        )
        consumer = endpoints.durable(
            ctx.js, routes.RUN_EVENTS, self.name, "memory", handler=self.on_events, batch=64
        )
        ctx.spawn(consumer.run(ctx.stop), "memory-events")

    async def close(self) -> None:
        await self.io.close()
        self.threads.close()

    async def on_events(self, msgs: Sequence[Msg]) -> list[bool | BaseException]:
        results: list[bool | BaseException] = []
        for msg in msgs:  # in order: a run's request lands before its output
            try:
                record = codec.decode_event(msg.data)
            except Exception as exc:
                results.append(bus.Poison(bus.decode_error_info(exc)))
                continue
            try:
                await self.remember(record)
                results.append(True)
            except bus.Poison as poison:
                results.append(poison)
            except Exception as exc:
                results.append(exc)
        return results

    async def remember(self, record: EventRecord) -> None:
        event = record.event
        if isinstance(event, RunRequested):
            thread_id = event.thread_id or record.run_id
            self._note_thread(record.run_id, thread_id)
            content = event.request if event.request is not None else {"input": event.input}
            entry = ThreadEntry(
                role="user",
                content=content,
                run_id=record.run_id,
                at=record.at,
                source_event_id=record.event_id,
            )
        elif isinstance(event, RunCompleted):
            thread_id = await self._thread_for(record.run_id)
            entry = ThreadEntry(
                role="assistant",
                content=event.output,
                run_id=record.run_id,
                at=record.at,
                source_event_id=record.event_id,
            )
        else:
            return
        # With NATS credentials off anyone can publish on loom.run.>: remember only what
        # the executor stored (one query per run start and end, never per step).
        if not await is_stored(self.ctx.nc, record):
            raise bus.Poison(
                ErrorInfo(
                    code="not_stored",
                    message=f"{record.kind} {record.event_id} is not the event the executor "
                    "stored; it was not published by the relay and is not remembered",
                    path="$.event",
                )
            )
        await self.io(self.threads.append, thread_id, entry)

    def _note_thread(self, run_id: str, thread_id: str) -> None:
        self.thread_of[run_id] = thread_id
        if len(self.thread_of) > 10_000:
            self.thread_of.popitem(last=False)

    async def _thread_for(self, run_id: str) -> str:
        if run_id in self.thread_of:
            return self.thread_of[run_id]
        reply = await bus.request(
            self.ctx.nc,
            subjects.API_RUN_EVENTS,
            RunEventsQuery(run_id=run_id, limit=1),
            RunEventsReply,
        )
        first = reply.events[0].event if reply.events else None
        thread_id = (
            first.thread_id if isinstance(first, RunRequested) and first.thread_id else run_id
        )
        self._note_thread(run_id, thread_id)
        return thread_id

    async def on_thread_query(self, msg: Msg, query: ThreadQuery) -> ThreadReply:
        entries = await self.io(self.threads.list, query.thread_id)
        return ThreadReply(thread_id=query.thread_id, entries=entries)


def main() -> None:
    run_main(lambda settings: [MemoryService(settings)])


if __name__ == "__main__":
    main()
