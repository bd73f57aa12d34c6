"""Issue 9 on a real stack: no oversized value reaches an event, and an event that cannot
be published anyway stops only its own run.

Reproduced on main first: a 200 KB run input passed six times to one ``echo`` step
rendered a 1.2 MB ``tool_call_requested``; the relay failed MaxPayloadError every 0.5 s
forever and every later run hung, across restarts. Now the step fails with
``input_too_large`` and every other run completes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from nats.js.api import DeliverPolicy
from tests.integration.conftest import make_settings

from loom_core import blobs, codec, subjects
from loom_core.contracts import (
    EventRecord,
    Plan,
    ReduceStep,
    RunControl,
    RunRequest,
    SleepStep,
    SubmitAccepted,
    ToolStep,
)
from loom_infra.client import LoomClient
from loom_infra.settings import BlobSettings, StoreSettings
from loom_services.executor import ExecutorService
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

ECHO = Plan(steps=[ToolStep(id="a", tool="echo", input={"message": "ok"})])


@pytest.fixture
async def big_stack(sqlite_store_settings: StoreSettings) -> AsyncIterator[LocalStack]:
    # the default LOOM_MAX_PAYLOAD (256 KiB): a 200 KB input is accepted at submit;
    # a tool input may hold at most 1 MB of blobs (big values travel by reference)
    settings = make_settings(sqlite_store_settings, blobs=BlobSettings(max_resolved_bytes=10**6))
    async with LocalStack(settings, nats_port=-1) as s:
        yield s


@pytest.fixture
async def big_client(big_stack: LocalStack) -> AsyncIterator[LoomClient]:
    async with await big_stack.client() as c:
        yield c


async def _run(client: LoomClient, plan: Plan, run_input: dict[str, Any] | None = None) -> Any:
    accepted = await client.submit(RunRequest(plan=plan, input=run_input or {}))
    return await client.wait(accepted.run_id, timeout=30)


async def _run_inline(client: LoomClient, plan: Plan, run_input: dict[str, Any]) -> Any:
    """Submitted as it is: the input inline in the request (``LoomClient.submit`` would
    upload a value over the blob threshold and pass its reference)."""
    reply = await client.submit_raw(codec.encode(RunRequest(plan=plan, input=run_input)))
    assert isinstance(reply, SubmitAccepted), reply
    return await client.wait(reply.run_id, timeout=30)


async def _still_completes(client: LoomClient) -> None:
    records = await _run(client, ECHO)
    assert records[-1].kind == "run_completed"


def _failure(records: list[EventRecord]) -> Any:
    """The error of the first failed step (the run's own names the step only), after
    checking that the run failed with the same code."""
    assert records[-1].kind == "run_failed", [r.kind for r in records]
    first = next(r.event.error for r in records if r.kind == "step_failed")
    assert records[-1].event.error.code == first.code
    return first


async def test_six_copies_of_a_200kb_input_fail_the_step_not_the_stack(
    big_client: LoomClient,
) -> None:
    plan = Plan(steps=[
        ToolStep(id="six", tool="echo", input={"message": ["{{ input.blob }}"] * 6}),
    ])  # fmt: skip
    records = await _run_inline(big_client, plan, {"blob": "x" * 200_000})
    error = _failure(records)
    assert error.code == "input_too_large"
    assert error.details["step_id"] == "six"
    assert error.details["setting"] == "LOOM_MAX_STEP_INPUT_BYTES"
    assert error.details["size"] > error.details["limit"] == 131_072
    assert "tool_call_requested" not in [r.kind for r in records]
    assert max(len(codec.encode(r)) for r in records) < 1024**2  # every event fits
    await _still_completes(big_client)
    # by reference (what LoomClient.submit does with a big input) the same plan runs:
    # six references in, the 1.2 MB echo out as one
    records = await _run(big_client, plan, {"blob": "x" * 200_000})
    assert records[-1].kind == "run_completed"
    assert max(len(codec.encode(r)) for r in records) < 16 * 1024


async def test_a_reduce_doubling_a_string_with_concat_stops_at_the_limit(
    big_client: LoomClient,
) -> None:
    double = ToolStep(id="double", tool="concat",
                      input={"parts": ["{{ acc.text }}", "{{ acc.text }}"]})  # fmt: skip
    plan = Plan(steps=[
        ReduceStep(id="grow", items=list(range(30)), initial={"text": "x" * 1000}, do=[double]),
    ])  # fmt: skip
    records = await _run(big_client, plan)
    # past the blob threshold the accumulator travels by reference; it stops at the most
    # a tool input may hold once its references are resolved
    error = _failure(records)
    assert error.code == "blob_too_large"
    assert error.details["limit"] == 10**6 and error.details["size"] > 500_000
    failed = next(r.event for r in records if r.kind == "step_failed")
    assert failed.step_id.startswith("grow/")
    assert max(len(codec.encode(r)) for r in records) < 1024**2
    await _still_completes(big_client)


async def test_an_oversized_tool_output_travels_by_reference(big_client: LoomClient) -> None:
    # 10 KB in, ~300 KB out: the separator repeated between 31 empty parts. It used to
    # fail output_too_large; over the blob threshold it is stored and referenced
    # (tests/integration/test_blobs.py has the limits of that)
    plan = Plan(steps=[
        ToolStep(id="blowup", tool="concat", input={"parts": [""] * 31, "sep": "{{ input.s }}"}),
    ])  # fmt: skip
    records = await _run(big_client, plan, {"s": "y" * 10_000})
    assert records[-1].kind == "run_completed"
    output = next(r.event.output for r in records if r.kind == "tool_call_completed")
    assert blobs.is_ref(output) and output["bytes"] > 300_000
    assert max(len(codec.encode(r)) for r in records) < 16 * 1024
    await _still_completes(big_client)


async def _run_failed(client: LoomClient, run_id: str, timeout: float) -> EventRecord:
    """The victim's run_failed from the stream (its oversized event is a hole in the
    sequence, which LoomClient.follow does not cross)."""
    sub = await client.js.subscribe(
        subjects.run_events_of(run_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        async with asyncio.timeout(timeout):
            while True:
                record = codec.decode_event((await sub.next_msg(timeout=timeout)).data)
                if record.kind == "run_failed":
                    return record
    finally:
        await sub.unsubscribe()


async def test_an_unpublishable_event_fails_its_run_and_the_rest_go_on(
    sqlite_store_settings: StoreSettings,
) -> None:
    settings = make_settings(sqlite_store_settings)
    async with LocalStack(settings, nats_port=-1) as stack, await stack.client() as client:
        assert stack.stack is not None
        executor = next(s for s in stack.stack.services if isinstance(s, ExecutorService))
        victim = (await client.submit(RunRequest(
            plan=Plan(steps=[SleepStep(id="nap", seconds=600)])
        ))).run_id  # fmt: skip
        async for record in client.follow(victim, timeout=20):
            if record.kind == "timer_started":
                break
        # Past every limit on purpose (the host, not the bus): a 1.5 MB pause reason is
        # stored, and is over the broker's 1 MiB max_payload.
        await executor.host.submit(
            victim, RunControl(run_id=victim, action="pause", by="test", reason="r" * 1_500_000)
        )
        await _still_completes(client)  # the relay went past it
        failed = await _run_failed(client, victim, timeout=20)
        assert failed.event.error.code == "event_too_large"
        assert failed.event.error.details["event_type"] == "run_paused"
        # following the run crosses the gap the skipped event left (it used to wait
        # for the missing seq until its timeout)
        followed = await asyncio.wait_for(client.wait(victim, timeout=20), 30)
        assert followed[-1].kind == "run_failed"
        assert "run_paused" not in [r.kind for r in followed]
        # from the store itself: the events query refuses a reply that cannot carry it
        stored = await asyncio.to_thread(executor.store.load, victim)
        assert [r.kind for r in stored][-3:] == [
            "run_publish_failed",
            "step_cancelled",
            "run_failed",
        ]
        letters = await _dead_letters(client)
        assert any(
            letter["error"]["code"] == "event_too_large"
            and letter["error"]["details"]["run_id"] == victim
            for letter in letters
        )
    # a restart does not meet it again: the relay's position is past it
    async with LocalStack(settings, nats_port=-1) as stack, await stack.client() as client:
        await _still_completes(client)


async def _dead_letters(client: LoomClient) -> list[dict[str, Any]]:
    sub = await client.js.subscribe(
        subjects.dead_letter("executor"), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    letters = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except TimeoutError:
                return letters
            letters.append(msgspec.json.decode(msg.data))
    finally:
        await sub.unsubscribe()
