"""Store micro-benchmark: the costs the executor and the relay pay per step.

    python bench/store_bench.py [--backend sqlite|postgres|both] [--iterations 300]
                                [--postgres-url postgresql://...]

Prints, per backend: append of one 5-event batch (one transaction; p50/p90/p99 ms),
last_seq, loading a 100-event run, and read_notifications(after, 500) throughput.
PostgreSQL: ``--postgres-url`` (or ``LOOM_POSTGRES_URL``) names a server on which a
scratch database is created and dropped; without one, the ``pgserver`` wheel is started
in a temporary directory. Durability is the stores' own (SQLite WAL with its default
synchronous mode; PostgreSQL with fsync and synchronous_commit on).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from loom_core.contracts import EventRecord, StepCompleted, StepScheduled, StepStarted
from loom_infra.settings import StoreSettings
from loom_infra.store import EventStore, open_event_store

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def events(run_id: str, start: int, count: int) -> list[EventRecord]:
    kinds = [
        StepScheduled(step_id="s"),
        StepStarted(step_id="s", attempt=1),
        StepCompleted(step_id="s", output={"value": 42, "text": "x" * 64}),
    ]
    return [
        EventRecord(
            run_id=run_id,
            seq=seq,
            at=T0 + timedelta(milliseconds=seq),
            event=kinds[seq % len(kinds)],
        )
        for seq in range(start, start + count)
    ]


def percentiles(samples_s: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples_s)
    q = statistics.quantiles(ms, n=100)
    return f"p50 {statistics.median(ms):.3f} ms  p90 {q[89]:.3f} ms  p99 {q[98]:.3f} ms"


def timed(fn: Callable[[], object], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def bench(store: EventStore, label: str, iterations: int) -> None:
    print(f"== {label}")
    seq = 0

    def append_batch() -> None:
        nonlocal seq
        store.append(events("bench-run", seq + 1, 5))
        seq += 5

    timed(append_batch, 20)  # warm up connections and statement caches
    cpu = time.process_time()
    samples = timed(append_batch, iterations)
    cpu_ms = (time.process_time() - cpu) * 1000 / iterations
    print(
        f"append 5-event batch    : {percentiles(samples)}  ({iterations} commits; "
        f"CPU {cpu_ms:.3f} ms each)"
    )
    runs = [0] * 50

    def append_wide() -> None:  # one step of 50 runs in one transaction (the writer's batch)
        batch = []
        for r, last in enumerate(runs):
            batch += events(f"wide-{r}", last + 1, 5)
            runs[r] = last + 5
        store.append(batch)

    timed(append_wide, 5)
    cpu = time.process_time()
    samples = timed(append_wide, max(20, iterations // 5))
    cpu_ms = (time.process_time() - cpu) * 1000 / max(20, iterations // 5)
    print(f"append 250 events/50 runs: {percentiles(samples)}  (CPU {cpu_ms:.3f} ms each)")

    samples = timed(lambda: store.last_seq("bench-run"), iterations)
    print(f"last_seq                : {percentiles(samples)}")

    store.append(events("run-100", 1, 100))
    samples = timed(lambda: store.load("run-100"), 100)
    print(f"load 100-event run      : {percentiles(samples)}")

    # Fill to >= 10,000 events with batches of 100 (20 runs at a time).
    n = 0
    while store.max_notification_id() < 10_000:
        store.append([e for r in range(20) for e in events(f"fill-{n}-{r}", 1, 5)])
        n += 1
    total = 0
    rounds = []
    for _ in range(3):
        after, read = 0, 0
        started = time.perf_counter()
        while page := store.read_notifications(after, 500):
            read += len(page)
            after = page[-1][0]
        rounds.append(time.perf_counter() - started)
        total = read
    best = min(rounds)
    print(
        f"read_notifications(,500): {total / best:,.0f} events/s "
        f"({total} events in {best * 1000:.1f} ms, best of 3; "
        f"{best / (total / 500) * 1000:.2f} ms/page)"
    )


@contextmanager
def sqlite_settings() -> Iterator[StoreSettings]:
    base = Path(tempfile.mkdtemp(prefix="loom-bench-"))
    try:
        yield StoreSettings(kind="sqlite", data_dir=base / "data")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def postgres_server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    base = Path(tempfile.mkdtemp(prefix="loom-bench-pg-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(base / "data", cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def postgres_settings(server_url: str) -> Iterator[StoreSettings]:
    import psycopg
    from psycopg import sql

    dbname = f"loom_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    url = urlunsplit(urlsplit(server_url)._replace(path=f"/{dbname}"))
    try:
        yield StoreSettings(kind="postgres", data_dir=Path("."), postgres_url=url)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--postgres-url", default=os.environ.get("LOOM_POSTGRES_URL"))
    args = parser.parse_args(argv)

    if args.backend in ("sqlite", "both"):
        with sqlite_settings() as settings, open_event_store(settings) as store:
            bench(store, "SQLite (WAL, one file per purpose)", args.iterations)
    if args.backend in ("postgres", "both"):
        with (
            postgres_server(args.postgres_url) as server_url,
            postgres_settings(server_url) as settings,
            open_event_store(settings) as store,
        ):
            bench(store, "PostgreSQL", args.iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
