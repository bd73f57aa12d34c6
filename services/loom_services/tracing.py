"""The tracing service: spans rebuilt from run events, stored, queryable, exported.

It folds every run event (``loom.run.>``) into that run's ``TraceBuilder`` and upserts
the spans the event changed; the events it saw are kept with the spans so a restart
refolds a run instead of losing it, and a rebuild (one run, or every run in a time
range) needs nothing but its own store. Span ids derive from the run, so a rebuild gives
the same spans and a backend that dedupes by id never sees duplicates.

Options (environment)
- ``LOOM_TRACE_CAPTURE_IO=1``: step inputs and outputs become span attributes
  (``loom.step.input`` / ``loom.step.output``), secrets redacted, truncated to
  ``LOOM_TRACE_IO_LIMIT`` bytes (default 4096). Rebuilds use the same options, so a
  rebuild equals the live trace; changing an option and rebuilding re-exports the runs.

OTLP export (when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set) reads spans not yet exported
from the store, so a collector that is down only delays spans: nothing is lost. A
collector that *refuses* data (HTTP 400/413, gRPC INVALID_ARGUMENT) must not block the
queue: the batch is halved until the refused span is alone, which is given up after
``export_max_attempts`` refusals: marked ``export_failed`` in the store, logged and sent
to the dead-letter stream (``loom.dlq.tracing``) with the span as payload.

Queries (request/reply): ``loom.api.runs`` (run list), ``loom.api.trace`` (one run's
spans; ``rebuild`` recomputes them from the executor's events and re-exports),
``loom.api.traces`` (runs filtered by status, time, tool, model, error),
``loom.api.traces.slowest``, ``loom.api.traces.usage`` and ``loom.api.traces.rebuild``
(bulk rebuild, a page of runs per request). They read this service's read model:
current as far as it has consumed the run streams.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from nats.aio.msg import Msg

from loom_core import codec, subjects
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    RebuildTracesQuery,
    RebuildTracesReply,
    RunEventsQuery,
    RunEventsReply,
    RunsQuery,
    RunsReply,
    SlowestStepsQuery,
    SlowestStepsReply,
    SpanRecord,
    TraceQuery,
    TraceReply,
    TracesQuery,
    TracesReply,
    UsageQuery,
    UsageReply,
)
from loom_core.spans import DEFAULT_IO_LIMIT, TraceBuilder, TraceOptions
from loom_infra import bus
from loom_infra.blocking import Blocking
from loom_infra.otlp import OtlpExporter, from_env
from loom_infra.settings import Settings, SettingsError
from loom_infra.spanstore import SpanStore, open_span_store
from loom_infra.store import StoreError
from loom_services.runtime import ServiceContext, run_main

log = logging.getLogger("loom.tracing")

MAX_BUILDERS = 2_000
EXPORT_RETRY_S = 5.0  # how long to wait before retrying a failed export
EXPORT_BATCH = 512  # spans per OTLP request
EXPORT_MAX_ATTEMPTS = 3  # refusals of one span before it is given up
HISTORY_PAGE = 1000  # events per request to the executor
MAX_QUERY_LIMIT = 10_000
DLQ_ORIGIN = "otlp-export"

Q = TypeVar("Q")
R = TypeVar("R")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def options_from_env(env: Mapping[str, str] = os.environ) -> TraceOptions:
    """``TraceOptions`` from ``LOOM_TRACE_CAPTURE_IO`` (1/true/yes/on or 0/false/no/off)
    and ``LOOM_TRACE_IO_LIMIT`` (bytes, >= 0, default 4096)."""
    raw = env.get("LOOM_TRACE_CAPTURE_IO", "").strip().lower()
    if raw not in _TRUE + _FALSE:
        raise SettingsError("LOOM_TRACE_CAPTURE_IO", f"must be 1 or 0 (true/false), got {raw!r}")
    raw_limit = env.get("LOOM_TRACE_IO_LIMIT", "").strip()
    limit = DEFAULT_IO_LIMIT
    if raw_limit:
        try:
            limit = int(raw_limit)
        except ValueError:
            limit = -1
        if limit < 0:
            raise SettingsError(
                "LOOM_TRACE_IO_LIMIT", f"must be a number of bytes >= 0, got {raw_limit!r}"
            )
    return TraceOptions(capture_io=raw in _TRUE, io_limit=limit)


class TracingService:
    name = "tracing"

    def __init__(
        self,
        settings: Settings,
        store: SpanStore | None = None,
        exporter: OtlpExporter | None = None,
        options: TraceOptions | None = None,
    ) -> None:
        self.settings = settings
        self.options = options if options is not None else options_from_env()
        self.store = store or open_span_store(settings.store)
        self.exporter = exporter if exporter is not None else from_env()
        self.io = Blocking("tracing-store")
        self.export_retry_s = EXPORT_RETRY_S
        self.export_batch = EXPORT_BATCH
        self.export_max_attempts = EXPORT_MAX_ATTEMPTS
        # counters (tests and logs): failed attempts with the collector unreachable,
        # refused requests, spans delivered, spans given up
        self.export_failures = 0
        self.export_rejections = 0
        self.exported_spans = 0
        self.export_given_up = 0
        self.builders: OrderedDict[str, tuple[TraceBuilder, int]] = OrderedDict()
        self._export_wake = asyncio.Event()
        # Folding and rebuilding one run must not interleave (a rebuild could otherwise
        # overwrite spans of an event folded meanwhile with older versions).
        self._fold_lock = asyncio.Lock()
        self.ctx: ServiceContext | None = None

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        nc = ctx.nc
        await nc.subscribe(subjects.API_RUNS, queue=self.name, cb=self.on_runs_query)
        await nc.subscribe(subjects.API_TRACE, queue=self.name, cb=self.on_trace_query)
        await nc.subscribe(subjects.API_TRACES, queue=self.name, cb=self.on_traces_query)
        await nc.subscribe(subjects.API_TRACES_SLOWEST, queue=self.name, cb=self.on_slowest_query)
        await nc.subscribe(subjects.API_TRACES_USAGE, queue=self.name, cb=self.on_usage_query)
        await nc.subscribe(subjects.API_TRACES_REBUILD, queue=self.name, cb=self.on_rebuild_query)
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
        if self.exporter is not None:
            self.exporter.close()

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
            async with self._fold_lock:
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
            await self.io(self.store.save, run_id, fresh, list(changed.values()), builder.summary)
            self._cache(run_id, builder)

    def _new_builder(self, run_id: str) -> TraceBuilder:
        return TraceBuilder(run_id, options=self.options)

    def _cache(self, run_id: str, builder: TraceBuilder) -> None:
        self.builders[run_id] = (builder, builder.last_seq)
        self.builders.move_to_end(run_id)
        while len(self.builders) > MAX_BUILDERS:
            self.builders.popitem(last=False)

    async def _builder(self, run_id: str) -> tuple[TraceBuilder, int]:
        cached = self.builders.get(run_id)
        if cached is not None:
            self.builders.move_to_end(run_id)
            return cached
        builder = self._new_builder(run_id)
        for record in await self.io(self.store.events, run_id):
            builder.apply(record)
        self._cache(run_id, builder)
        return builder, builder.last_seq

    async def _history(self, run_id: str, after_seq: int) -> list[EventRecord]:
        """The run's events after ``after_seq`` from the executor (the system of
        record), page by page."""
        assert self.ctx is not None
        events: list[EventRecord] = []
        while True:
            reply = await bus.request(
                self.ctx.nc,
                subjects.API_RUN_EVENTS,
                RunEventsQuery(run_id=run_id, after_seq=after_seq, limit=HISTORY_PAGE),
                RunEventsReply,
            )
            events.extend(reply.events)
            if reply.error is not None or len(reply.events) < HISTORY_PAGE:
                return events
            after_seq = reply.events[-1].seq

    # ------------------------------------------------------------------ rebuild

    async def rebuild_run(
        self, run_id: str, records: Sequence[EventRecord] | None = None
    ) -> tuple[list[SpanRecord], int]:
        """Refold one run from ``records`` (e.g. the executor's history) together with
        the events kept here, replace its stored trace and queue every span for export
        again. Returns the spans and how many differ from what was stored."""
        async with self._fold_lock:
            kept = await self.io(self.store.events, run_id)
            if records:
                # The given history may predate events folded since it was fetched:
                # take the union (by seq) so a rebuild never goes back in time.
                by_seq = {r.seq: r for r in kept}
                by_seq.update((r.seq, r) for r in records)
                records = [by_seq[seq] for seq in sorted(by_seq)]
            else:
                records = kept
            if not records:
                return [], 0
            builder = self._new_builder(run_id)
            for record in records:
                builder.apply(record)
            spans = builder.spans()
            changed = await self.io(
                self.store.replace_trace, run_id, spans, builder.summary, list(records)
            )
            self._cache(run_id, builder)
        self._export_wake.set()
        return spans, changed

    # ------------------------------------------------------------------ export

    async def _export_loop(self, stop: asyncio.Event) -> None:
        assert self.exporter is not None
        limit = self.export_batch
        while not stop.is_set():
            self._export_wake.clear()
            spans = await self.io(self.store.unexported, limit)
            if not spans:
                await bus.wait_or_timeout(self._export_wake, self.export_retry_s)
                continue
            result = await self.io(self.exporter.send, spans)
            dropped = set(result.dropped)
            if dropped:  # not representable in OTLP: never retried
                await self.io(
                    self.store.mark_export_failed, [s for s in spans if s.span_id in dropped]
                )
                self.export_given_up += len(dropped)
            if result.ok:
                await self.io(
                    self.store.mark_exported, [s for s in spans if s.span_id not in dropped]
                )
                self.exported_spans += result.sent
                limit = min(self.export_batch, limit * 2)
                continue
            if result.outcome == "rejected":
                self.export_rejections += 1
                if len(spans) > 1:  # isolate the refused span(s): halve the batch
                    limit = max(1, len(spans) // 2)
                    continue
                given_up = await self.io(
                    self.store.record_export_rejection, spans, self.export_max_attempts
                )
                if given_up:
                    await self._give_up(spans, result.message)
                    continue
                await bus.wait_or_timeout(stop, self.export_retry_s)
                continue
            self.export_failures += 1
            log.warning(
                "OTLP export of %d spans failed (%s); will retry", len(spans), result.message
            )
            await bus.wait_or_timeout(stop, self.export_retry_s)

    async def _give_up(self, spans: Sequence[SpanRecord], reason: str) -> None:
        """The collector refused these spans ``export_max_attempts`` times: say so loudly
        and keep them in the dead-letter stream (they stay in the store, marked)."""
        self.export_given_up += len(spans)
        for span in spans:
            error = ErrorInfo(
                code="export_rejected",
                message=(
                    f"the OTLP collector refused span {span.span_id} ({span.name!r}) of run "
                    f"{span.run_id} {self.export_max_attempts} times: {reason}; it is marked "
                    "export_failed in the trace store. Fix the collector or the span, then "
                    "`loom rebuild-traces` exports the run again"
                ),
                details={"run_id": span.run_id, "span_id": span.span_id},
            )
            log.error("%s", error.message)
            if self.ctx is None:
                continue
            try:
                await bus.dead_letter(self.ctx.js, self.name, DLQ_ORIGIN, error, codec.encode(span))
            except Exception:  # the log line above already says it; keep exporting
                log.exception("could not dead-letter span %s", span.span_id)

    # ------------------------------------------------------------------ queries

    async def _answer(
        self,
        msg: Msg,
        query_type: type[Q],
        handle: Callable[[Q], Awaitable[R]],
        failed: Callable[[ErrorInfo], R],
    ) -> None:
        """Decode, handle, reply; every failure becomes a reply with ``error``."""
        try:
            query = codec.decode(msg.data, query_type)
        except Exception as exc:
            reply: Any = failed(bus.decode_error_info(exc))
        else:
            try:
                reply = await handle(query)
            except StoreError as exc:
                reply = failed(
                    ErrorInfo(code="store_error", message=str(exc), retryable=exc.retryable)
                )
            except ValueError as exc:
                reply = failed(ErrorInfo(code="invalid_query", message=str(exc)))
            except Exception as exc:
                log.exception("query on %s failed", msg.subject)
                reply = failed(
                    ErrorInfo(code="internal_error", message=f"{type(exc).__name__}: {exc}")
                )
        data = codec.encode(reply)
        limit = self.ctx.nc.max_payload if self.ctx is not None else 0
        if limit and len(data) > limit:
            # NATS refuses to send it: the asker would only see a timeout.
            data = codec.encode(
                failed(
                    ErrorInfo(
                        code="reply_too_large",
                        message=(
                            f"the answer is {len(data)} bytes, over the NATS max_payload of "
                            f"{limit} bytes: ask for less (a lower limit, a narrower time "
                            "range), or raise the server's max_payload; a trace this large "
                            "can be read from the span store (loom_infra.spanstore)"
                        ),
                        details={"bytes": len(data), "max_payload": limit},
                    )
                )
            )
        await msg.respond(data)

    async def on_runs_query(self, msg: Msg) -> None:
        try:
            query = codec.decode(msg.data, RunsQuery)
        except Exception:
            query = RunsQuery()
        runs = await self.io(
            self.store.runs, max(1, min(query.limit, MAX_QUERY_LIMIT)), query.status
        )
        await msg.respond(codec.encode(RunsReply(runs=runs)))

    async def on_trace_query(self, msg: Msg) -> None:
        async def handle(query: TraceQuery) -> TraceReply:
            if query.rebuild:
                records = await self._executor_history(query.run_id)
                spans, _ = await self.rebuild_run(query.run_id, records or None)
            else:
                spans = await self.io(self.store.trace, query.run_id)
            if not spans:
                return TraceReply(
                    run_id=query.run_id,
                    error=ErrorInfo(code="not_found", message=f"no trace for run '{query.run_id}'"),
                )
            return TraceReply(run_id=query.run_id, spans=spans)

        await self._answer(
            msg, TraceQuery, handle, lambda error: TraceReply(run_id="", error=error)
        )

    async def _executor_history(self, run_id: str) -> list[EventRecord]:
        """The run's events from the executor; [] when it cannot answer (then a rebuild
        uses the events kept here)."""
        try:
            return await self._history(run_id, 0)
        except Exception as exc:
            log.warning(
                "no history of run %s from the executor (%r); using kept events", run_id, exc
            )
            return []

    async def on_traces_query(self, msg: Msg) -> None:
        async def handle(q: TracesQuery) -> TracesReply:
            runs = await self.io(
                lambda: self.store.traces(
                    since=q.since,
                    until=q.until,
                    status=q.status,
                    tool=q.tool,
                    model=q.model,
                    error=q.error,
                    limit=_limit(q.limit),
                )
            )
            return TracesReply(runs=runs)

        await self._answer(msg, TracesQuery, handle, lambda error: TracesReply(error=error))

    async def on_slowest_query(self, msg: Msg) -> None:
        async def handle(q: SlowestStepsQuery) -> SlowestStepsReply:
            spans = await self.io(
                lambda: self.store.slowest_steps(
                    since=q.since, until=q.until, tool=q.tool, limit=_limit(q.limit)
                )
            )
            return SlowestStepsReply(spans=spans)

        await self._answer(
            msg, SlowestStepsQuery, handle, lambda error: SlowestStepsReply(error=error)
        )

    async def on_usage_query(self, msg: Msg) -> None:
        async def handle(q: UsageQuery) -> UsageReply:
            rows = await self.io(
                lambda: self.store.usage(q.by, since=q.since, until=q.until, limit=_limit(q.limit))
            )
            return UsageReply(by=q.by, rows=rows)

        await self._answer(msg, UsageQuery, handle, lambda error: UsageReply(by="", error=error))

    async def on_rebuild_query(self, msg: Msg) -> None:
        async def handle(q: RebuildTracesQuery) -> RebuildTracesReply:
            limit = _limit(q.limit)
            last: str | None = None
            if q.run_ids:
                run_ids = list(dict.fromkeys(q.run_ids))
            else:
                run_ids = await self.io(
                    lambda: self.store.run_ids(
                        since=q.since, until=q.until, after=q.after_run_id, limit=limit
                    )
                )
                last = run_ids[-1] if len(run_ids) == limit else None
            runs = spans = changed = 0
            for run_id in run_ids:
                rebuilt, differ = await self.rebuild_run(run_id)
                if rebuilt:
                    runs += 1
                    spans += len(rebuilt)
                    changed += differ
            return RebuildTracesReply(runs=runs, spans=spans, changed=changed, last_run_id=last)

        await self._answer(
            msg, RebuildTracesQuery, handle, lambda error: RebuildTracesReply(error=error)
        )


def _limit(value: int) -> int:
    if value < 1:
        raise ValueError(f"limit must be at least 1, got {value}")
    return min(value, MAX_QUERY_LIMIT)


def main() -> None:
    run_main(lambda settings: [TracingService(settings)])


if __name__ == "__main__":
    main()
