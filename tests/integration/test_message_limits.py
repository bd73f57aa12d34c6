"""Pause reasons, resume data and external event payloads have limits of their own
(issue 9.1), on a real stack (SQLite, nats-server with credentials).

Reproduced on main first: a 900 KB pause reason, a 600 KB resume answer and a 300 KB
signal payload were each accepted (they fit the broker's 1 MiB) and stored in the run's
events. Now each is refused where it enters, with a typed error naming the field, the
size, the limit and the setting; nothing is stored, the refusal is recorded with the
client mistakes (``loom.rejects.executor``), and the run goes on with a good answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.js.api import DeliverPolicy
from tests.integration.conftest import make_settings
from tests.integration.waiting import having, until
from typer.testing import CliRunner

from loom_cli.app import app
from loom_core import codec, routes
from loom_core.contracts import (
    ApprovalStep,
    DeadLetter,
    EventMatch,
    Plan,
    RunControl,
    RunControlReply,
    RunRequest,
    SleepStep,
    WaitEventStep,
)
from loom_infra.client import LoomClient
from loom_infra.settings import StoreSettings
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration


@pytest.fixture
async def stack(sqlite_store_settings: StoreSettings) -> AsyncIterator[LocalStack]:
    async with LocalStack(make_settings(sqlite_store_settings), nats_port=-1) as s:
        yield s


@pytest.fixture
async def client(stack: LocalStack) -> AsyncIterator[LoomClient]:
    async with await stack.client() as c:
        yield c


async def _rejected_codes(client: LoomClient) -> list[str]:
    """The client mistakes the executor recorded so far."""
    sub = await client.js.subscribe(
        routes.REJECTED.subject(service="executor"),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    codes = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except TimeoutError:
                return codes
            codes.append(codec.decode(msg.data, DeadLetter).error.code)
    finally:
        await sub.unsubscribe()


async def test_a_huge_pause_reason_is_refused_and_nothing_stored(client: LoomClient) -> None:
    run_id = (await client.submit(RunRequest(plan=Plan(steps=[
        SleepStep(id="nap", seconds=600)
    ])))).run_id  # fmt: skip
    await until(client, run_id, having("timer_started"))

    reply = await client.nc.request(
        routes.CONTROL.subject(),
        codec.encode(RunControl(run_id=run_id, action="pause", by="t", reason="r" * 900_000)),
        timeout=10,
    )
    refused = codec.decode(reply.data, RunControlReply)
    assert not refused.ok and refused.error is not None
    assert refused.error.code == "reason_too_large" and refused.error.path == "$.reason"
    assert refused.error.details == {
        "size": 900_000,
        "limit": 4096,
        "setting": "LOOM_MAX_REASON_BYTES",
    }
    assert "run_paused" not in [r.kind for r in await client.events(run_id)]

    # a reason of a normal size pauses it; the run goes on
    assert (await client.control(run_id, "pause", reason="maintenance")).ok
    paused = await until(client, run_id, having("run_paused"))
    assert paused[-1].event.reason == "maintenance"
    await client.control(run_id, "cancel", reason="done")
    await until(client, run_id, having("run_cancelled"))
    assert "reason_too_large" in await _rejected_codes(client)


async def test_huge_or_deep_resume_data_is_refused_then_a_good_answer_resumes(
    client: LoomClient,
) -> None:
    plan = Plan(steps=[ApprovalStep(id="ok", label="approve")])
    run_id = (await client.submit(RunRequest(plan=plan))).run_id
    await until(client, run_id, having("step_suspended"))

    big = await client.resume(run_id, {"note": "x" * 600_000}, label="approve")
    assert not big.ok and big.error is not None
    assert (big.error.code, big.error.path) == ("data_too_large", "$.data")
    assert big.error.details["setting"] == "LOOM_MAX_RESUME_DATA_BYTES"
    assert big.error.details["limit"] == 131_072 < big.error.details["size"]

    deep: object = "leaf"
    for _ in range(100):
        deep = [deep]
    nested = await client.resume(run_id, deep, label="approve")
    assert not nested.ok and nested.error is not None and nested.error.code == "too_deep"

    long_label = await client.resume(run_id, True, label="l" * 10_000)
    assert long_label.error is not None and long_label.error.path == "$.label"

    assert "step_resumed" not in [r.kind for r in await client.events(run_id)]
    assert (await client.resume(run_id, {"approved": True}, label="approve")).ok
    records = await client.wait(run_id, timeout=20)
    assert records[-1].kind == "run_completed"
    codes = await _rejected_codes(client)
    assert {"data_too_large", "too_deep", "reason_too_large"} <= set(codes)


async def test_a_huge_signal_payload_never_reaches_the_run(
    client: LoomClient, stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = Plan(steps=[WaitEventStep(id="w", events=[EventMatch(name="paid", key="K1")])])
    run_id = (await client.submit(RunRequest(plan=plan))).run_id
    await until(client, run_id, having("event_wait_started"))

    await client.signal("paid", "K1", {"blob": "p" * 300_000})
    # the refusal is recorded (an event, not a guess by time), and the run still waits
    recorded = await _rejected_until(client, "payload_too_large")
    assert recorded.error.details["setting"] == "LOOM_MAX_SIGNAL_PAYLOAD_BYTES"
    assert recorded.error.path == "$.payload"
    assert "event_received" not in [r.kind for r in await client.events(run_id)]

    await client.signal("paid", "K1", {"amount": 3})
    records = await client.wait(run_id, timeout=20)
    assert records[-1].kind == "run_completed"

    # the CLI says it before publishing (the router answers nobody)
    monkeypatch.setenv("LOOM_NKEY_SEED_FILE", str(stack.seed_file("operator")))
    big = '{"blob": "' + "q" * 70_000 + '"}'
    shown = CliRunner().invoke(app, ["signal", "paid", "K2", "--data", big, "--nats", stack.url])
    assert shown.exit_code == 1 and "LOOM_MAX_SIGNAL_PAYLOAD_BYTES" in shown.output


async def _rejected_until(client: LoomClient, code: str) -> DeadLetter:
    sub = await client.js.subscribe(
        routes.REJECTED.subject(service="executor"),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    try:
        while True:
            letter = codec.decode((await sub.next_msg(timeout=10)).data, DeadLetter)
            if letter.error.code == code:
                return letter
    finally:
        await sub.unsubscribe()
