"""The executor's decide/evolve, driven purely: a fake tool-runner answers each
ToolCallRequested; no servers, no clock."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from loom_core import ids
from loom_core.contracts import (
    ErrorInfo,
    Plan,
    PlanAccepted,
    PlanIssue,
    PlanProposed,
    PlanRefused,
    PlanRejected,
    RunCompleted,
    RunEvent,
    RunFailed,
    RunRequest,
    StepCompleted,
    StepFailed,
    StepSkipped,
    StepStarted,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_core.executor import decide, evolve, fold, initial_state

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def tool_result(
    run_id: str, req: ToolCallRequested, output: Any = None, error: ErrorInfo | None = None
) -> ToolResult:
    return ToolResult(
        run_id=run_id,
        step_id=req.step_id,
        attempt=req.attempt,
        idempotency_key=req.idempotency_key,
        ok=error is None,
        started_at=T0,
        finished_at=T0,
        output=output,
        error=error,
    )


def drive(plan: Plan, run_input: dict[str, Any], answer, order: str = "fifo", run_id: str = "r1"):
    """Run a plan to the end. ``answer(req) -> (output, error)``. Returns (events, state,
    messages) where messages are every input given to decide, in order (for replay)."""
    state = initial_state(run_id)
    events: list[RunEvent] = []
    messages: list[Any] = []

    def apply(message: Any) -> list[RunEvent]:
        messages.append(message)
        produced = decide(state, message)
        for e in produced:
            evolve(state, e)
        events.extend(produced)
        return produced

    apply(RunRequest(plan=plan, input=run_input))
    pending = [
        e for e in apply(PlanProposed(run_id=run_id, plan=plan)) if isinstance(e, ToolCallRequested)
    ]
    while pending:
        req = pending.pop(0 if order == "fifo" else -1)
        output, error = answer(req)
        produced = apply(tool_result(run_id, req, output, error))
        pending.extend(e for e in produced if isinstance(e, ToolCallRequested))
    return events, state, messages


def echo_answer(req: ToolCallRequested):
    return {"echo": req.input}, None


def step(sid: str, deps: list[str] = (), **input: Any) -> ToolStep:
    return ToolStep(id=sid, tool="echo", input=dict(input), depends_on=list(deps))


def test_sequential_plan_runs_each_step_once_and_completes() -> None:
    plan = Plan(
        steps=[step("a", x="{{ input.x }}"), step("b", ["a"], y="{{ steps.a.output.echo.x }}")]
    )
    events, state, _ = drive(plan, {"x": 7}, echo_answer)
    assert state.status == "completed"
    requests = [e for e in events if isinstance(e, ToolCallRequested)]
    assert [(r.step_id, r.input) for r in requests] == [("a", {"x": 7}), ("b", {"y": 7})]
    assert requests[0].idempotency_key == "r1:a:1"
    assert isinstance(events[-1], RunCompleted)
    assert events[-1].output == {"b": {"echo": {"y": 7}}}  # default output: sink steps


def test_dag_starts_independent_steps_together_and_joins() -> None:
    plan = Plan(steps=[step("a"), step("b"), step("c", ["a", "b"])], output="{{ steps.c.output }}")
    state = initial_state("r1")
    for e in decide(state, RunRequest(plan=plan)):
        evolve(state, e)
    first = decide(state, PlanProposed(run_id="r1", plan=plan))
    started = [e.step_id for e in first if isinstance(e, StepStarted)]
    assert started == ["a", "b"]  # no barrier: both roots at once
    for e in first:
        evolve(state, e)
    req_a = next(e for e in first if isinstance(e, ToolCallRequested) and e.step_id == "a")
    after_a = decide(state, tool_result("r1", req_a, 1))
    assert not any(isinstance(e, StepStarted) for e in after_a)  # c still waits for b


def test_redelivered_result_causes_nothing() -> None:
    plan = Plan(steps=[step("a"), step("b", ["a"])])
    state = initial_state("r1")
    for m in (RunRequest(plan=plan), PlanProposed(run_id="r1", plan=plan)):
        for e in decide(state, m):
            evolve(state, e)
    req = ToolCallRequested(step_id="a", attempt=1, tool="echo", input={}, idempotency_key="r1:a:1")
    once = decide(state, tool_result("r1", req, 1))
    for e in once:
        evolve(state, e)
    assert decide(state, tool_result("r1", req, 1)) == []
    assert decide(state, PlanProposed(run_id="r1", plan=plan)) == []
    assert decide(state, RunRequest(plan=plan)) == []


def test_failure_skips_waiting_steps_and_fails_after_inflight_finish() -> None:
    plan = Plan(steps=[step("a"), step("slow"), step("b", ["a"]), step("c", ["b"])])
    state = initial_state("r1")
    reqs: dict[str, ToolCallRequested] = {}
    for m in (RunRequest(plan=plan), PlanProposed(run_id="r1", plan=plan)):
        for e in decide(state, m):
            evolve(state, e)
            if isinstance(e, ToolCallRequested):
                reqs[e.step_id] = e
    boom = ErrorInfo(code="tool_error", message="boom")
    failed = decide(state, tool_result("r1", reqs["a"], error=boom))
    for e in failed:
        evolve(state, e)
    assert [type(e) for e in failed] == [type(failed[0]), StepFailed, StepSkipped, StepSkipped]
    assert state.status == "running"  # `slow` is still in flight: its result must be recorded
    last = decide(state, tool_result("r1", reqs["slow"], "late"))
    assert isinstance(last[-1], RunFailed)
    assert last[-1].error.details == {"step_id": "a"}
    assert "boom" in last[-1].error.message


def test_template_that_misses_at_runtime_fails_the_step_with_a_path() -> None:
    plan = Plan(steps=[step("a"), step("b", ["a"], v="{{ steps.a.output.nope }}")])
    events, state, _ = drive(plan, {}, lambda req: ({"yes": 1}, None))
    failure = next(e for e in events if isinstance(e, StepFailed))
    assert failure.step_id == "b"
    assert failure.error.code == "missing_field"
    assert "nope" in failure.error.message
    assert state.status == "failed"


def test_plan_refused_and_invalid_plan_are_rejected() -> None:
    plan = Plan(steps=[step("a", ["a"])])
    state = initial_state("r1")
    for e in decide(state, RunRequest(plan=plan)):
        evolve(state, e)
    issue = PlanIssue(code="unknown_tool", path="$.plan.steps[0].tool", message="x")
    assert decide(state, PlanRefused(run_id="r1", issues=[issue])) == [PlanRejected(issues=[issue])]
    rejected = decide(state, PlanProposed(run_id="r1", plan=plan))
    assert isinstance(rejected[0], PlanRejected)
    assert rejected[0].issues[0].code == "dependency_cycle"


# ----------------------------------------------------------------------------- properties


@st.composite
def dag_plans(draw: st.DrawFn) -> Plan:
    n = draw(st.integers(min_value=1, max_value=12))
    steps = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=3)) if i else []
        ref = draw(st.sampled_from(deps)) if deps and draw(st.booleans()) else None
        value = f"{{{{ steps.s{ref}.output }}}}" if ref is not None else i
        steps.append(
            ToolStep(
                id=f"s{i}", tool="echo", input={"v": value}, depends_on=[f"s{d}" for d in deps]
            )
        )
    return Plan(steps=steps)


@settings(max_examples=150, deadline=None)
@given(
    plan=dag_plans(),
    failing=st.sets(st.integers(0, 11), max_size=3),
    order=st.sampled_from(["fifo", "lifo"]),
)
def test_random_plans_always_end_with_consistent_statistics(
    plan: Plan, failing: set[int], order: str
) -> None:
    fail_ids = {f"s{i}" for i in failing}

    def answer(req: ToolCallRequested):
        if req.step_id in fail_ids:
            return None, ErrorInfo(code="tool_error", message="planned failure")
        return req.input["v"], None

    events, state, messages = drive(plan, {}, answer, order=order)
    assert state.terminal
    assert state.version == len(events)
    terminal = [e for e in events if isinstance(e, (RunCompleted, RunFailed))]
    assert len(terminal) == 1 and events[-1] is terminal[0]
    # each step ends exactly once; started steps each have one request and one outcome
    ends = [e.step_id for e in events if isinstance(e, (StepCompleted, StepFailed, StepSkipped))]
    assert sorted(ends) == sorted(s.id for s in plan.steps)
    started = [e.step_id for e in events if isinstance(e, StepStarted)]
    requested = [e.step_id for e in events if isinstance(e, ToolCallRequested)]
    assert started == requested and len(set(started)) == len(started)
    # a step starts only after all of its dependencies completed
    done: set[str] = set()
    for e in events:
        if isinstance(e, StepStarted):
            assert set(state.steps[e.step_id].deps) <= done
        if isinstance(e, StepCompleted):
            done.add(e.step_id)
    ran_failing = fail_ids & set(started)
    assert isinstance(terminal[0], RunFailed) == bool(ran_failing)
    # replay: folding the events gives the same state; re-deciding gives the same events
    assert fold("r1", events).status == state.status
    replayed: list[RunEvent] = []
    replay_state = initial_state("r1")
    for m in messages:
        for e in decide(replay_state, m):
            evolve(replay_state, e)
            replayed.append(e)
    assert replayed == events


def test_decide_does_not_mutate_state() -> None:
    plan = Plan(steps=[step("a"), step("b", ["a"])])
    state = initial_state("r1")
    for e in decide(state, RunRequest(plan=plan)):
        evolve(state, e)
    before = (state.version, state.status, dict(state.outputs))
    decide(state, PlanProposed(run_id="r1", plan=plan))
    assert (state.version, state.status, dict(state.outputs)) == before
    assert state.steps == {}


def test_idempotency_key_is_derived_from_run_step_attempt() -> None:
    assert ids.idempotency_key("r", "s", 2) == "r:s:2"
    events, _, _ = drive(Plan(steps=[step("only")]), {}, echo_answer, run_id="run-9")
    req = next(e for e in events if isinstance(e, ToolCallRequested))
    assert req.idempotency_key == "run-9:only:1"
    assert isinstance(events[1], PlanAccepted)
