"""Plans (other agents) an agent's model calls as tools (``loom_core.agent_delegates``),
in the pure core: a call becomes an ordinary sub-run at the call's path, the child's
output or failure is the tool's answer, bad arguments are refused and told, forged or
late ends cause nothing, and replay needs no child. The "child run" here is a message
the test sends, as the executor's sub-run consumer would."""

from __future__ import annotations

import json
from typing import Any

from test_agent import World, answer, call, check_replays  # type: ignore[import-not-found]

from loom_core import ids
from loom_core.contracts import (
    AgentDelegate,
    AgentStep,
    ErrorInfo,
    FinalStep,
    ModelCallRequested,
    ModelOutputRefused,
    Plan,
    RunCompleted,
    SubRunEnded,
    SubRunFinished,
    SubRunRequested,
    ToolStep,
)
from loom_core.executor import fold, restore, snapshot, unexpected
from loom_core.validation import validate_plan

CHILD_PLAN = Plan(
    steps=[AgentStep(id="dig", instructions="Find facts.", input="{{ input.topic }}")]
)
RESEARCHER = AgentDelegate(
    description="Finds facts about a topic",
    plan=CHILD_PLAN,
    input_schema={"type": "object", "properties": {"topic": {"type": "string"}},
                  "required": ["topic"]},
)  # fmt: skip


def plan_with(**fields: Any) -> Plan:
    step = AgentStep(id="a", instructions="Lead.", input="{{ input.q }}", tools=["echo"],
                     delegates={"researcher": RESEARCHER}, **fields)  # fmt: skip
    return Plan(steps=[step, FinalStep(id="out", output="{{ steps.a.output }}")])


def ended(w: World, req: SubRunRequested, status: str = "completed", **kw: Any) -> SubRunFinished:
    return SubRunFinished(run_id="r1", step_id=req.step_id, child_run_id=req.child_run_id,
                          status=status, **kw)  # fmt: skip


def test_a_delegate_call_is_a_sub_run_whose_output_is_the_answer() -> None:
    w = World(plan_with(), [answer(None, call("researcher", {"topic": "owls"}, "c1")),
                            answer("Owls hoot.")])  # fmt: skip
    w.run()
    first = w.of(ModelCallRequested)[0]
    assert [(d.name, d.source) for d in first.delegates] == [("researcher", "delegate")]
    assert first.delegates[0].input_schema["required"] == ["topic"]
    req = w.of(SubRunRequested)[0]
    assert req.step_id == "a/c1-0" and req.input == {"topic": "owls"}
    assert req.child_run_id == ids.child_run_id("r1", "a/c1-0") and req.plan == CHILD_PLAN
    forged = SubRunFinished(run_id="r1", step_id="a/c1-0", child_run_id="other", status="completed")
    assert unexpected(w.state, forged) is not None
    good = ended(w, req, output={"facts": ["owls hoot"]})
    assert unexpected(w.state, good) is None
    w.send(good)
    assert w.of(SubRunEnded)[0].output == {"facts": ["owls hoot"]}
    w.run()
    told = [m for m in w.said(2) if m.role == "tool"]
    assert json.loads(told[0].content or "") == {"facts": ["owls hoot"]}
    assert w.of(RunCompleted)[0].output == "Owls hoot."
    w.send(good)  # late duplicate: nothing
    assert len(w.of(SubRunEnded)) == 1
    check_replays(w)


def test_bad_arguments_are_refused_and_a_failed_child_is_told() -> None:
    w = World(plan_with(), [
        answer(None, call("researcher", {"topic": 5}, "c1"), call("researcher", "{x", "c2"),
               call("researcher", {"topic": "bats"}, "c3")),
        answer("done"),
    ])  # fmt: skip
    w.run()
    refused = {(e.call_id, e.error.code) for e in w.of(ModelOutputRefused)}
    assert refused == {("a/c1-0", "invalid_input"), ("a/c1-1", "invalid_tool_arguments")}
    req = w.of(SubRunRequested)[0]
    assert req.step_id == "a/c1-2"
    w.send(ended(w, req, "failed", error=ErrorInfo(code="sub_run_rejected", message="bad plan")))
    w.run()
    answers = [json.loads(m.content or "")["error"] for m in w.said(2) if m.role == "tool"]
    assert answers == ["invalid_input", "invalid_tool_arguments", "sub_run_rejected"]
    assert w.of(RunCompleted)[0].output == "done"
    check_replays(w)


def test_a_delegate_in_flight_survives_a_snapshot_and_a_fold() -> None:
    w = World(plan_with(), [answer(None, call("researcher", {"topic": "owls"})), answer("ok")])
    w.run()
    req = w.of(SubRunRequested)[0]
    for state in (restore(snapshot(w.state)), fold("r1", w.events)):
        assert state.agents["a"].pending == ["a/c1-0"]
        assert state.agents["a"].children == {"a/c1-0": req.child_run_id}
    w.state = fold("r1", w.events)
    w.send(ended(w, req, output="facts"))
    w.run()
    assert w.of(RunCompleted)[0].output == "ok"
    check_replays(w)


def test_an_oversized_child_output_is_told_as_an_error_not_recorded() -> None:
    from loom_core.contracts import SizeLimits

    limits = SizeLimits(step_input_bytes=100_000, step_output_bytes=1_000)
    w = World(plan_with(), [answer(None, call("researcher", {"topic": "x"})), answer("ok")],
              limits=limits)  # fmt: skip
    w.run()
    w.send(ended(w, w.of(SubRunRequested)[0], output="y" * 5_000))
    got = w.of(SubRunEnded)[0]
    assert got.output is None and got.error is not None
    w.run()
    check_replays(w)


def test_validation_of_delegates() -> None:
    listed = AgentDelegate(description="d", plan=CHILD_PLAN, input_schema={"type": "array"})
    delegates = {"echo": RESEARCHER, "bad name!": RESEARCHER, "list": listed}
    clash = AgentStep(id="a", instructions="x", tools=["echo"], delegates=delegates)
    issues = {i.path for i in validate_plan(Plan(steps=[clash]))}
    assert {"$.plan.steps[0].delegates.echo", "$.plan.steps[0].delegates.bad name!",
            "$.plan.steps[0].delegates.list.input_schema"} <= issues  # fmt: skip
    assert validate_plan(plan_with()) == []
    assert validate_plan(Plan(steps=[ToolStep(id="t", tool="echo")])) == []


def test_a_delegate_child_is_found_by_a_resume_through_the_parent() -> None:
    from loom_core.resume_route import children_of

    w = World(plan_with(), [answer(None, call("researcher", {"topic": "owls"})), answer("ok")])
    w.run()
    assert children_of(w.state) == [w.of(SubRunRequested)[0].child_run_id]


def test_a_model_that_keeps_starting_delegates_is_bounded() -> None:
    from loom_core import agent_delegates

    many = [call("researcher", {"topic": str(i)}, f"c{i}") for i in range(16)]
    turns = [answer(None, *many) for _ in range(6)]
    w = World(plan_with(max_turns=8), [*turns, answer("enough")])
    for _ in range(6):
        w.run()
        for req in [r for r in w.of(SubRunRequested) if r.step_id not in
                    {e.step_id for e in w.of(SubRunEnded)}]:  # fmt: skip
            w.send(ended(w, req, output="fact"))
    w.run()
    assert len(w.of(SubRunRequested)) == agent_delegates.MAX_CHILD_RUNS
    refused = {e.error.code for e in w.of(ModelOutputRefused)}
    assert refused == {"too_many_delegate_calls"}
    assert w.of(RunCompleted)[0].output == "enough"
    check_replays(w)
