"""The storage contract, run on every backend.

Not collected by itself (the class name does not start with ``Test``): each backend's
test module subclasses :class:`StoreContract` and provides the ``store_settings`` fixture.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from loom_core.contracts import (
    EventRecord,
    Plan,
    PlanAccepted,
    RunCompleted,
    RunRequested,
    StepCompleted,
    StepScheduled,
    StepStarted,
    ThreadEntry,
    ToolCallCompleted,
    ToolCallRequested,
    ToolStep,
)
from loom_infra.settings import StoreSettings
from loom_infra.store import (
    ConcurrencyConflict,
    EventStore,
    StoreError,
    ThreadStore,
    ToolCallLedger,
    open_event_store,
    open_snapshot_store,
    open_stores,
    open_thread_store,
    open_tool_ledger,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WORKERS = 8
BARRIER_TIMEOUT_S = 30

R = TypeVar("R")


def run_events(run_id: str, start: int = 1, count: int = 5) -> list[EventRecord]:
    """Realistic events of one run with seq ``start .. start+count-1`` (cycling through the
    life of a one-step run)."""
    plan = Plan(
        steps=[ToolStep(id="fetch", tool="http_get", input={"url": "{{ input.url }}"})],
        name="fetch-one",
    )
    key = f"{run_id}:fetch:1"
    life = [
        RunRequested(plan=plan, input={"url": "https://example.com"}, labels={"team": "a"}),
        PlanAccepted(plan=plan),
        StepScheduled(step_id="fetch"),
        StepStarted(step_id="fetch", attempt=1),
        ToolCallRequested(
            step_id="fetch",
            attempt=1,
            tool="http_get",
            input={"url": "https://example.com"},
            idempotency_key=key,
            timeout_s=10.0,
        ),
        ToolCallCompleted(
            step_id="fetch",
            attempt=1,
            idempotency_key=key,
            output={"status": 200, "body": "ünïcode ✓"},
            started_at=T0,
            finished_at=T0 + timedelta(milliseconds=42),
        ),
        StepCompleted(step_id="fetch", output={"status": 200}),
        RunCompleted(output={"fetch": {"status": 200}}),
    ]
    return [
        EventRecord(
            run_id=run_id,
            seq=seq,
            at=T0 + timedelta(milliseconds=seq),
            event=life[(seq - 1) % len(life)],
        )
        for seq in range(start, start + count)
    ]


def entry(thread_id: str, n: int, source: str | None = None) -> ThreadEntry:
    return ThreadEntry(
        role="user" if n % 2 else "assistant",
        content={"text": f"message {n} of {thread_id}"},
        run_id=f"run-{n}",
        at=T0 + timedelta(seconds=n),
        source_event_id=source or f"run-{n}/{n}",
    )


def run_concurrently(workers: int, task: Callable[[int, threading.Barrier], R]) -> list[R]:
    """Run ``task(i, barrier)`` on ``workers`` threads; the barrier lines them up."""
    barrier = threading.Barrier(workers, timeout=BARRIER_TIMEOUT_S)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(task, i, barrier) for i in range(workers)]
        return [f.result(timeout=60) for f in futures]


class StoreContract:
    """Behaviour every store backend must have."""

    @pytest.fixture
    def store_settings(self) -> StoreSettings:
        raise NotImplementedError("a backend's test class provides store_settings")

    @pytest.fixture
    def events(self, store_settings: StoreSettings) -> Iterator[EventStore]:
        store = open_event_store(store_settings)
        yield store
        store.close()

    @pytest.fixture
    def ledger(self, store_settings: StoreSettings) -> Iterator[ToolCallLedger]:
        store = open_tool_ledger(store_settings)
        yield store
        store.close()

    @pytest.fixture
    def threads(self, store_settings: StoreSettings) -> Iterator[ThreadStore]:
        store = open_thread_store(store_settings)
        yield store
        store.close()

    @pytest.fixture
    def opener(
        self, store_settings: StoreSettings
    ) -> Iterator[Callable[[Callable[..., Any]], Any]]:
        """Opens extra store instances (each with its own connections, like another
        process or replica) and closes them after the test."""
        opened: list[Any] = []

        def open_(factory: Callable[[StoreSettings], Any]) -> Any:
            store = factory(store_settings)
            opened.append(store)
            return store

        yield open_
        for store in opened:
            store.close()

    # ----------------------------------------------------------------- events

    def test_append_then_load_round_trips_records(self, events: EventStore) -> None:
        records = run_events("run-a", count=8)
        ids = events.append(records)
        assert len(ids) == 8
        assert events.load("run-a") == records
        assert events.load("run-a", after_seq=3) == records[3:]
        assert events.load("run-a", after_seq=2, limit=2) == records[2:4]
        assert events.load("run-a", limit=1) == records[:1]
        assert events.load("run-a", after_seq=8) == []
        assert events.load("run-unknown") == []

    def test_append_of_several_runs_is_one_batch(self, events: EventStore) -> None:
        a, b = run_events("run-a", count=3), run_events("run-b", count=2)
        batch = [a[0], b[0], a[1], b[1], a[2]]
        ids = events.append(batch)
        assert ids == sorted(ids) and len(set(ids)) == 5
        assert events.load("run-a") == a
        assert events.load("run-b") == b
        assert [record for _, record in events.read_notifications(0, 100)] == batch

    def test_conflict_stores_nothing_and_names_the_run(self, events: EventStore) -> None:
        events.append(run_events("run-a", count=2))
        before = events.max_notification_id()
        batch = [*run_events("run-b", count=2), run_events("run-a", start=2, count=2)[0]]
        batch += run_events("run-c", count=1)
        with pytest.raises(ConcurrencyConflict) as caught:
            events.append(batch)
        assert caught.value.run_ids == ("run-a",)
        assert isinstance(caught.value, StoreError)
        assert events.load("run-b") == []
        assert events.load("run-c") == []
        assert events.load("run-a") == run_events("run-a", count=2)
        assert events.max_notification_id() == before
        assert len(events.read_notifications(0, 100)) == 2
        # The store stays usable, and new ids keep growing after a failed append.
        later = events.append(run_events("run-b", count=1))
        assert later[0] > before

    def test_appending_the_same_batch_twice_conflicts(self, events: EventStore) -> None:
        records = run_events("run-a", count=3)
        events.append(records)
        with pytest.raises(ConcurrencyConflict) as caught:
            events.append(records)
        assert caught.value.run_ids == ("run-a",)
        assert events.load("run-a") == records

    def test_a_batch_with_a_position_twice_is_refused(self, events: EventStore) -> None:
        record = run_events("run-a", count=1)[0]
        with pytest.raises(StoreError):
            events.append([record, record])
        assert events.load("run-a") == []

    def test_notification_ids_are_gap_free_in_append_order(self, events: EventStore) -> None:
        batches = [
            run_events("run-a", count=5),
            run_events("run-b", count=1),
            run_events("run-a", start=6, count=3),
            run_events("run-c", count=4),
        ]
        ids: list[int] = []
        for batch in batches:
            ids += events.append(batch)
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        notifications = events.read_notifications(0, 100)
        assert [nid for nid, _ in notifications] == ids
        assert [rec for _, rec in notifications] == [rec for batch in batches for rec in batch]
        assert events.max_notification_id() == ids[-1]

    def test_a_large_batch_is_stored_and_never_hangs(self, events: EventStore) -> None:
        # 2,000 events of ~300 bytes (and a few of 200 KB) deadlocked the PostgreSQL
        # recorder's pipelined insert while it held the table lock, stopping every writer.
        at = datetime(2026, 12, 4, tzinfo=UTC)
        small = [
            EventRecord(run_id=f"big-{i}", seq=1, at=at, event=RunCompleted(output="x" * 300))
            for i in range(2000)
        ]
        large = [
            EventRecord(run_id=f"huge-{i}", seq=1, at=at, event=RunCompleted(output="y" * 200_000))
            for i in range(4)
        ]
        for batch in (small, large):
            done: list[list[int]] = []
            worker = threading.Thread(target=lambda b=batch, out=done: out.append(events.append(b)))
            worker.daemon = True  # a hang must fail the test, not keep the process alive
            worker.start()
            worker.join(60)
            assert done, f"appending {len(batch)} events did not return within 60 s"
            assert len(done[0]) == len(batch) and done[0] == sorted(done[0])

    def test_read_notifications_pages(self, events: EventStore) -> None:
        for n in range(5):
            events.append(run_events(f"run-{n}", count=5))
        assert events.max_notification_id() > 0
        seen: list[tuple[int, EventRecord]] = []
        after, pages = 0, []
        while page := events.read_notifications(after, 10):
            pages.append(len(page))
            seen += page
            after = page[-1][0]
        assert pages == [10, 10, 5]
        assert [nid for nid, _ in seen] == sorted({nid for nid, _ in seen})
        assert [rec for _, rec in seen] == [
            rec for n in range(5) for rec in run_events(f"run-{n}", count=5)
        ]
        assert events.read_notifications(seen[-1][0], 10) == []
        assert events.read_notifications(seen[11][0], 3) == seen[12:15]

    def test_empty_store(self, events: EventStore) -> None:
        assert events.max_notification_id() == 0
        assert events.read_notifications(0, 10) == []
        assert events.last_seq("run-a") == 0
        assert events.append([]) == []

    def test_last_seq(self, events: EventStore) -> None:
        events.append(run_events("run-a", count=3))
        events.append(run_events("run-b", count=7))
        events.append(run_events("run-a", start=4, count=2))
        assert events.last_seq("run-a") == 5
        assert events.last_seq("run-b") == 7
        assert events.last_seq("run-c") == 0

    def test_position_is_monotonic_and_durable(
        self, events: EventStore, store_settings: StoreSettings
    ) -> None:
        assert events.position("relay") == 0
        events.set_position("relay", 5)
        assert events.position("relay") == 5
        events.set_position("relay", 3)
        assert events.position("relay") == 5
        events.set_position("relay", 5)
        assert events.position("relay") == 5
        events.set_position("relay", 9)
        events.set_position("tracer", 2)
        assert (events.position("relay"), events.position("tracer")) == (9, 2)
        events.append(run_events("run-a", count=2))
        events.close()
        with open_event_store(store_settings) as reopened:
            assert reopened.position("relay") == 9
            assert reopened.load("run-a") == run_events("run-a", count=2)

    def test_closed_store_raises_store_error(self, store_settings: StoreSettings) -> None:
        store = open_event_store(store_settings)
        store.close()
        with pytest.raises(StoreError, match="closed"):
            store.load("run-a")

    def test_stores_open_lazily_and_close_together(self, store_settings: StoreSettings) -> None:
        with open_stores(store_settings) as stores:
            assert stores.events is stores.events
            assert stores.toolcalls.claim("k", "me", T0)
            assert stores.threads.append("t", entry("t", 1))
            events = stores.events
        with pytest.raises(StoreError):
            events.last_seq("run-a")

    # ----------------------------------------------------------------- snapshots

    def test_only_the_newest_snapshots_of_a_run_are_kept(
        self, store_settings: StoreSettings
    ) -> None:
        # Issue 9: every snapshot of a run was kept (234 of one run, 3.3 GB)
        assert store_settings.snapshots_kept == 2  # the default
        with open_snapshot_store(store_settings) as snaps:
            for n in range(1, 11):
                snaps.save("run-a", 1000 * n, b"a%d" % n)
                assert len(snaps.taken("run-a")) == min(n, 2)
            snaps.save("run-b", 1000, b"b1")
            assert snaps.taken("run-a") == [9000, 10000]  # other runs untouched
            assert snaps.taken("run-b") == [1000]
            assert snaps.latest("run-a") == (10000, b"a10")
            snaps.save("run-a", 10000, b"again")  # the same position twice: first stays
            assert snaps.latest("run-a") == (10000, b"a10")
            assert snaps.taken("nobody") == [] and snaps.latest("nobody") is None

    def test_snapshots_kept_is_a_setting_and_a_smaller_one_catches_up(
        self, store_settings: StoreSettings
    ) -> None:
        five = dataclasses.replace(store_settings, snapshots_kept=5)
        with open_snapshot_store(five) as snaps:
            for n in range(1, 9):
                snaps.save("run-a", n, b"s")
            assert snaps.taken("run-a") == [4, 5, 6, 7, 8]
        with open_snapshot_store(store_settings) as snaps:  # back to 2: the next save prunes
            snaps.save("run-a", 9, b"s")
            assert snaps.taken("run-a") == [8, 9]

    def test_snapshot_storage_is_bounded_by_state_not_history(
        self, store_settings: StoreSettings
    ) -> None:
        # 60 snapshots of a growing 20-200 KB state: kept all, that is ~6.6 MB
        sizes = [20_000 + 3_000 * n for n in range(60)]
        with open_snapshot_store(store_settings) as snaps:
            for n, size in enumerate(sizes, start=1):
                snaps.save("run-a", 1000 * n, os.urandom(size))  # incompressible
                _reclaim(store_settings)  # what autovacuum does on PostgreSQL
            assert snaps.taken("run-a") == [59_000, 60_000]
        stored = _snapshot_bytes(store_settings)
        assert stored < 6 * max(sizes), f"{stored} bytes for 2 snapshots of <= {max(sizes)}"

    # ----------------------------------------------------------------- tool calls

    def test_ledger_claim_finish_get(self, ledger: ToolCallLedger) -> None:
        key = "run-a:fetch:1"
        assert ledger.get(key) is None
        assert ledger.claim(key, "toolrunner-1", T0) is True
        claimed = ledger.get(key)
        assert claimed is not None
        assert (claimed.key, claimed.status, claimed.owner) == (key, "claimed", "toolrunner-1")
        assert claimed.claimed_at == T0 and claimed.result is None
        assert ledger.claim(key, "toolrunner-2", T0 + timedelta(seconds=1)) is False
        ledger.finish(key, b'{"ok":true}')
        ledger.finish(key, b'{"ok":false}')  # a second finish changes nothing
        finished = ledger.get(key)
        assert finished is not None
        assert (finished.status, finished.owner, finished.result) == (
            "finished",
            "toolrunner-1",
            b'{"ok":true}',
        )
        assert finished.claimed_at == T0
        assert ledger.claim(key, "toolrunner-3", T0) is False

    def test_ledger_record_claims_and_finishes_at_once_first_wins(
        self, ledger: ToolCallLedger
    ) -> None:
        key = "run-a:noop:1"
        assert ledger.record(key, "toolrunner-1", T0, b'{"n":1}') is True
        assert ledger.record(key, "toolrunner-2", T0, b'{"n":2}') is False
        entry = ledger.get(key)
        assert entry is not None
        assert (entry.status, entry.owner, entry.result) == ("finished", "toolrunner-1", b'{"n":1}')
        # a claimed-but-unfinished key cannot be recorded over either
        assert ledger.claim("run-a:pay:1", "toolrunner-1", T0) is True
        assert ledger.record("run-a:pay:1", "toolrunner-2", T0, b"{}") is False
        pending = ledger.get("run-a:pay:1")
        assert pending is not None and pending.status == "claimed"

    def test_ledger_finish_without_claim_is_refused(self, ledger: ToolCallLedger) -> None:
        with pytest.raises(StoreError, match="never claimed"):
            ledger.finish("run-a:fetch:9", b"{}")
        assert ledger.get("run-a:fetch:9") is None

    def test_ledger_claims_exactly_once_under_concurrency(self, opener: Any) -> None:
        # Four ledger instances (own connections, like four tool-runner replicas), two
        # threads each, all claiming the same keys at the same moment.
        ledgers = [opener(open_tool_ledger) for _ in range(WORKERS // 2)]
        keys = [f"run-x:step:{n}" for n in range(5)]

        def claim_all(i: int, barrier: threading.Barrier) -> list[bool]:
            won = []
            for key in keys:
                barrier.wait()
                won.append(ledgers[i % len(ledgers)].claim(key, f"owner-{i}", T0))
            return won

        results = run_concurrently(WORKERS, claim_all)
        for k, key in enumerate(keys):
            winners = [i for i in range(WORKERS) if results[i][k]]
            assert len(winners) == 1, (key, winners)
            got = ledgers[0].get(key)
            assert got is not None and got.owner == f"owner-{winners[0]}"

    # ----------------------------------------------------------------- threads

    def test_thread_append_is_idempotent_by_source_event(self, threads: ThreadStore) -> None:
        e1, e2 = entry("t-1", 1), entry("t-1", 2)
        assert threads.append("t-1", e1) is True
        assert threads.append("t-1", e1) is False
        assert threads.append("t-1", e2) is True
        assert threads.append("t-1", e2) is False
        assert threads.list("t-1") == [e1, e2]
        # The same source event may be recorded in another thread.
        assert threads.append("t-2", e1) is True
        assert threads.list("t-2") == [e1]
        assert threads.list("t-unknown") == []

    def test_thread_ids_cannot_look_like_markers(self, threads: ThreadStore) -> None:
        with pytest.raises(StoreError):
            threads.append("~seen~x", entry("x", 1))

    def test_concurrent_thread_appends_all_land_in_order(self, opener: Any) -> None:
        stores = [opener(open_thread_store) for _ in range(WORKERS // 2)]
        per_worker = 10

        def append_many(i: int, barrier: threading.Barrier) -> list[bool]:
            store = stores[i % len(stores)]
            barrier.wait()
            return [
                store.append("shared", entry("shared", n, source=f"w{i}/{n}"))
                for n in range(per_worker)
            ]

        results = run_concurrently(WORKERS, append_many)
        assert all(all(r) for r in results)
        listed = stores[0].list("shared")
        assert len(listed) == WORKERS * per_worker
        assert len({e.source_event_id for e in listed}) == WORKERS * per_worker
        for i in range(WORKERS):
            mine = [e.source_event_id for e in listed if e.source_event_id.startswith(f"w{i}/")]
            assert mine == [f"w{i}/{n}" for n in range(per_worker)]

    def test_concurrent_redelivery_lands_once(self, opener: Any) -> None:
        stores = [opener(open_thread_store) for _ in range(WORKERS // 2)]
        first = entry("t", 0, source="run-1/1")
        stores[0].append("t", first)

        def redeliver(i: int, barrier: threading.Barrier) -> bool:
            barrier.wait()
            return stores[i % len(stores)].append("t", entry("t", 1, source="run-1/2"))

        assert sorted(run_concurrently(WORKERS, redeliver)) == [False] * (WORKERS - 1) + [True]
        assert stores[1].list("t") == [first, entry("t", 1, source="run-1/2")]


def _reclaim(settings: StoreSettings) -> None:
    """PostgreSQL: VACUUM the snapshot table, as autovacuum does now that its settings
    let it (SQLite reuses freed pages by itself)."""
    if settings.kind == "postgres":
        import psycopg

        assert settings.postgres_url is not None
        with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
            conn.execute("VACUUM loom_snapshots")
            options = conn.execute(
                "SELECT reloptions FROM pg_class WHERE relname = 'loom_snapshots'"
            ).fetchone()
            assert "autovacuum_vacuum_threshold=10" in (options[0] or [])


def _snapshot_bytes(settings: StoreSettings) -> int:
    """What the snapshots occupy: the SQLite file (+ WAL), or the table with its TOAST."""
    if settings.kind == "sqlite":
        files = [settings.data_dir / "snapshots.db", settings.data_dir / "snapshots.db-wal"]
        return sum(f.stat().st_size for f in files if f.exists())
    import psycopg

    assert settings.postgres_url is not None
    with psycopg.connect(settings.postgres_url) as conn:
        row = conn.execute("SELECT pg_total_relation_size('loom_snapshots')").fetchone()
    assert row is not None
    return int(row[0])
