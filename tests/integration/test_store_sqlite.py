"""The store contract on SQLite, plus what is particular to SQLite files."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from store_contract import StoreContract, run_events

from loom_infra.settings import StoreSettings, settings_from_env, store_settings_from_env
from loom_infra.store import StoreError, open_event_store, open_stores

pytestmark = pytest.mark.integration


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def store_settings(self, sqlite_store_settings: StoreSettings) -> StoreSettings:
        return sqlite_store_settings


def test_one_wal_file_per_purpose(sqlite_store_settings: StoreSettings) -> None:
    with open_stores(sqlite_store_settings) as stores:
        stores.events.append(run_events("run-a", count=1))
        stores.toolcalls.claim("k", "me", run_events("run-a", count=1)[0].at)
        stores.threads.list("t")
    data = sqlite_store_settings.data_dir
    for name in ("events.db", "toolcalls.db", "memory.db"):
        with sqlite3.connect(data / name) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal", name


def test_unusable_data_dir_is_a_store_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(StoreError) as caught:
        open_event_store(StoreSettings(kind="sqlite", data_dir=not_a_dir))
    assert caught.value.operation == "open event store"


_WORKER = textwrap.dedent(
    """
    import json, sys
    from datetime import UTC, datetime
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from store_contract import run_events
    from loom_infra.settings import StoreSettings
    from loom_infra.store import open_stores

    me, data_dir = sys.argv[1], Path(sys.argv[2])
    won = []
    with open_stores(StoreSettings(kind="sqlite", data_dir=data_dir)) as stores:
        print("ready", flush=True)
        sys.stdin.readline()  # start together
        for n in range(40):
            stores.events.append(run_events(f"{me}-{n}", count=2))
            if stores.toolcalls.claim(f"key-{n}", me, datetime(2026, 1, 1, tzinfo=UTC)):
                won.append(n)
    print(json.dumps(won), flush=True)
    """
)


def test_processes_sharing_the_files_wait_instead_of_failing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    here = str(Path(__file__).parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, name, str(data), here],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("p1", "p2")
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    won = [set(json.loads(out.strip().splitlines()[-1])) for out, _ in outputs]
    assert won[0].isdisjoint(won[1]) and won[0] | won[1] == set(range(40))
    with open_event_store(StoreSettings(kind="sqlite", data_dir=data)) as events:
        notifications = events.read_notifications(0, 1000)
        assert [nid for nid, _ in notifications] == list(range(1, 161))
        for name in ("p1", "p2"):
            for n in range(40):
                assert events.load(f"{name}-{n}") == run_events(f"{name}-{n}", count=2)


def test_store_settings_defaults() -> None:
    settings = store_settings_from_env({})
    assert settings == StoreSettings(kind="sqlite", data_dir=Path(".loom"), postgres_url=None)
    full = settings_from_env({})
    assert full.nats_url == "nats://127.0.0.1:4222"
    assert full.max_payload == 262_144
    assert full.http_allow_private == ()
    assert full.model is None
    custom = settings_from_env(
        {
            "LOOM_DATA_DIR": "/var/lib/loom",
            "LOOM_MAX_PAYLOAD": "1048576",
            "LOOM_HTTP_ALLOW_PRIVATE": " localhost, 10.0.0.0/8 ,,",
            "LOOM_MODEL": "openai/gpt-4o-mini",
        }
    )
    assert custom.store.data_dir == Path("/var/lib/loom")
    assert custom.max_payload == 1_048_576
    assert custom.http_allow_private == ("localhost", "10.0.0.0/8")
    assert custom.model == "openai/gpt-4o-mini"


def test_a_refused_append_leaves_the_writer_connection_usable(
    sqlite_store_settings: StoreSettings,
) -> None:
    """The executor's SQLite append (``store._sqlite_insert``, issue 10 hopcpu) writes
    without the library's context managers, on the writer connection it keeps
    (stackcpu): a batch refused halfway (its third event's position taken) stores none
    of it, leaves no transaction open on that connection, and the next append goes on
    with the next ids."""
    from loom_infra.store import ConcurrencyConflict

    events = open_event_store(sqlite_store_settings)
    try:
        first = events.append(run_events("run-a", 1, 2))
        clash = run_events("run-b", 1, 2) + run_events("run-a", 2, 1) + run_events("run-c", 1, 1)
        with pytest.raises(ConcurrencyConflict) as refused:
            events.append(clash)
        assert refused.value.run_ids == ("run-a",)
        assert [r.seq for r in events.load("run-b")] == [] and events.load("run-c") == []
        pool = events._recorder.datastore.pool
        assert not pool._loom_writer._sqlite_conn.in_transaction
        after = events.append(run_events("run-b", 1, 3))
        assert after == [first[-1] + 1, first[-1] + 2, first[-1] + 3]
    finally:
        events.close()


def test_the_append_waits_for_any_other_writer_and_its_connection_closes_with_the_store(
    sqlite_store_settings: StoreSettings,
) -> None:
    """The append keeps a writer connection of its own (issue 10, stackcpu) but takes the
    pool's writer lock for each commit, as every other writer of the file does (the
    relay's position through the pool): while another writer holds it, the append
    waits, and goes on once it is given back. Closing the store closes the connection."""
    import threading

    events = open_event_store(sqlite_store_settings)
    try:
        events.append(run_events("run-a", 1, 1))
        pool = events._recorder.datastore.pool
        held = pool._loom_writer._sqlite_conn
        other = pool.get_connection(is_writer=True)  # another writer, as the relay's
        finished = threading.Event()
        outcome: list[object] = []

        def append() -> None:
            try:
                outcome.append(events.append(run_events("run-a", 2, 1)))
            except Exception as exc:  # shown by the assertion below
                outcome.append(exc)
            finally:
                finished.set()

        worker = threading.Thread(target=append)
        worker.start()
        try:
            # bounded: the append must still be waiting for the lock after this long
            assert not finished.wait(0.3), outcome
        finally:
            pool.put_connection(other)
        assert finished.wait(10)
        worker.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], list), outcome
        assert [r.seq for r in events.load("run-a")] == [1, 2]
    finally:
        events.close()
    assert not hasattr(pool, "_loom_writer")
    with pytest.raises(sqlite3.ProgrammingError):
        held.execute("SELECT 1")
