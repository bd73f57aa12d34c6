"""A hostile client against a real stack with NATS credentials OFF (insecure mode).

Without credentials anyone may publish on any subject, so this suite proves what the
checks where facts land do alone (docs/design.md decision 11; issue 8, point 3): every forgery
that does not need a privileged identity is refused or has no effect, the refusal is
dead-lettered with its typed reason, nothing hangs, and the victim run ends with its
GENUINE results. (The same forgeries from the wrong identity with credentials on are the
credentials battery's.) What a forger with a privileged identity could still say, e.g. a
perfect tool result for the outstanding attempt, is listed in docs/decisions.md
("Facts checked where they land").

A ``gate`` tool (registered from this module through ``LOOM_TOOL_MODULES``) holds a step
running until the test opens it, so forgeries arrive while the run waits. No sleeps:
every wait is on an event, a read model or a dead letter, with a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import waiting  # type: ignore[import-not-found]
from nats.errors import MaxPayloadError
from nats.js.api import DeliverPolicy

from loom_core import codec, routes, subjects
from loom_core.contracts import (
    ApprovalStep,
    DeadLetter,
    EventMatch,
    EventRecord,
    ExternalEventArrived,
    ForkRun,
    Plan,
    PlanProposed,
    PlanRefused,
    ResumeRun,
    RunCompleted,
    RunFailed,
    RunRequest,
    SleepStep,
    StepCompleted,
    StepScheduled,
    StepSuspended,
    SubRunFinished,
    SubRunRequested,
    SubRunStep,
    TimerElapsed,
    TimerStarted,
    ToolCallCancelled,
    ToolCallRequested,
    ToolResult,
    ToolStep,
    WaitEventStep,
)
from loom_core.executor import request_digest
from loom_infra import bus
from loom_infra.client import LoomClient, LoomError
from loom_infra.natsserver import EmbeddedNats
from loom_infra.relay import Relay
from loom_infra.settings import Settings, StoreSettings
from loom_infra.store import open_event_store
from loom_services.stack import LocalStack
from loom_services.tools.registry import ToolContext, ToolInput, ToolOutput, ToolRegistry, tool

pytestmark = pytest.mark.integration

BOUND_S = 30.0
T = TypeVar("T")

# ----------------------------------------------------------------------------- the gate tool

GATES: dict[str, asyncio.Event] = {}
CALLS: list[tuple[str, str]] = []  # (idempotency key, value) of every gate call


class GateIn(ToolInput):
    name: str
    value: str


class GateOut(ToolOutput):
    value: str


@tool("gate", "Wait until the test opens the named gate; return the value (test tool).")
async def gate(inp: GateIn, ctx: ToolContext) -> GateOut:
    CALLS.append((ctx.idempotency_key, inp.value))
    await GATES.setdefault(inp.name, asyncio.Event()).wait()
    return GateOut(value=inp.value)


def register(registry: ToolRegistry) -> None:
    registry.register(gate)


def open_gate(name: str) -> None:
    GATES.setdefault(name, asyncio.Event()).set()


def gated(name: str, value: str = "real", step: str = "a") -> ToolStep:
    return ToolStep(id=step, tool="gate", input={"name": name, "value": value})


# ----------------------------------------------------------------------------- fixtures


def _settings(store: StoreSettings) -> Settings:
    return Settings(
        nats_url="nats://127.0.0.1:4222",
        store=store,
        max_payload=64 * 1024,
        tool_modules=(__name__,),
    )


@pytest.fixture
async def stack(sqlite_store_settings: StoreSettings) -> AsyncIterator[LocalStack]:
    GATES.clear()
    CALLS.clear()
    async with LocalStack(_settings(sqlite_store_settings), nats_port=-1, secure=False) as s:
        yield s


@pytest.fixture
async def client(stack: LocalStack) -> AsyncIterator[LoomClient]:
    async with await stack.client() as c:
        yield c


# ----------------------------------------------------------------------------- helpers


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    return await waiting.eventually(probe, what, BOUND_S)


async def until(client: LoomClient, run_id: str, kind: type) -> list[EventRecord]:
    """The run's events up to the first of ``kind`` (the shared bounded wait)."""
    return await waiting.until(
        client, run_id, lambda seen: isinstance(seen[-1].event, kind), BOUND_S
    )


async def letters(
    client: LoomClient, service: str, count: int, code: str | None = None, subject: str = ""
) -> list[DeadLetter]:
    """The first ``count`` dead letters of ``service`` (with ``code``), waiting (bounded);
    ``subject``: another record of the same shape (rejected submissions)."""
    sub = await client.js.subscribe(
        subject or subjects.dead_letter(service),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    found: list[DeadLetter] = []
    try:
        while len(found) < count:
            letter = codec.decode((await sub.next_msg(timeout=BOUND_S)).data, DeadLetter)
            if code is None or letter.error.code == code:
                found.append(letter)
    finally:
        await sub.unsubscribe()
    return found


async def publish(client: LoomClient, subject: str, message: Any, **headers: str) -> None:
    data = message if isinstance(message, bytes) else codec.encode(message)
    await client.js.publish(subject, data, headers=headers or None)


def inbox(run_id: str, source: str) -> str:
    return subjects.inbox(run_id, source)


async def finished(client: LoomClient, run_id: str) -> Any:
    records = await client.wait(run_id, timeout=BOUND_S)
    return records[-1].event


def result(run_id: str, req: ToolCallRequested, output: Any, **kw: Any) -> ToolResult:
    values: dict[str, Any] = {
        "run_id": run_id, "step_id": req.step_id, "attempt": req.attempt,
        "idempotency_key": req.idempotency_key, "ok": True, "output": output,
        "started_at": datetime.now(UTC), "finished_at": datetime.now(UTC),
    }  # fmt: skip
    values.update(kw)
    return ToolResult(**values)


# ----------------------------------------------------------------------------- tool results


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_forged_tool_results_are_refused_and_the_real_output_wins(
    store: str, request: pytest.FixtureRequest
) -> None:
    """The original forgery: a tool_result on the inbox replaced the real output. Now a
    result is believed only on its run's tool route, for the outstanding attempt, and
    for the request the executor stored."""
    settings = request.getfixturevalue(f"{'pg' if store == 'postgres' else store}_store_settings")
    GATES.clear()
    async with (
        LocalStack(_settings(settings), nats_port=-1, secure=False) as stack,
        await stack.client() as client,
    ):
        run_id = (
            await client.submit(RunRequest(plan=Plan(steps=[gated("g1")]), run_id="vic"))
        ).run_id
        req = (await until(client, run_id, ToolCallRequested))[-1].event
        evil = {"value": "forged"}
        digest = request_digest(run_id, req)
        # 1. on another route of the run's inbox
        await publish(
            client, inbox(run_id, "plan"), result(run_id, req, evil, request_digest=digest)
        )
        # 2. on another run's inbox, the body naming the victim (routing by body is gone)
        await publish(
            client, inbox("other", "tool"), result(run_id, req, evil, request_digest=digest)
        )
        # 3. for an attempt that is not outstanding
        await publish(client, inbox(run_id, "tool"), result(
            run_id, req, evil, attempt=2, idempotency_key=f"{run_id}:a:2", request_digest=digest
        ))  # fmt: skip
        # 4. for another request under the same key (what a forged tool_call_requested
        #    run by the real tool-runner would answer)
        other = msgspec.structs.replace(req, input={"name": "g1", "value": "forged"})
        await publish(client, inbox(run_id, "tool"), result(
            run_id, req, evil, request_digest=request_digest(run_id, other)
        ))  # fmt: skip
        wrong = await letters(client, "executor", 2, "wrong_subject")
        assert {w.error.path for w in wrong} == {"$.type", "$.run_id"}
        unexpected = await letters(client, "executor", 2, "unexpected_message")
        assert {u.error.path for u in unexpected} == {"$.attempt", "$.request_digest"}
        assert all("expects" in u.error.message for u in unexpected)
        open_gate("g1")
        final = await finished(client, run_id)
        assert final == RunCompleted(output={"a": {"value": "real"}})


async def test_a_forged_request_on_the_run_stream_cannot_preempt_the_real_call(
    client: LoomClient,
) -> None:
    """A forged tool_call_requested with the run's predictable idempotency key made the
    tool-runner fill its ledger, and the real call was then answered from it (or dropped
    as a duplicate Nats-Msg-Id) and the run hung. Now the ledger is per request digest and
    the forged answer is refused: the real call runs once and its output wins."""
    run_id = "pre"
    forged = ToolCallRequested(
        step_id="a", attempt=1, tool="gate", input={"name": "g-forged", "value": "forged"},
        idempotency_key=f"{run_id}:a:1",
    )  # fmt: skip
    open_gate("g-forged")
    record = EventRecord(run_id=run_id, seq=3, at=datetime.now(UTC), event=forged)
    await publish(client, subjects.run_event(run_id, "tool_call_requested"), record)
    # the forged call ran, and its answer was refused: no such run yet
    (letter,) = await letters(client, "executor", 1, "unexpected_message")
    assert "no such run" in letter.error.message
    # pre-claimed JetStream dedupe ids of every kind the stack used to use
    for msg_id in (f"{run_id}/{n}" for n in range(1, 12)):
        await publish(client, subjects.run_event(run_id, "step_started"), b"{}", **{
            subjects.MSG_ID: msg_id})  # fmt: skip
    for msg_id in (f"plan:{run_id}", f"result:{run_id}:a:1"):
        await publish(client, inbox(run_id, "plan"), b"{}", **{subjects.MSG_ID: msg_id})
    await client.submit(RunRequest(plan=Plan(steps=[gated("g-real")]), run_id=run_id))
    await eventually(lambda: _calls_of(f"{run_id}:a:1", 2), "the real call")
    open_gate("g-real")
    assert await finished(client, run_id) == RunCompleted(output={"a": {"value": "real"}})
    assert sorted(v for k, v in CALLS if k == f"{run_id}:a:1") == ["forged", "real"]


async def _calls_of(key: str, n: int) -> bool:
    return sum(1 for k, _ in CALLS if k == key) >= n


async def test_a_forged_cancellation_does_not_stop_the_real_call(
    client: LoomClient, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = (await client.submit(RunRequest(plan=Plan(steps=[gated("g-c")])))).run_id
    req = (await until(client, run_id, ToolCallRequested))[-1].event
    cancel = ToolCallCancelled(
        step_id="a", attempt=1, idempotency_key=req.idempotency_key, reason="forged"
    )
    record = EventRecord(run_id=run_id, seq=99, at=datetime.now(UTC), event=cancel)
    await publish(client, subjects.run_event(run_id, "tool_call_cancelled"), record)
    # the tool-runner asked the executor and ignored it while the call still ran

    async def ignored() -> bool:
        return f"ignored {run_id}/99" in caplog.text

    with caplog.at_level(logging.WARNING, "loom.toolrunner"):
        await eventually(ignored, "the tool-runner to ignore the forged cancel")
    open_gate("g-c")
    assert await finished(client, run_id) == RunCompleted(output={"a": {"value": "real"}})


# ----------------------------------------------------------------------------- garbage


async def test_garbage_and_oversized_inbox_messages_are_dead_lettered(
    client: LoomClient,
) -> None:
    run_id = (await client.submit(RunRequest(plan=Plan(steps=[gated("g-x")])))).run_id
    await until(client, run_id, ToolCallRequested)
    await publish(client, inbox(run_id, "tool"), b"\x00not json")
    await publish(client, inbox(run_id, "tool"), b'{"type": "tool_result", "run_id": 5}')
    # big, well formed, and for nothing the run waits for
    big = ToolResult(run_id=run_id, step_id="a", attempt=7, idempotency_key=f"{run_id}:a:7",
                     ok=True, started_at=datetime.now(UTC), finished_at=datetime.now(UTC),
                     output="x" * (200 * 1024))  # fmt: skip
    await publish(client, inbox(run_id, "tool"), big)
    # over the broker's limit: the publisher is told, nothing reaches the run
    with pytest.raises(MaxPayloadError):
        await publish(client, inbox(run_id, "tool"), b"x" * (client.nc.max_payload + 1))
    await publish(client, inbox(run_id, "event"), TimerElapsed(run_id=run_id, timer_id="t"))
    (bad,) = await letters(client, "executor", 1, "malformed_json")
    (shape,) = await letters(client, "executor", 1, "invalid_shape")
    (late,) = await letters(client, "executor", 1, "unexpected_message")
    assert shape.error.path is not None
    assert "attempt 7" in late.error.message
    (wrong,) = await letters(client, "executor", 1, "wrong_subject")
    assert wrong.origin_subject == inbox(run_id, "event")
    assert bad.origin_subject == inbox(run_id, "tool")
    open_gate("g-x")
    assert await finished(client, run_id) == RunCompleted(output={"a": {"value": "real"}})


# ----------------------------------------------------------------------------- timers


async def test_a_forged_early_timer_does_not_end_a_sleep(client: LoomClient) -> None:
    """A timer_elapsed with the predictable timer id ended a 60 s sleep after 2 s. The
    executor takes a timer only when it is due by its own clock."""
    plan = Plan(steps=[SleepStep(id="nap", seconds=2.0), gated("g-t", step="after")])
    run_id = (await client.submit(RunRequest(plan=plan))).run_id
    started = (await until(client, run_id, TimerStarted))[-1].event
    forged = TimerElapsed(run_id=run_id, timer_id=started.timer_id)
    await publish(client, inbox(run_id, "timer"), forged)
    (letter,) = await letters(client, "executor", 1, "unexpected_message")
    assert "before it is due" in letter.error.message
    open_gate("g-t")
    records = await client.wait(run_id, timeout=BOUND_S)
    woke = next(
        r for r in records if isinstance(r.event, StepCompleted) and r.event.step_id == "nap"
    )
    assert woke.at >= started.fire_at  # the sleep lasted its time
    assert isinstance(records[-1].event, RunCompleted)


# ----------------------------------------------------------------------------- waits


async def test_forged_external_events_do_not_satisfy_a_wait(client: LoomClient) -> None:
    wait = WaitEventStep(id="w", events=[EventMatch(name="paid", key="{{ input.order }}")])
    run_id = (
        await client.submit(RunRequest(plan=Plan(steps=[wait]), input={"order": "o1"}))
    ).run_id
    await until(client, run_id, StepScheduled)
    forged = ExternalEventArrived(run_id=run_id, step_id="w", name="paid", key="o2", payload="evil")
    await publish(client, inbox(run_id, "event"), forged)
    await publish(client, inbox(run_id, "event"), msgspec.structs.replace(forged, step_id="x"))
    await publish(client, inbox(run_id, "tool"), msgspec.structs.replace(forged, key="o1"))
    found = await letters(client, "executor", 2, "unexpected_message")
    assert {f.error.path for f in found} == {"$.name", "$.step_id"}
    await letters(client, "executor", 1, "wrong_subject")
    await client.signal("paid", "o1", {"amount": 3})
    assert await finished(client, run_id) == RunCompleted(output={"w": {"paid": {"amount": 3}}})


# ----------------------------------------------------------------------------- plans


async def test_forged_plan_verdicts_neither_replace_nor_reject_a_plan(client: LoomClient) -> None:
    """A plan_proposed replaced a plan without the planner; a pre-published
    ``Nats-Msg-Id: plan:R`` made the real verdict a duplicate and the run hung."""
    run_id = "plan-victim"
    evil = Plan(steps=[ToolStep(id="evil", tool="echo", input={"message": "pwned"})])
    # before the run exists: nothing waits for a verdict
    await publish(client, inbox(run_id, "plan"), PlanProposed(run_id=run_id, plan=evil),
                  **{subjects.MSG_ID: f"plan:{run_id}"})  # fmt: skip
    await publish(client, inbox(run_id, "plan"), PlanRefused(run_id=run_id, issues=[]))
    early = await letters(client, "executor", 2, "unexpected_message")
    assert all("no such run" in e.error.message for e in early)
    plan = Plan(steps=[ToolStep(id="a", tool="echo", input={"message": "real"})])
    await client.submit(RunRequest(plan=plan, run_id=run_id))
    # racing the planner: refused whether it lands while planning (not the plan it was
    # submitted with) or after (the plan is decided)
    await publish(client, inbox(run_id, "plan"), PlanProposed(run_id=run_id, plan=evil))
    await letters(client, "executor", 3, "unexpected_message")
    final = await finished(client, run_id)
    assert isinstance(final, RunCompleted) and "pwned" not in str(final.output)


# ----------------------------------------------------------------------------- submit


@pytest.mark.parametrize(
    ("body", "code", "path"),
    [
        ({"parent": {"run_id": "victim", "step_id": "child"}}, "internal_field", "$.parent"),
        ({"fork": {"run_id": "x", "from_step": "a", "reused": {"a": 1}}}, "internal_field",
         "$.fork"),
        ({"run_id": "victim--child"}, "invalid_run_id", "$.run_id"),
    ],
)  # fmt: skip
async def test_submit_refuses_what_only_the_engine_sets(
    client: LoomClient, body: dict[str, Any], code: str, path: str
) -> None:
    plan = msgspec.to_builtins(Plan(steps=[ToolStep(id="a", tool="echo", input={"message": "x"})]))
    reply = await client.submit_raw(codec.encode({"type": "run_request", "plan": plan, **body}))
    assert reply.error.code == code, reply  # type: ignore[union-attr]
    assert reply.error.path == path  # type: ignore[union-attr]
    rejects = routes.REJECTED.subject(service="executor")  # client mistakes, apart
    (letter,) = await letters(client, "executor", 1, code, subject=rejects)
    assert letter.error.path == path


def _parent_plan(child_id: str | None = None) -> Plan:
    child = Plan(steps=[ToolStep(id="x", tool="echo", input={"message": "from the child"})])
    return Plan(steps=[SubRunStep(id="kid", plan=child, run_id=child_id)])


async def test_a_child_id_cannot_be_squatted(client: LoomClient) -> None:
    """A client's run at the predictable child id ``{parent}--{step}`` made the parent
    finish with the squatter's output. That id form is reserved; a child id taken by
    anything the step did not start fails the step with a typed error."""
    squatter = Plan(steps=[ToolStep(id="x", tool="echo", input={"message": "squatter"})])
    with pytest.raises(LoomError) as refused:
        await client.submit(RunRequest(plan=squatter, run_id="par--kid"))
    assert refused.value.error.code == "invalid_run_id"
    await client.submit(RunRequest(plan=_parent_plan(), run_id="par"))
    final = await finished(client, "par")
    assert final == RunCompleted(output={"kid": {"x": {"message": "from the child"}}})
    # a plan-chosen child id taken by a client's run first: the step fails, no adoption
    await client.submit(RunRequest(plan=squatter, run_id="kid-1"))
    await finished(client, "kid-1")
    victim = (await client.submit(RunRequest(plan=_parent_plan("kid-1")))).run_id
    final = await finished(client, victim)
    assert isinstance(final, RunFailed), final
    assert final.error.code == "child_run_conflict"
    assert "kid-1" in final.error.message and "client" in final.error.message


async def test_forged_sub_run_commands_and_ends_are_refused(client: LoomClient) -> None:
    child = Plan(steps=[gated("g-kid", value="child output", step="x")])
    plan = Plan(steps=[SubRunStep(id="kid", plan=child)])
    run_id = "fam"
    # a forged command on the run stream, before the real one: creates no child
    evil = SubRunRequested(step_id="kid", child_run_id="fam--kid", plan=Plan(
        steps=[ToolStep(id="x", tool="echo", input={"message": "evil"})]))  # fmt: skip
    record = EventRecord(run_id=run_id, seq=4, at=datetime.now(UTC), event=evil)
    await publish(client, subjects.run_event(run_id, "sub_run_requested"), record)
    (letter,) = await letters(client, "executor", 1, "not_stored")
    assert letter.error.details["seq"] == 4  # type: ignore[index]
    await client.submit(RunRequest(plan=plan, run_id=run_id))
    await eventually(lambda: _calls_of("fam--kid:x:1", 1), "the child's call")
    # a forged end of the (running) child, and a forged terminal event of the child
    forged = SubRunFinished(run_id=run_id, step_id="kid", child_run_id="fam--kid",
                            status="completed", output={"x": "evil"})  # fmt: skip
    await publish(client, inbox(run_id, "subrun"), forged)
    (refused,) = await letters(client, "executor", 1, "unexpected_message")
    assert "as stored" in refused.error.message
    done = EventRecord(run_id="fam--kid", seq=50, at=datetime.now(UTC),
                       event=RunCompleted(output={"x": "evil"}))  # fmt: skip
    await publish(client, subjects.run_event("fam--kid", "run_completed"), done)
    open_gate("g-kid")
    final = await finished(client, run_id)
    assert final == RunCompleted(output={"kid": {"x": {"value": "child output"}}})


# ----------------------------------------------------------------------------- forks


async def test_forks_are_computed_by_the_engine(client: LoomClient) -> None:
    plan = Plan(steps=[
        ToolStep(id="a", tool="echo", input={"message": "one"}),
        ToolStep(id="b", tool="echo", input={"message": "{{ steps.a.output.message }}!"},
                 depends_on=["a"]),
    ])  # fmt: skip
    origin = (await client.submit(RunRequest(plan=plan, run_id="orig"))).run_id
    await finished(client, origin)
    forked = await client.fork(ForkRun(run_id=origin, from_step="b", new_run_id="orig-f"))
    assert forked.run_id == "orig-f" and not forked.existing
    records = await client.wait("orig-f", timeout=BOUND_S)
    assert records[0].event.fork.reused == {"a": {"message": "one"}}  # type: ignore[union-attr]
    assert records[-1].event == RunCompleted(output={"b": {"message": "one!"}})
    for request, code, path in (
        (ForkRun(run_id="nope", from_step="b"), "not_found", "$.run_id"),
        (ForkRun(run_id=origin, from_step="zz"), "unknown_step", "$.from_step"),
        (ForkRun(run_id=origin, from_step="b", new_run_id="orig--b"), "invalid_run_id",
         "$.new_run_id"),
    ):  # fmt: skip
        with pytest.raises(LoomError) as refused:
            await client.fork(request)
        assert (refused.value.error.code, refused.value.error.path) == (code, path)


# ----------------------------------------------------------------------------- resume


async def test_resumes_naming_the_wrong_run_change_nothing(client: LoomClient) -> None:
    plan = Plan(steps=[ApprovalStep(id="ok", label="boss", schema={"type": "boolean"})])
    run_id = (await client.submit(RunRequest(plan=plan))).run_id
    await until(client, run_id, StepSuspended)
    other = (await client.submit(RunRequest(plan=Plan(steps=[gated("g-r")])))).run_id
    ghost = await client.resume("no-such-run", True, label="boss", request_id="r1")
    assert ghost.error.code == "not_found"  # type: ignore[union-attr]
    wrong = await client.resume(other, True, label="boss", request_id="r2")
    assert wrong.error.code == "unknown_label"  # type: ignore[union-attr]
    # a resume is an operator's request/reply, never an inbox message
    await publish(
        client, inbox(run_id, "event"), ResumeRun(run_id=run_id, data=False, label="boss")
    )
    await letters(client, "executor", 1, "invalid_shape")
    assert (await client.resume(run_id, True, label="boss", request_id="r3", by="ada")).ok
    assert await finished(client, run_id) == RunCompleted(output={"ok": True})
    open_gate("g-r")
    await finished(client, other)


# ----------------------------------------------------------------------------- read model


async def test_the_run_list_shows_only_runs_the_executor_stored(client: LoomClient) -> None:
    """A forged run_completed on loom.run.> made ``loom runs`` list a run that does not
    exist. The tracing read model folds only what the executor holds."""
    ghost = EventRecord(run_id="ghost", seq=1, at=datetime.now(UTC),
                        event=RunCompleted(output="boo"))  # fmt: skip
    await publish(client, subjects.run_event("ghost", "run_completed"), ghost)
    (letter,) = await letters(client, "tracing", 1, "unknown_run")
    assert letter.error.details["run_id"] == "ghost"  # type: ignore[index]
    run_id = (await client.submit(RunRequest(plan=Plan(steps=[gated("g-m")])))).run_id
    req = (await until(client, run_id, ToolCallRequested))[-1]
    # for the victim: an event far ahead (not continuing its history), and one at the
    # very next seq that claims it completed (folded until the real one arrives)
    ahead = EventRecord(run_id=run_id, seq=req.seq + 40, at=datetime.now(UTC),
                        event=RunCompleted(output="evil"))  # fmt: skip
    await publish(client, subjects.run_event(run_id, "run_completed"), ahead)
    (not_stored,) = await letters(client, "tracing", 1, "not_stored")
    assert not_stored.error.details["seq"] == req.seq + 40  # type: ignore[index]
    nxt = msgspec.structs.replace(ahead, seq=req.seq + 1)
    await publish(client, subjects.run_event(run_id, "run_completed"), nxt)
    open_gate("g-m")
    assert await finished(client, run_id) == RunCompleted(output={"a": {"value": "real"}})

    async def listed() -> list[Any] | None:
        runs = {r.run_id: r for r in await client.runs(limit=100)}
        mine = runs.get(run_id)
        ok = mine is not None and mine.status == "completed" and mine.steps_done == 1
        return list(runs) if ok else None

    names = await eventually(listed, "the victim completed in the run list")
    assert "ghost" not in names
    trace = await client.trace(run_id)
    assert not any("evil" in str(span) for span in trace)


async def test_memory_remembers_only_what_the_executor_stored(client: LoomClient) -> None:
    """A forged run_completed at the victim's next seq used to be appended to its
    conversation thread as the assistant's answer."""
    run_id = (await client.submit(RunRequest(plan=Plan(steps=[gated("g-mem")])))).run_id
    req = (await until(client, run_id, ToolCallRequested))[-1]
    forged = EventRecord(run_id=run_id, seq=req.seq + 1, at=datetime.now(UTC),
                         event=RunCompleted(output="evil"))  # fmt: skip
    await publish(client, subjects.run_event(run_id, "run_completed"), forged)
    (letter,) = await letters(client, "memory", 1, "not_stored")
    assert run_id in letter.error.message
    open_gate("g-mem")
    assert await finished(client, run_id) == RunCompleted(output={"a": {"value": "real"}})

    async def answered() -> list[Any] | None:
        entries = await client.thread(run_id)
        return entries if any(e.role == "assistant" for e in entries) else None

    entries = await eventually(answered, "the genuine answer in the thread")
    assert [e.content for e in entries if e.role == "assistant"] == [{"a": {"value": "real"}}]


# ----------------------------------------------------------------------------- relay


async def test_a_forged_notification_id_does_not_make_the_relay_skip_events(
    nats_server: EmbeddedNats, sqlite_store_settings: StoreSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A forged ``Loom-Notification-Id`` on the stream's last message made a restarted
    relay skip every event after it (all new runs hung, nothing logged)."""
    store = open_event_store(sqlite_store_settings)
    nc = await bus.connect(nats_server.url, "test", persistent=False)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    try:
        store.append([EventRecord(run_id="r", seq=1, at=at, event=StepScheduled(step_id="s"))])
        relay = Relay(store, js, name="relay")
        relay.position = 0
        assert await relay.publish_once() == 1
        store.append([EventRecord(run_id="r", seq=2, at=at, event=StepScheduled(step_id="t"))])
        for forged in (
            # a made-up position far ahead, on garbage
            (b"{}", "1000000"),
            # a real event's bytes under a position that is not that event's
            (codec.encode(EventRecord(run_id="r", seq=1, at=at,
                                      event=StepScheduled(step_id="s"))), "2"),
        ):  # fmt: skip
            await js.publish("loom.run.r.step_scheduled", forged[0],
                             headers={subjects.NOTIFICATION_ID: forged[1]})  # fmt: skip
            with caplog.at_level(logging.WARNING, "loom.relay"):
                restarted = Relay(store, js, name="relay")
                assert await restarted.start_position() <= 1
            assert "ignoring Loom-Notification-Id" in caplog.text
        restarted.position = await restarted.start_position()
        await restarted.publish_once()
        seen = await js.subscribe("loom.run.r.>", ordered_consumer=True,
                                  deliver_policy=DeliverPolicy.ALL)  # fmt: skip
        kinds = []
        for _ in range(4):
            msg = await seen.next_msg(timeout=BOUND_S)
            if (msg.headers or {}).get(subjects.EVENT_TYPE):
                kinds.append(codec.decode_event(msg.data).seq)
        assert kinds == [1, 2]  # event 2 was published, after all
    finally:
        await nc.close()
        store.close()


async def test_a_claimed_event_id_is_published_again(
    nats_server: EmbeddedNats, sqlite_store_settings: StoreSettings,
) -> None:  # fmt: skip
    """Someone sets the relay's (content-bound) id on other bytes first: the duplicate
    ack is checked and the real event goes out under a fresh id."""
    store = open_event_store(sqlite_store_settings)
    nc = await bus.connect(nats_server.url, "test", persistent=False)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    try:
        record = EventRecord(run_id="r", seq=1, at=datetime(2026, 1, 1, tzinfo=UTC),
                             event=StepScheduled(step_id="s"))  # fmt: skip
        store.append([record])
        from loom_infra.relay import msg_id

        subject = subjects.run_event("r", "step_scheduled")
        taken = msg_id(record, subject, codec.encode(record))
        await js.publish(subject, b"garbage", headers={subjects.MSG_ID: taken})
        relay = Relay(store, js, name="relay")
        relay.position = 0
        assert await relay.publish_once() == 1
        info = await js.stream_info(subjects.RUN_EVENTS_STREAM)
        last = await js.get_msg(subjects.RUN_EVENTS_STREAM, info.state.last_seq)
        assert codec.decode_event(last.data) == record
    finally:
        await nc.close()
        store.close()


def test_module_is_importable_as_a_tool_module() -> None:
    """The stack loads ``gate`` from this module by name (LOOM_TOOL_MODULES)."""
    assert Path(__file__).stem == __name__
