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


def service_writer(worker: int, url: str, seed: str, start, out) -> None:
    """One OS process updating a working memory through the memory service (NATS)."""
    import asyncio

    from loom_core import subjects
    from loom_core.contracts import MemoryReply, MemoryRequest, Principal
    from loom_infra import bus
    from loom_infra.client import LoomClient

    alice = Principal(user_id="alice", via="operator", tenant="acme")

    async def main() -> int:
        client = await LoomClient.connect(url, seed=Path(seed), identity="operator")
        conflicts = 0

        async def ask(op: str, **args) -> MemoryReply:
            request = MemoryRequest(op=op, args=args, principal=alice)  # type: ignore[arg-type]
            return await bus.request(
                client.nc, subjects.API_MEMORY_OPERATOR, request, MemoryReply, timeout=30
            )

        start.wait()
        for i in range(UPDATES):
            while True:
                current = (await ask("working_get")).result
                doc = current["doc"] or {"applied": []}
                doc["applied"].append(f"{worker}:{i}")
                reply = await ask("working_set", doc=doc, expected_version=current["version"])
                if reply.error is None:
                    break
                assert reply.error.code == "conflict", reply.error
                conflicts += 1
        await client.close()
        return conflicts

    out.put(asyncio.run(main()))


async def test_no_update_is_lost_through_the_memory_service(
    sqlite_store_settings: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from loom_core.contracts import Principal
    from loom_infra.settings import Settings
    from loom_services.stack import LocalStack

    monkeypatch.setenv("LOOM_EMBEDDER", "hash")
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=sqlite_store_settings)
    async with LocalStack(settings, nats_port=-1, read_models="inline") as stack:
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(PROCESSES)
        out = ctx.Queue()
        seed = str(stack.seed_file("operator"))
        procs = [
            ctx.Process(target=service_writer, args=(w, stack.url, seed, start, out))
            for w in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        conflicts = [await asyncio.to_thread(out.get, True, 280) for _ in procs]
        for p in procs:
            await asyncio.to_thread(p.join, 60)
            assert p.exitcode == 0
        from loom_services.memory import MemoryService

        memory = next(s for s in stack.stack.services if isinstance(s, MemoryService))
        alice = Principal(user_id="alice", via="operator", tenant="acme")
        final = memory.open_store().working_get(alice)
        assert final["version"] == PROCESSES * UPDATES
        assert len(set(final["doc"]["applied"])) == PROCESSES * UPDATES
        assert sum(conflicts) > 0  # reported to the callers, who retried
