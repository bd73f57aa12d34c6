"""Working memory under contention: 8 OS processes x 100 updates of one document, each a
compare-and-set that re-reads and retries on a conflict. None is lost: the final version
is 800 and the document holds every update exactly once (SQLite and PostgreSQL)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from loom_infra.settings import StoreSettings
from loom_infra.workingmemory import Conflict, WorkingMemoryStore

PROCESSES = 8
UPDATES = 100
KEY = "acme\x1fuser\x1falice"


def open_store(path: str | None, dsn: str | None) -> WorkingMemoryStore:
    return WorkingMemoryStore(Path(path) if path else None, dsn=dsn)


def writer(worker: int, path: str | None, dsn: str | None, start, out) -> None:
    store = open_store(path, dsn)
    start.wait()
    conflicts = 0
    for i in range(UPDATES):
        while True:
            current = store.current(KEY)
            version = current.version if current else 0
            doc = current.doc if current else {"applied": []}
            doc["applied"].append(f"{worker}:{i}")
            try:
                store.update(KEY, version, doc, by=f"worker-{worker}")
                break
            except Conflict:
                conflicts += 1  # reported to the caller, who retries from the current one
    store.close()
    out.put(conflicts)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_no_update_is_lost(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if kind == "sqlite":
        path, dsn = str(tmp_path / "working.db"), None
    else:
        settings: StoreSettings = request.getfixturevalue("pg_store_settings")
        path, dsn = None, settings.postgres_url
    open_store(path, dsn).close()  # schema first
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(PROCESSES)
    out = ctx.Queue()
    procs = [ctx.Process(target=writer, args=(w, path, dsn, start, out)) for w in range(PROCESSES)]
    for p in procs:
        p.start()
    conflicts = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    store = open_store(path, dsn)
    final = store.current(KEY)
    assert final is not None and final.version == PROCESSES * UPDATES
    applied = final.doc["applied"]
    assert len(applied) == len(set(applied)) == PROCESSES * UPDATES
    assert [v.version for v in store.history(KEY, limit=1000)] == list(range(1, 801))
    assert sum(conflicts) > 0  # they really raced
    store.close()
