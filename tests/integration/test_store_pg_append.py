"""The lean PostgreSQL append (issue 10): one call of the store's function, which sets
the lock timeout, takes the table's EXCLUSIVE lock and inserts the rows as column arrays,
in one statement (its own transaction). What it must keep: the lock (ids issued in
commit order, so a reader tailing the notification log never passes a row that commits
later), nothing stored of a conflicting batch, and no pooled connection left inside a
transaction."""

from __future__ import annotations

import asyncio
import threading

import psycopg
import pytest
from psycopg import sql
from store_contract import run_events
from waiting import eventually

from loom_infra.settings import StoreSettings
from loom_infra.store import ConcurrencyConflict, open_event_store

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
