"""Snapshot store size and load time of a long run, with pruning vs keeping every snapshot.

A foreach over many items (one no-op tool step each) is decided by the real executor in
memory, its events stored in a real event store, and a snapshot of its state saved every
SNAPSHOT_EVERY events exactly as the executor host does. The state grows with the
completed elements, so keeping every snapshot costs O(history x state) (issue 9: a
100k-item foreach left 3.3 GB); keeping the last ``LOOM_SNAPSHOTS_KEPT`` costs O(state).
The same snapshots go to two stores: one that keeps everything (the old behaviour) and
one with the default setting. Prints, for each: snapshots kept, bytes on disk, time spent
saving; then the load time of the run (latest snapshot + the events after it + fold +
verify, what ``RunHost._load`` does) and, for comparison, folding the whole history.

    python bench/snapshot_bench.py                     # ~100k events on SQLite
    python bench/snapshot_bench.py --store postgres --batch 20
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loom_core.contracts import (
    EventRecord,
    ForeachStep,
    Plan,
    PlanProposed,
    RunRequest,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_core.executor import SNAPSHOT_EVERY, advance, evolve, initial_state, snapshot
from loom_infra.localpg import start_local_postgres
from loom_infra.settings import StoreSettings
from loom_infra.store import EventStore, SnapshotStore, open_event_store, open_snapshot_store
from loom_services.runhost import _rebuild

T0 = datetime(2026, 1, 1, tzinfo=UTC)
KEEP_ALL = 10**9  # "keep every snapshot": the behaviour before pruning


def plan(items: int) -> Plan:
    body = [ToolStep(id="work", tool="noop", input={"n": "{{ item }}"})]
    return Plan(steps=[ForeachStep(id="each", items=list(range(items)), do=body)])


def decide(run_id: str, items: int, on_batch: Callable[[list[EventRecord], Any], None]) -> int:
    """Decide the whole run, calling ``on_batch(records, state)`` after each decision
    (one executor batch); returns the number of events."""
    the_plan = plan(items)
    state = initial_state(run_id)
    now = T0

    def send(message: Any) -> list[ToolCallRequested]:
        nonlocal now
        now += timedelta(milliseconds=1)
        before = state.version
        produced = advance(state, message, now)
        records = [
            EventRecord(run_id=run_id, seq=seq, at=now, event=event)
            for seq, event in enumerate(produced, start=before + 1)
        ]
        on_batch(records, state)
        return [e for e in produced if isinstance(e, ToolCallRequested)]

    send(RunRequest(plan=the_plan))
    pending = send(PlanProposed(run_id=run_id, plan=the_plan))
    while pending:
        req = pending.pop(0)
        pending += send(
            ToolResult(
                run_id=run_id, step_id=req.step_id, attempt=req.attempt,
                idempotency_key=req.idempotency_key, ok=True, started_at=now,
                finished_at=now, output={"ok": True},
            )
        )  # fmt: skip
    return state.version


def stored_bytes(settings: StoreSettings) -> tuple[int, str]:
    """Bytes the snapshots occupy, and how they split."""
    if settings.kind == "sqlite":
        db, wal = (settings.data_dir / f"snapshots.db{x}" for x in ("", "-wal"))
        sizes = [f.stat().st_size if f.exists() else 0 for f in (db, wal)]
        return sum(sizes), f"file {sizes[0] / 1e6:.1f} + WAL {sizes[1] / 1e6:.1f}"
    import psycopg

    assert settings.postgres_url is not None
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_total_relation_size('loom_snapshots'), "
            "sum(pg_column_size(state)), sum(length(state)) FROM loom_snapshots"
        ).fetchone()
    assert row is not None
    total, stored, raw = (int(x or 0) for x in row)
    return total, f"live rows {stored / 1e6:.1f} MB compressed from {raw / 1e6:.1f}"


def vacuum(settings: StoreSettings) -> None:
    if settings.kind == "postgres":
        import psycopg

        assert settings.postgres_url is not None
        with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
            conn.execute("VACUUM loom_snapshots")


def record(
    run_id: str,
    items: int,
    events: EventStore | None,
    stores: dict[str, SnapshotStore],
    batch: int = 2000,
) -> tuple[int, dict[str, float], int, int]:
    """Decide and store one run's events (when ``events``) and its snapshots (in each of
    ``stores``); returns (events, seconds saving per store, snapshots, largest bytes)."""
    saving = dict.fromkeys(stores, 0.0)
    saved = largest = 0
    pending: list[EventRecord] = []

    def on_batch(records: list[EventRecord], state: Any) -> None:
        nonlocal saved, largest
        pending.extend(records)
        if events is not None and len(pending) >= batch:
            events.append(pending)
            pending.clear()
        if any(r.seq % SNAPSHOT_EVERY == 0 for r in records):  # as RunHost._snapshot
            body = snapshot(state)
            for name, snaps in stores.items():
                t = time.perf_counter()
                snaps.save(run_id, state.version, body)
                saving[name] += time.perf_counter() - t
            saved += 1
            largest = max(largest, len(body))

    n = decide(run_id, items, on_batch)
    if events is not None and pending:
        events.append(pending)
    return n, saving, saved, largest


def load(events: EventStore, snaps: SnapshotStore, run_id: str) -> tuple[float, int]:
    """What RunHost._load does: latest snapshot, the events after it, then its rebuild
    (``runhost._rebuild``: decode, re-decide the tail, the collector paused)."""
    t = time.perf_counter()
    taken = snaps.latest(run_id)
    tail = events.load(run_id, taken[0] if taken else 0)
    state = _rebuild(run_id, taken[1] if taken else None, tail, True)
    assert state.divergence is None, state.divergence
    return time.perf_counter() - t, len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="approximate run length")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    # PostgreSQL: a batch of large events can hang forever in the library's pipelined
    # insert (psycopg pipeline mode; see docs/decisions.md): keep batches small there
    parser.add_argument("--batch", type=int, default=2000, help="events per append")
    # a second run shows the steady state: freed space is reused (SQLite at once,
    # PostgreSQL once vacuumed), so the pruned store stops growing
    parser.add_argument("--runs", type=int, default=2, help="runs one after the other")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="loom-snapbench-"))
    stop_pg = None
    try:
        if args.store == "postgres":
            url, stop_pg = start_local_postgres(base / "pg")
            before = StoreSettings(
                kind="postgres", data_dir=base, postgres_url=database(url, "keep_all"),
                snapshots_kept=KEEP_ALL,
            )  # fmt: skip
            after = StoreSettings(kind="postgres", data_dir=base, postgres_url=url)
        else:
            before = StoreSettings(kind="sqlite", data_dir=base / "before", snapshots_kept=KEEP_ALL)
            after = StoreSettings(kind="sqlite", data_dir=base / "after")
        settings = {"keep all (before)": before, "pruned (after)": after}

        probe = record("probe", 100, None, {})[0]
        items = max(1, round(args.events * 100 / probe))
        events = open_event_store(after)
        stores = {name: open_snapshot_store(s) for name, s in settings.items()}
        try:
            for run in range(1, args.runs + 1):
                run_id = f"long-{run}"
                t = time.perf_counter()
                n, saving, saved, largest = record(run_id, items, events, stores, args.batch)
                took = time.perf_counter() - t
                print(
                    f"run {run}: foreach of {items:,} items on {args.store}: {n:,} events "
                    f"decided and stored in {took:.1f} s; {saved} snapshots (every "
                    f"{SNAPSHOT_EVERY} events), the largest {largest / 1e6:.2f} MB"
                )
                for name, snaps in stores.items():
                    size, split = stored_bytes(settings[name])
                    load_s, tail = load(events, snaps, run_id)
                    print(
                        f"  {name:18} {len(snaps.taken(run_id)):>4} kept, {size / 1e6:7.1f} MB "
                        f"in the store ({split}); saving {1000 * saving[name]:.0f} ms in all; "
                        f"load {1000 * load_s:.0f} ms (snapshot + {tail} events after it + "
                        "fold + verify)"
                    )
                    vacuum(settings[name])  # between runs, as autovacuum would
            t = time.perf_counter()
            state = initial_state(run_id)
            for r in events.load(run_id):
                evolve(state, r.event, r.at)
            print(f"whole history read + fold (no snapshot): {time.perf_counter() - t:.2f} s")
        finally:
            events.close()
            for snaps in stores.values():
                snaps.close()
    finally:
        if stop_pg is not None:
            stop_pg()
        shutil.rmtree(base, ignore_errors=True)


def database(url: str, name: str) -> str:
    """A new database ``name`` on the server of ``url``; its URL."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    head, _, tail = url.partition("?")
    return head.rsplit("/", 1)[0] + f"/{name}" + (f"?{tail}" if tail else "")


if __name__ == "__main__":
    main()
