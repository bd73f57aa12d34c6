"""Long runs load from a snapshot plus the events after it, not their whole history."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from waiting import eventually  # type: ignore[import-not-found]

import loom_services.runhost as run_host
from loom_core.contracts import (
    ApprovalStep,
    Plan,
    RunCompleted,
    RunRequest,
    StepSuspended,
    ToolStep,
)
from loom_infra.settings import StoreSettings
from loom_infra.store import open_event_store, open_snapshot_store
from loom_services.runtime import Stack
from loom_services.stack import LocalStack, all_services


async def latest_snapshot(stack: LocalStack, run_id: str) -> tuple[int, bytes]:
    """The run's newest snapshot, once written: snapshots are saved off the writer's
    loop, after the batch that crossed the interval (so a test waits for it)."""
    snapshots = open_snapshot_store(stack.settings.store)
    try:
        return await eventually(lambda: snapshots.latest(run_id), f"a snapshot of {run_id}")
    finally:
        snapshots.close()


pytestmark = pytest.mark.integration


async def test_a_restarted_executor_continues_a_run_from_its_snapshot(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_host, "SNAPSHOT_EVERY", 10)
    restored: list[int] = []
    real_restore = run_host.restore

    def spy(data: bytes) -> object:  # the executor rebuilt the run from a snapshot
        state = real_restore(data)
        restored.append(state.version)
        return state

    monkeypatch.setattr(run_host, "restore", spy)
    steps = [
        ToolStep(id=f"s{i}", tool="noop", depends_on=[f"s{i - 1}"] if i else []) for i in range(6)
    ]
    steps.append(ApprovalStep(id="ok", label="go", schema={"type": "boolean"}, depends_on=["s5"]))
    steps.append(ToolStep(id="after", tool="noop", depends_on=["ok"]))
    async with await stack.client() as client:
        accepted = await client.submit(RunRequest(plan=Plan(steps=steps)))
        async for record in client.follow(accepted.run_id, timeout=30):
            if isinstance(record.event, StepSuspended):
                break
        events = await client.events(accepted.run_id)
    assert len(events) > 20
    taken = await latest_snapshot(stack, accepted.run_id)
    # taken at the end of the batch whose events crossed a multiple of 10 (local noop
    # calls advance several steps per batch, so not on the multiple itself)
    assert taken is not None and taken[0] >= 20

    assert stack.stack is not None
    await stack.stack.close()  # every service stops: the actor is gone from memory
    stack.stack = Stack(all_services(stack.settings), stack.settings)
    await stack.stack.start()
    async with await stack.client() as client:
        reply = await client.resume(accepted.run_id, True, label="go", request_id="r")
        assert reply.ok, reply.error
        records = await client.wait(accepted.run_id, timeout=30)
    assert isinstance(records[-1].event, RunCompleted)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert taken[0] in restored  # loaded from the snapshot, then only the events after it


async def test_a_snapshot_that_no_longer_restores_falls_back_to_the_history(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A deploy that changes the state's shape (or a damaged snapshot) used to make every
    run with a snapshot unloadable."""
    monkeypatch.setattr(run_host, "SNAPSHOT_EVERY", 5)
    steps = [
        ToolStep(id=f"s{i}", tool="noop", depends_on=[f"s{i - 1}"] if i else []) for i in range(4)
    ]
    steps.append(ApprovalStep(id="ok", label="go", schema={"type": "boolean"}, depends_on=["s3"]))
    async with await stack.client() as client:
        accepted = await client.submit(RunRequest(plan=Plan(steps=steps)))
        async for record in client.follow(accepted.run_id, timeout=30):
            if isinstance(record.event, StepSuspended):
                break
    taken = await latest_snapshot(stack, accepted.run_id)
    snapshots = open_snapshot_store(stack.settings.store)
    try:
        snapshots.save(accepted.run_id, taken[0] + 1, b'{"not": "a run state"}')
    finally:
        snapshots.close()
    assert stack.stack is not None
    await stack.stack.close()
    stack.stack = Stack(all_services(stack.settings), stack.settings)
    await stack.stack.start()
    async with await stack.client() as client:
        reply = await client.resume(accepted.run_id, True, label="go", request_id="r")
        assert reply.ok, reply.error
        records = await client.wait(accepted.run_id, timeout=30)
    assert isinstance(records[-1].event, RunCompleted)
    assert "not restored" in caplog.text


def test_snapshots_commit_without_fsync_in_large_pages_and_events_stay_durable(
    tmp_path: Path,
) -> None:
    """snapshots.db holds only a cache of the fold (taken after its events are durable):
    its commits skip the fsync (WAL + synchronous=NORMAL: consistent, may lose the newest)
    and a new file has 16 KB pages, checkpointed every 4 MB of log as before. events.db
    keeps synchronous=FULL."""
    settings = StoreSettings(kind="sqlite", data_dir=tmp_path)
    snapshots = open_snapshot_store(settings)
    events = open_event_store(settings)
    try:
        snapshots.save("run-1", 1000, b"{}" * 100_000)
        assert snapshots.latest("run-1") == (1000, b"{}" * 100_000)
        with snapshots._recorder.datastore.get_connection(commit=True) as conn:
            raw = conn._sqlite_conn
            assert raw.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
            assert raw.execute("PRAGMA page_size").fetchone()[0] == 16384
            assert raw.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 256  # 4 MB
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with events._recorder.datastore.get_connection(commit=True) as conn:  # type: ignore[attr-defined]  # the SQLite recorder has it; its base does not say
            assert conn._sqlite_conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        snapshots.close()
        events.close()


def test_an_existing_snapshot_file_keeps_its_pages_and_its_snapshots(tmp_path: Path) -> None:
    """A snapshots.db made with 4 KB pages (before) opens as it is: WAL keeps a file's page
    size, and its snapshots still load."""
    old = sqlite3.connect(tmp_path / "snapshots.db")
    old.execute("PRAGMA page_size=4096")
    old.execute("PRAGMA journal_mode=WAL")
    old.close()
    snapshots = open_snapshot_store(StoreSettings(kind="sqlite", data_dir=tmp_path))
    try:
        snapshots.save("run-1", 1000, b"[1]")
        assert snapshots.latest("run-1") == (1000, b"[1]")
        with snapshots._recorder.datastore.get_connection(commit=False) as conn:
            assert conn._sqlite_conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    finally:
        snapshots.close()
