"""Suspend/resume, replay, time travel, fork and diff, on the pure core (no servers)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from test_executor import T0, World, check_invariants, echo, tool  # type: ignore[import-not-found]

import loom_core.executor as executor
from loom_core.contracts import (
    ApprovalStep,
    ErrorInfo,
    EventRecord,
    ForeachStep,
    ParallelStep,
    Plan,
    ResumeRun,
    RetryPolicy,
    RunCompleted,
    RunDiverged,
    RunFailed,
    StepCompleted,
    StepFailed,
    StepResumed,
    StepSuspended,
    SuspendRequest,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_core.executor import advance, explain_resume
from loom_core.lineage import ForkError, diff_runs, fork_request
from loom_core.replay import replay, state_at, state_view
from loom_core.schemas import problems

SCHEMA = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}, "note": {"type": "string"}},
    "required": ["approved"],
    "additionalProperties": False,
}


def records_of(w: World) -> list[EventRecord]:
    """The world's events as the store would hold them, each stamped with the time of
    the decision that made it (replay must see the same times)."""
    return [
        EventRecord(run_id=w.run_id, seq=i, at=at, event=e)
        for i, (e, at) in enumerate(zip(w.events, w.times, strict=True), start=1)
    ]


def approval_plan(**kw: Any) -> Plan:
    return Plan(steps=[
        tool("prepare"),
        ApprovalStep(id="ok", label="manager",
                     payload={"amount": "{{ steps.prepare.output.echo }}"},
                     schema=SCHEMA, depends_on=["prepare"], **kw),
        tool("pay", ["ok"], approved="{{ steps.ok.output.approved }}"),
    ])  # fmt: skip


def resume(
    w: World,
    data: Any,
    label: str = "manager",
    request_id: str = "req-1",
    by: str = "ada",
    **kw: Any,
):
    request = ResumeRun(run_id=w.run_id, label=label, data=data, request_id=request_id, by=by, **kw)
    w.send(request)
    return explain_resume(w.state, request)


# ----------------------------------------------------------------------------- answers


def test_answer_problems_name_the_field() -> None:
    assert problems(SCHEMA, {"approved": True}) == []
    found = dict(problems(SCHEMA, {"approved": "yes", "extra": 1}, "$.data"))
    assert found["$.data.approved"] == 'expected a boolean, got a string "yes"'
    assert found["$.data.extra"].startswith("unknown field 'extra'; accepted fields: ")
    assert problems(SCHEMA, {}) == [
        ("$.approved", "missing required field 'approved' (a boolean); add it")
    ]


# ----------------------------------------------------------------------------- suspend


def test_approval_suspends_and_resume_with_valid_data_continues() -> None:
    w = World(approval_plan())
    w.run(echo)
    suspended = w.of(StepSuspended)[0]
    assert (suspended.label, suspended.suspension_id) == ("manager", "ok#1")
    assert suspended.payload == {"amount": {}}
    assert w.state.status == "running" and w.state.insts["ok"].status == "suspended"
    bad = resume(w, {"approved": "yes"})
    assert not bad.ok and bad.error.code == "invalid_resume_data"
    assert bad.error.path == "$.data.approved"
    assert w.state.insts["ok"].status == "suspended"  # still waiting: nothing recorded
    good = resume(w, {"approved": True})
    assert good.ok
    w.run(echo)
    check_invariants(w)
    assert w.of(ToolCallRequested)[-1].input == {"approved": True}
    assert isinstance(w.events[-1], RunCompleted)


def test_two_people_resume_the_same_suspension_one_wins() -> None:
    w = World(approval_plan())
    w.run(echo)
    first = resume(w, {"approved": True}, request_id="a", by="ada")
    second = resume(w, {"approved": False}, request_id="b", by="bob")
    assert first.ok and not second.ok
    assert second.error.code == "already_resumed"
    assert second.already.by == "ada" and second.already.data == {"approved": True}
    assert len(w.of(StepResumed)) == 1
    again = resume(w, {"approved": True}, request_id="a", by="ada")  # idempotent
    assert again.ok and len(w.of(StepResumed)) == 1


def test_many_suspensions_resume_independently_by_id() -> None:
    plan = Plan(steps=[ForeachStep(id="fe", items=[1, 2, 3], do=[
        ApprovalStep(id="check", label="reviewer", payload="{{ item }}",
                     schema={"type": "boolean"}),
    ])])  # fmt: skip
    w = World(plan)
    ids_ = [s.suspension_id for s in w.of(StepSuspended)]
    assert ids_ == ["fe/0/check#1", "fe/1/check#1", "fe/2/check#1"]
    ambiguous = resume(w, True, label="reviewer")
    assert not ambiguous.ok and ambiguous.error.code == "ambiguous_label"
    assert resume(w, True, label=None, suspension_id="fe/1/check#1", request_id="x").ok
    assert resume(w, False, label=None, suspension_id="fe/0/check#1", request_id="y").ok
    # a branch already resumed never reverts
    assert not resume(w, False, label=None, suspension_id="fe/1/check#1", request_id="z").ok
    assert resume(w, True, label="reviewer", request_id="w").ok  # one left: label works
    check_invariants(w)
    assert w.events[-1] == RunCompleted(output={"fe": [False, True, True]})


def test_a_recorded_label_answer_is_reported_as_recorded_and_repeats_answer_nothing_else() -> None:
    """Issue 17, item 1: elements 2 and 1 answered by id, then the last by label: the
    label answer was recorded but reported as refused (the reply looked the label up
    again and picked another, already answered suspension)."""
    plan = Plan(steps=[ForeachStep(id="each", items=[1, 2, 3], do=[
        ApprovalStep(id="ok", label="reviewer", schema={"type": "boolean"}),
        ApprovalStep(id="again", label="reviewer", schema={"type": "boolean"},
                     depends_on=["ok"]),
    ])])  # fmt: skip
    w = World(plan)
    assert resume(w, True, label=None, suspension_id="each/2/ok#1", request_id="a").ok
    assert resume(w, True, label=None, suspension_id="each/1/ok#1", request_id="b").ok
    # each/0/ok is the only "ok" still open, but each/1/again and each/2/again now wait
    # under the same label: answer by suspension id first, then the label is unique
    assert resume(w, True, label=None, suspension_id="each/1/again#1", request_id="c").ok
    assert resume(w, True, label=None, suspension_id="each/2/again#1", request_id="d").ok
    reply = resume(w, False, label="reviewer", request_id="e")
    assert reply.ok and reply.suspension_id == "each/0/ok#1", reply
    # the same request again: the same answer, and it answers nothing else (each/0/again
    # now waits under that label)
    repeat = resume(w, True, label="reviewer", request_id="e")
    assert repeat.ok and repeat.suspension_id == "each/0/ok#1", repeat
    assert w.state.insts["each/0/again"].status == "suspended"
    assert [e.request_id for e in w.of(StepResumed)] == ["a", "b", "c", "d", "e"]


def test_expiry_policies() -> None:
    for policy, expected in (("default", RunCompleted), ("fail", RunFailed)):
        w = World(approval_plan(expires_in_s=60, on_expire=policy, default={"approved": False}))
        w.run(echo)
        check_invariants(w)
        assert isinstance(w.events[-1], expected), policy
    w = World(approval_plan(expires_in_s=60, on_expire="escalate", escalate_to="director"))
    w.run(echo)
    labels = [s.label for s in w.of(StepSuspended)]
    assert labels == ["manager", "director"]
    assert isinstance(w.events[-1], RunFailed)  # the escalation expired too
    assert w.events[-1].error.code == "suspension_expired"


def test_a_tool_can_ask_to_suspend_and_is_called_again_with_the_answer() -> None:
    plan = Plan(steps=[ToolStep(id="pay", tool="payments")])
    w = World(plan)

    def answer(req: ToolCallRequested):
        if req.resume is None:
            return "suspend", None
        return {"paid": req.resume["approved"]}, None

    while w.pending:
        req = w.pending.pop(0)
        output, _ = answer(req)
        if output == "suspend":
            w.send(ToolResult(run_id="r1", step_id=req.step_id, attempt=req.attempt,
                              idempotency_key=req.idempotency_key, ok=True, started_at=T0,
                              finished_at=T0,
                              suspend=SuspendRequest(label="confirm", schema=SCHEMA)))  # fmt: skip
        else:
            w.result(req, output)
        if not w.pending and w.state.insts["pay"].status == "suspended":
            resume(w, {"approved": True}, label="confirm")
    check_invariants(w)
    assert [r.attempt for r in w.of(ToolCallRequested)] == [1, 2]
    assert w.events[-1] == RunCompleted(output={"pay": {"paid": True}})


# ----------------------------------------------------------------------------- replay


def rich_world() -> World:
    plan = Plan(steps=[
        ToolStep(id="flaky", tool="t",
                 retry=RetryPolicy(max_attempts=3, initial_delay_s=1, jitter=0.3)),
        ParallelStep(id="par", depends_on=["flaky"], branches={"a": [tool("x")], "b": [tool("y")]}),
        ApprovalStep(id="ok", label="boss", schema={"type": "boolean"}, depends_on=["par"]),
        ForeachStep(id="fe", items=[1, 2], depends_on=["ok"], do=[tool("z", v="{{ item }}")]),
    ])  # fmt: skip
    w = World(plan)
    calls = iter(range(100))
    w.run(
        lambda req: (None, ErrorInfo(code="x", message="y")) if next(calls) == 0 else ("ok", None)
    )
    w.now += timedelta(seconds=5)
    resume(w, True, label="boss")
    w.run(echo)
    assert isinstance(w.events[-1], RunCompleted)
    return w


def test_replay_of_a_recorded_run_is_identical() -> None:
    w = rich_world()
    report, state = replay(records_of(w))
    assert report.identical, report.divergence
    assert report.events == len(w.events)
    assert state.status == "completed"


def test_replay_reports_the_first_event_where_changed_code_decides_differently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = records_of(rich_world())
    # a "deploy" that changes the backoff: replay must point at the retry decision
    monkeypatch.setattr(executor, "retry_delay", lambda policy, attempt, key: 99.0)
    report, _ = replay(records)
    assert not report.identical
    first_retry = next(r for r in records if type(r.event).__name__ == "StepRetryScheduled")
    assert report.divergence.seq == first_retry.seq
    assert report.divergence.recorded["delay_s"] != 99.0
    assert report.divergence.decided["delay_s"] == 99.0


def test_a_loaded_run_whose_replay_diverged_is_parked() -> None:
    w = World(approval_plan())
    w.run(echo)
    report, state = replay(records_of(w))
    assert report.identical
    state.divergence = RunDiverged(seq=3, recorded={}, decided={}, message="test")
    produced = advance(state, ResumeRun(run_id="r1", label="manager", data={"approved": True}), T0)
    assert [type(e) for e in produced] == [RunDiverged]
    assert state.status == "diverged"
    assert (
        advance(state, ResumeRun(run_id="r1", label="manager", data={"approved": True}), T0) == []
    )


def test_state_at_any_event() -> None:
    records = records_of(rich_world())
    view = state_view(state_at(records, 5))
    assert view["version"] == 5 and view["status"] == "running"
    assert view["steps"]["flaky"] == {"status": "running", "attempt": 1}
    final = state_view(state_at(records, len(records)))
    assert final["status"] == "completed"
    assert final["suspensions"]["ok#1"]["resumed_by"] == "ada"
    with pytest.raises(ValueError, match="between 0 and"):
        state_at(records, len(records) + 1)


# ----------------------------------------------------------------------------- fork + diff


def test_fork_with_an_edited_output_changes_the_result_and_diff_shows_it() -> None:
    plan = Plan(steps=[
        ToolStep(id="fetch", tool="fetch"),
        ToolStep(id="score", tool="score", depends_on=["fetch"],
                 input={"n": "{{ steps.fetch.output.n }}"}),
        ToolStep(id="unrelated", tool="fetch"),
    ], output="{{ steps.score.output }}")  # fmt: skip

    def world_answer(req: ToolCallRequested):
        if req.tool == "fetch":
            return {"n": 2}, None
        return req.input["n"] * 10, None

    original = World(plan)
    original.run(world_answer)
    a = records_of(original)
    assert isinstance(a[-1].event, RunCompleted) and a[-1].event.output == 20

    request = fork_request(a, from_step="score", set_outputs={"fetch": {"n": 5}})
    assert request.fork.reused == {"fetch": {"n": 5}, "unrelated": {"n": 2}}
    forked = World(request.plan, run_id="r2", request=request)
    forked.run(world_answer)
    b = records_of(forked)
    assert [r.tool for r in forked.of(ToolCallRequested)] == ["score"]  # the rest reused
    assert b[-1].event.output == 50
    reused = [e for e in forked.of(StepCompleted) if e.reused_from == "r1"]
    assert {e.step_id for e in reused} == {"fetch", "unrelated"}

    changes = {d.step_id: d.changes for d in diff_runs(a, b)}
    assert changes["score"]["output"] == (20, 50)
    assert changes["score"]["inputs"] == ([{"n": 2}], [{"n": 5}])
    assert changes["fetch"]["output"] == ({"n": 2}, {"n": 5})
    with pytest.raises(ForkError, match="has no step instance 'nope'"):
        fork_request(a, from_step="nope")


def test_failed_steps_show_in_diff() -> None:
    plan = Plan(steps=[tool("a")])
    ok, bad = World(plan), World(plan)
    ok.run(echo)
    bad.run(lambda req: (None, ErrorInfo(code="boom", message="no")))
    (d,) = diff_runs(records_of(ok), records_of(bad))
    assert d.changes["status"] == ("succeeded", "failed")
    assert d.changes["error"][1] == {"code": "boom", "message": "no"}
    assert any(isinstance(e, StepFailed) for e in bad.events)
