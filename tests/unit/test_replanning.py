"""Re-planning after a failed step (``loom_core.replanning``) in the pure core: a plan
that opts in asks the planner instead of failing; the revised plan keeps the steps that
succeeded (not run again) and runs the new ones; a refused or forged answer fails the
run with the step's failure; it is bounded by ``replan.max``; replay reads the revised
plan from the history. The "planner" here is a function of the request."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from test_executor import World, echo, tool  # type: ignore[import-not-found]

from loom_core import replanning
from loom_core.contracts import (
    EventRecord,
    Plan,
    PlanIssue,
    PlanProposed,
    PlanRefused,
    PlanRevised,
    Replan,
    ReplanRefused,
    ReplanRequested,
    RunCompleted,
    RunFailed,
    StepCompleted,
    ToolCallRequested,
    ToolStep,
)
from loom_core.executor import fold, request_digest, restore, snapshot, unexpected
from loom_core.replay import replay
from loom_core.validation import validate_plan


def failing(sid: str, deps: list[str] = ()) -> ToolStep:
    return ToolStep(id=sid, tool="explode", input={}, depends_on=list(deps))


def answer(req: ToolCallRequested) -> tuple[Any, Any]:
    if req.tool == "explode":
        from loom_core.contracts import ErrorInfo

        return None, ErrorInfo(code="boom", message="it broke")
    return echo(req)


PLAN = Plan(
    steps=[tool("fetch", x=1), failing("parse", ["fetch"]), tool("report", ["parse"])],
    replan=Replan(max=2),
)


def verdict(w: World, tail: Plan | None, issues: list[PlanIssue] = ()) -> Any:
    asked = w.of(ReplanRequested)[-1]
    digest = request_digest(w.run_id, asked)
    if tail is None:
        return PlanRefused(run_id=w.run_id, issues=list(issues), request_digest=digest)
    plan = replanning.revise(asked, tail)
    return PlanProposed(run_id=w.run_id, plan=plan, planner="replan", request_digest=digest)


def records(w: World) -> list[EventRecord]:
    return [EventRecord(run_id=w.run_id, seq=i + 1, at=t, event=e)
            for i, (e, t) in enumerate(zip(w.events, w.times, strict=True))]  # fmt: skip


def test_a_failed_step_asks_for_the_rest_and_the_kept_steps_are_not_run_again() -> None:
    w = World(PLAN)
    w.run(answer)
    asked = w.of(ReplanRequested)
    assert not w.of(RunFailed) and w.state.status == "planning"
    assert [(a.attempt, a.step_id, a.error.code, a.kept) for a in asked] == [
        (1, "parse", "boom", ["fetch"])
    ]
    assert asked[0].outputs == {"fetch": {"echo": {"x": 1}}}
    tail = Plan(steps=[tool("parse2", ["fetch"], v="{{ steps.fetch.output.echo.x }}")],
                output="{{ steps.parse2.output.echo.v }}")  # fmt: skip
    message = verdict(w, tail)
    assert unexpected(w.state, message) is None
    w.send(message)
    w.run(answer)
    revised = w.of(PlanRevised)[0]
    assert [s.id for s in revised.plan.steps] == ["fetch", "parse2"] and revised.kept == ["fetch"]
    assert w.of(RunCompleted)[0].output == 1
    assert [r.step_id for r in w.of(ToolCallRequested)].count("fetch") == 1  # run once
    assert [e.step_id for e in w.of(StepCompleted)] == ["fetch", "parse2"]
    report, state = replay(records(w))
    assert report.identical, report.divergence
    assert state.status == "completed" and fold(w.run_id, w.events).status == "completed"


def test_a_refused_replan_fails_the_run_with_the_step_failure() -> None:
    w = World(PLAN)
    w.run(answer)
    w.send(verdict(w, None, [PlanIssue(code="unknown_tool", path="$.plan.steps[1].tool",
                                       message="no such tool")]))  # fmt: skip
    refused = w.of(ReplanRefused)[0]
    assert [i.code for i in refused.issues] == ["unknown_tool"]
    failed = w.of(RunFailed)[0].error
    assert failed.code == "boom" and failed.details["replan_issues"] == ["unknown_tool"]
    assert replay(records(w))[0].identical


def test_replanning_is_bounded_by_max() -> None:
    w = World(PLAN)
    w.run(answer)
    for k in range(2):  # each revision fails again
        w.send(verdict(w, Plan(steps=[failing(f"again{k}", ["fetch"])])))
        w.run(answer)
    assert w.of(ReplanRequested)[1].retired == ["again0", "parse", "report"]
    assert [a.attempt for a in w.of(ReplanRequested)] == [1, 2]
    assert len(w.of(PlanRevised)) == 2
    assert w.of(RunFailed)[0].error.code == "boom"
    assert replay(records(w))[0].identical


def test_a_proposal_that_rewrites_a_kept_step_or_names_another_request_is_refused() -> None:
    w = World(PLAN)
    w.run(answer)
    honest = verdict(w, Plan(steps=[tool("x", ["fetch"])]))
    forged = msgspec.structs.replace(honest, request_digest="0" * 32)
    assert unexpected(w.state, forged) is not None
    rewritten = msgspec.structs.replace(honest, plan=Plan(
        steps=[tool("fetch", x=2), tool("x", ["fetch"])], replan=PLAN.replan,
    ))  # fmt: skip
    w.send(rewritten)
    assert [i.path for i in w.of(ReplanRefused)[0].issues] == ["$.plan.steps"]
    assert w.of(RunFailed)
    assert replay(records(w))[0].identical


def test_without_replan_a_failure_fails_the_run_as_before() -> None:
    w = World(Plan(steps=PLAN.steps))
    w.run(answer)
    assert not w.of(ReplanRequested) and w.of(RunFailed)[0].error.code == "boom"


def test_the_state_while_replanning_survives_a_snapshot_and_a_fold() -> None:
    w = World(PLAN)
    w.run(answer)
    for state in (restore(snapshot(w.state)), fold(w.run_id, w.events)):
        assert (state.status, state.replanning, state.replans) == ("planning", 1, 1)
        assert state.replan_digest == w.state.replan_digest
    w.state = fold(w.run_id, w.events)
    w.send(verdict(w, Plan(steps=[tool("y", ["fetch"])])))
    w.run(answer)
    assert w.of(RunCompleted)


def test_validation_of_replan() -> None:
    bad = Plan(steps=PLAN.steps, replan=Replan(max=0))
    assert [(i.code, i.path) for i in validate_plan(bad)] == [("invalid_plan", "$.plan.replan.max")]
    assert validate_plan(PLAN) == []


def test_large_outputs_are_described_not_told() -> None:
    assert replanning.told({"a": 1}) == {"a": 1}
    big = replanning.told("x" * 10_000)
    assert "_large_output" in big


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(min_value=0, max_value=2), ok=st.booleans())
def test_whatever_the_planner_answers_the_run_ends_and_replays(cut: int, ok: bool) -> None:
    steps = [tool("a"), tool("b", ["a"]), failing("c", ["b"])]
    w = World(Plan(steps=steps[cut:] if cut < 2 else steps, replan=Replan(max=1)))
    w.run(answer)
    if w.state.status == "planning":
        tail = Plan(steps=[tool("d")]) if ok else Plan(steps=[failing("d")])
        w.send(verdict(w, tail))
        w.run(answer)
    assert w.state.terminal
    assert replay(records(w))[0].identical


def test_a_fork_of_a_replanned_run_runs_the_revised_plan_reusing_the_kept_step() -> None:
    from loom_core.lineage import fork_request

    w = World(PLAN)
    w.run(answer)
    w.send(verdict(w, Plan(steps=[tool("parse2", ["fetch"])])))
    w.run(answer)
    fork = fork_request(records(w), "parse2")
    assert fork.plan is not None and [s.id for s in fork.plan.steps] == ["fetch", "parse2"]
    assert fork.fork is not None and set(fork.fork.reused) == {"fetch"}


def test_a_revision_may_not_reuse_the_id_of_a_step_that_did_not_succeed() -> None:
    # its instance path names idempotency keys the tool-runner already answered
    w = World(PLAN)
    w.run(answer)
    assert w.of(ReplanRequested)[0].retired == ["parse", "report"]
    w.send(verdict(w, Plan(steps=[tool("parse", ["fetch"])])))
    refused = w.of(ReplanRefused)[0]
    assert [(i.code, i.path) for i in refused.issues] == [
        ("duplicate_step_id", "$.plan.steps[1].id")
    ]
    assert w.of(RunFailed)
    assert replay(records(w))[0].identical


def test_re_planning_usage_counts_in_the_run_budget_and_the_trace() -> None:
    from loom_core.contracts import ModelUsage, PlanningRecord
    from loom_core.spans import build_spans

    w = World(PLAN)
    w.run(answer)
    usage = ModelUsage(input_tokens=7, output_tokens=3, calls=1)
    planning = PlanningRecord(model="m", prompt_id="replan-v1:x", usage=usage)
    message = msgspec.structs.replace(verdict(w, Plan(steps=[tool("y", ["fetch"])])),
                                      planning=planning)  # fmt: skip
    w.send(message)
    w.run(answer)
    assert w.state.model_usage.tokens == 10 and w.state.model_usage.calls == 1
    spans = {s.name: s for s in build_spans(records(w))}
    assert spans["replan 1"].end is not None and spans["replan 1"].status == "ok"
    chat = spans["chat m"]
    assert chat.parent_span_id == spans["replan 1"].span_id
