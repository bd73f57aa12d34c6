"""The executor's interpreter, driven purely by a fake world: a tool-runner that answers
each ToolCallRequested, a clock that jumps to each timer, and operator controls. No
servers; time only moves when the world says so."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from loom_core.contracts import (
    ErrorInfo,
    FinalStep,
    ForeachStep,
    IfStep,
    LoopStep,
    ParallelStep,
    Plan,
    PlanProposed,
    PlanRejected,
    ReduceStep,
    RetryPolicy,
    RunCancelled,
    RunCompleted,
    RunControl,
    RunEvent,
    RunFailed,
    RunNeedsReview,
    RunRequest,
    SleepStep,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    TimerElapsed,
    TimerStarted,
    ToolCallCancelled,
    ToolCallFailed,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_core.executor import (
    RunState,
    advance,
    decide,
    fold,
    initial_state,
    retry_delay,
    unexpected,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
Answer = Callable[[ToolCallRequested], tuple[Any, ErrorInfo | None]]


class World:
    """Runs a plan to the end. ``answer(req) -> (output, error)``; ``None`` as the whole
    answer leaves the call in flight (for cancellation tests)."""

    def __init__(
        self,
        plan: Plan,
        run_input: dict[str, Any] | None = None,
        run_id: str = "r1",
        request: RunRequest | None = None,
    ) -> None:
        self.run_id = run_id
        self.state: RunState = initial_state(run_id)
        self.now = T0
        self.events: list[RunEvent] = []
        self.times: list[datetime] = []  # when each event was decided (its envelope's `at`)
        self.messages: list[tuple[Any, datetime]] = []
        self.pending: list[ToolCallRequested] = []
        self.timers: list[TimerStarted] = []
        self.send(request or RunRequest(plan=plan, input=run_input or {}))
        self.send(PlanProposed(run_id=run_id, plan=plan))

    def send(self, message: Any) -> list[RunEvent]:
        self.messages.append((message, self.now))
        produced = advance(self.state, message, self.now)
        self.events.extend(produced)
        self.times.extend([self.now] * len(produced))
        for e in produced:
            if isinstance(e, ToolCallRequested):
                self.pending.append(e)
            elif isinstance(e, TimerStarted):
                self.timers.append(e)
        return produced

    def result(
        self, req: ToolCallRequested, output: Any = None, error: ErrorInfo | None = None
    ) -> None:
        self.send(
            ToolResult(
                run_id=self.run_id, step_id=req.step_id, attempt=req.attempt,
                idempotency_key=req.idempotency_key, ok=error is None,
                started_at=self.now, finished_at=self.now, output=output, error=error,
            )
        )  # fmt: skip

    def run(self, answer: Answer, lifo: bool = False, max_turns: int = 10_000) -> None:
        for _ in range(max_turns):
            if self.pending:
                req = self.pending.pop(-1 if lifo else 0)
                reply = answer(req)
                if reply is None:
                    continue
                self.result(req, *reply)
            elif self.timers:
                self.timers.sort(key=lambda t: t.fire_at)
                timer = self.timers.pop(0)
                self.now = max(self.now, timer.fire_at)
                self.send(TimerElapsed(run_id=self.run_id, timer_id=timer.timer_id))
            else:
                return
        raise AssertionError("run did not settle")

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def echo(req: ToolCallRequested) -> tuple[Any, None]:
    return {"echo": req.input}, None


def tool(sid: str, deps: list[str] = (), **input: Any) -> ToolStep:
    return ToolStep(id=sid, tool="echo", input=dict(input), depends_on=list(deps))


def check_invariants(w: World) -> None:
    """Every run the tests drive ends consistently."""
    assert w.state.terminal or w.state.status == "needs_review"
    assert w.state.version == len(w.events)
    assert fold(w.run_id, w.events).status == w.state.status  # fold == advance
    ends: dict[str, int] = {}
    for e in w.events:
        if isinstance(e, StepCompleted | StepFailed | StepSkipped | StepCancelled):
            ends[e.step_id] = ends.get(e.step_id, 0) + 1
    assert all(n == 1 for n in ends.values()), {k: n for k, n in ends.items() if n > 1}
    scheduled = {e.step_id for e in w.of(StepScheduled)}
    if w.state.terminal:
        assert scheduled <= set(ends), scheduled - set(ends)
        assert w.state.running == 0


# ----------------------------------------------------------------------------- tool steps


def test_sequential_plan_completes_with_rendered_inputs() -> None:
    plan = Plan(
        steps=[tool("a", x="{{ input.x }}"), tool("b", ["a"], y="{{ steps.a.output.echo.x }}")]
    )
    w = World(plan, {"x": 7})
    w.run(echo)
    check_invariants(w)
    reqs = w.of(ToolCallRequested)
    assert [(r.step_id, r.input, r.idempotency_key) for r in reqs] == [
        ("a", {"x": 7}, "r1:a:1"),
        ("b", {"y": 7}, "r1:b:1"),
    ]
    assert w.events[-1] == RunCompleted(output={"b": {"echo": {"y": 7}}})


def test_dag_has_no_barrier() -> None:
    plan = Plan(steps=[tool("a"), tool("slow"), tool("b", ["a"])])
    w = World(plan)
    assert [r.step_id for r in w.pending] == ["a", "slow"]
    w.result(w.pending.pop(0), 1)
    assert [r.step_id for r in w.pending] == ["slow", "b"]  # b started while slow runs


def test_redelivered_and_late_messages_cause_nothing() -> None:
    plan = Plan(steps=[tool("a"), tool("b", ["a"])])
    w = World(plan)
    req = w.pending.pop(0)
    w.result(req, 1)
    n = len(w.events)
    w.result(req, 1)
    w.send(PlanProposed(run_id="r1", plan=plan))
    w.send(RunRequest(plan=plan))
    w.send(TimerElapsed(run_id="r1", timer_id="nope"))
    assert len(w.events) == n


def test_retries_with_backoff_timers_then_success() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay_s=1, multiplier=2)
    plan = Plan(steps=[ToolStep(id="flaky", tool="echo", retry=policy)])
    w = World(plan)
    failures = iter([True, True, False])

    def answer(req: ToolCallRequested):
        if next(failures):
            return None, ErrorInfo(code="http_error", message="503", retryable=True)
        return "ok", None

    w.run(answer)
    check_invariants(w)
    retries = w.of(StepRetryScheduled)
    assert [(r.attempt, r.delay_s) for r in retries] == [(2, 1.0), (3, 2.0)]
    timers = [t for t in w.of(TimerStarted) if t.purpose == "retry"]
    assert [t.fire_at - T0 for t in timers] == [timedelta(seconds=1), timedelta(seconds=3)]
    assert [r.attempt for r in w.of(ToolCallRequested)] == [1, 2, 3]
    assert w.events[-1] == RunCompleted(output={"flaky": "ok"})


def test_never_retried_errors_fail_at_once() -> None:
    plan = Plan(
        steps=[
            ToolStep(
                id="a", tool="echo", retry=RetryPolicy(max_attempts=5, non_retryable=["quota"])
            )
        ]
    )
    for code in ("invalid_input", "quota"):
        w = World(plan)
        w.run(lambda req, code=code: (None, ErrorInfo(code=code, message="no")))
        assert len(w.of(ToolCallRequested)) == 1
        assert isinstance(w.events[-1], RunFailed)


def test_retry_jitter_is_deterministic_and_bounded() -> None:
    policy = RetryPolicy(initial_delay_s=10, jitter=0.5)
    delays = {retry_delay(policy, 1, f"r:s:{i}") for i in range(50)}
    assert all(5 <= d <= 15 for d in delays) and len(delays) > 10
    assert retry_delay(policy, 1, "r:s:1") == retry_delay(policy, 1, "r:s:1")


def test_on_error_continue_skips_only_dependents() -> None:
    plan = Plan(steps=[
        ToolStep(id="bad", tool="echo", on_error="continue"),
        tool("after_bad", ["bad"]),
        tool("other"),
    ])  # fmt: skip
    w = World(plan)
    w.run(
        lambda req: (
            (None, ErrorInfo(code="x", message="boom")) if req.step_id == "bad" else ("ok", None)
        )
    )
    check_invariants(w)
    assert [e.step_id for e in w.of(StepSkipped)] == ["after_bad"]
    assert isinstance(w.events[-1], RunCompleted)


def test_fallback_runs_in_place_of_the_failed_step() -> None:
    plan = Plan(steps=[
        ToolStep(id="primary", tool="flaky", on_error="fallback",
                 fallback=ToolStep(id="backup", tool="echo", input={"v": 2})),
        tool("use", ["primary"], got="{{ steps.primary.output }}"),
    ])  # fmt: skip
    w = World(plan)
    w.run(
        lambda req: (
            (None, ErrorInfo(code="x", message="down")) if req.tool == "flaky" else echo(req)
        )
    )
    check_invariants(w)
    assert [r.step_id for r in w.of(ToolCallRequested)] == ["primary", "primary/fallback", "use"]
    assert w.of(ToolCallRequested)[-1].input == {"got": {"echo": {"v": 2}}}


def test_failure_skips_waiting_steps_but_records_running_ones() -> None:
    plan = Plan(steps=[tool("a"), tool("slow"), tool("b", ["a"]), tool("c", ["b"])])
    w = World(plan)
    a, slow = w.pending
    w.pending.clear()
    w.result(a, error=ErrorInfo(code="tool_error", message="boom"))
    assert [e.step_id for e in w.of(StepSkipped)] == ["b", "c"]
    assert w.state.status == "running"  # slow's result must still be recorded
    w.result(slow, "late")
    assert isinstance(w.events[-1], RunFailed)
    assert w.events[-1].error.details == {"step_id": "a"}
    check_invariants(w)


def test_ambiguous_outcome_parks_the_run_for_review() -> None:
    w = World(Plan(steps=[ToolStep(id="pay", tool="pay", retry=RetryPolicy(max_attempts=5))]))
    w.run(lambda req: (None, ErrorInfo(code="ambiguous_outcome", message="runner died")))
    assert len(w.of(ToolCallRequested)) == 1
    assert isinstance(w.events[-1], RunNeedsReview)
    assert w.state.status == "needs_review"


def test_a_redelivered_ambiguous_outcome_is_not_recorded_twice() -> None:
    """Found by the chaos suite (seed 32): the inbox ack of an ambiguous outcome was lost
    with a killed nats-server, the result came again, and tool_call_failed and
    run_needs_review were recorded a second time for the same attempt."""
    w = World(Plan(steps=[ToolStep(id="pay", tool="pay")]))
    req = w.pending.pop(0)
    ambiguous = ErrorInfo(code="ambiguous_outcome", message="runner died")
    w.result(req, error=ambiguous)
    recorded = len(w.events)
    again = ToolResult(run_id=w.run_id, step_id=req.step_id, attempt=req.attempt,
                       idempotency_key=req.idempotency_key, ok=False, started_at=w.now,
                       finished_at=w.now, error=ambiguous)  # fmt: skip
    refusal = unexpected(w.state, again, w.now)  # the inbox says so, before deciding
    assert refusal is not None and "answered already" in refusal.message
    w.result(req, error=ambiguous)  # the redelivery
    assert len(w.events) == recorded
    assert len(w.of(ToolCallFailed)) == 1 and len(w.of(RunNeedsReview)) == 1
    assert w.state.running == 0


# ----------------------------------------------------------------------------- composites


def test_foreach_keeps_input_order_and_concurrency_limit() -> None:
    body = [ToolStep(id="sq", tool="echo", input={"v": "{{ item }}", "i": "{{ index }}"})]
    plan = Plan(steps=[ForeachStep(id="fe", items="{{ input.xs }}", concurrency=2, do=body,
                                   output="{{ steps.sq.output.echo.v }}")])  # fmt: skip
    w = World(plan, {"xs": [3, 1, 2, 5]})
    in_flight = max_in_flight = 0
    assert len(w.pending) == 2  # concurrency 2
    w.run(echo, lifo=True)  # answer out of order
    check_invariants(w)
    assert w.events[-1] == RunCompleted(output={"fe": [3, 1, 2, 5]})
    for e in w.events:
        if isinstance(e, ToolCallRequested):
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
        elif isinstance(e, StepCompleted) and e.step_id.endswith("/sq"):
            in_flight -= 1
    assert max_in_flight == 2
    assert [r.step_id for r in w.of(ToolCallRequested)][:2] == ["fe/0/sq", "fe/1/sq"]


def test_foreach_elements_that_end_at_once_each_run_once() -> None:
    """Found by the random-plan property: an element whose body ends at once (an empty
    inner foreach) freed its slot while the owner was still starting its first children,
    so element 1 was started twice and ran again after the run completed."""
    inner = ForeachStep(id="in", items=[], do=[tool("t")])
    plan = Plan(steps=[ForeachStep(id="out", items=[0, 1, 2], concurrency=2, do=[inner])])
    w = World(plan)
    w.run(echo)
    check_invariants(w)
    assert [e.step_id for e in w.of(StepScheduled) if e.step_id.count("/") == 1] == [
        "out/0",
        "out/1",
        "out/2",
    ]
    assert w.events[-1] == RunCompleted(output={"out": [[], [], []]})


def test_foreach_fail_fast_cancels_in_flight_items() -> None:
    plan = Plan(
        steps=[ForeachStep(id="fe", items=[1, 2, 3], concurrency=3, do=[tool("t", v="{{ item }}")])]
    )
    w = World(plan)
    first = w.pending.pop(0)
    w.result(first, error=ErrorInfo(code="x", message="bad item"))
    cancelled = [e.step_id for e in w.of(ToolCallCancelled)]
    assert cancelled == ["fe/1/t", "fe/2/t"]
    assert isinstance(w.events[-1], RunFailed)
    check_invariants(w)


def test_foreach_collect_and_min_success() -> None:
    def answer(req: ToolCallRequested):
        return (
            (None, ErrorInfo(code="x", message="odd"))
            if req.input["v"] % 2
            else (req.input["v"], None)
        )

    collect = ForeachStep(
        id="fe", items=[0, 1, 2, 3], failure="collect", do=[tool("t", v="{{ item }}")]
    )
    w = World(Plan(steps=[collect]))
    w.run(answer)
    assert w.events[-1] == RunCompleted(output={"fe": [0, None, 2, None]})
    strict = msgspec.structs.replace(collect, min_success=3)
    w = World(Plan(steps=[strict]))
    w.run(answer)
    assert isinstance(w.events[-1], RunFailed) and w.events[-1].error.code == "too_few_successes"
    check_invariants(w)


def test_map_then_reduce() -> None:
    plan = Plan(steps=[
        ForeachStep(id="pages", items=["a b", "c", "d e f"],
                    do=[ToolStep(id="count", tool="wc", input={"t": "{{ item }}"})],
                    output="{{ steps.count.output }}"),
        ReduceStep(id="total", items="{{ steps.pages.output }}", initial=0,
                   do=[ToolStep(id="add", tool="add", input={"a": "{{ acc }}", "b": "{{ item }}"})],
                   output="{{ steps.add.output }}"),
    ], output="{{ steps.total.output }}")  # fmt: skip

    def answer(req: ToolCallRequested):
        if req.tool == "wc":
            return len(req.input["t"].split()), None
        return req.input["a"] + req.input["b"], None

    w = World(plan)
    w.run(answer)
    check_invariants(w)
    assert w.events[-1] == RunCompleted(output=6)
    adds = [r.input for r in w.of(ToolCallRequested) if r.tool == "add"]
    assert adds == [{"a": 0, "b": 2}, {"a": 2, "b": 1}, {"a": 3, "b": 3}]


def test_loop_until_and_cap() -> None:
    body = [ToolStep(id="inc", tool="inc", input={"i": "{{ iteration }}"})]
    until = LoopStep(
        id="lp", do=body, max_iterations=10, until={"gte": ["{{ steps.inc.output }}", 3]}
    )
    w = World(Plan(steps=[until]))
    w.run(lambda req: (req.input["i"] + 1, None))
    check_invariants(w)
    assert w.events[-1] == RunCompleted(output={"lp": 3})
    capped = LoopStep(id="lp", do=body, max_iterations=2, while_={"lt": ["{{ iteration }}", 100]})
    w = World(Plan(steps=[capped]))
    w.run(lambda req: (req.input["i"], None))
    assert len(w.of(ToolCallRequested)) == 2
    assert w.events[-1] == RunCompleted(output={"lp": 1})


def test_parallel_branches_join() -> None:
    plan = Plan(steps=[ParallelStep(id="par", branches={
        "left": [tool("l1"), tool("l2", ["l1"])],
        "right": [tool("r1")],
    })])  # fmt: skip
    w = World(plan)
    assert sorted(r.step_id for r in w.pending) == ["par/left/l1", "par/right/r1"]
    w.run(lambda req: (req.step_id, None))
    check_invariants(w)
    assert w.events[-1] == RunCompleted(
        output={"par": {"left": "par/left/l2", "right": "par/right/r1"}}
    )


def test_if_takes_one_branch_and_records_the_other_as_skipped() -> None:
    plan = Plan(steps=[
        tool("probe"),
        IfStep(id="cond", condition={"gt": ["{{ steps.probe.output }}", 10]},
               then=[tool("big")], else_=[tool("small"), tool("tiny")]),
        FinalStep(id="out", output={"branch": "{{ steps.cond.output }}"}, depends_on=["cond"]),
    ])  # fmt: skip
    w = World(plan)
    w.run(lambda req: (42, None) if req.step_id == "probe" else (req.step_id, None))
    check_invariants(w)
    assert {e.step_id for e in w.of(StepSkipped)} == {"cond/else/small", "cond/else/tiny"}
    assert w.events[-1] == RunCompleted(output={"branch": "cond/then/big"})


def test_sleep_is_a_durable_timer() -> None:
    plan = Plan(steps=[SleepStep(id="nap", seconds=30), tool("after", ["nap"])])
    w = World(plan)
    timer = w.of(TimerStarted)[0]
    assert (timer.purpose, timer.fire_at) == ("sleep", T0 + timedelta(seconds=30))
    assert w.pending == []  # nothing runs while sleeping
    w.run(echo)
    assert isinstance(w.events[-1], RunCompleted)
    assert w.of(ToolCallRequested)[0].step_id == "after"


def test_step_timeout_cancels_the_attempt_and_fails() -> None:
    plan = Plan(steps=[ToolStep(id="slow", tool="echo", step_timeout_s=5)])
    w = World(plan)
    w.run(lambda req: None)  # never answers
    check_invariants(w)
    assert [e.step_id for e in w.of(ToolCallCancelled)] == ["slow"]
    assert w.events[-1].error.code == "step_timeout"


def test_run_timeout_cancels_everything() -> None:
    plan = Plan(steps=[tool("a"), SleepStep(id="s", seconds=100)], timeout_s=10)
    w = World(plan)
    w.run(lambda req: None)
    check_invariants(w)
    assert isinstance(w.events[-1], RunFailed) and w.events[-1].error.code == "run_timeout"
    assert {e.step_id for e in w.of(StepCancelled)} == {"a", "s"}


# ----------------------------------------------------------------------------- control


def test_cancel_tells_in_flight_calls_and_records_every_step() -> None:
    plan = Plan(
        steps=[tool("a"), tool("b", ["a"]), ForeachStep(id="fe", items=[1, 2], do=[tool("t")])]
    )
    w = World(plan)
    w.send(RunControl(run_id="r1", action="cancel", by="ada", reason="wrong input"))
    check_invariants(w)
    assert {e.step_id for e in w.of(ToolCallCancelled)} == {"a", "fe/0/t", "fe/1/t"}
    assert {"a", "b", "fe", "fe/0", "fe/1", "fe/0/t", "fe/1/t"} <= {
        e.step_id for e in w.of(StepCancelled)
    }
    assert w.events[-1] == RunCancelled(by="ada", reason="wrong input")
    n = len(w.events)
    w.result(w.pending[0], 1)  # a late result changes nothing
    assert len(w.events) == n


def test_pause_holds_new_steps_and_unpause_resumes() -> None:
    plan = Plan(steps=[tool("a"), tool("b", ["a"])])
    w = World(plan)
    w.send(RunControl(run_id="r1", action="pause", by="ada"))
    assert w.state.status == "paused"
    w.result(w.pending.pop(0), 1)  # in-flight work finishes and is recorded
    assert not any(r.step_id == "b" for r in w.of(ToolCallRequested))
    w.send(RunControl(run_id="r1", action="unpause", by="ada"))
    assert w.of(ToolCallRequested)[-1].step_id == "b"
    w.run(echo)
    check_invariants(w)
    assert isinstance(w.events[-1], RunCompleted)


def test_invalid_plan_is_rejected_by_the_executor_too() -> None:
    w = World(Plan(steps=[tool("a", ["a"])]))
    assert isinstance(w.events[-1], PlanRejected)


# ----------------------------------------------------------------------------- properties


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """Random plans mixing tool steps, foreach, if and parallel, with valid references."""
    counter = iter(range(10_000))

    def body(depth: int, size: int) -> list[Any]:
        steps: list[Any] = []
        for i in range(size):
            sid = f"s{next(counter)}"
            deps = (
                draw(st.lists(st.sampled_from([s.id for s in steps]), unique=True, max_size=2))
                if steps
                else []
            )
            kind = draw(
                st.sampled_from(["tool"] * 4 + (["foreach", "if", "parallel"] if depth < 2 else []))
            )
            retry = RetryPolicy(max_attempts=2, initial_delay_s=1) if draw(st.booleans()) else None
            on_error = draw(st.sampled_from(["fail", "continue"]))
            if kind == "tool":
                steps.append(
                    ToolStep(
                        id=sid,
                        tool="t",
                        input={"v": i},
                        depends_on=deps,
                        retry=retry,
                        on_error=on_error,
                    )
                )
            elif kind == "foreach":
                steps.append(
                    ForeachStep(
                        id=sid,
                        items=list(range(draw(st.integers(0, 3)))),
                        depends_on=deps,
                        concurrency=draw(st.integers(1, 3)),
                        do=body(depth + 1, 1),
                        failure=draw(st.sampled_from(["fail_fast", "collect"])),
                    )
                )
            elif kind == "if":
                steps.append(
                    IfStep(
                        id=sid,
                        condition={"eq": ["{{ input.flag }}", True]},
                        depends_on=deps,
                        then=body(depth + 1, 1),
                        else_=body(depth + 1, 1),
                    )
                )
            else:
                steps.append(
                    ParallelStep(
                        id=sid,
                        depends_on=deps,
                        branches={"x": body(depth + 1, 1), "y": body(depth + 1, 2)},
                    )
                )
        return steps  # fmt: skip

    return Plan(steps=body(0, draw(st.integers(1, 5))))


@settings(max_examples=120, deadline=None)
@given(plan=plans(), fail_mod=st.integers(2, 7), flag=st.booleans(), lifo=st.booleans())
def test_random_plans_always_end_consistently_and_replay_exactly(
    plan: Plan, fail_mod: int, flag: bool, lifo: bool
) -> None:
    calls = iter(range(10_000))

    def answer(req: ToolCallRequested):
        if next(calls) % fail_mod == 0:
            return None, ErrorInfo(code="flaky", message="planned failure")
        return req.input, None

    w = World(plan, {"flag": flag})
    w.run(answer, lifo=lifo)
    check_invariants(w)
    # replay: the same messages at the same times give the same events
    replay = initial_state("r1")
    replayed: list[RunEvent] = []
    for message, at in w.messages:
        replayed.extend(advance(replay, message, at))
    assert replayed == w.events


def test_decide_is_pure_and_equals_advance() -> None:
    plan = Plan(steps=[tool("a"), tool("b", ["a"])])
    w = World(plan)
    snapshot = copy.deepcopy(w.state)
    req = w.pending[0]
    message = ToolResult(run_id="r1", step_id="a", attempt=1, idempotency_key=req.idempotency_key,
                         ok=True, started_at=T0, finished_at=T0, output=1)  # fmt: skip
    pure = decide(w.state, message, T0)
    assert w.state.version == snapshot.version and w.state.insts.keys() == snapshot.insts.keys()
    assert advance(w.state, message, T0) == pure
    assert [type(e) for e in pure][:3] == [type(pure[0]), StepCompleted, StepScheduled]
    assert isinstance(pure[-1], ToolCallRequested) and isinstance(pure[-2], StepStarted)


def queued_run(*controls: str) -> tuple[RunState, list[RunEvent]]:
    """A one-step run submitted over its queue's limit and planned, then the operator's
    ``controls`` (pause, unpause) sent while it waits in the queue."""
    from loom_core.executor import Submission

    plan = Plan(steps=[tool("a")])
    state = initial_state("r1")
    events: list[RunEvent] = []
    messages: list[Any] = [Submission(RunRequest(plan=plan), queued=True),
                           PlanProposed(run_id="r1", plan=plan)]  # fmt: skip
    messages += [RunControl(run_id="r1", action=c, by="ada") for c in controls]  # type: ignore[arg-type]
    for message in messages:
        events += advance(state, message, T0)
    return state, events


def test_a_pause_sent_while_the_run_is_queued_holds_after_admission() -> None:
    from loom_core.contracts import RunAdmitted, RunPaused, RunUnpaused
    from loom_core.executor import Admit

    state, events = queued_run("pause")
    assert state.status == "queued" and [type(e) for e in events].count(RunPaused) == 1
    events += advance(state, Admit(), T0)
    assert isinstance(events[-1], RunAdmitted)
    assert state.status == "paused"  # the pause was not lost with the queue's hold
    assert not any(isinstance(e, ToolCallRequested) for e in events)
    after = advance(state, RunControl(run_id="r1", action="unpause", by="ada"), T0)
    assert isinstance(after[0], RunUnpaused) and isinstance(after[-1], ToolCallRequested)


def test_an_unpause_while_queued_does_not_jump_the_queue() -> None:
    from loom_core.executor import Admit

    state, events = queued_run("pause", "unpause")
    assert state.status == "queued"
    assert not any(isinstance(e, ToolCallRequested) for e in events)
    events += advance(state, Admit(), T0)
    assert isinstance(events[-1], ToolCallRequested) and state.status == "running"
