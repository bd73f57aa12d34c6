"""A run's waits (progress after every commit) come from an index the fold keeps
(``RunState._suspended`` / ``_awaiting``), not from a walk of every instance the run
ever had (issue 10: a step's cost must not grow with the run's length). The property:
for any plan mixing people, external events, child runs, timers, retries and
composites, driven by any order of answers, after every message the waits equal the
full walk's (same items; same order within people, and within events and children in
the order they began), and a snapshot restores the same index."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_executor import T0, World  # type: ignore[import-not-found]

from loom_core.contracts import (
    ApprovalStep,
    ErrorInfo,
    EventMatch,
    EventWaitStarted,
    ExternalEventArrived,
    ForeachStep,
    LoopStep,
    ParallelStep,
    Plan,
    ResumeRun,
    RetryPolicy,
    RunControl,
    SleepStep,
    SubRunFinished,
    SubRunRequested,
    SubRunStep,
    TimerElapsed,
    ToolStep,
    Wait,
    WaitEventStep,
)
from loom_core.executor import TERMINAL_RUN, RunState, is_open, restore, snapshot
from loom_core.waits import WAIT_TIMER_PURPOSES, state_waits

CHILD = Plan(steps=[ToolStep(id="c", tool="t")])


def full_walk(state: RunState) -> list[Wait]:
    """The waits by walking every suspension and instance (the code before the index)."""
    if state.status in TERMINAL_RUN:
        return []
    out: list[Wait] = []
    for susp in state.suspensions.values():
        if is_open(state, susp):
            out.append(Wait(kind="person", step_id=susp.step_id, ref=susp.suspension_id,
                            label=susp.label, until=susp.expires_at))  # fmt: skip
    for timer_id, (purpose, iid) in state.timers.items():
        if purpose in WAIT_TIMER_PURPOSES:
            until = state.timer_due.get(timer_id)
            out.append(Wait(kind="timer", step_id=iid or "", ref=timer_id, until=until))
    for inst in state.insts.values():
        if inst.status != "running":
            continue
        for match in inst.matches:
            if match.name not in inst.received:
                out.append(Wait(kind="event", step_id=inst.iid, ref=f"{match.name}:{match.key}"))
        if inst.child_run_id is not None:
            out.append(Wait(kind="sub_run", step_id=inst.iid, ref=inst.child_run_id))
    return out


def key(w: Wait) -> tuple[str, str, str]:
    return (w.kind, w.step_id, w.ref)


def check(state: RunState, began: list[str]) -> None:
    """``began``: instance ids in the order their event wait or child run began."""
    fast, walked = state_waits(state), full_walk(state)
    assert sorted(fast, key=key) == sorted(walked, key=key)
    for kinds in (("person",), ("timer",)):
        assert [w for w in fast if w.kind in kinds] == [w for w in walked if w.kind in kinds]
    rank = {iid: i for i, iid in enumerate(began)}  # the latest start of each id
    for kind in ("event", "sub_run"):
        mine = [key(w) for w in fast if w.kind == kind]
        assert mine == sorted(mine, key=lambda k: rank[k[1]])
    # kinds in the documented order: people, timers, events, children
    order = ["person", "timer", "event", "sub_run"]
    assert [order.index(w.kind) for w in fast] == sorted(order.index(w.kind) for w in fast)
    # the index holds only what may wait (bounded by the waits, not by the run's length)
    assert len(state._suspended) + len(state._awaiting) <= len(state.insts)
    restored = restore(snapshot(state))
    assert restored._suspended == state._suspended and restored._awaiting == state._awaiting
    assert sorted(state_waits(restored), key=key) == sorted(fast, key=key)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    counter = iter(range(10_000))

    def body(depth: int, size: int) -> list[Any]:
        steps: list[Any] = []
        for _ in range(size):
            sid = f"s{next(counter)}"
            earlier = [s.id for s in steps]
            deps = draw(st.lists(st.sampled_from(earlier), max_size=1)) if earlier else []
            kinds = ["tool", "approval", "wait", "sub", "sleep"]
            kinds += ["foreach", "parallel", "loop"] if depth < 2 else []
            kind = draw(st.sampled_from(kinds))
            retry = RetryPolicy(max_attempts=2, initial_delay_s=1) if draw(st.booleans()) else None
            on_error = draw(st.sampled_from(["fail", "continue"]))
            match kind:
                case "tool":
                    steps.append(ToolStep(id=sid, tool="t", depends_on=deps, retry=retry,
                                          on_error=on_error))  # fmt: skip
                case "approval":
                    expire = draw(st.sampled_from([None, 5.0]))
                    on_expire = draw(st.sampled_from(["fail", "default", "escalate"]))
                    on_expire = on_expire if expire else "fail"  # the others need an expiry
                    steps.append(ApprovalStep(
                        id=sid, label=f"l{sid}", depends_on=deps, expires_in_s=expire,
                        on_expire=on_expire,
                        escalate_to="boss" if on_expire == "escalate" else None,
                    ))  # fmt: skip
                case "wait":
                    names = draw(st.lists(st.sampled_from(["a", "b"]), min_size=1, unique=True))
                    steps.append(WaitEventStep(
                        id=sid, events=[EventMatch(name=n, key="k") for n in names],
                        mode=draw(st.sampled_from(["any", "all"])), depends_on=deps,
                        timeout_s=draw(st.sampled_from([None, 7.0])), on_error=on_error,
                    ))  # fmt: skip
                case "sub":
                    steps.append(SubRunStep(id=sid, plan=CHILD, depends_on=deps, on_error=on_error))
                case "sleep":
                    steps.append(SleepStep(id=sid, seconds=2, depends_on=deps))
                case "foreach":
                    steps.append(ForeachStep(id=sid, items=list(range(draw(st.integers(0, 3)))),
                                             depends_on=deps, concurrency=draw(st.integers(1, 2)),
                                             do=body(depth + 1, 1)))  # fmt: skip
                case "parallel":
                    steps.append(ParallelStep(id=sid, depends_on=deps,
                                              branches={"x": body(depth + 1, 1),
                                                        "y": body(depth + 1, 2)}))  # fmt: skip
                case _:
                    steps.append(LoopStep(id=sid, depends_on=deps, max_iterations=2,
                                          do=body(depth + 1, 1)))  # fmt: skip
        return steps

    return Plan(steps=body(0, draw(st.integers(1, 4))))


@settings(max_examples=300, deadline=None)
@given(plan=plans(), choices=st.lists(st.integers(0, 1_000), min_size=5, max_size=80))
def test_the_indexed_waits_equal_the_full_walk_after_every_message(
    plan: Plan, choices: list[int]
) -> None:
    w = World(plan)
    began: list[str] = []
    seen = 0

    def note() -> None:
        nonlocal seen
        for e in w.events[seen:]:
            if isinstance(e, EventWaitStarted | SubRunRequested):
                began.append(e.step_id)
        seen = len(w.events)
        check(w.state, began)

    note()
    for choice in choices:
        options = messages(w)
        if not options:
            break
        message, answered = options[choice % len(options)]
        if answered is not None:
            w.pending.remove(answered)
        if isinstance(message, TimerElapsed):
            w.timers = [t for t in w.timers if t.timer_id != message.timer_id]
            w.now = max(w.now + timedelta(seconds=10), T0)
        w.send(message)
        note()


def messages(w: World) -> list[tuple[Any, Any]]:
    """What may arrive next (with the call it answers): answers to calls (ok or
    failed), timers, a person's answer, events, a child's end, a cancel."""
    s = w.state
    if s.terminal:
        return []
    out: list[Any] = []
    answers = [(_result(w, r, ok), r) for r in w.pending[:3] for ok in (True, False)]
    out += [TimerElapsed(run_id=w.run_id, timer_id=t.timer_id) for t in w.timers[:2]]
    for susp in s.suspensions.values():
        if is_open(s, susp):
            out.append(ResumeRun(run_id=w.run_id, suspension_id=susp.suspension_id, data=True))
    for iid in list(s.insts):
        inst = s.insts[iid]
        if inst.status != "running":
            continue
        for m in inst.matches:
            out.append(ExternalEventArrived(run_id=w.run_id, step_id=iid, name=m.name,
                                            key=m.key, payload=1))  # fmt: skip
        if inst.child_run_id is not None:
            for status in ("completed", "failed"):
                error = ErrorInfo(code="x", message="child failed") if status == "failed" else None
                out.append(SubRunFinished(run_id=w.run_id, step_id=iid,
                                          child_run_id=inst.child_run_id, status=status,
                                          output=1, error=error))  # fmt: skip
    if not answers and not out or len(w.messages) % 23 == 0:  # now and then, a cancel
        out.append(RunControl(run_id=w.run_id, action="cancel"))
    return answers + [(m, None) for m in out]


def _result(w: World, req: Any, ok: bool) -> Any:
    from loom_core.contracts import ToolResult

    return ToolResult(run_id=w.run_id, step_id=req.step_id, attempt=req.attempt,
                      idempotency_key=req.idempotency_key, ok=ok, started_at=T0,
                      finished_at=T0, output=1 if ok else None,
                      error=None if ok else ErrorInfo(code="flaky", message="no"))  # fmt: skip
