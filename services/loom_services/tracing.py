"""The tracing service: spans rebuilt from run events, stored, queryable, exported.

It folds every run event (``loom.run.>``) into that run's ``TraceBuilder`` and upserts
the spans the event changed; the events it saw are kept with the spans so a restart
refolds a run instead of losing it. Span ids derive from the run, so a rebuild gives the
same spans and a backend that dedupes by id never sees duplicates.

OTLP export (when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set) reads spans not yet exported
from the store, so a collector that is down only delays spans: nothing is lost.

The run list (``loom runs``) is served from the run summaries kept here: it is a read
model of the run streams, current as far as this service has consumed them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence

from nats.aio.msg import Msg

from loom_core import codec, subjects
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    RunEventsQuery,
    RunEventsReply,
    RunsQuery,
    RunsReply,
    SpanRecord,
    TraceQuery,
    TraceReply,
)
from loom_core.spans import TraceBuilder, build_spans
from loom_infra import bus
from loom_infra.blocking import Blocking
from loom_infra.otlp import OtlpExporter, from_env
from loom_infra.settings import Settings
from loom_infra.spanstore import SpanStore, open_span_store
from loom_services.runtime import ServiceContext, run_main

log = logging.getLogger("loom.tracing")

MAX_BUILDERS = 2_000
EXPORT_RETRY_S = 5.0  # how long to wait before retrying a failed export


class TracingService:
    name = "tracing"

    def __init__(
        self,
        settings: Settings,
        store: SpanStore | None = None,
        exporter: OtlpExporter | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or open_span_store(settings.store)
        self.exporter = exporter if exporter is not None else from_env()
        self.io = Blocking("tracing-store")
        self.export_retry_s = EXPORT_RETRY_S
        self.export_failures = 0
        self.builders: OrderedDict[str, tuple[TraceBuilder, int]] = OrderedDict()
        self._export_wake = asyncio.Event()

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        await ctx.nc.subscribe(subjects.API_RUNS, queue=self.name, cb=self.on_runs_query)
        await ctx.nc.subscribe(subjects.API_TRACE, queue=self.name, cb=self.on_trace_query)
        consumer = bus.PullConsumer(
            js=ctx.js,
            service=self.name,
            stream=subjects.RUN_EVENTS_STREAM,
            durable="tracing",
            filter_subjects=[subjects.RUN_EVENTS_ALL],
            handler=self.on_events,
            batch=256,
        )
        ctx.spawn(consumer.run(ctx.stop), "tracing-events")
        if self.exporter is not None:
            ctx.spawn(self._export_loop(ctx.stop), "tracing-export")

    async def close(self) -> None:
        await self.io.close()
        self.store.close()

    # ------------------------------------------------------------------ folding

    async def on_events(self, msgs: Sequence[Msg]) -> list[bool | BaseException]:
        results: list[bool | BaseException] = [True] * len(msgs)
        by_run: OrderedDict[str, list[EventRecord]] = OrderedDict()
        for i, msg in enumerate(msgs):
            try:
                record = codec.decode_event(msg.data)
            except Exception as exc:
                results[i] = bus.Poison(bus.decode_error_info(exc))
                continue
            by_run.setdefault(record.run_id, []).append(record)
        try:
            await self._fold(by_run)
        except Exception as exc:
            log.exception("tracing batch failed")
            return [r if r is not True else exc for r in results]
        self._export_wake.set()
        return results

    async def _fold(self, by_run: OrderedDict[str, list[EventRecord]]) -> None:
        for run_id, records in by_run.items():
            builder, last = await self._builder(run_id)
            fresh = [r for r in sorted(records, key=lambda r: r.seq) if r.seq > last]
            if not fresh:
                continue
            if fresh[0].seq != last + 1:  # a gap: fetch the missing events from the store
                fresh = await self._history(run_id, last) or fresh
            changed: dict[str, SpanRecord] = {}
            for record in fresh:
                for span in builder.apply(record):
                    changed[span.span_id] = span
            # events, spans and summary in one transaction: a crash between them would
            # leave events whose span changes are never reported again
            await self.io(
                self.store.save, run_id, fresh, list(changed.values()), builder.summary
            )
            self.builders[run_id] = (builder, fresh[-1].seq)

    async def _builder(self, run_id: str) -> tuple[TraceBuilder, int]:
        cached = self.builders.get(run_id)
        if cached is not None:
            self.builders.move_to_end(run_id)
            return cached
        builder = TraceBuilder(run_id)
        seen = await self.io(self.store.events, run_id)
        for record in seen:
            builder.apply(record)
        entry = (builder, seen[-1].seq if seen else 0)
        self.builders[run_id] = entry
        if len(self.builders) > MAX_BUILDERS:
            self.builders.popitem(last=False)
        return entry

    async def _history(self, run_id: str, after_seq: int) -> list[EventRecord]:
        reply = await bus.request(
            self.ctx.nc,
            subjects.API_RUN_EVENTS,
            RunEventsQuery(run_id=run_id, after_seq=after_seq, limit=5000),
            RunEventsReply,
        )
        return reply.events

    # ------------------------------------------------------------------ export

    async def _export_loop(self, stop: asyncio.Event) -> None:
        assert self.exporter is not None
        while not stop.is_set():
            self._export_wake.clear()
            spans = await self.io(self.store.unexported, 512)
            if spans:
                ok = await self.io(self.exporter.export, spans)
                if ok:
                    await self.io(self.store.mark_exported, spans)
                    continue
                self.export_failures += 1
                log.warning("OTLP export of %d spans failed; will retry", len(spans))
                await bus.wait_or_timeout(stop, self.export_retry_s)
                continue
            await bus.wait_or_timeout(self._export_wake, self.export_retry_s)

    # ------------------------------------------------------------------ queries

    async def on_runs_query(self, msg: Msg) -> None:
        try:
            query = codec.decode(msg.data, RunsQuery)
        except Exception:
            query = RunsQuery()
        runs = await self.io(self.store.runs, query.limit, query.status)
        await msg.respond(codec.encode(RunsReply(runs=runs)))

    async def on_trace_query(self, msg: Msg) -> None:
        try:
            query = codec.decode(msg.data, TraceQuery)
        except Exception as exc:
            await msg.respond(codec.encode(TraceReply(run_id="", error=bus.decode_error_info(exc))))
            return
        if query.rebuild:
            events = await self._history(query.run_id, 0)
            spans = build_spans(events)
        else:
            spans = await self.io(self.store.trace, query.run_id)
        if not spans:
            reply = TraceReply(
                run_id=query.run_id,
                error=ErrorInfo(code="not_found", message=f"no trace for run '{query.run_id}'"),
            )
        else:
            reply = TraceReply(run_id=query.run_id, spans=spans)
        await msg.respond(codec.encode(reply))


def main() -> None:
    run_main(lambda settings: [TracingService(settings)])


if __name__ == "__main__":
    main()
