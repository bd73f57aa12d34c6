"""How fast spans are rebuilt from events, whether a step's cost grows with the run, and
how fast a big trace is read back from the span store.

Builds a synthetic N-step run in memory (each step: scheduled, started, tool call
requested, completed, step completed), then prints
- spans rebuilt per second by ``build_spans`` over the whole run (and events/s);
- the cost of ``TraceBuilder.apply`` for the events of step 10 vs step N (median over
  passes): the target is that step 1,000 costs no more than ~1.2x step 10;
- per span store (SQLite, PostgreSQL): the latency of reading one run's trace of
  ``--trace-spans`` spans (10,000 by default; ``SpanStore.trace``, decoded records),
  and of the slowest-steps and usage queries over it (median and best of ``--queries``).

    .venv/bin/python bench/spans_bench.py [--steps 1000] [--passes 30]
        [--trace-spans 10000] [--queries 20] [--backend sqlite|postgres|both|none]
        [--postgres-url postgresql://...]

PostgreSQL: ``--postgres-url`` (or ``LOOM_POSTGRES_URL``) names a server on which a
scratch database is created and dropped; without one, a local server is started from
the ``pgserver`` wheel (or the system's binaries) in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from loom_core import codec, ids
from loom_core.contracts import (
    EventRecord,
    Plan,
    PlanAccepted,
    RunCompleted,
    RunEvent,
    RunRequested,
    SpanRecord,
    StepCompleted,
    StepScheduled,
    StepStarted,
    ToolCallCompleted,
    ToolCallRequested,
    ToolStep,
)
from loom_core.spans import TraceBuilder, build_spans
from loom_infra.settings import StoreSettings
from loom_infra.spanstore import SpanStore, open_span_store

RUN = "bench-run"
T0 = datetime(2026, 11, 2, tzinfo=UTC)


def synthetic_run(steps: int) -> tuple[list[EventRecord], list[range]]:
    """The run's records, and for each step the index range of its records."""
    plan = Plan(steps=[ToolStep(id=f"s{i}", tool="noop") for i in range(steps)], name="bench")
    events: list[RunEvent] = [RunRequested(plan=plan), PlanAccepted(plan=plan)]
    per_step: list[range] = []
    t = T0
    for i in range(steps):
        sid, key = f"s{i}", ids.idempotency_key(RUN, f"s{i}", 1)
        first = len(events)
        events += [
            StepScheduled(step_id=sid),
            StepStarted(step_id=sid, attempt=1),
            ToolCallRequested(
                step_id=sid, attempt=1, tool="noop", input={"i": i}, idempotency_key=key
            ),
            ToolCallCompleted(
                step_id=sid,
                attempt=1,
                idempotency_key=key,
                output=i,
                started_at=t,
                finished_at=t + timedelta(microseconds=300),
            ),
            StepCompleted(step_id=sid, output=i),
        ]
        per_step.append(range(first, len(events)))
        t += timedelta(milliseconds=1)
    events.append(RunCompleted(output=None))
    records = [
        EventRecord(run_id=RUN, seq=n, at=T0 + timedelta(microseconds=500 * n), event=e)
        for n, e in enumerate(events, start=1)
    ]
    return records, per_step


@contextmanager
def sqlite_settings() -> Iterator[StoreSettings]:
    base = Path(tempfile.mkdtemp(prefix="loom-spans-bench-"))
    try:
        yield StoreSettings(kind="sqlite", data_dir=base / "data")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def postgres_settings(url: str | None) -> Iterator[StoreSettings]:
    """A scratch database on ``url``'s server, or on a local server started for it."""
    import psycopg
    from psycopg import sql

    from loom_infra.localpg import start_local_postgres

    base = Path(tempfile.mkdtemp(prefix="loom-spans-bench-pg-"))
    stop = None
    try:
        if url is None:
            url, stop = start_local_postgres(base / "pg")
        dbname = f"loom_bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        try:
            db_url = urlunsplit(urlsplit(url)._replace(path=f"/{dbname}"))
            yield StoreSettings(kind="postgres", data_dir=base, postgres_url=db_url)
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(dbname)
                    )
                )
    finally:
        if stop is not None:
            stop()
        shutil.rmtree(base, ignore_errors=True)


def timed(fn: Callable[[], object], passes: int) -> tuple[float, float]:
    """(median, best) of ``passes`` calls, in ms."""
    samples = []
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples), min(samples)


def store_queries(name: str, store: SpanStore, target_spans: int, passes: int) -> None:
    """Store one run of ``target_spans`` spans (plus 50 small runs around it, so the
    queries select rather than scan one run) and time the queries."""
    steps = max(1, -(-(target_spans - 2) // 3))  # run + plan + 3 spans per step
    records, _ = synthetic_run(steps)
    spans = build_spans(records)
    builder = TraceBuilder(RUN)
    for rec in records:
        builder.apply(rec)
    t0 = time.perf_counter()
    store.save(RUN, records, spans, builder.summary)
    write_s = time.perf_counter() - t0
    small, _ = synthetic_run(10)
    for i in range(50):
        run_id = f"other-{i}"
        other = [EventRecord(run_id=run_id, seq=r.seq, at=r.at, event=r.event) for r in small]
        store.save(run_id, other, build_spans(other))
    got = store.trace(RUN)
    assert len(got) == len(spans), (len(got), len(spans))
    trace_ms = timed(lambda: store.trace(RUN), passes)
    slow_ms = timed(lambda: store.slowest_steps(limit=10), passes)
    usage_ms = timed(lambda: store.usage("tool"), passes)
    print(
        f"{name}: stored a {len(spans):,}-span trace in {write_s * 1000:.0f} ms "
        f"({len(spans) / write_s:,.0f} spans/s, one transaction)"
    )
    print(
        f"{name}: trace({len(spans):,} spans) median {trace_ms[0]:.1f} ms, "
        f"best {trace_ms[1]:.1f} ms; slowest_steps(10) median {slow_ms[0]:.1f} ms; "
        f"usage(by tool) median {usage_ms[0]:.1f} ms"
    )


def fold_cost(store: SpanStore, steps: int, batch_steps: int, label: str) -> None:
    """What the tracing service's live fold costs per step (CPU of this thread, so a
    noisy machine moves it little): each batch of ``batch_steps`` steps' events is
    decoded from its wire bytes, folded, and saved in one transaction, as
    ``TracingService._fold_run`` does with what one fetch brought (the service lingers
    ``FOLD_LINGER_S`` so a fetch holds ~10 steps of a sequential run)."""
    records, _ = synthetic_run(steps)
    wire = [codec.encode(r) for r in records]
    per_batch = 5 * batch_steps
    builder = TraceBuilder(RUN)
    cost = {"decode": 0.0, "apply": 0.0, "save": 0.0}
    clock = time.thread_time
    for at in range(0, len(wire), per_batch):
        t0 = clock()
        fresh = [codec.decode_event(data) for data in wire[at : at + per_batch]]
        t1 = clock()
        changed: dict[str, SpanRecord] = {}
        for record in fresh:
            for span in builder.apply(record):
                changed[span.span_id] = span
        summary = builder.summary
        t2 = clock()
        store.save(RUN, fresh, list(changed.values()), summary)
        t3 = clock()
        cost["decode"] += t1 - t0
        cost["apply"] += t2 - t1
        cost["save"] += t3 - t2
    parts = "  ".join(f"{k} {v * 1000 / steps:.4f}" for k, v in cost.items())
    total = sum(cost.values()) * 1000 / steps
    print(f"{label} fold, {batch_steps} steps a batch: {total:.4f} ms CPU/step ({parts})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--trace-spans", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both", "none"], default="both")
    parser.add_argument("--postgres-url", default=os.environ.get("LOOM_POSTGRES_URL"))
    parser.add_argument(
        "--fold-steps", type=int, default=3000,
        help="steps of the live-fold cost measure (0: skip)",
    )  # fmt: skip
    parser.add_argument("--fold-batch", type=int, default=11, help="steps per folded batch")
    args = parser.parse_args()
    if args.fold_steps:
        with sqlite_settings() as settings, open_span_store(settings) as store:
            fold_cost(store, args.fold_steps, args.fold_batch, "sqlite")
    rebuild(args.steps, args.passes)
    if args.backend in ("sqlite", "both"):
        with sqlite_settings() as settings, open_span_store(settings) as store:
            store_queries("sqlite", store, args.trace_spans, args.queries)
    if args.backend in ("postgres", "both"):
        with postgres_settings(args.postgres_url) as settings, open_span_store(settings) as store:
            store_queries("postgres", store, args.trace_spans, args.queries)


def rebuild(steps: int, passes: int) -> None:
    early = min(10, steps) - 1  # step 10, 0-based
    late = steps - 1

    records, per_step = synthetic_run(steps)

    # Whole-run rebuild throughput.
    rebuild_s: list[float] = []
    n_spans = 0
    for _ in range(passes):
        t0 = time.perf_counter()
        n_spans = len(build_spans(records))
        rebuild_s.append(time.perf_counter() - t0)
    best = min(rebuild_s)
    median = statistics.median(rebuild_s)

    # Per-step apply cost: time the events of step 10 and of the last step in full
    # incremental passes (the builder holds all earlier steps when the last one comes).
    early_ns: list[int] = []
    late_ns: list[int] = []
    for _ in range(passes):
        builder = TraceBuilder(RUN)
        for i, rec in enumerate(records):
            if i == per_step[early].start:
                t0 = time.perf_counter_ns()
                for r in records[per_step[early].start : per_step[early].stop]:
                    builder.apply(r)
                early_ns.append(time.perf_counter_ns() - t0)
            elif i == per_step[late].start:
                t0 = time.perf_counter_ns()
                for r in records[per_step[late].start : per_step[late].stop]:
                    builder.apply(r)
                late_ns.append(time.perf_counter_ns() - t0)
            elif i in per_step[early] or i in per_step[late]:
                continue
            else:
                builder.apply(rec)
        assert builder.summary.status == "completed"

    e_us = statistics.median(early_ns) / 1000
    l_us = statistics.median(late_ns) / 1000
    print(f"synthetic run: {steps} steps, {len(records)} events, {n_spans} spans")
    print(
        f"build_spans: median {median * 1000:.1f} ms, best {best * 1000:.1f} ms -> "
        f"{n_spans / median:,.0f} spans/s, {len(records) / median:,.0f} events/s (median)"
    )
    print(
        f"apply cost per step (5 events): step {early + 1}: {e_us:.1f} us, "
        f"step {late + 1}: {l_us:.1f} us, ratio {l_us / e_us:.2f} (target <= 1.2)"
    )


if __name__ == "__main__":
    main()
