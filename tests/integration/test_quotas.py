"""Quotas through the real routes (``loom_core.quotas``, ``loom_services.admission``):
a tenant at its concurrent run limit has its next runs recorded queued (visible as
``queued`` in the run list and in ``describe``'s statistics), they start highest
priority first and then in submission order as slots free, a queued run survives an
executor restart, and a submission over the tenant's rate is refused with a retry-after.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from waiting import eventually, having, until  # type: ignore[import-not-found]

from loom_cli.app import load_run_request
from loom_core.contracts import EventRecord, RunAdmitted, RunCompleted, RunQueued, RunRequest
from loom_core.stats import run_stats
from loom_infra.client import LoomClient, LoomError
from loom_infra.settings import Settings, StoreSettings
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BOUND_S = 30


def settings(tmp_path: Path, quotas: str, store: StoreSettings | None = None) -> Settings:
    path = tmp_path / "quotas.yaml"
    path.write_text(quotas)
    return Settings(
        nats_url="nats://127.0.0.1:4222",
        store=store or StoreSettings(kind="sqlite", data_dir=tmp_path / "data"),
        quotas_file=path,
    )


def quick(priority: int = 0, queue: str = "") -> RunRequest:
    hello = load_run_request(EXAMPLES / "hello-dag.yaml", [], None)
    return msgspec.structs.replace(hello, priority=priority, queue=queue)


def approval() -> RunRequest:
    return load_run_request(EXAMPLES / "approval.yaml", [], None)


async def listed_status(client: LoomClient, run_id: str) -> str | None:
    found = {r.run_id: r.status for r in await client.runs(limit=100)}
    return found.get(run_id)


async def admitted_at(client: LoomClient, run_id: str) -> EventRecord:
    records = await client.wait(run_id, timeout=BOUND_S)
    assert isinstance(records[-1].event, RunCompleted)
    return next(r for r in records if isinstance(r.event, RunAdmitted))


async def test_over_the_limit_runs_queue_and_start_by_priority_then_order(
    tmp_path: Path,
) -> None:
    limits = "tenants:\n  default:\n    max_concurrent_runs: 1\n"
    async with (
        LocalStack(settings(tmp_path, limits), nats_port=-1) as stack,
        await stack.client() as op,
    ):
        holder = (await op.submit(approval())).run_id
        await until(op, holder, having("step_suspended"), BOUND_S)
        first = (await op.submit(quick())).run_id
        urgent = (await op.submit(quick(priority=5))).run_id
        last = (await op.submit(quick())).run_id
        for run_id in (first, urgent, last):
            records = await until(op, run_id, having("run_queued"), BOUND_S)
            assert isinstance(records[1].event, RunQueued)
            assert records[0].event.queued  # type: ignore[union-attr]
            # describe (statistics from the events) and the run list say so
            assert run_stats(await op.events(run_id)).status == "queued"
            await eventually(
                lambda r=run_id: _is(listed_status(op, r), "queued"), f"{run_id} queued"
            )
        # nothing of theirs started while they waited
        assert not [r for r in await op.events(first) if r.kind == "step_started"]
        reply = await op.resume(holder, {"approved": True}, label="manager")
        assert reply.ok, reply.error
        admitted = {r: await admitted_at(op, r) for r in (first, urgent, last)}
        # one slot: each starts after the one before it ended
        by_time = sorted(admitted, key=lambda r: admitted[r].at)
        assert by_time == [urgent, first, last]
        await eventually(
            lambda: _is(listed_status(op, last), "completed"), "the last run listed done"
        )


async def _is(status: object, wanted: str) -> bool:
    return (await status) == wanted  # type: ignore[misc]


async def test_a_queued_run_survives_an_executor_restart(
    tmp_path: Path, store_settings: StoreSettings
) -> None:
    """On SQLite and PostgreSQL: the book is rebuilt from the store's notification log."""
    limits = "tenants:\n  '*':\n    max_concurrent_runs: 1\n"
    config = settings(tmp_path, limits, store_settings)
    async with LocalStack(config, nats_port=-1) as stack, await stack.client() as op:
        holder = (await op.submit(approval())).run_id
        await until(op, holder, having("step_suspended"), BOUND_S)
        waiting = (await op.submit(quick())).run_id
        await until(op, waiting, having("run_queued"), BOUND_S)
    # the whole stack stopped; a new one rebuilds who holds the slot and who waits
    async with LocalStack(config, nats_port=-1) as stack, await stack.client() as op:
        assert run_stats(await op.events(waiting)).status == "queued"
        also = (await op.submit(quick())).run_id  # behind the one already waiting
        await until(op, also, having("run_queued"), BOUND_S)
        reply = await op.resume(holder, {"approved": True}, label="manager")
        assert reply.ok, reply.error
        first, second = await admitted_at(op, waiting), await admitted_at(op, also)
        assert first.at < second.at


async def test_a_queue_has_its_own_limit_within_the_tenant(tmp_path: Path) -> None:
    limits = (
        "tenants:\n  default:\n    max_concurrent_runs: 5\n"
        "    queues:\n      batch: {max_concurrent_runs: 1}\n"
    )
    async with (
        LocalStack(settings(tmp_path, limits), nats_port=-1) as stack,
        await stack.client() as op,
    ):
        holder = (await op.submit(msgspec.structs.replace(approval(), queue="batch"))).run_id
        await until(op, holder, having("step_suspended"), BOUND_S)
        batch = (await op.submit(quick(queue="batch"))).run_id
        await until(op, batch, having("run_queued"), BOUND_S)
        # another queue of the tenant still has room
        other = (await op.submit(quick())).run_id
        records = await op.wait(other, timeout=BOUND_S)
        assert not any(isinstance(r.event, RunQueued) for r in records)
        await op.control(holder, "cancel")  # a cancelled run frees its slot too
        await admitted_at(op, batch)


async def test_submissions_over_the_rate_are_refused_with_a_retry_after(tmp_path: Path) -> None:
    limits = "tenants:\n  default:\n    submissions_per_s: 0.01\n    submission_burst: 2\n"
    async with (
        LocalStack(settings(tmp_path, limits), nats_port=-1) as stack,
        await stack.client() as op,
    ):
        await op.submit(quick())
        await op.submit(quick())
        with pytest.raises(LoomError) as refused:
            await op.submit(quick())
        info = refused.value.info
        assert info.code == "too_many_submissions" and info.retryable
        assert 0 < info.details["retry_after_s"] <= 100
        bad = msgspec.structs.replace(quick(), queue="no spaces allowed")
        with pytest.raises(LoomError) as refused:
            await op.submit(bad)
        assert refused.value.info.path == "$.queue"


async def test_tool_calls_over_the_tenants_rate_wait_and_the_wait_is_recorded(
    tmp_path: Path,
) -> None:
    from loom_core.contracts import Plan, ToolCallCompleted, ToolStep

    limits = "tenants:\n  default:\n    tool_calls_per_s: 4\n"
    naps = [ToolStep(id=f"nap{i}", tool="sleep", input={"seconds": 0}) for i in range(6)]
    async with (
        LocalStack(settings(tmp_path, limits), nats_port=-1) as stack,
        await stack.client() as op,
    ):
        accepted = await op.submit(RunRequest(plan=Plan(name="burst", steps=naps)))
        records = await op.wait(accepted.run_id, timeout=BOUND_S)
        assert isinstance(records[-1].event, RunCompleted)  # none failed for it
        calls = [r.event for r in records if isinstance(r.event, ToolCallCompleted)]
        assert len(calls) == 6 and any(c.throttled_ms > 0 for c in calls)
        # the token bucket's promise, whatever the arrival times: after a burst of 4,
        # call k starts no sooner than (k - 3) / 4 s after the first
        starts = sorted(c.started_at for c in calls if c.started_at is not None)
        for k in (4, 5):
            assert (starts[k] - starts[0]).total_seconds() >= (k - 3) / 4 - 0.05, starts


async def test_loom_run_puts_its_queue_and_priority_on_the_run(tmp_path: Path) -> None:
    """``loom run --queue batch --priority 3`` (a separate OS process, as a user runs it):
    the run is recorded in that queue with that priority; a bad queue name is refused
    with the field named and no traceback."""
    import asyncio
    import os
    import subprocess
    import sys

    from loom_core.contracts import RunRequested

    limits = "tenants:\n  default:\n    queues:\n      batch: {max_concurrent_runs: 2}\n"
    loom = str(Path(sys.executable).parent / "loom")
    async with (
        LocalStack(settings(tmp_path, limits), nats_port=-1) as stack,
        await stack.client() as op,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
        env.update(LOOM_NATS_URL=stack.url, LOOM_LOG_LEVEL="WARNING",
                   LOOM_CREDS_DIR=str(stack.settings.credentials_dir))  # fmt: skip

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run([loom, *args], env=env, capture_output=True, text=True,
                                  timeout=60, cwd=EXAMPLES.parent)  # fmt: skip
            assert "Traceback" not in done.stderr + done.stdout, done.stderr
            return done

        ran = await asyncio.to_thread(
            cli, "run", "examples/hello-dag.yaml", "--run-id", "cli-q1",
            "--queue", "batch", "--priority", "3", "-o", "json",
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        first = (await op.events("cli-q1"))[0].event
        assert isinstance(first, RunRequested)
        assert (first.queue, first.priority) == ("batch", 3)
        bad = await asyncio.to_thread(
            cli, "run", "examples/hello-dag.yaml", "--queue", "no.dots", "-o", "json"
        )
        assert bad.returncode != 0 and "queue" in (bad.stdout + bad.stderr), bad
