"""The lean PostgreSQL append (issue 10): one call of the store's function, which sets
the lock timeout, takes the table's EXCLUSIVE lock and inserts the rows as column arrays,
in one statement (its own transaction). What it must keep: the lock (ids issued in
commit order, so a reader tailing the notification log never passes a row that commits
later), nothing stored of a conflicting batch, and no pooled connection left inside a
transaction."""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings

import psycopg
import pytest
from psycopg import sql
from store_contract import run_events
from waiting import eventually

from loom_infra.settings import StoreSettings
from loom_infra.store import ConcurrencyConflict, StoreError, open_event_store

pytestmark = pytest.mark.integration


def _sessions(url: str, column: str, like: str) -> int:
    """Other sessions of this database whose ``column`` is LIKE ``like``."""
    query = sql.SQL(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND {} LIKE %s"
    ).format(sql.Identifier(column))
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query, (like,)).fetchone()
    return row[0] if row else 0


def test_an_append_waits_for_the_table_lock_and_gets_a_later_id(
    pg_store_settings: StoreSettings,
) -> None:
    url = pg_store_settings.postgres_url
    assert url is not None
    with open_event_store(pg_store_settings) as events:
        events.append(run_events("run-a", count=1))  # tables made, connections warm
        # an uncommitted plain INSERT (ROW EXCLUSIVE): a row-level write alone would not
        # wait for it, only the append's own EXCLUSIVE table lock does
        holder = psycopg.connect(url)
        try:
            held_id = holder.execute(
                "INSERT INTO loom_events (originator_id, originator_version, topic, state) "
                "VALUES ('run-h', 1, 'x', '\\x00') RETURNING notification_id"
            ).fetchone()[0]  # type: ignore[index]  # RETURNING gives one row
            got: list[list[int]] = []
            writer = threading.Thread(target=lambda: got.append(events.append(run_events("run-b"))))
            writer.start()
            # the append waits for the uncommitted insert: its table lock is taken
            asyncio.run(
                eventually(
                    lambda: _sessions(url, "wait_event_type", "Lock") == 1,
                    "the append to wait on the table lock",
                )
            )
            assert not got
            holder.commit()
        finally:
            holder.close()
        writer.join(timeout=10)
        assert got and min(got[0]) > held_id  # issued after the holder committed
        assert got[0] == sorted(got[0]) and len(got[0]) == 5  # in the order given


def test_a_conflict_stores_nothing_and_leaves_no_connection_in_a_transaction(
    pg_store_settings: StoreSettings,
) -> None:
    url = pg_store_settings.postgres_url
    assert url is not None
    with open_event_store(pg_store_settings) as events:
        events.append(run_events("run-a", count=3))
        clash = run_events("run-b", count=2) + run_events("run-a", count=1)
        for _ in range(3):  # every pooled connection meets it
            with pytest.raises(ConcurrencyConflict) as caught:
                events.append(clash)
            assert caught.value.run_ids == ("run-a",)
        assert events.last_seq("run-b") == 0
        assert _sessions(url, "state", "idle in transaction%") == 0
        events.append(run_events("run-b", count=2))  # the same connections write again
        assert events.last_seq("run-b") == 2


def _loop_writer_pid(url: str) -> int | None:
    """The backend of the store's loop connection: the one session that ran the append
    function without a pool (the test's own sessions never call it)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND query LIKE '%loom_append%' "
            "ORDER BY backend_start DESC LIMIT 1"
        ).fetchone()
    return row[0] if row else None


def test_an_append_on_the_loop_stores_what_append_stores(
    pg_store_settings: StoreSettings,
) -> None:
    """The writer's append awaited on its loop (issue 10, pgloop): the same rows, ids in
    commit order after the pool's, the same conflict (nothing stored, the connection
    still writes), from one loop after another."""
    with open_event_store(pg_store_settings) as events:
        first = events.append(run_events("run-a", count=2))
        on_loop = asyncio.run(events.append_on_loop(run_events("run-a", start=3, count=3)))
        assert len(on_loop) == 3 and on_loop == sorted(on_loop) and min(on_loop) > max(first)
        assert [r.seq for r in events.load("run-a")] == [1, 2, 3, 4, 5]
        assert [r.event for r in events.load("run-a")] == [
            r.event for r in run_events("run-a", count=5)
        ]

        async def clash_then_write() -> list[int]:
            with pytest.raises(ConcurrencyConflict) as caught:
                await events.append_on_loop(run_events("run-b") + run_events("run-a", count=1))
            assert caught.value.run_ids == ("run-a",)
            return await events.append_on_loop(run_events("run-b", count=2))

        assert len(asyncio.run(clash_then_write())) == 2  # another loop: a new connection
        assert events.last_seq("run-b") == 2
        assert asyncio.run(events.append_on_loop([])) == []


def test_an_append_on_the_loop_after_its_connection_died_fails_retryable_then_reconnects(
    pg_store_settings: StoreSettings,
) -> None:
    """The server ends the loop's connection (a restart, a failover, an admin): that
    append is a retryable StoreError (the writer fails the batch and its senders retry),
    and the next one connects again."""
    url = pg_store_settings.postgres_url
    assert url is not None
    with open_event_store(pg_store_settings) as events:

        async def scenario() -> None:
            await events.append_on_loop(run_events("run-a", count=1))
            pid = _loop_writer_pid(url)
            assert pid is not None
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with pytest.raises(StoreError) as caught:
                await events.append_on_loop(run_events("run-a", start=2, count=1))
            assert caught.value.retryable and caught.value.operation == "append"
            await events.append_on_loop(run_events("run-a", start=2, count=1))

        asyncio.run(scenario())
        assert events.last_seq("run-a") == 2


def test_a_cancelled_append_on_the_loop_leaves_no_connection_behind(
    pg_store_settings: StoreSettings,
) -> None:
    """A cancel while the append waits for the table lock: the connection may be mid-
    statement, so it is closed (its session ends, the insert with it) and the next append
    opens another."""
    url = pg_store_settings.postgres_url
    assert url is not None
    with open_event_store(pg_store_settings) as events:
        events.append(run_events("run-a", count=1))
        holder = psycopg.connect(url)
        try:
            holder.execute(
                "INSERT INTO loom_events (originator_id, originator_version, topic, state) "
                "VALUES ('run-h', 1, 'x', '\\x00')"
            )

            async def cancelled() -> None:
                task = asyncio.ensure_future(events.append_on_loop(run_events("run-b")))
                await eventually(
                    lambda: _sessions(url, "wait_event_type", "Lock") == 1,
                    "the loop's append to wait on the table lock",
                )
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

            asyncio.run(cancelled())
        finally:
            holder.rollback()
            holder.close()
        asyncio.run(eventually(lambda: _sessions(url, "wait_event_type", "Lock") == 0, "no waiter"))
        assert events.last_seq("run-b") == 0
        assert len(asyncio.run(events.append_on_loop(run_events("run-b")))) == 5


def test_appends_on_the_loop_at_once_share_one_connection(
    pg_store_settings: StoreSettings,
) -> None:
    """Two appends awaited together before any connection exists: both store, in one
    connection (the second connect is closed, not dropped open)."""
    url = pg_store_settings.postgres_url
    assert url is not None
    with open_event_store(pg_store_settings) as events:
        events.append(run_events("run-0", count=1))  # the pool's own session, warm
        before = _sessions(url, "state", "%")

        async def together() -> list[list[int]]:
            return list(
                await asyncio.gather(
                    events.append_on_loop(run_events("run-a")),
                    events.append_on_loop(run_events("run-b")),
                )
            )

        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", ResourceWarning)
            stored = asyncio.run(together())
            gc.collect()
        # a second connection dropped open would be closed by its finalizer, which warns
        assert not [w for w in seen if issubclass(w.category, ResourceWarning)]
        assert [len(ids) for ids in stored] == [5, 5]
        assert events.last_seq("run-a") == events.last_seq("run-b") == 5
        assert _sessions(url, "state", "%") == before + 1
