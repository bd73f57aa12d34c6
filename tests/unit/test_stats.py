"""Run statistics from events alone: worked examples with exact numbers, then property
tests over simulated runs (retries, failures, skips, timers, pauses, reviews,
cancellation, nested step ids) checked against the simulator's own bookkeeping."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_core import ids
from loom_core.contracts import (
    ApprovalStep,
    ErrorInfo,
    EventMatch,
    EventReceived,
    EventRecord,
    EventWaitStarted,
    ForeachStarted,
    ForeachStep,
    Plan,
    PlanAccepted,
    PlanIssue,
    PlanRejected,
    RunCancelled,
    RunCompleted,
    RunEvent,
    RunFailed,
    RunNeedsReview,
    RunPaused,
    RunRequested,
    RunUnpaused,
    SleepStep,
    Step,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepResumed,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    StepSuspended,
    SubRunEnded,
    SubRunRequested,
    SubRunStep,
    TimerFired,
    TimerStarted,
    ToolCallCancelled,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolStep,
    WaitEventStep,
)
from loom_core.stats import PendingWork, RunStats, StepCounts, StepStats, run_stats

T0 = datetime(2026, 11, 2, 9, 0, 0, tzinfo=UTC)
RUN = "run-1"
ERR = ErrorInfo(code="boom", message="it broke", retryable=True)


def ms(n: float) -> datetime:
    return T0 + timedelta(milliseconds=n)


class Script:
    """Builds a run's EventRecords with explicit times (ms after T0)."""

    def __init__(self, run_id: str = RUN) -> None:
        self.run_id = run_id
        self.records: list[EventRecord] = []

    def add(self, t: float, event: RunEvent) -> EventRecord:
        rec = EventRecord(run_id=self.run_id, seq=len(self.records) + 1, at=ms(t), event=event)
        self.records.append(rec)
        return rec

    def start(self, t: float, plan: Plan) -> None:
        self.add(t, RunRequested(plan=plan))
        self.add(t, PlanAccepted(plan=plan))

    def request(self, t: float, sid: str, n: int = 1, tool: str = "echo") -> None:
        self.add(t, StepStarted(step_id=sid, attempt=n))
        key = ids.idempotency_key(self.run_id, sid, n)
        self.add(
            t,
            ToolCallRequested(step_id=sid, attempt=n, tool=tool, input={}, idempotency_key=key),
        )

    def ok(self, t: float, sid: str, n: int, started: float, finished: float) -> None:
        key = ids.idempotency_key(self.run_id, sid, n)
        self.add(
            t,
            ToolCallCompleted(
                step_id=sid,
                attempt=n,
                idempotency_key=key,
                output=n,
                started_at=ms(started),
                finished_at=ms(finished),
            ),
        )

    def fail(self, t: float, sid: str, n: int, started: float, finished: float) -> None:
        key = ids.idempotency_key(self.run_id, sid, n)
        self.add(
            t,
            ToolCallFailed(
                step_id=sid,
                attempt=n,
                idempotency_key=key,
                error=ERR,
                started_at=ms(started),
                finished_at=ms(finished),
            ),
        )


def tool_plan(*step_ids: str, name: str = "demo") -> Plan:
    return Plan(steps=[ToolStep(id=s, tool=f"t_{s}") for s in step_ids], name=name)


def counts(s: RunStats) -> dict[str, int]:
    keys = ("succeeded", "failed", "skipped", "cancelled", "running", "pending", "total")
    return {k: getattr(s, k) for k in keys}


# --------------------------------------------------------------------------- examples


def two_step_success() -> Script:
    s = Script()
    s.start(0, tool_plan("fetch", "summarize"))
    s.add(2, StepScheduled(step_id="fetch"))
    s.request(2, "fetch", tool="http_get")
    s.ok(10, "fetch", 1, started=3, finished=9)
    s.add(10, StepCompleted(step_id="fetch", output=1))
    s.add(10, StepScheduled(step_id="summarize"))
    s.request(10, "summarize", tool="summarize")
    s.ok(20, "summarize", 1, started=12, finished=19)
    s.add(20, StepCompleted(step_id="summarize", output=2))
    s.add(21, RunCompleted(output=2))
    return s


def test_completed_run_counts_times_and_steps() -> None:
    stats = run_stats(two_step_success().records)
    assert (stats.run_id, stats.status, stats.name) == (RUN, "completed", "demo")
    assert (stats.started_at, stats.ended_at, stats.duration_ms) == (ms(0), ms(21), 21.0)
    assert stats.last_event_at == ms(21)
    assert stats.events == 13
    assert counts(stats) == {
        "succeeded": 2,
        "failed": 0,
        "skipped": 0,
        "cancelled": 0,
        "running": 0,
        "pending": 0,
        "total": 2,
    }
    assert (stats.attempts, stats.retries, stats.tool_calls_failed, stats.planned) == (2, 0, 0, 2)
    assert stats.running_ms == pytest.approx(6 + 7)  # tool clocks: 3..9 and 12..19
    assert stats.queued_ms == pytest.approx(1 + 2)  # requested at 2 and 10
    assert (stats.waiting_ms, stats.timer_wait_ms, stats.paused_ms) == (0.0, 0.0, 0.0)
    assert stats.pending_work == ()
    assert stats.terminal
    assert stats.per_step == (
        StepStats("fetch", "succeeded", "tool", "t_fetch", 1, 8.0),
        StepStats("summarize", "succeeded", "tool", "t_summarize", 1, 10.0),
    )


def retry_script() -> Script:
    s = Script()
    s.start(0, tool_plan("a"))
    s.add(0, StepScheduled(step_id="a"))
    s.request(0, "a")
    s.add(0, TimerStarted(timer_id="to-a", fire_at=ms(5000), purpose="step_timeout", step_id="a"))
    s.fail(6, "a", 1, started=1, finished=5)
    s.add(6, StepRetryScheduled(step_id="a", attempt=1, delay_s=0.1, error=ERR))
    s.add(6, TimerStarted(timer_id="r-a-1", fire_at=ms(106), purpose="retry", step_id="a"))
    return s


def test_retry_wait_is_pending_work_and_waiting_time() -> None:
    s = retry_script()
    live = run_stats(s.records)
    assert live.status == "running"
    assert (live.attempts, live.retries, live.tool_calls_failed) == (1, 1, 1)
    assert (live.pending, live.running, live.total) == (1, 0, 1)  # between attempts
    assert live.duration_ms is None and live.ended_at is None
    # the retry timer is open: measured to the last event (no clock inside stats) ...
    assert live.timer_wait_ms == 0.0
    # ... or to the moment the caller names
    later = run_stats(s.records, as_of=ms(56))
    assert later.timer_wait_ms == pytest.approx(50.0)
    assert later.waiting_ms == pytest.approx(50.0)
    # an as_of before the last event never makes time negative
    assert run_stats(s.records, as_of=ms(-1000)).timer_wait_ms == 0.0
    # the step_timeout guard is not something the run waits on
    assert live.pending_work == (
        PendingWork(
            "timer",
            f"step a: retry timer fires at {ms(106).isoformat(timespec='milliseconds')}",
            "a",
            since=ms(6),
            until=ms(106),
            ref="r-a-1",
        ),
    )

    s.add(110, TimerFired(timer_id="r-a-1"))
    s.request(110, "a", 2)
    mid = run_stats(s.records)
    assert (mid.running, mid.pending, mid.attempts) == (1, 0, 2)
    assert [w.kind for w in mid.pending_work] == ["tool_call"]
    assert "tool echo, attempt 2" in mid.pending_work[0].text

    s.ok(121, "a", 2, started=112, finished=120)
    s.add(121, StepCompleted(step_id="a", output=2))
    s.add(121, RunCompleted(output=2))
    done = run_stats(s.records, as_of=ms(99999))  # ignored once the run ended
    assert done.status == "completed"
    assert (done.attempts, done.retries, done.tool_calls_failed, done.succeeded) == (2, 1, 1, 1)
    assert done.running_ms == pytest.approx(4 + 8)
    assert done.queued_ms == pytest.approx(1 + 2)
    assert done.timer_wait_ms == pytest.approx(104.0)  # TimerStarted at 6 to TimerFired at 110
    assert done.waiting_ms == pytest.approx(104.0)  # the step_timeout guard is not a wait
    assert done.per_step == (StepStats("a", "succeeded", "tool", "t_a", 2, 121.0),)


def test_paused_run_with_a_call_in_flight() -> None:
    s = Script()
    s.start(0, tool_plan("a", "b"))
    s.add(1, StepScheduled(step_id="a"))
    s.request(1, "a", tool="slow")
    s.add(10, RunPaused(by="alice@box", reason="investigating"))
    s.add(30, StepScheduled(step_id="zz"))  # any later event moves the horizon
    stats = run_stats(s.records)
    assert stats.status == "paused"
    assert stats.paused_ms == pytest.approx(20.0)
    assert run_stats(s.records, as_of=ms(110)).paused_ms == pytest.approx(100.0)
    assert [w.kind for w in stats.pending_work] == ["paused", "tool_call"]
    assert stats.pending_work[0].text == "paused by alice@box: investigating"
    assert stats.pending_work[0].since == ms(10)
    assert stats.pending_work[1].text.startswith("step a: tool slow, attempt 1, in flight since")
    assert stats.pending_work[1].step_id == "a"
    # b is in the plan but has no event: listed, not counted as an instance
    assert [(p.id, p.status) for p in stats.per_step] == [
        ("a", "running"),
        ("b", "not_started"),
        ("zz", "pending"),
    ]
    assert (stats.total, stats.running, stats.pending, stats.planned) == (2, 1, 1, 2)

    s.add(50, RunUnpaused(by="alice@box"))
    s.add(60, RunPaused(by="bob"))
    s.add(70, RunPaused(by="carol"))  # already paused: the first pause stands
    resumed = run_stats(s.records)
    assert resumed.status == "paused"
    assert resumed.paused_ms == pytest.approx(40.0 + 10.0)
    assert resumed.pending_work[0].text == "paused by bob"
    s.add(80, RunUnpaused(by="bob"))
    assert run_stats(s.records).status == "running"
    assert run_stats(s.records).paused_ms == pytest.approx(40.0 + 20.0)


def test_needs_review_lasts_until_the_run_ends() -> None:
    s = Script()
    s.start(0, tool_plan("pay"))
    s.add(0, StepScheduled(step_id="pay"))
    s.request(0, "pay", tool="charge_card")
    s.fail(5, "pay", 1, 1, 4)  # the runner died mid-call: outcome unknown
    error = ErrorInfo(code="ambiguous_outcome", message="did it charge?")
    s.add(5, RunNeedsReview(step_id="pay", error=error))
    stats = run_stats(s.records)
    assert stats.status == "needs_review"
    assert stats.pending_work == (
        PendingWork(
            "needs_review",
            "needs review: step pay: ambiguous_outcome: did it charge?",
            "pay",
            ms(5),
        ),
    )
    assert (stats.running, stats.tool_calls_failed) == (1, 1)  # the step has no outcome yet
    # a pause on top neither hides the review nor is lifted into "running"
    s.add(7, RunPaused(by="ops"))
    s.add(9, RunUnpaused(by="ops"))
    after = run_stats(s.records)
    assert after.status == "needs_review"
    assert after.paused_ms == pytest.approx(2.0)
    assert [w.kind for w in after.pending_work] == ["needs_review"]
    s.add(12, StepCancelled(step_id="pay", reason="run cancelled by ops"))
    s.add(12, RunCancelled(by="ops"))
    done = run_stats(s.records)
    assert (done.status, done.cancelled, done.pending_work) == ("cancelled", 1, ())


def test_cancelled_run_finalises_everything() -> None:
    s = Script()
    s.start(0, tool_plan("a", "b", "c"))
    s.add(0, StepScheduled(step_id="a"))
    s.request(0, "a")
    s.add(0, StepScheduled(step_id="b"))
    s.add(0, StepStarted(step_id="b", attempt=1))
    s.add(0, TimerStarted(timer_id="sl-b", fire_at=ms(1000), purpose="sleep", step_id="b"))
    s.add(0, TimerStarted(timer_id="run", fire_at=ms(9000), purpose="run_timeout"))
    key = ids.idempotency_key(RUN, "a", 1)
    s.add(40, ToolCallCancelled(step_id="a", attempt=1, idempotency_key=key, reason="cancel"))
    s.add(40, StepCancelled(step_id="a", reason="run cancelled"))
    s.add(40, StepCancelled(step_id="b", reason="run cancelled"))
    s.add(40, StepSkipped(step_id="c", reason="run cancelled"))
    s.add(40, RunCancelled(by="alice@box", reason="wrong input"))
    s.add(50, RunPaused(by="late"))  # after the end: changes nothing
    stats = run_stats(s.records)
    assert stats.status == "cancelled"
    assert stats.detail == "cancelled by alice@box: wrong input"
    assert counts(stats) == {
        "succeeded": 0,
        "failed": 0,
        "skipped": 1,
        "cancelled": 2,
        "running": 0,
        "pending": 0,
        "total": 3,
    }
    assert (stats.duration_ms, stats.ended_at) == (40.0, ms(40))
    assert stats.pending_work == ()
    # the sleep ended when its step was cancelled; the run_timeout guard is no wait
    assert stats.timer_wait_ms == pytest.approx(40.0)
    assert stats.paused_ms == 0.0
    assert stats.per_step[2] == StepStats(
        "c", "skipped", "tool", "t_c", 0, None, detail="run cancelled"
    )
    assert stats.per_step[0].duration_ms == 40.0


def test_composite_steps_count_their_children() -> None:
    s = Script()
    body: list[Step] = [ToolStep(id="fetch", tool="http_get")]
    plan = Plan(
        steps=[ForeachStep(id="fe", items=[1, 2, 3], do=body), SleepStep(id="nap", seconds=1)]
    )
    s.start(0, plan)
    s.add(1, StepScheduled(step_id="fe"))
    for i in range(3):
        s.add(1, StepScheduled(step_id=f"fe/{i}/fetch"))
    pending = run_stats(s.records)
    # children scheduled: the composite has begun even without a StepStarted of its own
    assert [(p.id, p.status) for p in pending.per_step] == [
        ("fe", "running"),
        ("nap", "not_started"),
    ]
    assert pending.per_step[0].children == StepCounts(pending=3, total=3)
    s.add(2, ForeachStarted(step_id="fe", count=3))
    s.request(2, "fe/0/fetch", tool="http_get")
    s.ok(5, "fe/0/fetch", 1, 3, 4)
    s.add(5, StepCompleted(step_id="fe/0/fetch", output=1))
    s.request(5, "fe/1/fetch", tool="http_get")
    s.fail(6, "fe/1/fetch", 1, 5, 6)
    s.add(6, StepFailed(step_id="fe/1/fetch", error=ERR))
    s.request(6, "fe/2/fetch", tool="http_get")
    mid = run_stats(s.records)
    fe = mid.per_step[0]
    assert (fe.id, fe.kind, fe.status, fe.attempts) == ("fe", "foreach", "running", 3)
    assert fe.children == StepCounts(succeeded=1, failed=1, running=1, total=3)
    assert counts(mid)["total"] == 4 and counts(mid)["running"] == 2

    # deeper nesting: a known ancestor two levels up is running too
    s.add(7, StepScheduled(step_id="fe/2/fetch/fallback"))
    assert run_stats(s.records).per_step[0].children == StepCounts(
        succeeded=1, failed=1, running=1, pending=1, total=4
    )


def test_fallback_and_nested_ids_belong_to_the_top_level_step() -> None:
    s = Script()
    s.start(0, Plan(steps=[ToolStep(id="x", tool="flaky", on_error="fallback")]))
    s.add(0, StepScheduled(step_id="x"))
    s.request(0, "x", tool="flaky")
    s.fail(3, "x", 1, 1, 2)
    s.add(3, StepScheduled(step_id="x/fallback"))
    s.request(3, "x/fallback", tool="steady")
    s.ok(9, "x/fallback", 1, 4, 8)
    s.add(9, StepCompleted(step_id="x/fallback", output="ok"))
    s.add(9, StepCompleted(step_id="x", output="ok"))
    s.add(9, RunCompleted(output="ok"))
    stats = run_stats(s.records)
    assert stats.per_step == (
        StepStats(
            "x", "succeeded", "tool", "flaky", 2, 9.0, children=StepCounts(succeeded=1, total=1)
        ),
    )
    assert (stats.attempts, stats.tool_calls_failed, stats.succeeded, stats.total) == (2, 1, 2, 2)


def test_planning_rejected_and_failed_runs() -> None:
    s = Script()
    s.add(0, RunRequested(request="do things"))
    planning = run_stats(s.records)
    assert planning.status == "planning"
    assert planning.pending_work == (PendingWork("planning", "waiting for a plan", since=ms(0)),)
    assert planning.total == 0 and planning.per_step == ()

    s.add(3, RunPaused(by="ops"))
    paused = run_stats(s.records)
    assert paused.status == "planning"  # as the executor says; the pause is listed
    assert [w.text for w in paused.pending_work] == ["waiting for a plan", "paused by ops"]
    s.add(4, RunUnpaused(by="ops"))
    assert run_stats(s.records).status == "planning"
    assert run_stats(s.records).paused_ms == pytest.approx(1.0)

    issue = PlanIssue(code="unknown_tool", path="$.steps[0].tool", message="no tool 'x'")
    s.add(5, PlanRejected(issues=[issue]))
    rejected = run_stats(s.records)
    assert rejected.status == "rejected"
    assert (
        rejected.detail == "plan rejected (1 issues): unknown_tool at $.steps[0].tool: no tool 'x'"
    )
    assert (rejected.duration_ms, rejected.pending_work) == (5.0, ())

    f = Script()
    f.start(0, tool_plan("a", "b"))
    f.add(0, StepScheduled(step_id="a"))
    f.request(0, "a")
    f.fail(2, "a", 1, 0, 1)
    f.add(2, StepFailed(step_id="a", error=ERR))
    f.add(2, StepSkipped(step_id="b", reason="step 'a' failed"))
    f.add(3, RunFailed(error=ErrorInfo(code="boom", message="step 'a' failed: it broke")))
    failed = run_stats(f.records)
    assert (failed.status, failed.detail) == ("failed", "boom: step 'a' failed: it broke")
    assert (failed.failed, failed.skipped, failed.total) == (1, 1, 2)  # b never scheduled
    assert failed.per_step[0].detail == "boom: it broke"
    assert failed.per_step[1].status == "skipped" and failed.per_step[1].duration_ms is None


def test_clock_skew_never_makes_time_negative() -> None:
    s = Script()
    s.start(0, tool_plan("a"))
    s.add(100, StepScheduled(step_id="a"))
    s.request(100, "a")
    s.ok(110, "a", 1, started=90, finished=80)  # tool-runner clock behind, and backwards
    stats = run_stats(s.records)
    assert (stats.queued_ms, stats.running_ms) == (0.0, 0.0)


def test_order_and_duplicates_of_records_do_not_matter() -> None:
    records = two_step_success().records
    shuffled = list(reversed(records)) + records[:4]
    assert run_stats(shuffled) == run_stats(records)


def test_bad_input_is_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="no events"):
        run_stats([])
    records = two_step_success().records
    other = Script("run-2")
    other.add(0, RunRequested(request="x"))
    with pytest.raises(ValueError, match="several runs"):
        run_stats(records + other.records)


def test_stats_encode_as_json() -> None:
    data = msgspec.json.decode(msgspec.json.encode(run_stats(two_step_success().records)))
    assert data["status"] == "completed"
    assert data["per_step"][0]["id"] == "fetch"
    assert data["started_at"] == "2026-11-02T09:00:00Z"


# --------------------------------------------------------------------------- simulation


@dataclass
class Node:
    id: str
    kind: str  # tool | sleep | group
    children: list[Node] = field(default_factory=list)
    max_attempts: int = 1


@dataclass
class Inst:
    node: Node
    sid: str
    parent: Inst | None
    state: str = "scheduled"  # scheduled | requested | retry_wait | sleeping | active | done
    outcome: str = ""
    attempt: int = 0
    requested_at: float = 0.0
    timer: tuple[str, float, float] | None = None  # (id, started at, fire at)
    left: int = 0
    child_failed: bool = False


class Sim:
    """Simulates one run and records what its stats must say. Times are integer ms
    after T0. Streams that end are well formed: cancel and failure finalise every
    step; a stream cut short by ``max_events`` is a live run."""

    def __init__(self, rnd: random.Random, max_events: int) -> None:
        self.rnd = rnd
        self.max_events = max_events
        self.records: list[EventRecord] = []
        self.now = 0
        self.status = "planning"
        self.plan_accepted = False
        self.unscheduled: list[Node] = []
        self.active: dict[str, Inst] = {}
        self.outcomes: dict[str, str] = {}
        self.failing = False
        self.paused_since: float | None = None
        self.paused_ms = 0.0
        self.timer_wait_ms = 0.0
        self.running_ms = 0.0
        self.queued_ms = 0.0
        self.n_timers = 0

    # -- plumbing
    def emit(self, event: RunEvent, at: float | None = None) -> float:
        self.now = max(self.now + self.rnd.choice((0, 0, 1, 3, 20)), int(at or 0))
        self.records.append(
            EventRecord(run_id=RUN, seq=len(self.records) + 1, at=ms(self.now), event=event)
        )
        return self.now

    @property
    def ended(self) -> bool:
        return self.status in ("completed", "failed", "cancelled", "rejected")

    def make_nodes(self, depth: int, prefix: str) -> list[Node]:
        nodes = []
        for i in range(self.rnd.randint(1, 4 - depth)):
            kind = self.rnd.choice(("tool", "tool", "sleep", "group") if depth < 2 else ("tool",))
            node = Node(id=f"{prefix}{kind[0]}{i}", kind=kind, max_attempts=self.rnd.randint(1, 3))
            if kind == "group":
                node.children = self.make_nodes(depth + 1, "c")
            nodes.append(node)
        return nodes

    @staticmethod
    def to_step(node: Node) -> Step:
        if node.kind == "group":
            return ForeachStep(id=node.id, items=[0], do=[Sim.to_step(c) for c in node.children])
        if node.kind == "sleep":
            return SleepStep(id=node.id, seconds=0.01)
        return ToolStep(id=node.id, tool=f"tool_{node.id}")

    # -- the run
    def run(self) -> None:
        self.emit(RunRequested(request="simulate"))
        while not self.ended and len(self.records) < self.max_events:
            actions = self.actions()
            if not actions:
                break
            self.rnd.choice(actions)()

    def actions(self) -> list[Any]:
        r = self.status
        acts: list[Any] = [self.cancel] if self.rnd.random() < 0.03 else []
        toggle = self.unpause if self.paused_since is not None else self.pause
        if r == "planning":
            return [*acts, *[self.accept] * 8, self.reject, toggle]
        if r == "needs_review":  # only cancel ends a review
            return [self.cancel, toggle]
        if r == "paused":
            acts.append(self.unpause)
            # results of calls in flight still arrive
            acts += [lambda i=i: self.advance(i) for i in self.in_state("requested")]
            return acts
        if self.unscheduled and not self.failing:
            acts.append(self.schedule_top)
        movable = [i for i in self.active.values() if i.state != "active"]
        acts += [lambda i=i: self.advance(i) for i in movable]
        if self.rnd.random() < 0.1:
            acts.append(self.pause)
        if self.in_state("requested") and self.rnd.random() < 0.05:
            acts.append(self.review)
        return acts

    def in_state(self, state: str) -> list[Inst]:
        return [i for i in self.active.values() if i.state == state]

    def accept(self) -> None:
        self.unscheduled = self.make_nodes(0, "s")
        self.emit(PlanAccepted(plan=Plan(steps=[self.to_step(n) for n in self.unscheduled])))
        self.plan_accepted = True
        self.status = "paused" if self.paused_since is not None else "running"

    def reject(self) -> None:
        self.emit(PlanRejected(issues=[PlanIssue(code="invalid_plan", path="$", message="no")]))
        self.status = "rejected"

    def pause(self) -> None:
        self.paused_since = self.emit(RunPaused(by="sim"))
        if self.status == "running":
            self.status = "paused"

    def unpause(self) -> None:
        at = self.emit(RunUnpaused(by="sim"))
        if self.paused_since is not None:
            self.paused_ms += at - self.paused_since
            self.paused_since = None
        if self.status == "paused":
            self.status = "running"

    def review(self) -> None:
        inst = self.rnd.choice(self.in_state("requested"))
        self.emit(RunNeedsReview(step_id=inst.sid, error=ERR))
        self.status = "needs_review"

    def schedule_top(self) -> None:
        node = self.unscheduled.pop(0)
        self.schedule(node, node.id, None)

    def schedule(self, node: Node, sid: str, parent: Inst | None) -> None:
        inst = Inst(node=node, sid=sid, parent=parent)
        self.active[sid] = inst
        self.emit(StepScheduled(step_id=sid))
        if node.kind == "group":
            inst.state, inst.left = "active", len(node.children)
            self.emit(ForeachStarted(step_id=sid, count=len(node.children)))
            for i, child in enumerate(node.children):
                self.schedule(child, f"{sid}/{i}/{child.id}", inst)

    def start_timer(self, inst: Inst, purpose: Any, delay: int) -> None:
        self.n_timers += 1
        tid = f"t{self.n_timers}"
        at = self.emit(
            TimerStarted(
                timer_id=tid, fire_at=ms(self.now + delay), purpose=purpose, step_id=inst.sid
            )
        )
        inst.timer = (tid, at, at + delay)

    def fire_timer(self, inst: Inst) -> None:
        assert inst.timer is not None
        tid, started, fire_at = inst.timer
        at = self.emit(TimerFired(timer_id=tid), at=fire_at)
        self.timer_wait_ms += at - started
        inst.timer = None

    def advance(self, inst: Inst) -> None:
        sid = inst.sid
        if inst.node.kind == "sleep":
            if inst.state == "scheduled":
                self.emit(StepStarted(step_id=sid, attempt=1))
                self.start_timer(inst, "sleep", self.rnd.choice((0, 10, 100)))
                inst.state = "sleeping"
            else:
                self.fire_timer(inst)
                self.emit(StepCompleted(step_id=sid, output=None))
                self.finish(inst, "succeeded")
            return
        if inst.state in ("scheduled", "retry_wait"):
            if inst.state == "retry_wait":
                self.fire_timer(inst)
            inst.attempt += 1
            self.emit(StepStarted(step_id=sid, attempt=inst.attempt))
            if self.rnd.random() < 0.2:  # a guard that never fires: not a wait
                self.emit(
                    TimerStarted(timer_id=f"g-{sid}", fire_at=ms(10**7), purpose="step_timeout")
                )
            key = ids.idempotency_key(RUN, sid, inst.attempt)
            inst.requested_at = self.emit(
                ToolCallRequested(
                    step_id=sid, attempt=inst.attempt, tool="t", input={}, idempotency_key=key
                )
            )
            inst.state = "requested"
            return
        assert inst.state == "requested"
        queue, took = self.rnd.choice((0, 1, 7)), self.rnd.choice((0, 2, 50))
        started = inst.requested_at + queue
        finished = started + took
        self.queued_ms += queue
        self.running_ms += took
        key = ids.idempotency_key(RUN, sid, inst.attempt)
        times = {"started_at": ms(started), "finished_at": ms(finished)}
        if self.rnd.random() < 0.6:
            self.emit(
                ToolCallCompleted(
                    step_id=sid, attempt=inst.attempt, idempotency_key=key, output=1, **times
                ),
                at=finished,
            )
            self.emit(StepCompleted(step_id=sid, output=1))
            self.finish(inst, "succeeded")
            return
        self.emit(
            ToolCallFailed(
                step_id=sid, attempt=inst.attempt, idempotency_key=key, error=ERR, **times
            ),
            at=finished,
        )
        if inst.attempt < inst.node.max_attempts:
            delay = self.rnd.choice((0, 10, 100))
            self.emit(
                StepRetryScheduled(
                    step_id=sid, attempt=inst.attempt, delay_s=delay / 1000, error=ERR
                )
            )
            self.start_timer(inst, "retry", delay)
            inst.state = "retry_wait"
        else:
            self.emit(StepFailed(step_id=sid, error=ERR))
            self.finish(inst, "failed")

    def finish(self, inst: Inst, outcome: str) -> None:
        inst.state, inst.outcome = "done", outcome
        del self.active[inst.sid]
        self.outcomes[inst.sid] = outcome
        parent = inst.parent
        if parent is not None:
            parent.left -= 1
            parent.child_failed |= outcome != "succeeded"
            if parent.left == 0:
                if parent.child_failed:
                    self.emit(StepFailed(step_id=parent.sid, error=ERR))
                else:
                    self.emit(StepCompleted(step_id=parent.sid, output=None))
                self.finish(parent, "failed" if parent.child_failed else "succeeded")
            return
        if outcome == "failed" and not self.failing:
            self.failing = True
            for node in self.unscheduled:
                self.emit(StepSkipped(step_id=node.id, reason="a step failed"))
                self.outcomes[node.id] = "skipped"
            self.unscheduled = []
        if not self.unscheduled and not self.active:
            error = ErrorInfo(code="boom", message="failed")
            self.end(RunFailed(error=error) if self.failing else RunCompleted(output=1))

    def cancel(self) -> None:
        for inst in self.in_state("requested"):
            key = ids.idempotency_key(RUN, inst.sid, inst.attempt)
            self.emit(
                ToolCallCancelled(
                    step_id=inst.sid, attempt=inst.attempt, idempotency_key=key, reason="cancel"
                )
            )
        # innermost first, as an executor unwinding composites would
        for inst in sorted(self.active.values(), key=lambda i: -i.sid.count("/")):
            at = self.emit(StepCancelled(step_id=inst.sid, reason="run cancelled"))
            if inst.timer is not None:
                self.timer_wait_ms += at - inst.timer[1]
            self.outcomes[inst.sid] = "cancelled"
        self.active = {}
        for node in self.unscheduled:
            outcome = self.rnd.choice(("skipped", "cancelled"))
            event = StepSkipped if outcome == "skipped" else StepCancelled
            self.emit(event(step_id=node.id, reason="run cancelled"))
            self.outcomes[node.id] = outcome
        self.unscheduled = []
        self.end(RunCancelled(by="sim", reason="enough"))

    def end(self, event: RunEvent) -> None:
        at = self.emit(event)
        self.status = {
            RunCompleted: "completed",
            RunFailed: "failed",
            RunCancelled: "cancelled",
        }[type(event)]
        if self.paused_since is not None:
            self.paused_ms += at - self.paused_since
            self.paused_since = None

    # -- what the stats must say about the whole stream
    def expected_counts(self) -> dict[str, int]:
        tally = dict.fromkeys(
            ("succeeded", "failed", "skipped", "cancelled", "running", "pending"), 0
        )
        for outcome in self.outcomes.values():
            tally[outcome] += 1
        for inst in self.active.values():
            live = inst.state in ("requested", "sleeping", "active")
            tally["running" if live else "pending"] += 1
        tally["total"] = sum(tally.values())
        return tally

    def expected_waits(self) -> tuple[float, float]:
        """(timer wait, paused) with open intervals ending at the last event."""
        last = self.now
        timers = self.timer_wait_ms + sum(
            last - i.timer[1] for i in self.active.values() if i.timer is not None
        )
        paused = self.paused_ms + (last - self.paused_since if self.paused_since is not None else 0)
        return timers, paused


MONOTONE = (
    "attempts",
    "retries",
    "succeeded",
    "tool_calls_failed",
    "total",
    "events",
    "running_ms",
    "queued_ms",
    "timer_wait_ms",
    "paused_ms",
    "waiting_ms",
)
COUNT_KEYS = ("succeeded", "failed", "skipped", "cancelled", "running", "pending")
STEP_EVENTS = (StepScheduled, StepStarted, StepCompleted, StepFailed, StepSkipped, StepCancelled)


def check_invariants(stats: RunStats, records: list[EventRecord]) -> None:
    kinds = [r.kind for r in records]
    assert sum(getattr(stats, k) for k in COUNT_KEYS) == stats.total
    assert stats.attempts == kinds.count("tool_call_requested")
    assert stats.retries == kinds.count("step_retry_scheduled")
    assert stats.tool_calls_failed == kinds.count("tool_call_failed")
    assert stats.retries <= stats.attempts
    for name in ("running_ms", "waiting_ms", "queued_ms", "timer_wait_ms", "paused_ms"):
        assert getattr(stats, name) >= 0.0, name
    assert stats.waiting_ms == pytest.approx(stats.timer_wait_ms + stats.paused_ms)
    assert stats.duration_ms is None or stats.duration_ms >= 0.0
    assert sum(p.attempts for p in stats.per_step) == stats.attempts
    # every instance belongs to exactly one top-level step: itself or inside it
    own = {r.event.step_id for r in records if isinstance(r.event, STEP_EVENTS)}
    instances = 0
    for p in stats.per_step:
        assert p.duration_ms is None or p.duration_ms >= 0.0
        if p.children is not None:
            assert sum(getattr(p.children, k) for k in COUNT_KEYS) == p.children.total
            instances += p.children.total
        instances += p.id in own
    assert instances == stats.total
    if stats.terminal:
        assert (stats.running, stats.pending, stats.pending_work) == (0, 0, ())
        assert stats.duration_ms is not None
    else:
        assert stats.duration_ms is None and stats.ended_at is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rnd=st.randoms(use_true_random=False), max_events=st.integers(5, 250))
def test_simulated_runs_match_the_simulator(rnd: random.Random, max_events: int) -> None:
    sim = Sim(rnd, max_events)
    sim.run()
    records = sim.records
    whole = run_stats(records)

    check_invariants(whole, records)
    assert whole.status == sim.status
    assert counts(whole) == sim.expected_counts()
    assert whole.running_ms == pytest.approx(sim.running_ms)
    assert whole.queued_ms == pytest.approx(sim.queued_ms)
    timers, paused = sim.expected_waits()
    assert whole.timer_wait_ms == pytest.approx(timers)
    assert whole.paused_ms == pytest.approx(paused)
    if not whole.terminal:
        in_flight = {i.sid for i in sim.in_state("requested")}
        listed = {w.step_id for w in whole.pending_work if w.kind == "tool_call"}
        assert listed == in_flight
        assert any(w.kind == "paused" for w in whole.pending_work) == (sim.paused_since is not None)

    # any order of the same records gives the same answer
    shuffled = list(records)
    rnd.shuffle(shuffled)
    assert run_stats(shuffled) == whole

    # prefixes: a live view of the same run never exceeds the whole on monotone counters
    for cut in sorted({rnd.randint(1, len(records)) for _ in range(6)}):
        part = run_stats(records[:cut])
        check_invariants(part, records[:cut])
        for name in MONOTONE:
            assert getattr(part, name) <= getattr(whole, name) + 1e-9, name


# ------------------------------------------------------------------ people (issue 17)
# describe (stats), runs (the trace's summary) and progress agree on a run's status and
# on what it waits for: one rule, loom_core.waits.run_status.


def _summary_of(records: list[EventRecord]) -> Any:
    from loom_core.spans import TraceBuilder

    builder = TraceBuilder(records[0].run_id)
    for record in records:
        builder.apply(record)
    return builder.summary


def _people_script() -> Script:
    s = Script()
    plan = Plan(
        steps=[
            ApprovalStep(id="ok", label="legal", schema={"type": "boolean"}),
            WaitEventStep(id="paid", events=[EventMatch(name="paid", key="o1")]),
            SubRunStep(id="sub", plan=tool_plan("x")),
        ],
        name="people",
    )
    s.start(0, plan)
    for sid in ("ok", "paid", "sub"):
        s.add(1, StepScheduled(step_id=sid))
    s.add(2, StepSuspended(step_id="ok", suspension_id="ok#1", label="legal", expires_at=ms(500)))
    s.add(3, EventWaitStarted(step_id="paid", matches=[EventMatch(name="paid", key="o1")]))
    s.add(4, SubRunRequested(step_id="sub", child_run_id="run-1--sub", plan=tool_plan("x")))
    return s


def test_a_run_waiting_on_a_person_is_suspended_and_says_on_whom() -> None:
    s = Script()
    s.start(0, Plan(steps=[ApprovalStep(id="ok", label="legal")]))
    s.add(1, StepScheduled(step_id="ok"))
    s.add(2, StepSuspended(step_id="ok", suspension_id="ok#1", label="legal"))
    live = run_stats(s.records, as_of=ms(102))
    assert live.status == "suspended"
    (person,) = live.pending_work
    assert (person.kind, person.ref, person.label, person.step_id) == (
        "person", "ok#1", "legal", "ok",
    )  # fmt: skip
    assert "'legal' (ok#1)" in person.text
    assert live.person_wait_ms == pytest.approx(100.0)
    assert live.waiting_ms == pytest.approx(100.0)
    assert [(w.kind, w.ref, w.label) for w in live.waits] == [("person", "ok#1", "legal")]
    summary = _summary_of(s.records)
    assert (summary.status, summary.waiting) == ("suspended", {"ok#1": "legal"})
    assert summary.waits == list(live.waits)

    s.add(52, StepResumed(step_id="ok", suspension_id="ok#1", data=True, by="ada", request_id="r"))
    after = run_stats(s.records, as_of=ms(1000))
    assert after.status == "running" and after.pending_work == ()
    assert after.person_wait_ms == pytest.approx(50.0)  # closed when answered
    assert _summary_of(s.records).status == "running"


def test_an_escalated_suspension_replaces_the_first_and_an_ended_step_waits_on_nobody() -> None:
    s = Script()
    s.start(0, Plan(steps=[ApprovalStep(id="ok", label="a", escalate_to="b")]))
    s.add(1, StepSuspended(step_id="ok", suspension_id="ok#1", label="a"))
    s.add(11, StepSuspended(step_id="ok", suspension_id="ok#2", label="b"))
    live = run_stats(s.records)
    assert [(w.ref, w.label) for w in live.waits] == [("ok#2", "b")]
    assert live.person_wait_ms == pytest.approx(10.0)
    s.add(21, StepCancelled(step_id="ok", reason="no"))
    ended = run_stats(s.records)
    assert ended.waits == () and ended.status == "running"
    assert ended.person_wait_ms == pytest.approx(20.0)
    assert _summary_of(s.records).waits == []


def test_people_timers_events_and_children_are_listed_alike_by_describe_and_runs() -> None:
    s = _people_script()
    live = run_stats(s.records, as_of=ms(10))
    kinds = [(w.kind, w.ref) for w in live.waits]
    assert sorted(kinds) == [("event", "paid:o1"), ("person", "ok#1"), ("sub_run", "run-1--sub")]
    # a child whose state the run's own events cannot tell is work in progress
    assert live.status == "running"
    summary = _summary_of(s.records)
    assert summary.status == "running"
    assert sorted((w.kind, w.ref) for w in summary.waits) == sorted(kinds)
    assert {w.ref: w.until for w in summary.waits}["ok#1"] == ms(500)
    assert live.event_wait_ms == pytest.approx(7.0) and live.child_wait_ms == pytest.approx(6.0)
    # events arrive, the child ends: the run waits on its person alone
    s.add(20, EventReceived(step_id="paid", name="paid", key="o1"))
    s.add(21, SubRunEnded(step_id="sub", child_run_id="run-1--sub", status="completed"))
    s.add(21, StepCompleted(step_id="sub", output=1))
    later = run_stats(s.records)
    assert [w.kind for w in later.waits] == ["person"] and later.status == "suspended"
    assert _summary_of(s.records).status == "suspended"


def test_a_parent_is_suspended_when_the_child_it_waits_on_is() -> None:
    from loom_core.waits import lift_summary

    parent = Script()
    parent.start(0, Plan(steps=[SubRunStep(id="sub", plan=tool_plan("x"))]))
    parent.add(1, SubRunRequested(step_id="sub", child_run_id="kid", plan=tool_plan("x")))
    child = Script("kid")
    child.start(2, Plan(steps=[ApprovalStep(id="ok", label="legal")]))
    child.add(3, StepSuspended(step_id="ok", suspension_id="ok#1", label="legal"))
    own = _summary_of(parent.records)
    assert own.status == "running"  # from its own events: the child is unknown
    kid = _summary_of(child.records)
    lifted = lift_summary(own, {"kid": kid})
    assert lifted.status == "suspended"
    assert [(w.kind, w.run_id, w.ref) for w in lifted.waits] == [
        ("sub_run", "", "kid"), ("person", "kid", "ok#1"),
    ]  # fmt: skip
    # a child that works keeps its parent running
    busy = msgspec.structs.replace(kid, status="running", waits=[])
    assert lift_summary(own, {"kid": busy}).status == "running"
