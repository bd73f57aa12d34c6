"""People in the loop, through the whole stack (real nats-server, both stores): approval
steps suspend and resume, answers are checked against the schema, many suspensions are
answered independently, a late answer never reverts an earlier one, suspensions expire
by policy, a tool can ask to suspend, and stopping every service while runs wait loses
nothing.

Synchronisation is on events (followed from the run's first event, bounded) and on
replies: a resume reply comes after the single writer handled the request, so reading
the stream right after it shows everything the request caused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from waiting import having, until  # type: ignore[import-not-found]

from loom_cli.app import load_run_request
from loom_core.contracts import (
    ApprovalStep,
    EventRecord,
    ForeachStep,
    ParallelStep,
    Plan,
    RunCompleted,
    RunFailed,
    RunRequest,
    StepCompleted,
    StepFailed,
    StepResumed,
    StepSuspended,
    TimerStarted,
    ToolCallCompleted,
    ToolCallRequested,
    ToolStep,
)
from loom_infra.client import LoomClient
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings, StoreSettings
from loom_services.executor import ExecutorService
from loom_services.memory import MemoryService
from loom_services.planner import PlannerService
from loom_services.runtime import Stack
from loom_services.stack import LocalStack, all_services
from loom_services.toolrunner import ToolRunnerService
from loom_services.tools import (
    ToolContext,
    ToolInput,
    ToolOutput,
    ToolSuspend,
    default_registry,
    tool,
)
from loom_services.tracing import TracingService

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BOUND_S = 10.0  # no wait below may take longer than this
BOOLEAN = {"type": "boolean"}
ANSWER = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}},
    "required": ["approved"],
    "additionalProperties": False,
}
ENDS = ("step_completed", "step_failed", "step_skipped", "step_cancelled")


# ----------------------------------------------------------------------------- helpers


def of(records: list[EventRecord], kind: type) -> list[Any]:
    return [r.event for r in records if isinstance(r.event, kind)]


def ends_of(records: list[EventRecord], step_id: str) -> list[str]:
    return [r.kind for r in records if r.kind in ENDS and r.event.step_id == step_id]


def approval_request() -> RunRequest:
    return load_run_request(EXAMPLES / "approval.yaml", [], None)


# ----------------------------------------------------------------------------- approval


async def test_approval_refuses_a_mismatching_answer_and_continues_with_a_good_one(
    client: LoomClient,
) -> None:
    accepted = await client.submit(approval_request())
    run_id = accepted.run_id
    seen = await until(client, run_id, having("step_suspended"))
    (suspended,) = of(seen, StepSuspended)
    assert (suspended.step_id, suspended.suspension_id, suspended.label) == (
        "approve", "approve#1", "manager",
    )  # fmt: skip
    # the payload is rendered for the person; the schema says what the answer must be
    assert suspended.payload == {
        "question": "Pay this invoice?", "quote": "ACME asks 120 EUR", "amount": 120,
    }  # fmt: skip
    assert suspended.schema["required"] == ["approved"]
    before = await client.events(run_id)

    wrong_type = await client.resume(run_id, {"approved": "yes"}, label="manager", by="ada")
    assert not wrong_type.ok and wrong_type.error is not None
    assert (wrong_type.error.code, wrong_type.error.path) == (
        "invalid_resume_data", "$.data.approved",
    )  # fmt: skip
    assert "$.data.approved" in wrong_type.error.message
    assert 'expected a boolean, got a string "yes"' in wrong_type.error.message
    assert "stays suspended" in wrong_type.error.message
    extra = await client.resume(run_id, {"approved": True, "by": "me"}, label="manager")
    assert extra.error is not None and extra.error.code == "invalid_resume_data"
    assert extra.error.path == "$.data.by"
    missing = await client.resume(run_id, {"note": "?"}, label="manager")
    assert missing.error is not None and missing.error.path == "$.data.approved"
    # nothing was recorded: the run still waits for the same suspension
    assert await client.events(run_id) == before

    answer = {"approved": True, "note": "fine"}
    good = await client.resume(run_id, answer, label="manager", request_id="req-1", by="ada")
    assert (good.ok, good.suspension_id, good.error) == (True, "approve#1", None)
    again = await client.resume(run_id, answer, label="manager", request_id="req-1", by="ada")
    assert (again.ok, again.suspension_id) == (True, "approve#1")  # idempotent by request id

    records = await client.wait(run_id, timeout=BOUND_S)
    assert records[-1].event == RunCompleted(
        output={"answer": answer, "result": "paid 120 EUR to ACME"}
    )
    assert of(records, StepResumed) == [
        StepResumed(step_id="approve", suspension_id="approve#1", data=answer, by="ada",
                    request_id="req-1"),
    ]  # fmt: skip
    # the answer is the step's output, and what the next steps saw
    assert [e.output for e in of(records, StepCompleted) if e.step_id == "approve"] == [answer]
    assert ends_of(records, "approve") == ["step_completed"]


async def test_many_suspensions_are_answered_independently_and_never_revert(
    client: LoomClient,
) -> None:
    plan = Plan(
        steps=[
            ForeachStep(
                id="fe",
                items=[1, 2, 3],
                do=[
                    ApprovalStep(id="check", label="reviewer", payload="{{ item }}", schema=BOOLEAN)
                ],
            ),
            ParallelStep(
                id="par",
                branches={
                    "legal": [ApprovalStep(id="legal_ok", label="legal", schema=BOOLEAN)],
                    "finance": [ApprovalStep(id="finance_ok", label="finance", schema=BOOLEAN)],
                },
            ),
        ]
    )
    run_id = (await client.submit(RunRequest(plan=plan))).run_id
    seen = await until(client, run_id, having("step_suspended", 5))
    waiting = {e.suspension_id: (e.label, e.payload) for e in of(seen, StepSuspended)}
    assert waiting == {
        "fe/0/check#1": ("reviewer", 1),
        "fe/1/check#1": ("reviewer", 2),
        "fe/2/check#1": ("reviewer", 3),
        "par/legal/legal_ok#1": ("legal", None),
        "par/finance/finance_ok#1": ("finance", None),
    }
    before = await client.events(run_id)

    ambiguous = await client.resume(run_id, True, label="reviewer")
    assert ambiguous.error is not None
    assert (ambiguous.error.code, ambiguous.error.path) == ("ambiguous_label", "$.label")
    for sid in ("fe/0/check#1", "fe/1/check#1", "fe/2/check#1"):
        assert sid in ambiguous.error.message
    unknown = await client.resume(run_id, True, label="nobody")
    assert unknown.error is not None and unknown.error.code == "unknown_label"
    assert "'finance'" in unknown.error.message  # it lists the labels that do wait
    assert await client.events(run_id) == before

    one = await client.resume(run_id, True, suspension_id="fe/1/check#1", request_id="r1", by="ada")
    zero = await client.resume(run_id, False, suspension_id="fe/0/check#1", request_id="r2")
    assert one.ok and zero.ok
    late = await client.resume(
        run_id, False, suspension_id="fe/1/check#1", request_id="r3", by="bob"
    )
    assert not late.ok and late.error is not None and late.error.code == "already_resumed"
    assert late.already is not None
    assert (late.already.by, late.already.data, late.already.request_id) == ("ada", True, "r1")
    assert "ada" in late.error.message
    # the rest at the same moment: one label is unique again, the branches have their own
    replies = await asyncio.gather(
        client.resume(run_id, True, label="reviewer", request_id="r4"),
        client.resume(run_id, True, label="legal", request_id="r5"),
        client.resume(run_id, False, label="finance", request_id="r6"),
    )
    assert [(r.ok, r.suspension_id) for r in replies] == [
        (True, "fe/2/check#1"), (True, "par/legal/legal_ok#1"), (True, "par/finance/finance_ok#1"),
    ]  # fmt: skip

    records = await client.wait(run_id, timeout=BOUND_S)
    assert records[-1].event == RunCompleted(
        output={"fe": [False, True, True], "par": {"legal": True, "finance": False}}
    )
    resumed = [e.suspension_id for e in of(records, StepResumed)]
    assert sorted(resumed) == sorted(waiting)  # each answered exactly once
    # the late, different answer to fe/1 changed nothing: it completed once, with True
    assert [(e.output) for e in of(records, StepCompleted) if e.step_id == "fe/1/check"] == [True]
    assert ends_of(records, "fe/1/check") == ["step_completed"]


# ----------------------------------------------------------------------------- expiry


async def test_suspensions_expire_by_policy(client: LoomClient) -> None:
    def plan(**policy: Any) -> Plan:
        return Plan(steps=[ApprovalStep(
            id="approve", label="manager", payload={"amount": 120}, schema=ANSWER,
            expires_in_s=0.2, **policy,
        )])  # fmt: skip

    default_id = (await client.submit(load_run_request(
        EXAMPLES / "approval-expiry.yaml", [], None
    ))).run_id  # fmt: skip
    escalate_id = (
        await client.submit(RunRequest(plan=plan(on_expire="escalate", escalate_to="director")))
    ).run_id
    fail_id = (await client.submit(RunRequest(plan=plan(on_expire="fail")))).run_id
    default, escalate, fail = await asyncio.gather(
        *(client.wait(r, timeout=BOUND_S) for r in (default_id, escalate_id, fail_id))
    )

    # default: the default is the answer, by "expiry", once the timer fired
    (suspended,) = [r for r in default if isinstance(r.event, StepSuspended)]
    timer = next(r.event for r in default if isinstance(r.event, TimerStarted))
    assert (timer.purpose, timer.timer_id) == ("suspension_expiry", "approve#1:expiry")
    assert timer.fire_at == suspended.event.expires_at
    assert (suspended.event.expires_at - suspended.at).total_seconds() == pytest.approx(0.2)
    resumed = next(r for r in default if isinstance(r.event, StepResumed))
    assert resumed.event == StepResumed(
        step_id="approve", suspension_id="approve#1",
        data={"approved": False, "note": "nobody answered in time"},
        by="expiry", request_id="expiry:approve#1",
    )  # fmt: skip
    assert resumed.at >= suspended.event.expires_at - timedelta(milliseconds=1)
    assert default[-1].event == RunCompleted(output="approved: false (nobody answered in time)")

    # escalate: a second suspension under the new label, same payload and schema; when
    # nobody answers that one either, the step fails
    again = of(escalate, StepSuspended)
    assert [(e.suspension_id, e.label) for e in again] == [
        ("approve#1", "manager"), ("approve#2", "director"),
    ]  # fmt: skip
    assert again[0].payload == again[1].payload == {"amount": 120}
    assert again[0].schema == again[1].schema == ANSWER
    assert not of(escalate, StepResumed)
    (failed,) = of(escalate, StepFailed)
    assert failed.error.code == "suspension_expired" and "'director'" in failed.error.message
    assert isinstance(escalate[-1].event, RunFailed)

    # fail: the step fails at once, and a late answer is refused
    assert [e.label for e in of(fail, StepSuspended)] == ["manager"]
    assert fail[-1].event.error.code == "suspension_expired"
    late = await client.resume(fail_id, {"approved": True}, label="manager")
    assert late.error is not None and late.error.code == "already_finished"
    assert await client.events(fail_id) == fail


async def test_an_escalated_suspension_can_no_longer_be_answered(client: LoomClient) -> None:
    plan = Plan(steps=[
        ApprovalStep(id="approve", label="manager", schema=BOOLEAN, expires_in_s=0.2,
                     on_expire="escalate", escalate_to="director"),
        ApprovalStep(id="hold", label="hold", schema=BOOLEAN),  # keeps the run alive
    ])  # fmt: skip
    run_id = (await client.submit(RunRequest(plan=plan))).run_id
    await until(client, run_id, lambda seen: any(
        isinstance(r.event, StepSuspended) and r.event.label == "director" for r in seen
    ))  # fmt: skip
    stale = await client.resume(run_id, True, label="manager", by="ada")
    director = await client.resume(run_id, False, label="director", by="dee")
    records = await client.events(run_id)
    assert not stale.ok, f"the escalated suspension was answered: {stale}"
    assert ends_of(records, "approve") in (["step_completed"], ["step_failed"]), director


async def test_a_cancelled_suspension_can_no_longer_be_answered(client: LoomClient) -> None:
    plan = Plan(steps=[
        # item 1 fails at once (its payload names a missing field): fail_fast cancels
        # item 0, which is waiting for a person
        ForeachStep(id="fe", items=[{"x": 1}, {}], on_error="continue", do=[
            ApprovalStep(id="check", label="reviewer", payload="{{ item.x }}", schema=BOOLEAN),
        ]),
        ApprovalStep(id="hold", label="hold", schema=BOOLEAN),  # keeps the run alive
    ])  # fmt: skip
    run_id = (await client.submit(RunRequest(plan=plan))).run_id
    seen = await until(client, run_id, lambda s: any(
        isinstance(r.event, StepSuspended) and r.event.label == "hold" for r in s
    ))  # fmt: skip
    assert ends_of(seen, "fe/0/check") == ["step_cancelled"]
    late = await client.resume(run_id, True, suspension_id="fe/0/check#1", by="ada")
    records = await client.events(run_id)
    assert not late.ok, f"a cancelled step's suspension was answered: {late}"
    assert ends_of(records, "fe/0/check") == ["step_cancelled"]


# ----------------------------------------------------------------------------- tools

TOOL_CALLS: list[tuple[int, Any]] = []


class PaymentIn(ToolInput):
    amount: int


class PaymentOut(ToolOutput):
    paid: bool
    amount: int


@tool("confirm_payment", "Pay once a person confirmed (test tool).", idempotent=False)
async def confirm_payment(inp: PaymentIn, ctx: ToolContext) -> PaymentOut:
    TOOL_CALLS.append((ctx.attempt, ctx.resume))
    if ctx.resume is None:
        raise ToolSuspend("payments", payload={"amount": inp.amount, "to": "ACME"}, schema=ANSWER)
    return PaymentOut(paid=ctx.resume["approved"], amount=inp.amount)


@pytest.fixture
async def payments_stack(
    tmp_path: Path, store_settings: StoreSettings
) -> AsyncIterator[LoomClient]:
    """All five services, the tool-runner with ``confirm_payment`` registered."""
    TOOL_CALLS.clear()
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    settings = Settings(nats_url=server.url, store=store_settings)
    registry = default_registry()
    registry.register(confirm_payment)
    stack = Stack(
        [
            ExecutorService(settings),
            PlannerService(settings),
            ToolRunnerService(settings, registry=registry),
            MemoryService(settings),
            TracingService(settings),
        ],
        settings,
    )
    try:
        await stack.start()
        async with await LoomClient.connect(server.url) as client:
            await client.wait_ready()
            yield client
    finally:
        await stack.close()
        server.stop()


async def test_a_tool_asks_to_suspend_and_is_called_again_with_the_answer(
    payments_stack: LoomClient,
) -> None:
    client = payments_stack
    plan = Plan(steps=[
        ToolStep(id="pay", tool="confirm_payment", input={"amount": "{{ input.amount }}"}),
        ToolStep(id="receipt", tool="echo", depends_on=["pay"],
                 input={"message": "paid: {{ steps.pay.output.paid }}"}),
    ])  # fmt: skip
    run_id = (await client.submit(RunRequest(plan=plan, input={"amount": 120}))).run_id
    seen = await until(client, run_id, having("step_suspended"))
    (suspended,) = of(seen, StepSuspended)
    assert (suspended.step_id, suspended.suspension_id, suspended.label) == (
        "pay", "pay#1", "payments",
    )  # fmt: skip
    assert (suspended.payload, suspended.schema) == ({"amount": 120, "to": "ACME"}, ANSWER)
    (first,) = of(seen, ToolCallCompleted)
    assert first.attempt == 1 and first.suspend is not None  # the tool asked, no output

    bad = await client.resume(run_id, {"approved": 1}, label="payments")
    assert bad.error is not None
    assert (bad.error.code, bad.error.path) == ("invalid_resume_data", "$.data.approved")
    good = await client.resume(run_id, {"approved": True}, label="payments", by="ada")
    assert good.ok

    records = await client.wait(run_id, timeout=BOUND_S)
    assert records[-1].event == RunCompleted(output={"receipt": {"message": "paid: true"}})
    calls = of(records, ToolCallRequested)
    assert [(c.step_id, c.attempt, c.resume) for c in calls if c.step_id == "pay"] == [
        ("pay", 1, None), ("pay", 2, {"approved": True}),
    ]  # fmt: skip
    assert TOOL_CALLS == [(1, None), (2, {"approved": True})]  # really called twice
    assert [e.output for e in of(records, StepCompleted) if e.step_id == "pay"] == [
        {"paid": True, "amount": 120}
    ]


# ----------------------------------------------------------------------------- restart


async def restart_every_service(stack: LocalStack) -> None:
    """Stop all five services (NATS and the store stay) and start new ones."""
    assert stack.stack is not None
    await stack.stack.close()
    stack.stack = Stack(all_services(stack.settings), stack.settings)
    await stack.stack.start()


async def test_suspended_runs_survive_a_restart_of_every_service(
    stack: LocalStack, client: LoomClient
) -> None:
    plan = Plan(
        steps=[
            ApprovalStep(id="first", label="one", schema=BOOLEAN),
            ApprovalStep(id="second", label="two", schema=BOOLEAN),
            ToolStep(id="after", tool="echo", depends_on=["first", "second"],
                     input={"message": ["{{ steps.first.output }}", "{{ steps.second.output }}"]}),
        ]
    )  # fmt: skip
    a = (await client.submit(RunRequest(plan=plan))).run_id
    b = (await client.submit(approval_request())).run_id
    await until(client, a, having("step_suspended", 2))
    await until(client, b, having("step_suspended"))
    assert (await client.resume(a, True, label="one", request_id="one-1", by="ada")).ok
    waited = await client.events(a)

    await restart_every_service(stack)

    # what was answered before the restart stays answered, by whom it was
    late = await client.resume(a, False, label="one", request_id="one-2", by="bob")
    assert late.error is not None and late.error.code == "already_resumed"
    assert late.already is not None and (late.already.by, late.already.data) == ("ada", True)
    assert await client.events(a) == waited  # the restart and the refusal added nothing
    assert (await client.resume(a, False, label="two", by="bob")).ok
    assert (await client.resume(b, {"approved": False}, label="manager", by="bob")).ok

    done_a, done_b = await asyncio.gather(
        client.wait(a, timeout=BOUND_S), client.wait(b, timeout=BOUND_S)
    )
    assert done_a[-1].event == RunCompleted(output={"after": {"message": [True, False]}})
    assert done_b[-1].event == RunCompleted(
        output={"answer": {"approved": False}, "result": "not paid: ACME was refused"}
    )
    assert [r.seq for r in done_a] == list(range(1, len(done_a) + 1))
    assert [e.by for e in of(done_a, StepResumed)] == ["ada", "bob"]
