"""The SQLite event store checkpoints its WAL in a thread of its own
(``loom_infra.walcheckpoint``): the writer's connections never do (the executor commits
on its event loop), the log still starts over (it does not grow without bound), every
event stays readable, and closing the store stops the thread. Real SQLite files."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from store_contract import run_events
from waiting import eventually  # type: ignore[import-not-found]  # tests/integration on sys.path

from loom_infra import walcheckpoint
from loom_infra.settings import StoreSettings
from loom_infra.store import open_event_store

pytestmark = pytest.mark.integration

COMMITS = 3000  # ~9,000 log pages written: 2x the bound below if the log never restarted


def log_bytes(data_dir: Path) -> int:
    wal = data_dir / "events.db-wal"
    return wal.stat().st_size if wal.exists() else 0


def test_the_writer_never_checkpoints_and_the_log_stays_bounded(
    sqlite_store_settings: StoreSettings,
) -> None:
    data = sqlite_store_settings.data_dir
    store = open_event_store(sqlite_store_settings)
    checkpointer = store.checkpointer
    assert checkpointer is not None and checkpointer.alive
    records = run_events("run-w", count=COMMITS * 5)
    for i in range(COMMITS):
        store.append(records[i * 5 : i * 5 + 5])
    with store._recorder.datastore.get_connection(commit=True) as conn:  # the writer's
        assert conn._sqlite_conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    # the thread checkpointed, and the writer finished a checkpoint so the log restarted:
    # without that it held every commit (~36 MB here); with it ~1,000-1,300 pages
    assert checkpointer.checkpoints >= 5 and checkpointer.finished_on_loop >= 2
    assert log_bytes(data) < 8 * 1024 * 1024, log_bytes(data)
    assert [r.seq for r in store.load("run-w")] == list(range(1, COMMITS * 5 + 1))
    store.close()
    assert not checkpointer.alive
    assert not any(t.name == "sqlite-checkpoint" and t.is_alive() for t in threading.enumerate())
    with open_event_store(sqlite_store_settings) as reopened:
        assert len(reopened.load("run-w")) == COMMITS * 5


async def test_a_quiet_store_is_checkpointed_within_the_kick_interval(
    sqlite_store_settings: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer than KICK_COMMITS commits are checkpointed too (a trickle of steps must not
    leave its log to the next close)."""
    monkeypatch.setattr(walcheckpoint, "KICK_S", 0.05)
    with open_event_store(sqlite_store_settings) as store:
        store.append(run_events("run-q", count=5))
        checkpointer = store.checkpointer
        assert checkpointer is not None
        await eventually(
            lambda: checkpointer.checkpoints > 0 or None, "a checkpoint without a kick"
        )
