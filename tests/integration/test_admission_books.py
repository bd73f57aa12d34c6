"""The shared admission books (``loom_services.shared_admission``) against careless and
hostile states, through the real routes: a corrupt value in the bucket is recorded as a
reject and the book rebuilt from the store (no queued run lost); slots left behind by a
replica that died (its run ended, or was never stored) are freed by the sweep; a queue
past its bound refuses the submission, typed and retryable, storing nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_quotas import BOUND_S, approval, quick, settings  # type: ignore[import-not-found]
from waiting import eventually, having, until  # type: ignore[import-not-found]

from loom_core import codec, quotas, routes, subjects
from loom_core.contracts import AdmissionBook, AdmissionSlot, DeadLetter, RunCompleted
from loom_infra import bus
from loom_infra.client import LoomClient, LoomError
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

ONE = "tenants:\n  default:\n    max_concurrent_runs: 1\n"
KEY = "t-default"


async def as_executor(stack: LocalStack) -> object:
    """A connection with the executor's key: the only identity that may write a book."""
    assert stack.credentials is not None
    return await bus.connect(
        stack.settings.nats_url, "test-executor", persistent=False,
        seed=stack.credentials.seed_file("executor"), identity="executor",
    )  # fmt: skip


async def book(op: LoomClient) -> AdmissionBook | None:
    kv = await op.js.key_value(subjects.ADMISSION_BUCKET)
    try:
        return codec.decode((await kv.get(KEY)).value, AdmissionBook)
    except Exception:  # corrupt (not repaired yet) or absent
        return None


@pytest.mark.parametrize(
    "value",
    [
        b"\x00not a book",
        codec.encode(AdmissionBook(tenant="globex")),  # another tenant's
        codec.encode(
            AdmissionBook(tenant="default", running=[AdmissionSlot("a"), AdmissionSlot("a")])
        ),
    ],
    ids=["garbage", "other-tenant", "a-run-twice"],
)
async def test_a_corrupt_book_is_recorded_and_rebuilt_from_the_store(
    tmp_path: Path, value: bytes
) -> None:
    async with (
        LocalStack(settings(tmp_path, ONE), nats_port=-1) as stack,
        await stack.client() as op,
    ):
        holder = (await op.submit(approval())).run_id
        await until(op, holder, having("step_suspended"), BOUND_S)
        waiting = (await op.submit(quick())).run_id
        await until(op, waiting, having("run_queued"), BOUND_S)
        nc = await as_executor(stack)
        try:
            await nc.jetstream().publish(f"$KV.{subjects.ADMISSION_BUCKET}.{KEY}", value)  # type: ignore[attr-defined]
        finally:
            await nc.close()  # type: ignore[attr-defined]

        async def rebuilt() -> AdmissionBook | None:
            found = await book(op)
            ok = found is not None and [s.run_id for s in found.running] == [holder]
            return found if ok and [s.run_id for s in found.waiting] == [waiting] else None

        await eventually(rebuilt, "the book rebuilt from the store", BOUND_S)
        last = await op.js.get_last_msg(
            bus.REJECTS_STREAM, routes.REJECTED.subject(service="executor")
        )
        letter = codec.decode(last.data, DeadLetter)
        assert letter.error.code == "admission_book_corrupt"
        assert letter.error.details["key"] == KEY
        # nothing lost: the queued run starts once the holder ends
        await op.resume(holder, {"approved": True}, label="manager")
        records = await op.wait(waiting, timeout=BOUND_S)
        assert isinstance(records[-1].event, RunCompleted)


async def test_slots_of_runs_ended_or_never_stored_are_freed(tmp_path: Path) -> None:
    """What a replica killed at the wrong moment leaves behind: the slot of a run whose
    end it stored but did not free, and the booking of a run it never stored."""
    async with (
        LocalStack(settings(tmp_path, ONE), nats_port=-1) as stack,
        await stack.client() as op,
    ):
        ended = (await op.submit(quick())).run_id
        assert isinstance((await op.wait(ended, timeout=BOUND_S))[-1].event, RunCompleted)
        current = await book(op)
        assert current is not None and current.running == []
        leftover = AdmissionBook(
            tenant="default",
            running=[AdmissionSlot(ended, order=1), AdmissionSlot("never-stored", order=2,
                                                                  booked_at=time.time() - 3600)],
            next_order=current.next_order + 2,
        )  # fmt: skip
        nc = await as_executor(stack)
        try:
            kv = await nc.jetstream().key_value(subjects.ADMISSION_BUCKET)  # type: ignore[attr-defined]
            await kv.put(KEY, codec.encode(leftover))
        finally:
            await nc.close()  # type: ignore[attr-defined]
        late = (await op.submit(quick())).run_id
        records = await op.wait(late, timeout=BOUND_S)
        assert records[0].event.queued  # type: ignore[union-attr]  # both slots looked taken
        assert isinstance(records[-1].event, RunCompleted)  # the sweep freed them
        found = await book(op)
        assert found is not None and found.running == [] and found.waiting == []


async def test_a_queue_past_its_bound_refuses_typed_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quotas, "MAX_WAITING", 3)  # the bound, small enough to reach here
    async with (
        LocalStack(settings(tmp_path, ONE), nats_port=-1) as stack,
        await stack.client() as op,
    ):
        holder = (await op.submit(approval())).run_id
        await until(op, holder, having("step_suspended"), BOUND_S)
        queued = [(await op.submit(quick())).run_id for _ in range(3)]
        with pytest.raises(LoomError) as refused:
            await op.submit(msgspec_replace_run_id(quick(), "one-too-many"))
        error = refused.value.error  # type: ignore[attr-defined]
        assert error.code == "queue_full" and error.retryable
        assert error.details["waiting"] == 3
        assert await op.events("one-too-many") == []  # nothing stored
        await op.resume(holder, {"approved": True}, label="manager")
        for run_id in queued:
            assert isinstance((await op.wait(run_id, timeout=BOUND_S))[-1].event, RunCompleted)
        # the refused submission, retried, is accepted
        again = await op.submit(msgspec_replace_run_id(quick(), "one-too-many"))
        assert isinstance((await op.wait(again.run_id, timeout=BOUND_S))[-1].event, RunCompleted)


def msgspec_replace_run_id(request: object, run_id: str) -> object:
    import msgspec

    return msgspec.structs.replace(request, run_id=run_id)  # type: ignore[type-var]


async def test_a_repeated_submission_keeps_the_runs_slot(tmp_path: Path) -> None:
    """A client retrying its submission (same run id) gets the run it has; the run's
    slot stays held (a repeat is not a new booking to undo)."""
    async with (
        LocalStack(settings(tmp_path, ONE), nats_port=-1) as stack,
        await stack.client() as op,
    ):
        holder = msgspec_replace_run_id(approval(), "holder")
        await op.submit(holder)
        await until(op, "holder", having("step_suspended"), BOUND_S)
        again = await op.submit(holder)
        assert again.existing
        found = await book(op)
        assert found is not None and [s.run_id for s in found.running] == ["holder"]
        late = (await op.submit(quick())).run_id
        records = await until(op, late, having("run_queued"), BOUND_S)
        assert records[0].event.queued  # type: ignore[union-attr]


async def test_a_lost_book_is_rebuilt_from_the_partitions_a_replica_takes(
    tmp_path: Path,
) -> None:
    """The bucket lost the book while the stack was down (a KV purge, a new NATS): the
    executor taking its partitions at start books their live runs again from the store
    (the holder's slot, the queued run's place), so the queue goes on."""
    config = settings(tmp_path, ONE)
    async with LocalStack(config, nats_port=-1) as stack, await stack.client() as op:
        holder = (await op.submit(approval())).run_id
        await until(op, holder, having("step_suspended"), BOUND_S)
        waiting = (await op.submit(quick())).run_id
        await until(op, waiting, having("run_queued"), BOUND_S)
    async with LocalStack(config, nats_port=-1) as stack, await stack.client() as op:
        nc = await as_executor(stack)
        try:
            kv = await nc.jetstream().key_value(subjects.ADMISSION_BUCKET)  # type: ignore[attr-defined]
            await kv.purge(KEY)
        finally:
            await nc.close()  # type: ignore[attr-defined]
    # a third start finds no book at all: only the store says who runs and who waits
    async with LocalStack(config, nats_port=-1) as stack, await stack.client() as op:

        async def rebooked() -> bool:
            found = await book(op)
            return found is not None and (
                [s.run_id for s in found.running],
                [s.run_id for s in found.waiting],
            ) == ([holder], [waiting])

        await eventually(rebooked, "the live runs booked again", BOUND_S)
        await op.resume(holder, {"approved": True}, label="manager")
        records = await op.wait(waiting, timeout=BOUND_S)
        assert isinstance(records[-1].event, RunCompleted)
