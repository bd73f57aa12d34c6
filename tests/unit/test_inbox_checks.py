"""What a run believes from its inbox (``loom_core.executor.unexpected``), on the pure core.

A message is taken only if the run is waiting for it: the verdict on its pending plan
request (and, for an explicit plan, that very plan), the result of the outstanding tool
attempt (same attempt, key and request digest), a pending timer that is due, an event an
open wait still needs, the end of the running sub-run. Everything else is refused with an
``unexpected_message`` error saying what was expected and what arrived. The predicate never
refuses a message the run acted on: every recorded history passes it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from test_executor import T0, World, echo, tool  # type: ignore[import-not-found]

from loom_core import codec
from loom_core.contracts import (
    EventMatch,
    EventRecord,
    ExternalEventArrived,
    ModelResult,
    Plan,
    PlanProposed,
    PlanRefused,
    RunRequest,
    SleepStep,
    SubRunFinished,
    SubRunStep,
    TimerElapsed,
    ToolCallRequested,
    ToolResult,
    WaitEventStep,
)
from loom_core.executor import (
    TIMER_EARLY_S,
    RunState,
    advance,
    evolve,
    initial_state,
    request_digest,
    unexpected,
)
from loom_core.replay import message_for

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
PLAN = Plan(steps=[tool("a", x=1), tool("b", ["a"], y="{{ steps.a.output.echo.x }}")])


def requested(plan: Plan = PLAN, run_id: str = "r1") -> World:
    """A world whose run was submitted but not yet planned."""
    w = World.__new__(World)
    w.run_id, w.state, w.now = run_id, initial_state(run_id), T0
    w.events, w.times, w.messages, w.pending, w.timers = [], [], [], [], []
    w.send(RunRequest(plan=plan))
    return w


def result_for(w: World, req: ToolCallRequested, output: Any = "real", **kw: Any) -> ToolResult:
    values: dict[str, Any] = {
        "run_id": w.run_id, "step_id": req.step_id, "attempt": req.attempt,
        "idempotency_key": req.idempotency_key, "ok": True, "started_at": T0,
        "finished_at": T0, "output": output,
        "request_digest": request_digest(w.run_id, req),
    }  # fmt: skip
    values.update(kw)
    return ToolResult(**values)


def refused(state: RunState, message: Any, now: Any = None) -> str:
    error = unexpected(state, message, now)
    assert error is not None, f"{message!r} was accepted"
    assert error.code == "unexpected_message"
    assert error.details["run_id"] == state.run_id  # type: ignore[index]
    return error.message


# ----------------------------------------------------------------------------- plans


def test_a_plan_verdict_is_taken_only_while_planning_and_only_for_the_stored_request() -> None:
    w = requested()
    digest = w.state.request_digest
    assert digest is not None
    good = PlanProposed(run_id="r1", plan=PLAN, request_digest=digest)
    assert unexpected(w.state, good) is None
    # an answer to another (forged) run_requested of the same run
    message = refused(w.state, msgspec.structs.replace(good, request_digest="0" * 32))
    assert "verdict on its stored run_requested" in message
    assert "0" * 32 in message
    # a refusal needs the same digest: a forged one could otherwise reject the run
    assert unexpected(w.state, PlanRefused(run_id="r1", issues=[], request_digest=digest)) is None
    assert "digest" in refused(w.state, PlanRefused(run_id="r1", issues=[]))
    w.send(good)
    assert "plan is decided" in refused(w.state, good)  # a second verdict


def test_an_explicit_plan_is_validated_never_replaced() -> None:
    w = requested()
    other = Plan(steps=[tool("evil", x=666)])
    forged = PlanProposed(run_id="r1", plan=other, request_digest=w.state.request_digest)
    assert "explicit plan it was submitted with" in refused(w.state, forged)


def test_messages_for_another_run_or_no_run_are_refused() -> None:
    w = requested()
    good = PlanProposed(run_id="r1", plan=PLAN, request_digest=w.state.request_digest)
    message = refused(w.state, msgspec.structs.replace(good, run_id="r2"))
    assert "messages for run 'r1'" in message
    ghost = msgspec.structs.replace(good, run_id="ghost")
    assert "no such run" in refused(initial_state("ghost"), ghost)


# ----------------------------------------------------------------------------- tools


def test_a_tool_result_must_answer_the_outstanding_attempt_of_the_stored_request() -> None:
    w = World(PLAN)
    (req,) = w.pending
    assert unexpected(w.state, result_for(w, req)) is None
    # a result for a step that has not started (b waits on a)
    early = result_for(w, msgspec.structs.replace(req, step_id="b", idempotency_key="r1:b:1"))
    assert "no tool result for step 'b' (not started)" in refused(w.state, early)
    # another attempt
    wrong = result_for(w, req, attempt=2, idempotency_key="r1:a:2")
    assert "the result of attempt 1 of step 'a' (r1:a:1)" in refused(w.state, wrong)
    # the right ids, but computed for another (forged) request under the same key
    forged_req = msgspec.structs.replace(req, input={"x": 666})
    message = refused(w.state, result_for(w, req, request_digest=request_digest("r1", forged_req)))
    assert "result of the stored request r1:a:1" in message
    assert "digest" in refused(w.state, result_for(w, req, request_digest=None))
    # once recorded, a repeat is refused: the first result that fits wins
    w.result(req, output={"echo": {"x": 1}})
    assert "no tool result for step 'a' (succeeded)" in refused(w.state, result_for(w, req))


def test_nothing_is_taken_after_the_run_ended() -> None:
    w = World(Plan(steps=[tool("a", x=1)]))
    w.run(echo)
    assert w.state.status == "completed"
    assert "the run is completed" in refused(w.state, TimerElapsed(run_id="r1", timer_id="x"))


# ----------------------------------------------------------------------------- timers


def test_a_timer_must_be_pending_and_due_by_the_hosts_clock() -> None:
    w = World(Plan(steps=[SleepStep(id="nap", seconds=60), tool("after", ["nap"])]))
    (timer,) = w.timers
    elapsed = TimerElapsed(run_id="r1", timer_id=timer.timer_id)
    assert w.state.timer_due[timer.timer_id] == timer.fire_at == T0 + timedelta(seconds=60)
    # without a clock (the pure question) a pending timer is expected
    assert unexpected(w.state, elapsed) is None
    # two seconds in, the forged "elapsed" is refused; at its time the real one is taken
    message = refused(w.state, elapsed, now=T0 + timedelta(seconds=2))
    assert "before it is due" in message and timer.fire_at.isoformat() in message
    assert unexpected(w.state, elapsed, now=timer.fire_at) is None
    just_early = timer.fire_at - timedelta(seconds=TIMER_EARLY_S / 2)
    assert unexpected(w.state, elapsed, now=just_early) is None  # the timer service's margin
    assert "pending timers (nap:sleep)" in refused(
        w.state, TimerElapsed(run_id="r1", timer_id="nap:other")
    )
    w.now = timer.fire_at
    w.send(elapsed)
    assert "none" in refused(w.state, elapsed, now=timer.fire_at)  # fired: no longer pending
    assert timer.timer_id not in w.state.timer_due


# ----------------------------------------------------------------------------- waits


def test_an_external_event_must_match_an_open_wait_once_per_name() -> None:
    wait = WaitEventStep(
        id="w", events=[EventMatch(name="paid", key="k1"), EventMatch(name="shipped", key="k1")],
        mode="all",
    )  # fmt: skip
    w = World(Plan(steps=[wait]))
    paid = ExternalEventArrived(run_id="r1", step_id="w", name="paid", key="k1", payload=1)
    assert unexpected(w.state, paid) is None
    other_key = msgspec.structs.replace(paid, key="k2")
    assert "still waits for (paid/k1, shipped/k1)" in refused(w.state, other_key)
    w.send(paid)
    assert "still waits for (shipped/k1)" in refused(w.state, paid)  # one per name
    nowhere = msgspec.structs.replace(paid, step_id="zz")
    assert "no external event for step 'zz' (not started)" in refused(w.state, nowhere)


# ----------------------------------------------------------------------------- sub-runs


def test_a_sub_run_end_must_name_the_running_child() -> None:
    w = World(Plan(steps=[SubRunStep(id="child", plan=Plan(steps=[tool("x")]))]))
    child = w.state.insts["child"].child_run_id
    assert child == "r1--child"
    done = SubRunFinished(run_id="r1", step_id="child", child_run_id=child, status="completed")
    assert unexpected(w.state, done) is None
    squat = msgspec.structs.replace(done, child_run_id="someone-else")
    assert "the end of child run 'r1--child'" in refused(w.state, squat)


# ----------------------------------------------------------------------------- history


def _with_digests(state: RunState, message: Any) -> Any:
    """The rebuilt message as its service sent it: the digest of what it answered."""
    if isinstance(message, ToolResult) and message.step_id not in state.insts:
        agent = state.agents[message.step_id.rpartition("/")[0]]  # an agent's tool call
        return msgspec.structs.replace(message, request_digest=agent.digests[message.step_id])
    if isinstance(message, ToolResult):
        return msgspec.structs.replace(
            message, request_digest=state.insts[message.step_id].request_digest
        )
    if isinstance(message, ModelResult):
        return msgspec.structs.replace(
            message, request_digest=state.agents[message.step_id].request_digest
        )
    if isinstance(message, PlanProposed | PlanRefused):
        asked = state.replan_digest if state.replanning else state.request_digest
        return msgspec.structs.replace(message, request_digest=asked)
    return message


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.jsonl")), ids=lambda p: p.stem)
def test_every_recorded_message_is_one_the_run_was_waiting_for(path: Path) -> None:
    """Recorded histories pass the predicate at the state before each message, with the
    clock at the recorded time: the checks never refuse what the run acted on."""
    records = [codec.decode_event(line.encode()) for line in path.read_text().splitlines()]
    state = initial_state(records[0].run_id)
    checked = 0
    for record in records:
        message = message_for(record.run_id, record.event)
        if isinstance(message, ToolResult | PlanProposed | PlanRefused | TimerElapsed
                      | SubRunFinished | ExternalEventArrived | ModelResult):  # fmt: skip
            message = _with_digests(state, message)
            assert unexpected(state, message, record.at) is None, (path.stem, record.seq)
            checked += 1
        evolve(state, record.event, record.at)
    assert checked >= 1


def test_the_checks_leave_decide_alone() -> None:
    """``advance`` does not consult the predicate: a message it used to act on is still
    acted on there (replay stays exact); the host refuses before deciding."""
    w = requested()
    forged = PlanProposed(run_id="r1", plan=Plan(steps=[tool("evil")]))
    assert unexpected(w.state, forged) is not None
    events = advance(w.state, forged, T0)
    assert [type(e).__name__ for e in events][0] == "PlanAccepted"


def test_digests_survive_the_wire() -> None:
    """A service decodes the stored record and re-encodes the event to compute the
    digest it echoes: that must equal the executor's digest of the event it emitted."""
    w = World(PLAN)
    (req,) = w.pending
    record = EventRecord(run_id="r1", seq=5, at=T0, event=req)
    decoded = codec.decode_event(codec.encode(record))
    assert request_digest("r1", decoded.event) == w.state.insts["a"].request_digest
