"""The tracing service: spans rebuilt from run events, stored, queryable, exported.

It folds every run event (``loom.run.>``) into that run's ``TraceBuilder`` and upserts
the spans the event changed; the events it saw are kept with the spans so a restart
refolds a run instead of losing it, and a rebuild (one run, or every run in a time
range) needs nothing but its own store. Span ids derive from the run, so a rebuild gives
the same spans and a backend that dedupes by id never sees duplicates.

Options (read at start by ``loom_infra.settings.trace_options_from_env``)
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
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

import msgspec
from nats.aio.msg import Msg

from loom_core import codec, ids, routes, subjects
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    RebuildTracesQuery,
    RebuildTracesReply,
    RunEventsQuery,
    RunEventsReply,
    RunsQuery,
    RunsReply,
    RunSummary,
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
from loom_core.spans import TraceBuilder, TraceOptions
from loom_core.waits import lift_runs
from loom_infra import bus, endpoints, paging
from loom_infra.blocking import Blocking
from loom_infra.cpu_priority import IdleWhileCaughtUp
from loom_infra.endpoints import ServiceError
from loom_infra.otlp import OtlpExporter, exporter_for
from loom_infra.settings import Settings, otlp_settings_from_env
from loom_infra.spanstore import SpanStore, micros, open_span_store, run_key
from loom_services import tenants
from loom_services.runtime import ServiceContext, run_main

log = logging.getLogger("loom.tracing")
LIVE = ("running", "suspended")  # run statuses a child run can change (lift_runs)

MAX_BUILDERS = 2_000
EXPORT_RETRY_S = 5.0  # how long to wait before retrying a failed export
EXPORT_BATCH = 512  # spans per OTLP request
# Events folded per fetch, and how long the consumer waits after a smaller batch before
# fetching again: spans lag the run by up to that (a read model), and each fetch, fold
# and SQLite transaction serves many steps instead of one (issue 10, perf3: tracing was
# ~0.8 ms of CPU per hop step, on the same cores as the step's path). 50 ms, not 20:
# a sequential run's batch grows from ~16 steps to ~28, and each fetch, thread hop and
# commit (~0.3 ms of CPU) is shared by that many steps (docs/decisions.md,
# "Performance, seventh part").
FOLD_BATCH = 256
FOLD_LINGER_S = 0.05
# the durable it folds from (declared in loom_core.routes), acked once per fold batch
FOLD_DURABLE = routes.RUN_EVENTS.consumer("tracing").durable or "tracing-fold"
EXPORT_MAX_ATTEMPTS = 3  # refusals of one span before it is given up
HISTORY_PAGE = 1000  # events per request to the executor
MAX_QUERY_LIMIT = 10_000
TRACE_CHUNK = 256  # spans read from the store per query while filling a trace page
DLQ_ORIGIN = "otlp-export"

Q = TypeVar("Q")
R = TypeVar("R")


def _bad_cursor(cursor: str, what: str) -> ServiceError:
    return ServiceError(
        ErrorInfo(
            code="bad_cursor",
            message=f"{cursor[:80]!r} is not a {what} page cursor: pass a reply's "
            "next_after unchanged, or '' for the first page",
            path="$.after",
        )
    )


def _span_cursor_key(cursor: str) -> tuple[int, str]:
    """(start in µs, span id) from a trace page cursor (``{start ISO}|{span id}``)."""
    start, sep, span_id = cursor.rpartition("|")
    try:
        if not sep or not span_id:
            raise ValueError(cursor)
        return micros(datetime.fromisoformat(start)), span_id
    except ValueError:
        raise _bad_cursor(cursor, "trace") from None


def _run_cursor_key(cursor: str) -> tuple[int, str] | None:
    """The keyset of a runs page cursor (None: from the newest run)."""
    if not cursor:
        return None
    try:
        return paging.parse_keyset_cursor(cursor)
    except ValueError:
        raise _bad_cursor(cursor, "runs") from None


class TracingService:
    name: routes.Identity = "tracing"

    def __init__(
        self,
        settings: Settings,
        store: SpanStore | None = None,
        exporter: OtlpExporter | None = None,
        options: TraceOptions | None = None,
    ) -> None:
        self.settings = settings
        self.options = options if options is not None else settings.trace
        self.store = store or open_span_store(settings.store)
        if exporter is None:  # OTEL_EXPORTER_OTLP_*: read at this service's start only
            exporter = exporter_for(otlp_settings_from_env())
        self.exporter = exporter
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
        # SCHED_IDLE while the folds keep up, when the embedded stack started this
        # process so (loom_infra.cpu_priority); a batch's worth of events still waiting
        # after a batch, or its first event stored a second ago, means behind: the
        # normal policy until it has caught up
        self.priority = IdleWhileCaughtUp(FOLD_BATCH)

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        nc = ctx.nc
        for route, handler in (
            (routes.API_RUNS, self.on_runs_query),
            (routes.API_TRACE, self.on_trace_query),
            (routes.API_TRACES, self.on_traces_query),
            (routes.API_TRACES_SLOWEST, self.on_slowest_query),
            (routes.API_TRACES_USAGE, self.on_usage_query),
            (routes.API_TRACES_REBUILD, self.on_rebuild_query),
        ):
            await endpoints.serve(nc, ctx.rejects, route, self.name, handler)
        consumer = endpoints.durable(
            ctx.js, routes.RUN_EVENTS, self.name, FOLD_DURABLE, handler=self.on_events,
            batch=FOLD_BATCH, linger_s=FOLD_LINGER_S, ack_all=True,
        )  # fmt: skip
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
        if msgs and self.priority.managed:
            age_s = (time.time_ns() - bus.stored_at_ns(msgs[0])) / 1e9
            self.priority.saw(bus.num_pending(msgs[-1]), age_s)
        results: list[bool | BaseException] = [True] * len(msgs)
        by_run: OrderedDict[str, list[tuple[int, EventRecord]]] = OrderedDict()
        for i, msg in enumerate(msgs):
            try:
                record = codec.decode_event(msg.data)
            except Exception as exc:
                results[i] = bus.Poison(bus.decode_error_info(exc))
                continue
            by_run.setdefault(record.run_id, []).append((i, record))
        async with self._fold_lock:
            outcome = await self._fold(by_run)
        for i, result in outcome.items():
            results[i] = bus.Poison(result) if isinstance(result, ErrorInfo) else result
        self._export_wake.set()
        return results

    async def _fold(
        self, by_run: OrderedDict[str, list[tuple[int, EventRecord]]]
    ) -> dict[int, ErrorInfo | BaseException]:
        """Fold each run's new events on its own: what one run's events do (a history
        that cannot be read, a store error, a bug) never fails another run's. Returns,
        by message index, those refused (ErrorInfo: dead-lettered with the reason) and
        those to retry (the exception: only that run's messages are redelivered)."""
        outcome: dict[int, ErrorInfo | BaseException] = {}
        for run_id, indexed in by_run.items():
            try:
                outcome.update(await self._fold_run(run_id, indexed))
            except Exception as exc:
                log.warning(
                    "tracing: folding run %s failed (%r); its %d event(s) are retried, "
                    "other runs go on",
                    run_id,
                    exc,
                    len(indexed),
                )
                self.builders.pop(run_id, None)  # it may hold half of what failed
                outcome.update((i, exc) for i, _ in indexed)
        return outcome

    async def _fold_run(
        self, run_id: str, indexed: list[tuple[int, EventRecord]]
    ) -> dict[int, ErrorInfo]:
        """Fold one run's new events; returns the messages refused (by index), why.

        The read model folds only what the relay published: a run's history from seq 1,
        contiguous. When a batch does not simply continue what was folded (a run seen
        for the first time, a gap, an event for a seq already folded but different), the
        events are taken from the executor (the system of record) instead of the bus;
        events it does not hold, and runs it does not know, are refused. An event whose
        spans could not be built is folded (the failure is an event on the run's span)
        and dead-lettered with the reason, so it is seen."""
        refused: dict[int, ErrorInfo] = {}
        builder, last = await self._builder(run_id)
        indexed.sort(key=lambda item: item[1].seq)
        fresh = [r for _, r in indexed if r.seq > last]
        conflict = await self._conflicts(run_id, indexed, last)
        if not fresh and not conflict:
            return refused  # redelivered events already folded
        if last == 0 or conflict or fresh[0].seq != last + 1 or _gaps(fresh):
            fresh, wrong = await self._checked(run_id, indexed, last)
            refused.update(wrong)
            if last and any(r.seq <= last for r in fresh):  # folded a forgery: refold
                await self._refold(run_id, fresh)
                return refused
            if not fresh:
                return refused
        changed: dict[str, SpanRecord] = {}
        failed: dict[int, ErrorInfo] = {}
        for record in fresh:
            for span in builder.apply(record):
                changed[span.span_id] = span
            if builder.last_error is not None:
                log.error("tracing: %s", builder.last_error.message)
                failed[record.seq] = builder.last_error
        # events, spans and summary in one transaction: a crash between them would
        # leave events whose span changes are never reported again
        await self.io(self.store.save, run_id, fresh, list(changed.values()), builder.summary)
        self._cache(run_id, builder)
        for i, record in indexed:
            if record.seq in failed and i not in refused:
                refused[i] = failed[record.seq]
        return refused

    async def _conflicts(
        self, run_id: str, indexed: list[tuple[int, EventRecord]], last: int
    ) -> bool:
        """Does any event at or below the folded ``last`` differ from the one folded (a
        forged event got folded first, and the real one arrives now)?"""
        old = [r for _, r in indexed if r.seq <= last]
        if not old:
            return False
        kept = {r.seq: r for r in await self.io(self.store.events, run_id)}
        return any(r.seq in kept and codec.encode(kept[r.seq]) != codec.encode(r) for r in old)

    async def _checked(
        self, run_id: str, indexed: list[tuple[int, EventRecord]], last: int
    ) -> tuple[list[EventRecord], dict[int, ErrorInfo]]:
        """The run's events from the executor (all of them when something folded here
        may be wrong, else those after ``last``), and the bus messages it does not hold."""
        history = await self._history(run_id, 0)
        stored = {codec.encode(r) for r in history}
        wrong: dict[int, ErrorInfo] = {}
        for i, record in indexed:
            if codec.encode(record) in stored:
                continue
            reason = "unknown_run" if not history else "not_stored"
            wrong[i] = ErrorInfo(
                code=reason,
                message=f"run event {record.event_id} ({record.kind}) is not in the executor's "
                + ("store: no such run" if not history else "history of the run")
                + "; the read model folds only stored events",
                details={"run_id": run_id, "seq": record.seq, "kind": record.kind},
            )
            log.warning("tracing refused %s: %s", record.event_id, wrong[i].message)
        kept = await self.io(self.store.events, run_id) if last else []
        clean = len(kept) == last and all(
            codec.encode(a) == codec.encode(b) for a, b in zip(kept, history, strict=False)
        )
        return ([r for r in history if r.seq > last] if clean else history), wrong

    async def _refold(self, run_id: str, history: list[EventRecord]) -> None:
        """Replace a run's trace with one folded from ``history`` (the executor's)."""
        log.warning("tracing: run %s held an event the executor never stored; refolded", run_id)
        builder = self._new_builder(run_id)
        for record in history:
            builder.apply(record)
        await self.io(
            self.store.replace_trace, run_id, builder.spans(), builder.summary, list(history)
        )
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

    async def _catch_up(self, run_id: str) -> None:
        """Before a run's trace is read: fold what the executor stored of it beyond what
        this read model folded (the consumer lingers up to FOLD_LINGER_S between folds,
        so a trace asked for right after a run ended would miss its last steps). For a
        run being folded now (its builder in memory), and for a run this read model has
        not seen at all (its consumer may be behind, e.g. idle while the machine is busy:
        ``loom_infra.cpu_priority``); any other was folded whole, or the consumer is
        catching up on it anyway. The events come from the system of record; their
        stream copies, when they arrive, are already folded. Best effort: if the
        executor does not answer, the trace is read as it is."""
        cached = self.builders.get(run_id)
        if cached is None and await self.io(self.store.run_tenant, run_id) is not None:
            return
        try:
            records = await self._history(run_id, 0 if cached is None else cached[1])
        except Exception as exc:
            log.debug("tracing: catching up %s before a read failed: %r", run_id, exc)
            return
        if records:
            async with self._fold_lock:
                await self._fold_run(run_id, list(enumerate(records)))

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
            if reply.error is not None:
                skipped = _unreadable_seq(reply.error, after_seq)
                if skipped is not None:
                    # An event no reply can carry (over the broker's max_payload: the
                    # relay skipped it too and its run failed for it). The trace goes
                    # on without it; waiting would hold this run's events forever.
                    log.warning(
                        "tracing: event %d of run %s cannot be read (%s); its trace goes "
                        "on without it",
                        skipped,
                        run_id,
                        reply.error.code,
                    )
                    after_seq = skipped
                    continue
                # not "no such run": the events are retried rather than judged on it
                raise RuntimeError(f"executor history of {run_id}: {reply.error.message}")
            events.extend(reply.events)
            if reply.next_after_seq is None:  # pages are byte-bounded: short is not last
                return events
            after_seq = reply.next_after_seq

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

    async def on_runs_query(self, msg: Msg, query: RunsQuery) -> RunsReply:
        """One page of runs, newest first, after the cursor; bounded in count and bytes.
        A parent whose child waits on a person is stored "running" (its own events
        cannot tell): its children decide (loom_core.waits.lift_runs, people docs), so
        the status filter applies after lifting and a page may come back short."""
        limit, after = _limit(query.limit), _run_cursor_key(query.after)
        statuses: list[str] | None = None if query.status is None else [query.status]
        if query.status in ("suspended", "running"):
            statuses = ["suspended", "running"]
        rows = await self.io(self.store.runs, limit + 1, statuses, after, tenants.caller(msg))
        more, rows = len(rows) > limit, rows[:limit]
        lifted = {r.run_id: r for r in await lift_runs(rows, self._own_summary, None, len(rows))}
        kept = [
            (row, lifted[row.run_id])
            for row in rows
            if query.status is None or lifted[row.run_id].status == query.status
        ]
        page, cursor = self._runs_page(kept, limit, rows[-1] if more else None)
        return RunsReply(runs=page, next_after=cursor)

    def _runs_page(
        self,
        kept: Sequence[tuple[RunSummary, RunSummary]],
        limit: int,
        last_read: RunSummary | None,
    ) -> tuple[list[RunSummary], str | None]:
        """The (stored row, summary sent) pairs that fit one reply, and the cursor after
        them: the last one sent when the byte budget cut the page, else the last row
        read when the store holds more (``last_read``), else None."""
        assert self.ctx is not None
        max_payload = self.ctx.nc.max_payload or self.settings.max_payload
        page = paging.fill(
            kept, lambda pair: len(codec.encode(pair[1])), limit=limit, max_payload=max_payload
        )
        if page.too_large is not None:
            (_, run), size = page.too_large
            raise ServiceError(
                ErrorInfo(
                    code="summary_too_large",
                    message=f"the summary of run '{run.run_id}' is {size} bytes, more than "
                    f"one reply can carry (NATS max_payload {max_payload}); read that run "
                    "with `loom describe`",
                    path="$.after",
                    details={"run_id": run.run_id, "bytes": size, "max_payload": max_payload},
                )
            )
        if page.more:
            cursor: str | None = paging.keyset_cursor(*run_key(page.items[-1][0]))
        elif last_read is not None:
            cursor = paging.keyset_cursor(*run_key(last_read))
        else:
            cursor = None
        return [summary for _, summary in page.items], cursor

    async def _own_summary(self, run_id: str) -> RunSummary | None:
        """A run's summary from its own events (the cached builder, else the store's
        events folded here without caching: a query must not race the fold)."""
        cached = self.builders.get(run_id)
        if cached is not None:
            return cached[0].summary
        records = await self.io(self.store.events, run_id)
        if not records:
            return None
        builder = self._new_builder(run_id)
        for record in records:
            builder.apply(record)
        return builder.summary

    async def on_trace_query(self, msg: Msg, query: TraceQuery) -> TraceReply:
        """One page of the run's spans after the cursor, bounded by count and bytes so
        the reply always fits; ``next_after`` is the cursor of the next page. The cursor
        is the last span's (start, span id), the order spans are kept in: a span folded
        between two pages lands in a later page or, when it starts earlier, not in this
        reading (spans are only added or updated, never reordered). Only the page's
        rows are read from the store (a keyset range, a chunk at a time), never the
        whole trace."""
        caller = tenants.caller(msg)
        if not query.after and not query.rebuild:
            # first: a run the consumer has not reached yet has no tenant here yet
            # (folding what the executor stored discloses nothing: the check follows)
            await self._catch_up(query.run_id)
        if caller is not None and await self.io(self.store.run_tenant, query.run_id) != caller:
            # another tenant's run is answered as no run, before anything is rebuilt
            return TraceReply(
                run_id=query.run_id,
                error=ErrorInfo(code="not_found", message=f"no trace for run '{query.run_id}'"),
            )
        if query.rebuild and not query.after:  # the first page rebuilds, the rest read it
            records = await self._executor_history(query.run_id)
            await self.rebuild_run(query.run_id, records or None)
        after = _span_cursor_key(query.after) if query.after else None
        limit = max(1, min(query.limit, MAX_QUERY_LIMIT))
        assert self.ctx is not None
        max_payload = self.ctx.nc.max_payload or self.settings.max_payload
        chunk = min(limit + 1, TRACE_CHUNK)

        def read() -> paging.Page[SpanRecord]:
            spans = self.store.iter_trace(query.run_id, after, chunk)
            size = lambda s: len(codec.encode(s))  # noqa: E731
            return paging.fill(spans, size, limit=limit, max_payload=max_payload)

        page = await self.io(read)
        if page.too_large is not None:
            span, size = page.too_large
            raise ServiceError(
                ErrorInfo(
                    code="span_too_large",
                    message=f"span {span.span_id} ({span.name}) of run '{query.run_id}' is "
                    f"{size} bytes, more than one reply can carry (NATS max_payload "
                    f"{max_payload}); lower LOOM_TRACE_IO_LIMIT and rebuild the trace",
                    path="$.after",
                    details={"span_id": span.span_id, "bytes": size, "max_payload": max_payload},
                )
            )
        if not page.items and not query.after:
            return TraceReply(
                run_id=query.run_id,
                error=ErrorInfo(code="not_found", message=f"no trace for run '{query.run_id}'"),
            )
        last = page.items[-1] if page.items else None
        cursor = f"{last.start.isoformat()}|{last.span_id}" if page.more and last else None
        items = await self._lifted_run_span(query.run_id, page.items)
        return TraceReply(run_id=query.run_id, spans=items, next_after=cursor)

    async def _lifted_run_span(self, run_id: str, spans: list[SpanRecord]) -> list[SpanRecord]:
        """The run span's ``loom.run.status`` as ``loom runs`` shows the run: one waiting
        on a child that waits on a person is ``suspended``, which its own events (the
        stored span) cannot tell (``loom_core.waits.lift_runs``)."""
        root = ids.span_id(run_id, "run")
        for i, span in enumerate(spans):
            shown = span.attributes.get("loom.run.status")
            if span.span_id != root or span.end is not None or shown not in LIVE:
                continue
            own = await self._own_summary(run_id)
            if own is None or not any(w.kind == "sub_run" for w in own.waits):
                return spans
            (lifted,) = await lift_runs([own], self._own_summary, None, 1)
            if lifted.status == shown:
                return spans
            attrs = {**span.attributes, "loom.run.status": lifted.status}
            return [*spans[:i], msgspec.structs.replace(span, attributes=attrs), *spans[i + 1 :]]
        return spans

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

    async def on_traces_query(self, msg: Msg, q: TracesQuery) -> TracesReply:
        limit, after = _limit(q.limit), _run_cursor_key(q.after)
        runs = await self.io(
            lambda: self.store.traces(
                since=q.since,
                until=q.until,
                status=q.status,
                tool=q.tool,
                model=q.model,
                error=q.error,
                limit=limit + 1,
                after=after,
                tenant=tenants.caller(msg),
            )
        )
        more, runs = len(runs) > limit, runs[:limit]
        page, cursor = self._runs_page([(r, r) for r in runs], limit, runs[-1] if more else None)
        return TracesReply(runs=page, next_after=cursor)

    async def on_slowest_query(self, msg: Msg, q: SlowestStepsQuery) -> SlowestStepsReply:
        limit = _limit(q.limit)
        spans = await self.io(
            lambda: self.store.slowest_steps(
                since=q.since, until=q.until, tool=q.tool, limit=limit, tenant=tenants.caller(msg)
            )
        )
        return SlowestStepsReply(spans=spans)

    async def on_usage_query(self, msg: Msg, q: UsageQuery) -> UsageReply:
        limit = _limit(q.limit)
        rows = await self.io(
            lambda: self.store.usage(
                q.by, since=q.since, until=q.until, limit=limit, tenant=tenants.caller(msg)
            )
        )
        return UsageReply(by=q.by, rows=rows)

    async def on_rebuild_query(self, msg: Msg, q: RebuildTracesQuery) -> RebuildTracesReply:
        limit = _limit(q.limit)
        last: str | None = None
        if q.run_ids:
            run_ids = list(dict.fromkeys(q.run_ids))[:limit]
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


def _unreadable_seq(error: ErrorInfo, after_seq: int) -> int | None:
    """The seq of the event an events query could not carry (``event_too_large``), when
    it is the next one to read: reading goes on after it."""
    seq = error.details.get("seq") if error.code == "event_too_large" else None
    return seq if isinstance(seq, int) and seq > after_seq else None


def _gaps(records: Sequence[EventRecord]) -> bool:
    return any(b.seq != a.seq + 1 for a, b in zip(records, records[1:], strict=False))


def _limit(value: int) -> int:
    if value < 1:
        raise ServiceError(
            ErrorInfo(
                code="invalid_query",
                message=f"limit must be at least 1, got {value}",
                path="$.limit",
            )
        )
    return min(value, MAX_QUERY_LIMIT)


def main() -> None:
    run_main(lambda settings: [TracingService(settings)])


if __name__ == "__main__":
    main()
