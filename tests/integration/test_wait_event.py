"""wait_event steps through the whole stack: external events by name and correlation key,
any/all, timeouts, events that race ahead of the wait, and waits that survive restarts."""

from __future__ import annotations

import pytest
import waiting  # type: ignore[import-not-found]  # tests/integration on sys.path
from test_step_types import EXAMPLES  # type: ignore[import-not-found]

from loom_cli.app import load_run_request
from loom_core.contracts import (
    EventMatch,
    EventReceived,
    EventWaitStarted,
    Plan,
    RunCompleted,
    RunFailed,
    RunRequest,
    WaitEventStep,
)
from loom_infra.client import LoomClient
from loom_services.runtime import Stack
from loom_services.stack import LocalStack, all_services

pytestmark = pytest.mark.integration


async def until_waiting(client: LoomClient, run_id: str) -> None:
    await waiting.first(client, run_id, lambda r: isinstance(r.event, EventWaitStarted), 30)


async def test_an_event_published_after_the_wait_completes_it(client: LoomClient) -> None:
    accepted = await client.submit(load_run_request(EXAMPLES / "wait-event.yaml", [], None))
    await until_waiting(client, accepted.run_id)
    await client.signal("payment", "B-99", {"amount": 1})  # another order: ignored
    await client.signal("payment", "A-17", {"amount": 12}, signal_id="pay-1")
    records = await client.wait(accepted.run_id, timeout=30)
    assert records[-1].event == RunCompleted(output="order A-17 paid 12")
    received = [r.event for r in records if isinstance(r.event, EventReceived)]
    assert [(e.name, e.key, e.signal_id) for e in received] == [("payment", "A-17", "pay-1")]


async def test_an_event_that_raced_ahead_of_the_wait_is_not_lost(client: LoomClient) -> None:
    await client.signal("payment", "EARLY-1", {"amount": 3})
    request = load_run_request(EXAMPLES / "wait-event.yaml", [], None)
    request = RunRequest(plan=request.plan, input={"order": "EARLY-1"})
    accepted = await client.submit(request)
    records = await client.wait(accepted.run_id, timeout=30)
    assert records[-1].event == RunCompleted(output="order EARLY-1 paid 3")


async def test_all_mode_waits_for_every_event_and_timeouts_fail(client: LoomClient) -> None:
    both = WaitEventStep(
        id="both",
        mode="all",
        events=[
            EventMatch(name="shipped", key="{{ input.k }}"),
            EventMatch(name="paid", key="{{ input.k }}"),
        ],
    )
    accepted = await client.submit(RunRequest(plan=Plan(steps=[both]), input={"k": "K1"}))
    await until_waiting(client, accepted.run_id)
    await client.signal("paid", "K1", "p")
    await client.signal("shipped", "K1", "s")
    records = await client.wait(accepted.run_id, timeout=30)
    assert records[-1].event == RunCompleted(output={"both": {"paid": "p", "shipped": "s"}})

    never = WaitEventStep(id="never", events=[EventMatch(name="x", key="nobody")], timeout_s=0.2)
    accepted = await client.submit(RunRequest(plan=Plan(steps=[never])))
    records = await client.wait(accepted.run_id, timeout=30)
    assert isinstance(records[-1].event, RunFailed)
    assert records[-1].event.error.code == "wait_timeout"


async def test_a_wait_survives_a_restart_of_every_service(stack: LocalStack) -> None:
    async with await stack.client() as client:
        request = load_run_request(EXAMPLES / "wait-event.yaml", [], None)
        accepted = await client.submit(RunRequest(plan=request.plan, input={"order": "R-1"}))
        await until_waiting(client, accepted.run_id)
    assert stack.stack is not None
    await stack.stack.close()
    stack.stack = Stack(all_services(stack.settings), stack.settings)
    await stack.stack.start()
    async with await stack.client() as client:
        await client.signal("payment", "R-1", {"amount": 5})
        records = await client.wait(accepted.run_id, timeout=30)
    assert records[-1].event == RunCompleted(output="order R-1 paid 5")
