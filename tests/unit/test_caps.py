"""Issue 9 point 3: fan-out is bounded by configuration (``loom_core.caps``), and a run's
memory follows what runs now, not how many foreach elements have ended.

Reproduced on main first: a foreach over 100,000 items was accepted, and the executor
kept two instances per ended element (executor memory 121 -> 528 MB; 1.8 KB per element
in the pure core, a snapshot of 91 MB at the end)."""

from __future__ import annotations

import gc
import tracemalloc
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from loom_core import caps as fanout
from loom_core.contracts import (
    Caps,
    EventRecord,
    ForeachStep,
    LoopStep,
    ParallelStep,
    Plan,
    PlanProposed,
    PlanRejected,
    ReduceStep,
    RunCompleted,
    RunEvent,
    RunFailed,
    RunRequest,
    RunRequested,
    SizeLimits,
    StepFailed,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_core.executor import (
    RunState,
    Submission,
    advance,
    fold,
    initial_state,
    restore,
    snapshot,
)
from loom_core.replay import replay
from loom_core.validation import validate_plan
from loom_infra.settings import SettingsError, caps_from_env

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SMALL = Caps(foreach_items=5, foreach_concurrency=4, parallel_branches=2, loop_iterations=3)
BIG = 1 << 30


def noop(sid: str = "t", **input: Any) -> ToolStep:
    return ToolStep(id=sid, tool="noop", input=dict(input))


def foreach(items: Any, concurrency: int = 2, **kw: Any) -> ForeachStep:
    return ForeachStep(id="fe", items=items, concurrency=concurrency, do=[noop(v="{{ item }}")],
                       **kw)  # fmt: skip


class Driver:
    """Submits ``plan`` as the executor host would (a Submission with recorded caps) and
    answers every tool call at once, in order; keeps every event and message."""

    def __init__(self, plan: Plan, caps: Caps | None, run_input: dict[str, Any] | None = None,
                 limits: SizeLimits | None = None) -> None:  # fmt: skip
        self.state: RunState = initial_state("r1")
        self.now = T0
        self.events: list[RunEvent] = []
        self.pending: deque[ToolCallRequested] = deque()
        self.send(Submission(RunRequest(plan=plan, input=run_input or {}), limits=limits,
                             caps=caps))  # fmt: skip
        self.send(PlanProposed(run_id="r1", plan=plan))

    def send(self, message: Any) -> list[RunEvent]:
        produced = advance(self.state, message, self.now)
        self.events.extend(produced)
        self.pending.extend(e for e in produced if isinstance(e, ToolCallRequested))
        return produced

    def answer_one(self) -> None:
        req = self.pending.popleft()
        self.now += timedelta(milliseconds=1)
        self.send(ToolResult(
            run_id="r1", step_id=req.step_id, attempt=req.attempt,
            idempotency_key=req.idempotency_key, ok=True, started_at=self.now,
            finished_at=self.now, output={"i": req.input.get("v")},
        ))  # fmt: skip

    def run(self) -> None:
        while self.pending:
            self.answer_one()


# ----------------------------------------------------------------------------- static caps


@pytest.mark.parametrize(
    ("step", "code", "path", "count", "cap"),
    [
        (foreach(list(range(6))), "too_many_items", "$.plan.steps[0].items", 6, 5),
        (ReduceStep(id="fe", items=list(range(9)), initial=0, do=[noop()]),
         "too_many_items", "$.plan.steps[0].items", 9, 5),
        (foreach([1], concurrency=5), "too_much_concurrency", "$.plan.steps[0].concurrency",
         5, 4),
        (ParallelStep(id="fe", branches={k: [noop(f"t{k}")] for k in "abc"}),
         "too_many_branches", "$.plan.steps[0].branches", 3, 2),
        (LoopStep(id="fe", do=[noop()], max_iterations=4),
         "too_many_iterations", "$.plan.steps[0].max_iterations", 4, 3),
    ],
)  # fmt: skip
def test_validation_refuses_fan_out_over_the_caps_naming_step_count_cap_setting(
    step: Any, code: str, path: str, count: int, cap: int
) -> None:
    plan = Plan(steps=[step])
    [issue] = validate_plan(plan, caps=SMALL)
    assert (issue.code, issue.path) == (code, path)
    setting = {"too_many_items": fanout.ITEMS_SETTING,
               "too_much_concurrency": fanout.CONCURRENCY_SETTING,
               "too_many_branches": fanout.BRANCHES_SETTING,
               "too_many_iterations": fanout.ITERATIONS_SETTING}[code]  # fmt: skip
    assert "'fe'" in issue.message and str(count) in issue.message
    assert f"cap of {cap}" in issue.message and setting in issue.message
    assert validate_plan(plan) == []  # no caps given (a run recorded before caps): none
    assert validate_plan(plan, caps=fanout.DEFAULT_CAPS) == []


def test_a_nested_fan_out_is_checked_too_and_at_the_cap_is_fine() -> None:
    inner = foreach(list(range(5)), concurrency=4)
    plan = Plan(steps=[LoopStep(id="lp", do=[inner], max_iterations=3)])
    assert validate_plan(plan, caps=SMALL) == []
    inner = foreach(list(range(6)))
    issues = validate_plan(Plan(steps=[LoopStep(id="lp", do=[inner], max_iterations=3)]),
                           caps=SMALL)  # fmt: skip
    assert [(i.code, i.path) for i in issues] == [("too_many_items", "$.plan.steps[0].do[0].items")]


def test_the_executor_rejects_a_static_fan_out_over_the_runs_recorded_caps() -> None:
    d = Driver(Plan(steps=[foreach(list(range(6)))]), SMALL)
    [requested] = [e for e in d.events if isinstance(e, RunRequested)]
    assert requested.caps == SMALL  # recorded: replay decides with the same caps
    [rejected] = [e for e in d.events if isinstance(e, PlanRejected)]
    assert [i.code for i in rejected.issues] == ["too_many_items"]
    assert d.state.status == "rejected"


# ----------------------------------------------------------------------------- dynamic items


def test_a_rendered_list_over_the_cap_fails_the_step_with_a_typed_error() -> None:
    plan = Plan(steps=[foreach("{{ input.xs }}"), noop("after")])
    d = Driver(plan, SMALL, {"xs": list(range(6))})
    [failed] = [e for e in d.events if isinstance(e, StepFailed)]
    error = failed.error
    assert failed.step_id == "fe" and error.code == "too_many_items"
    assert error.path == "$.steps.fe.items"
    assert error.details == {"step_id": "fe", "count": 6, "cap": 5,
                             "setting": fanout.ITEMS_SETTING}  # fmt: skip
    assert "step 'fe'" in error.message and fanout.ITEMS_SETTING in error.message
    assert not d.pending  # no element started
    assert isinstance(d.events[-1], RunFailed) and d.events[-1].error.code == "too_many_items"
    # at the cap it runs
    d = Driver(plan, SMALL, {"xs": list(range(5))})
    d.run()
    assert isinstance(d.events[-1], RunCompleted)


def test_the_count_is_checked_before_the_size_the_clearer_error() -> None:
    small_input = SizeLimits(step_input_bytes=1024, step_output_bytes=1024)
    d = Driver(Plan(steps=[foreach("{{ input.xs }}")]), SMALL, {"xs": ["x" * 100] * 20},
               limits=small_input)  # fmt: skip
    [failed] = [e for e in d.events if isinstance(e, StepFailed)]
    assert failed.error.code == "too_many_items"


def test_a_run_recorded_without_caps_is_decided_without_them() -> None:
    """Old histories replay: ``caps`` None means no cap, never today's defaults."""
    plan = Plan(steps=[foreach("{{ input.xs }}", concurrency=100)])
    state = initial_state("r1")
    events = advance(state, RunRequest(plan=plan, input={"xs": list(range(12_000))}), T0)
    events += advance(state, PlanProposed(run_id="r1", plan=plan), T0)
    assert state.caps is None and not any(isinstance(e, StepFailed) for e in events)
    assert sum(isinstance(e, ToolCallRequested) for e in events) == 100


def test_replay_decides_the_caps_again_from_the_record() -> None:
    plan = Plan(steps=[foreach("{{ input.xs }}"), noop("other")])
    d = Driver(plan, SMALL, {"xs": list(range(6))})
    d.run()
    assert any(isinstance(e, StepFailed) and e.error.code == "too_many_items" for e in d.events)
    history = [EventRecord(run_id="r1", seq=i + 1, at=T0, event=e)
               for i, e in enumerate(d.events)]  # fmt: skip
    report, _ = replay(history)
    assert report.identical, report.divergence


# ----------------------------------------------------------------------------- settings


def test_settings_give_the_caps_with_defaults_and_bounds() -> None:
    assert caps_from_env({}) == fanout.DEFAULT_CAPS
    assert caps_from_env({fanout.ITEMS_SETTING: "20"}).foreach_items == 20
    for name, bad in ((fanout.ITEMS_SETTING, "0"), (fanout.ITERATIONS_SETTING, "100001"),
                      (fanout.CONCURRENCY_SETTING, "many")):  # fmt: skip
        with pytest.raises(SettingsError, match=name):
            caps_from_env({name: bad})


# ----------------------------------------------------------------------------- memory


def _drive_foreach(n: int, measure_at: int) -> tuple[int, int, int, int]:
    """Runs a foreach of ``n`` noop elements at concurrency 8; returns (the most
    instances alive at once, traced bytes held by the state after ``measure_at``
    answers, the snapshot's size then, events)."""
    big = Caps(foreach_items=BIG, foreach_concurrency=BIG, parallel_branches=BIG,
               loop_iterations=BIG)  # fmt: skip
    limits = SizeLimits(step_input_bytes=BIG, step_output_bytes=BIG)
    plan = Plan(steps=[foreach(list(range(n)), concurrency=8)])
    d = Driver(plan, big, limits=limits)
    d.events.clear()  # the driver's record is not the run's memory
    most, held, snap, answered = 0, 0, 0, 0
    while d.pending:
        d.answer_one()
        d.events.clear()
        answered += 1
        most = max(most, len(d.state.insts))
        if answered == measure_at:
            gc.collect()
            held = tracemalloc.get_traced_memory()[0]
            snap = len(snapshot(d.state))
    return most, held, snap, answered


def test_a_foreach_holds_only_its_running_elements_and_their_outputs() -> None:
    """The state of a run keeps, per ended element, its output (the foreach's result
    needs it) and nothing else: no instances, no scope. Without ``_forget`` the state
    held two instances per ended element (~1.8 KB each) and the snapshot ~0.9 KB."""
    tracemalloc.start()
    try:
        most_small, held_small, snap_small, _ = _drive_foreach(2000, 1000)
        most_big, held_big, snap_big, _ = _drive_foreach(6000, 5000)
    finally:
        tracemalloc.stop()
    # instances: the foreach and its 8 running elements (2 each), whatever n is
    assert most_small <= 1 + 2 * 8 and most_big <= 1 + 2 * 8
    per_element = (held_big - held_small) / 4000
    # an output ({"i": n}: a dict, a key) and its slot: ~300 B; before: ~2,000 B
    assert per_element < 600, per_element
    per_element_snapshot = (snap_big - snap_small) / 4000
    assert per_element_snapshot < 100, per_element_snapshot  # before: ~900 B


def test_loops_and_reduces_keep_only_their_latest_result() -> None:
    body = [noop(v="{{ iteration }}")]
    plan = Plan(steps=[
        LoopStep(id="lp", do=body, max_iterations=50,
                 until={"gte": ["{{ steps.t.output.i }}", 40]}),
        ReduceStep(id="rd", items=list(range(30)), initial=0,
                   do=[noop("u", v="{{ item }}")], output="{{ steps.u.output.i }}"),
    ])  # fmt: skip
    d = Driver(plan, fanout.DEFAULT_CAPS)
    most = 0
    while d.pending:
        d.answer_one()
        most = max(most, len(d.state.insts), *(len(i.results) for i in d.state.insts.values()))
    assert isinstance(d.events[-1], RunCompleted), d.events[-1]
    assert d.events[-1].output == {"lp": {"i": 40}, "rd": 29}
    assert most <= 6
    assert fold("r1", d.events).output == d.state.output


def test_snapshot_of_a_compacted_state_continues_the_same() -> None:
    """Restoring mid-run (a foreach with nested parallels and loops) then continuing
    decides exactly what the live state decides."""
    inner = ParallelStep(id="par", branches={
        "a": [noop("x", v="{{ item }}")],
        "b": [LoopStep(id="lp", do=[noop("y", v="{{ iteration }}")], max_iterations=2)],
    })  # fmt: skip
    plan = Plan(steps=[ForeachStep(id="fe", items=list(range(12)), concurrency=3, do=[inner])])
    live = Driver(plan, fanout.DEFAULT_CAPS)
    for _ in range(15):
        live.answer_one()
    copy = restore(snapshot(live.state))
    assert snapshot(copy) == snapshot(live.state)
    twin = Driver.__new__(Driver)
    twin.state, twin.now, twin.events, twin.pending = copy, live.now, [], deque(live.pending)
    live_from = len(live.events)
    live.run()
    twin.run()
    assert twin.events == live.events[live_from:]
    assert isinstance(live.events[-1], RunCompleted)
    assert len(live.events[-1].output["fe"]) == 12


def test_a_snapshot_of_the_old_layout_is_not_restored() -> None:
    """The host then folds the history (a snapshot is a cache)."""
    state = Driver(Plan(steps=[noop()]), None).state
    with pytest.raises((msgspec.ValidationError, ValueError)):
        restore(msgspec.json.encode({"run_id": "r1", "version": state.version}))
