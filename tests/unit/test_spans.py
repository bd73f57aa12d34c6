"""Spans rebuilt from a run's events: shape, names, times, determinism, and that folding
events one by one gives exactly what a rebuild from scratch gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_core import ids
from loom_core.contracts import (
    ApprovalStep,
    BranchTaken,
    ErrorInfo,
    EventRecord,
    ForeachStarted,
    ForeachStep,
    IfStep,
    LoopIterationStarted,
    LoopStep,
    ParallelStep,
    Plan,
    PlanAccepted,
    PlanIssue,
    PlanRejected,
    RunCancelled,
    RunCancelRequested,
    RunCompleted,
    RunEvent,
    RunFailed,
    RunNeedsReview,
    RunPaused,
    RunRequested,
    RunUnpaused,
    SleepStep,
    SpanRecord,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepResumed,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    StepSuspended,
    TimerFired,
    TimerStarted,
    ToolCallCancelled,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolStep,
)
from loom_core.spans import (
    REDACTED,
    TraceBuilder,
    TraceOptions,
    build_spans,
    capture_json,
    parse_traceparent,
    redact,
    span_category,
)

T0 = datetime(2026, 11, 2, 9, 0, 0, tzinfo=UTC)
RUN = "run-1"


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

    def tool_call(self, t: float, sid: str, n: int, tool: str = "echo") -> None:
        self.add(t, StepStarted(step_id=sid, attempt=n))
        self.add(
            t,
            ToolCallRequested(
                step_id=sid,
                attempt=n,
                tool=tool,
                input={"x": 1},
                idempotency_key=ids.idempotency_key(self.run_id, sid, n),
            ),
        )


def plan(*step_ids: str, name: str = "demo") -> Plan:
    return Plan(steps=[ToolStep(id=s, tool="echo") for s in step_ids], name=name)


def sid_of(*path: str) -> str:
    return ids.span_id(RUN, *path)


# --------------------------------------------------------------------------- examples


def two_step_success() -> Script:
    s = Script()
    p = plan("fetch", "summarize")
    s.add(0, RunRequested(plan=p, thread_id="thread-9"))
    s.add(2, PlanAccepted(plan=p, planner="explicit"))
    s.add(2, StepScheduled(step_id="fetch"))
    s.tool_call(2, "fetch", 1, tool="http_get")
    key = ids.idempotency_key(RUN, "fetch", 1)
    s.add(
        10,
        ToolCallCompleted(
            step_id="fetch",
            attempt=1,
            idempotency_key=key,
            output={"a": 1},
            started_at=ms(3),
            finished_at=ms(9),
        ),
    )
    s.add(10, StepCompleted(step_id="fetch", output={"a": 1}))
    s.add(10, StepScheduled(step_id="summarize"))
    s.tool_call(10, "summarize", 1, tool="summarize")
    key2 = ids.idempotency_key(RUN, "summarize", 1)
    s.add(
        20,
        ToolCallCompleted(
            step_id="summarize",
            attempt=1,
            idempotency_key=key2,
            output="ok",
            started_at=ms(11),
            finished_at=ms(19),
        ),
    )
    s.add(20, StepCompleted(step_id="summarize", output="ok"))
    s.add(20, RunCompleted(output="ok"))
    return s


def test_successful_run_tree_names_ids_times_and_attributes() -> None:
    spans = build_spans(two_step_success().records)
    assert [s.name for s in spans] == [
        "invoke_workflow demo",
        "plan",
        "step fetch",
        "attempt 1",
        "execute_tool http_get",
        "step summarize",
        "attempt 1",
        "execute_tool summarize",
    ]
    trace = ids.trace_id(RUN)
    assert {s.trace_id for s in spans} == {trace}
    assert all(s.run_id == RUN for s in spans)
    got = {s.span_id: s for s in spans}
    root = got[sid_of("run")]
    assert root.name == "invoke_workflow demo"
    assert root.parent_span_id is None
    assert (root.start, root.end, root.status) == (ms(0), ms(20), "ok")
    assert root.attributes == {
        "gen_ai.operation.name": "invoke_workflow",
        "loom.run.id": RUN,
        "gen_ai.conversation.id": "thread-9",
        "loom.run.status": "completed",
    }

    plan_span = got[sid_of("plan")]
    assert (plan_span.name, plan_span.parent_span_id) == ("plan", root.span_id)
    assert (plan_span.start, plan_span.end, plan_span.status) == (ms(0), ms(2), "ok")
    assert plan_span.attributes == {"loom.plan.steps": 2, "loom.planner": "explicit"}

    step = got[sid_of("step", "fetch")]
    assert (step.name, step.parent_span_id) == ("step fetch", root.span_id)
    assert (step.start, step.end, step.status) == (ms(2), ms(10), "ok")
    assert step.attributes == {
        "loom.step.id": "fetch",
        "loom.step.kind": "tool",
        "loom.step.tool": "echo",  # from the plan (the calls in this script say http_get)
        "loom.step.status": "completed",
        "loom.step.attempts": 1,
    }

    attempt = got[sid_of("step", "fetch", "attempt", "1")]
    assert (attempt.name, attempt.parent_span_id) == ("attempt 1", step.span_id)
    assert (attempt.start, attempt.end, attempt.status) == (ms(2), ms(10), "ok")

    tool = got[sid_of("step", "fetch", "attempt", "1", "tool")]
    assert (tool.name, tool.kind, tool.parent_span_id) == (
        "execute_tool http_get",
        "client",
        attempt.span_id,
    )
    # the tool-runner's clock, not the executor's
    assert (tool.start, tool.end, tool.status) == (ms(3), ms(9), "ok")
    key = ids.idempotency_key(RUN, "fetch", 1)
    assert tool.attributes == {
        "gen_ai.tool.name": "http_get",
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.call.id": key,
        "loom.idempotency_key": key,
        "loom.attempt": 1,
    }
    assert len(spans) == 8


def test_spans_are_ordered_by_start_then_creation() -> None:
    spans = build_spans(two_step_success().records)
    assert [s.span_id for s in spans] == [
        sid_of("run"),  # t=0, created first
        sid_of("plan"),  # t=0
        sid_of("step", "fetch"),  # t=2
        sid_of("step", "fetch", "attempt", "1"),  # t=2
        sid_of("step", "fetch", "attempt", "1", "tool"),  # t=3 (tool clock)
        sid_of("step", "summarize"),  # t=10
        sid_of("step", "summarize", "attempt", "1"),  # t=10
        sid_of("step", "summarize", "attempt", "1", "tool"),  # t=11
    ]


def test_summary_follows_the_run() -> None:
    s = two_step_success()
    b = TraceBuilder(RUN)
    assert b.summary.status == "pending"
    b.apply(s.records[0])
    assert (b.summary.status, b.summary.started_at, b.summary.name) == ("planning", ms(0), "demo")
    b.apply(s.records[1])
    assert (b.summary.status, b.summary.steps_total, b.summary.steps_done) == ("running", 2, 0)
    for rec in s.records[2:-1]:
        b.apply(rec)
    assert b.summary.steps_done == 2
    assert b.summary.ended_at is None and b.summary.duration_ms is None
    b.apply(s.records[-1])
    summary = b.summary
    assert (summary.status, summary.ended_at, summary.duration_ms) == ("completed", ms(20), 20.0)


def test_in_flight_tool_call_starts_at_request_then_takes_the_tool_clock() -> None:
    s = Script()
    p = plan("a")
    s.add(0, RunRequested(plan=p))
    s.add(1, PlanAccepted(plan=p))
    s.add(1, StepScheduled(step_id="a"))
    s.tool_call(5, "a", 1)
    b = TraceBuilder(RUN)
    for rec in s.records:
        b.apply(rec)
    tool_id = sid_of("step", "a", "attempt", "1", "tool")
    tool = next(x for x in b.spans() if x.span_id == tool_id)
    assert (tool.start, tool.end, tool.status) == (ms(5), None, "unset")

    key = ids.idempotency_key(RUN, "a", 1)
    changed = b.apply(
        s.add(
            9,
            ToolCallCompleted(
                step_id="a",
                attempt=1,
                idempotency_key=key,
                output=1,
                started_at=ms(6),
                finished_at=ms(8),
            ),
        )
    )
    assert {c.span_id for c in changed} == {tool_id, sid_of("step", "a", "attempt", "1")}
    tool = next(x for x in changed if x.span_id == tool_id)
    assert (tool.start, tool.end, tool.status) == (ms(6), ms(8), "ok")


def failing_then_retried() -> Script:
    s = Script()
    p = plan("a")
    s.add(0, RunRequested(plan=p))
    s.add(1, PlanAccepted(plan=p))
    s.add(1, StepScheduled(step_id="a"))
    s.tool_call(1, "a", 1)
    s.add(
        5,
        ToolCallFailed(
            step_id="a",
            attempt=1,
            idempotency_key=ids.idempotency_key(RUN, "a", 1),
            error=ErrorInfo(code="timeout", message="tool 'echo' timed out after 3s"),
            started_at=ms(2),
            finished_at=ms(4),
        ),
    )
    s.tool_call(6, "a", 2)
    s.add(
        9,
        ToolCallFailed(
            step_id="a",
            attempt=2,
            idempotency_key=ids.idempotency_key(RUN, "a", 2),
            error=ErrorInfo(code="http_500", message="upstream said 500"),
        ),
    )
    s.add(9, StepFailed(step_id="a", error=ErrorInfo(code="http_500", message="upstream said 500")))
    s.add(9, RunFailed(error=ErrorInfo(code="http_500", message="step 'a' failed: upstream")))
    return s


def test_failed_attempts_and_run_carry_error_status_and_type() -> None:
    got = {s.span_id: s for s in build_spans(failing_then_retried().records)}
    t1 = got[sid_of("step", "a", "attempt", "1", "tool")]
    assert (t1.status, t1.status_message, t1.attributes["error.type"]) == (
        "error",
        "tool 'echo' timed out after 3s",
        "timeout",
    )
    assert (t1.start, t1.end) == (ms(2), ms(4))
    a1 = got[sid_of("step", "a", "attempt", "1")]
    assert (a1.status, a1.start, a1.end) == ("error", ms(1), ms(5))
    # a failure without the tool-runner's times keeps the request time, ends at the event
    t2 = got[sid_of("step", "a", "attempt", "2", "tool")]
    assert (t2.start, t2.end, t2.status, t2.attributes["loom.attempt"]) == (
        ms(6),
        ms(9),
        "error",
        2,
    )
    step = got[sid_of("step", "a")]
    assert (step.status, step.attributes["loom.step.status"]) == ("error", "failed")
    assert step.attributes["loom.step.attempts"] == 2
    assert step.attributes["error.type"] == "http_500"
    root = got[sid_of("run")]
    assert (root.status, root.status_message) == ("error", "step 'a' failed: upstream")
    assert root.attributes["loom.run.status"] == "failed"
    assert root.name == "invoke_workflow demo"


def test_skipped_step_has_zero_duration_and_reason() -> None:
    s = Script()
    p = plan("a", "b")
    s.add(0, RunRequested(plan=p))
    s.add(1, PlanAccepted(plan=p))
    s.add(1, StepScheduled(step_id="a"))
    s.add(3, StepFailed(step_id="a", error=ErrorInfo(code="invalid_template", message="bad")))
    s.add(3, StepSkipped(step_id="b", reason="step 'a' failed"))
    s.add(3, RunFailed(error=ErrorInfo(code="invalid_template", message="step 'a' failed: bad")))
    b = TraceBuilder(RUN)
    for rec in s.records:
        b.apply(rec)
    got = {x.span_id: x for x in b.spans()}
    skipped = got[sid_of("step", "b")]
    assert skipped.start == skipped.end == ms(3)
    assert skipped.attributes["loom.step.skip_reason"] == "step 'a' failed"
    assert skipped.attributes["loom.step.status"] == "skipped"
    assert skipped.status == "unset"
    assert b.summary.steps_done == 2 and b.summary.status == "failed"
    # a step that failed before any attempt has no attempt span
    assert sid_of("step", "a", "attempt", "1") not in got


def test_plan_rejected_marks_plan_and_run_with_one_event_per_issue() -> None:
    s = Script()
    s.add(0, RunRequested(request="book a flight"))
    issues = [
        PlanIssue(code="unknown_tool", path="$.steps[0].tool", message="no tool 'fly'"),
        PlanIssue(code="dependency_cycle", path="$.steps[1]", message="a -> b -> a"),
    ]
    s.add(4, PlanRejected(issues=issues))
    b = TraceBuilder(RUN)
    for rec in s.records:
        b.apply(rec)
    got = {x.span_id: x for x in b.spans()}
    assert len(got) == 2
    plan_span = got[sid_of("plan")]
    assert (plan_span.status, plan_span.end) == ("error", ms(4))
    assert "2 issues" in plan_span.status_message and "no tool 'fly'" in plan_span.status_message
    assert [(e.name, e.at, e.attributes) for e in plan_span.events] == [
        (
            "loom.plan.issue",
            ms(4),
            {
                "loom.issue.code": "unknown_tool",
                "loom.issue.path": "$.steps[0].tool",
                "loom.issue.message": "no tool 'fly'",
            },
        ),
        (
            "loom.plan.issue",
            ms(4),
            {
                "loom.issue.code": "dependency_cycle",
                "loom.issue.path": "$.steps[1]",
                "loom.issue.message": "a -> b -> a",
            },
        ),
    ]
    root = got[sid_of("run")]
    assert (root.name, root.status, root.end) == ("invoke_workflow run", "error", ms(4))
    assert b.summary.status == "rejected" and b.summary.duration_ms == 4.0


def test_parent_context_joins_the_submitters_trace() -> None:
    parent = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    spans = build_spans(two_step_success().records, parent=parent)
    assert {s.trace_id for s in spans} == {parent[0]}
    root = next(s for s in spans if s.span_id == sid_of("run"))
    assert root.parent_span_id == parent[1]
    # everything else keeps its derived ids and parents
    plain = {s.span_id: s.parent_span_id for s in build_spans(two_step_success().records)}
    assert {s.span_id: s.parent_span_id for s in spans} == {**plain, root.span_id: parent[1]}


@pytest.mark.parametrize(
    "parent",
    [("xyz", "b7ad6b7169203331"), ("0" * 32, "b7ad6b7169203331"), ("a" * 32, "B" * 16)],
)
def test_bad_parent_context_is_refused_with_the_expected_shape(parent: Any) -> None:
    with pytest.raises(ValueError, match="32 and 16"):
        TraceBuilder(RUN, parent=parent)


def test_event_of_another_run_is_refused() -> None:
    b = TraceBuilder("other")
    with pytest.raises(ValueError, match="one TraceBuilder per run"):
        b.apply(two_step_success().records[0])


def test_redelivered_event_changes_nothing() -> None:
    records = two_step_success().records
    b = TraceBuilder(RUN)
    for rec in records[:5]:
        assert b.apply(rec)
    before = b.spans()
    assert b.apply(records[4]) == []
    assert b.apply(records[0]) == []
    assert b.spans() == before


def test_open_spans_are_closed_when_the_run_ends() -> None:
    s = Script()
    p = plan("a")
    s.add(0, RunRequested(plan=p))
    s.add(1, PlanAccepted(plan=p))
    s.add(1, StepScheduled(step_id="a"))
    s.tool_call(1, "a", 1)
    s.add(7, RunFailed(error=ErrorInfo(code="cancelled", message="operator stopped it")))
    got = {x.span_id: x for x in build_spans(s.records)}
    assert all(x.end is not None for x in got.values())
    tool = got[sid_of("step", "a", "attempt", "1", "tool")]
    assert (tool.end, tool.status, tool.attributes["loom.incomplete"]) == (ms(7), "unset", True)
    assert got[sid_of("step", "a")].attributes["loom.incomplete"] is True


def test_apply_touches_a_bounded_number_of_spans_however_long_the_run() -> None:
    n = 300
    s = Script()
    p = plan(*(f"s{i}" for i in range(n)))
    s.add(0, RunRequested(plan=p))
    s.add(0, PlanAccepted(plan=p))
    for i in range(n):
        sid = f"s{i}"
        s.add(i, StepScheduled(step_id=sid))
        s.tool_call(i, sid, 1)
        key = ids.idempotency_key(RUN, sid, 1)
        s.add(
            i + 1,
            ToolCallCompleted(
                step_id=sid,
                attempt=1,
                idempotency_key=key,
                output=i,
                started_at=ms(i),
                finished_at=ms(i + 1),
            ),
        )
        s.add(i + 1, StepCompleted(step_id=sid, output=i))
    b = TraceBuilder(RUN)
    sizes = [len(b.apply(rec)) for rec in s.records]
    assert max(sizes) <= 3
    assert len(b.spans()) == 2 + 3 * n
    assert b.summary.steps_done == n


def test_same_events_give_identical_records() -> None:
    a = build_spans(two_step_success().records)
    b = build_spans(two_step_success().records)
    assert a == b
    assert [x.span_id for x in a] == [x.span_id for x in b]
    assert build_spans([]) == []


# --------------------------------------------------------------------------- helpers


def key(iid: str, n: int) -> str:
    return ids.idempotency_key(RUN, iid, n)


def done(s: Script, t: float, iid: str, n: int, output: Any = 1) -> None:
    s.add(
        t,
        ToolCallCompleted(
            step_id=iid,
            attempt=n,
            idempotency_key=key(iid, n),
            output=output,
            started_at=ms(t - 1),
            finished_at=ms(t),
        ),
    )


def failed(s: Script, t: float, iid: str, n: int, code: str = "boom") -> ErrorInfo:
    error = ErrorInfo(code=code, message=f"{code} happened")
    s.add(t, ToolCallFailed(step_id=iid, attempt=n, idempotency_key=key(iid, n), error=error))
    return error


def start(s: Script, p: Plan, t: float = 0) -> None:
    s.add(t, RunRequested(plan=p))
    s.add(t, PlanAccepted(plan=p))


def got(records: list[EventRecord], options: TraceOptions | None = None) -> dict[str, SpanRecord]:
    return {x.span_id: x for x in build_spans(records, options=options)}


def step_span(spans: dict[str, SpanRecord], iid: str) -> SpanRecord:
    return spans[sid_of("step", iid)]


# --------------------------------------------------------------------------- nesting


def test_foreach_elements_and_their_steps_nest_by_instance_path() -> None:
    p = Plan(
        steps=[ForeachStep(id="fe", items=[3, 4], do=[ToolStep(id="sq", tool="math")])],
        name="nested",
    )
    s = Script()
    start(s, p)
    s.add(1, StepScheduled(step_id="fe"))
    s.add(1, StepStarted(step_id="fe", attempt=1))
    s.add(1, ForeachStarted(step_id="fe", count=2, items=[3, 4]))
    for k in ("0", "1"):
        s.add(1, StepScheduled(step_id=f"fe/{k}"))
        s.add(1, StepScheduled(step_id=f"fe/{k}/sq"))
        s.tool_call(2, f"fe/{k}/sq", 1, tool="math")
    done(s, 5, "fe/1/sq", 1, 16)
    s.add(5, StepCompleted(step_id="fe/1/sq", output=16))
    s.add(5, StepCompleted(step_id="fe/1", output=16))
    done(s, 8, "fe/0/sq", 1, 9)
    s.add(8, StepCompleted(step_id="fe/0/sq", output=9))
    s.add(8, StepCompleted(step_id="fe/0", output=9))
    s.add(8, StepCompleted(step_id="fe", output=[9, 16]))
    s.add(8, RunCompleted(output=[9, 16]))
    spans = got(s.records)
    root, fe = spans[sid_of("run")], step_span(spans, "fe")
    assert (fe.name, fe.parent_span_id) == ("step fe", root.span_id)
    assert fe.attributes["loom.foreach.count"] == 2
    assert fe.attributes["loom.step.kind"] == "foreach"
    assert sid_of("step", "fe", "attempt", "1") not in spans  # only tool steps have attempts
    for k in (0, 1):
        item = step_span(spans, f"fe/{k}")
        assert (item.name, item.parent_span_id, item.status) == (f"item {k}", fe.span_id, "ok")
        assert item.attributes == {
            "loom.step.id": f"fe/{k}",
            "loom.scope.kind": "item",
            "loom.foreach.index": k,
            "loom.step.status": "completed",
        }
        sq = step_span(spans, f"fe/{k}/sq")
        assert (sq.name, sq.parent_span_id) == ("step sq", item.span_id)
        assert sq.attributes["loom.step.id"] == f"fe/{k}/sq"
        assert sq.attributes["loom.step.tool"] == "math"
        attempt = spans[sid_of("step", f"fe/{k}/sq", "attempt", "1")]
        assert attempt.parent_span_id == sq.span_id
        tool = spans[sid_of("step", f"fe/{k}/sq", "attempt", "1", "tool")]
        assert (tool.name, tool.parent_span_id) == ("execute_tool math", attempt.span_id)
    assert step_span(spans, "fe/1").end == ms(5) and step_span(spans, "fe/0").end == ms(8)
    b = TraceBuilder(RUN)
    for rec in s.records:
        b.apply(rec)
    assert (b.summary.steps_total, b.summary.steps_done) == (1, 1)  # top-level steps only


def test_loop_iterations_branches_and_the_branch_not_taken() -> None:
    p = Plan(
        steps=[
            LoopStep(id="lp", do=[ToolStep(id="a", tool="echo")], max_iterations=3),
            IfStep(
                id="cond",
                condition={"eq": [1, 1]},
                then=[ToolStep(id="t", tool="echo")],
                else_=[ToolStep(id="e", tool="echo")],
            ),
            ParallelStep(id="par", branches={"left": [ToolStep(id="l", tool="echo")]}),
        ]
    )
    s = Script()
    start(s, p)
    s.add(1, StepScheduled(step_id="lp"))
    s.add(1, StepStarted(step_id="lp", attempt=1))
    for k in (0, 1):
        s.add(1, LoopIterationStarted(step_id="lp", iteration=k))
        s.add(1, StepScheduled(step_id=f"lp/{k}"))
        s.add(1, StepScheduled(step_id=f"lp/{k}/a"))
        s.tool_call(1, f"lp/{k}/a", 1)
        done(s, 2, f"lp/{k}/a", 1)
        s.add(2, StepCompleted(step_id=f"lp/{k}/a", output=1))
        s.add(2, StepCompleted(step_id=f"lp/{k}", output=1))
    s.add(2, StepCompleted(step_id="lp", output=1))
    s.add(3, StepScheduled(step_id="cond"))
    s.add(3, StepStarted(step_id="cond", attempt=1))
    s.add(3, BranchTaken(step_id="cond", branch="then"))
    s.add(3, StepSkipped(step_id="cond/else/e", reason="branch not taken"))
    s.add(3, StepScheduled(step_id="cond/then"))
    s.add(3, StepScheduled(step_id="par"))
    s.add(3, StepStarted(step_id="par", attempt=1))
    s.add(3, StepScheduled(step_id="par/left"))
    spans = got(s.records)
    lp = step_span(spans, "lp")
    assert lp.attributes["loom.loop.iterations"] == 2
    for k in (0, 1):
        it = step_span(spans, f"lp/{k}")
        assert (it.name, it.parent_span_id) == (f"iteration {k}", lp.span_id)
        assert it.attributes["loom.loop.iteration"] == k
        assert step_span(spans, f"lp/{k}/a").parent_span_id == it.span_id
    cond = step_span(spans, "cond")
    assert cond.attributes["loom.branch"] == "then"
    then = step_span(spans, "cond/then")
    assert (then.name, then.parent_span_id, then.attributes["loom.branch"]) == (
        "branch then",
        cond.span_id,
        "then",
    )
    # the branch not taken has no scope span: its skipped step hangs under the if step
    skipped = step_span(spans, "cond/else/e")
    assert (skipped.name, skipped.parent_span_id) == ("step e", cond.span_id)
    assert skipped.attributes["loom.step.status"] == "skipped" and skipped.start == skipped.end
    left = step_span(spans, "par/left")
    assert (left.name, left.parent_span_id) == ("branch left", step_span(spans, "par").span_id)
    assert left.attributes["loom.branch"] == "left"


def test_a_fallback_runs_under_the_step_it_replaces() -> None:
    p = Plan(
        steps=[
            ToolStep(
                id="price",
                tool="http_get",
                on_error="fallback",
                fallback=ToolStep(id="cached", tool="echo"),
            )
        ]
    )
    s = Script()
    start(s, p)
    s.add(1, StepScheduled(step_id="price"))
    s.tool_call(1, "price", 1, tool="http_get")
    failed(s, 3, "price", 1, "http_503")
    s.add(3, StepScheduled(step_id="price/fallback"))
    s.tool_call(3, "price/fallback", 1)
    done(s, 5, "price/fallback", 1)
    s.add(5, StepCompleted(step_id="price/fallback", output=1))
    s.add(5, StepCompleted(step_id="price", output=1))
    s.add(5, RunCompleted(output=1))
    spans = got(s.records)
    price, fallback = step_span(spans, "price"), step_span(spans, "price/fallback")
    assert (fallback.name, fallback.parent_span_id) == ("step cached", price.span_id)
    assert fallback.attributes["loom.step.fallback_of"] == "price"
    assert fallback.attributes["loom.step.tool"] == "echo"
    assert spans[sid_of("step", "price/fallback", "attempt", "1", "tool")].status == "ok"
    assert price.status == "ok"


def test_unknown_paths_and_a_missing_plan_still_make_a_tree() -> None:
    s = Script()
    s.add(0, StepScheduled(step_id="x"))  # truncated: no run_requested, no plan
    s.add(1, StepScheduled(step_id="x/0/y"))
    spans = got(s.records)
    y = step_span(spans, "x/0/y")
    assert (y.name, y.parent_span_id) == ("step y", step_span(spans, "x").span_id)
    assert step_span(spans, "x").parent_span_id == sid_of("run")


# --------------------------------------------------------------------------- waits


def test_retry_backoff_is_a_wait_span_between_attempts() -> None:
    s = Script()
    start(s, plan("call"))
    s.add(1, StepScheduled(step_id="call"))
    s.tool_call(1, "call", 1)
    error = failed(s, 5, "call", 1)
    s.add(5, StepRetryScheduled(step_id="call", attempt=2, delay_s=0.05, error=error))
    s.add(5, TimerStarted(timer_id="call:retry:2", fire_at=ms(55), purpose="retry", step_id="call"))
    s.add(55, TimerFired(timer_id="call:retry:2"))
    s.tool_call(55, "call", 2)
    error = failed(s, 60, "call", 2)
    s.add(60, StepRetryScheduled(step_id="call", attempt=3, delay_s=0.1, error=error))
    s.add(
        60, TimerStarted(timer_id="call:retry:3", fire_at=ms(160), purpose="retry", step_id="call")
    )
    s.tool_call(170, "call", 3)  # no timer_fired recorded: the next attempt ends the wait
    done(s, 175, "call", 3)
    s.add(175, StepCompleted(step_id="call", output=1))
    s.add(175, RunCompleted(output=1))
    spans = got(s.records)
    step = step_span(spans, "call")
    children = sorted(
        (x for x in spans.values() if x.parent_span_id == step.span_id), key=lambda x: x.start
    )
    assert [(c.name, c.start, c.end, c.status) for c in children] == [
        ("attempt 1", ms(1), ms(5), "error"),
        ("wait retry", ms(5), ms(55), "unset"),
        ("attempt 2", ms(55), ms(60), "error"),
        ("wait retry", ms(60), ms(170), "unset"),
        ("attempt 3", ms(170), ms(175), "ok"),
    ]
    wait = spans[sid_of("step", "call", "retry", "2")]
    assert wait.attributes == {
        "loom.step.id": "call",
        "loom.retry.attempt": 2,
        "loom.retry.delay_s": 0.05,
        "loom.retry.error": "boom",
        "loom.timer.id": "call:retry:2",
        "loom.timer.fire_at": ms(55).isoformat(),
    }
    assert "loom.incomplete" not in spans[sid_of("step", "call", "retry", "3")].attributes
    assert (step.status, step.attributes["loom.step.attempts"]) == ("ok", 3)


def test_a_sleep_step_shows_its_wait_and_has_no_attempt() -> None:
    p = Plan(steps=[SleepStep(id="nap", seconds=0.2)])
    s = Script()
    start(s, p)
    s.add(1, StepScheduled(step_id="nap"))
    s.add(1, StepStarted(step_id="nap", attempt=1))
    s.add(1, TimerStarted(timer_id="nap:sleep", fire_at=ms(201), purpose="sleep", step_id="nap"))
    s.add(201, TimerFired(timer_id="nap:sleep"))
    s.add(201, StepCompleted(step_id="nap", output={"woke_at": "x"}))
    s.add(201, RunCompleted(output=None))
    spans = got(s.records)
    nap = step_span(spans, "nap")
    wait = spans[sid_of("step", "nap", "sleep")]
    assert (wait.name, wait.parent_span_id, wait.start, wait.end) == (
        "wait sleep",
        nap.span_id,
        ms(1),
        ms(201),
    )
    assert wait.attributes["loom.sleep.seconds"] == pytest.approx(0.2)
    assert nap.attributes["loom.step.kind"] == "sleep"
    assert sid_of("step", "nap", "attempt", "1") not in spans


def test_a_suspension_is_a_wait_until_answered_and_expiry_ends_it() -> None:
    p = Plan(steps=[ApprovalStep(id="ok", label="approve", expires_in_s=0.1)])
    s = Script()
    start(s, p)
    s.add(1, StepScheduled(step_id="ok"))
    s.add(1, StepStarted(step_id="ok", attempt=1))
    payload = {"amount": 5, "password": "hunter22"}
    s.add(
        2,
        StepSuspended(
            step_id="ok", suspension_id="ok#1", label="approve", payload=payload, expires_at=ms(100)
        ),
    )
    s.add(
        2,
        TimerStarted(
            timer_id="ok#1:expiry", fire_at=ms(100), purpose="suspension_expiry", step_id="ok"
        ),
    )
    s.add(100, TimerFired(timer_id="ok#1:expiry"))
    s.add(100, StepSuspended(step_id="ok", suspension_id="ok#2", label="boss", payload=payload))
    answer = {"approved": True}
    s.add(
        150,
        StepResumed(step_id="ok", suspension_id="ok#2", data=answer, by="boss@x", request_id="r1"),
    )
    s.add(150, StepCompleted(step_id="ok", output=answer))
    s.add(150, RunCompleted(output=answer))
    spans = got(s.records, TraceOptions(capture_io=True))
    step = step_span(spans, "ok")
    first = spans[sid_of("step", "ok", "suspension", "ok#1")]
    second = spans[sid_of("step", "ok", "suspension", "ok#2")]
    assert (first.name, first.parent_span_id, first.start, first.end) == (
        "wait suspension",
        step.span_id,
        ms(2),
        ms(100),
    )
    assert first.attributes["loom.suspension.label"] == "approve"
    assert first.attributes["loom.suspension.expired"] is True
    assert first.attributes["loom.suspension.expires_at"] == ms(100).isoformat()
    assert first.attributes["loom.suspension.payload"] == '{"amount":5,"password":"[redacted]"}'
    assert [e.name for e in first.events] == ["expired"]
    assert (second.start, second.end, second.status) == (ms(100), ms(150), "ok")
    assert second.attributes["loom.suspension.resumed_by"] == "boss@x"
    assert second.attributes["loom.suspension.answer"] == '{"approved":true}'
    assert step.attributes["loom.step.output"] == '{"approved":true}'


def test_timeouts_are_marked_on_the_step_and_the_run() -> None:
    s = Script()
    start(s, plan("slow"))
    s.add(0, TimerStarted(timer_id="run:timeout", fire_at=ms(300), purpose="run_timeout"))
    s.add(1, StepScheduled(step_id="slow"))
    s.add(
        1,
        TimerStarted(
            timer_id="slow:timeout", fire_at=ms(31), purpose="step_timeout", step_id="slow"
        ),
    )
    s.tool_call(1, "slow", 1)
    s.add(31, TimerFired(timer_id="slow:timeout"))
    s.add(
        31,
        ToolCallCancelled(
            step_id="slow", attempt=1, idempotency_key=key("slow", 1), reason="step timed out"
        ),
    )
    error = ErrorInfo(code="step_timeout", message="step 'slow' did not finish")
    s.add(31, StepFailed(step_id="slow", error=error))
    s.add(31, RunFailed(error=error))
    spans = got(s.records)
    root, step = spans[sid_of("run")], step_span(spans, "slow")
    assert root.attributes["loom.run.timeout_at"] == ms(300).isoformat()
    assert step.attributes["loom.step.timeout_at"] == ms(31).isoformat()
    assert [(e.name, e.at) for e in step.events] == [("step_timeout", ms(31))]
    tool = spans[sid_of("step", "slow", "attempt", "1", "tool")]
    assert (tool.end, tool.attributes["loom.tool.cancelled"]) == (ms(31), True)
    assert (step.status, step.attributes["error.type"]) == ("error", "step_timeout")


# --------------------------------------------------------------------------- cancel, pause, review


def test_cancelled_steps_calls_and_run_keep_status_unset_with_a_reason() -> None:
    s = Script()
    start(s, plan("nap", "after"))
    s.add(1, StepScheduled(step_id="nap"))
    s.tool_call(1, "nap", 1, tool="sleep")
    reason = "run cancelled by ann: test"
    s.add(10, RunCancelRequested(by="ann", reason="test"))
    s.add(
        10,
        ToolCallCancelled(step_id="nap", attempt=1, idempotency_key=key("nap", 1), reason=reason),
    )
    s.add(10, StepCancelled(step_id="nap", reason=reason))
    s.add(10, StepCancelled(step_id="after", reason=reason))
    s.add(10, RunCancelled(by="ann", reason="test"))
    b = TraceBuilder(RUN)
    for rec in s.records:
        b.apply(rec)
    spans = {x.span_id: x for x in b.spans()}
    tool = spans[sid_of("step", "nap", "attempt", "1", "tool")]
    assert (tool.end, tool.status) == (ms(10), "unset")
    assert (
        tool.attributes["loom.tool.cancelled"] is True and "loom.incomplete" not in tool.attributes
    )
    assert [(e.name, e.at, e.attributes) for e in tool.events] == [
        ("cancelled", ms(10), {"loom.cancel.reason": reason})
    ]
    for iid, begin in (("nap", ms(1)), ("after", ms(10))):
        step = step_span(spans, iid)
        assert (step.start, step.end, step.status) == (begin, ms(10), "unset")
        assert step.attributes["loom.step.status"] == "cancelled"
        assert [(e.name, e.attributes) for e in step.events] == [
            ("cancelled", {"loom.cancel.reason": reason})
        ]
    root = spans[sid_of("run")]
    assert (root.status, root.end, root.attributes["loom.run.status"]) == (
        "unset",
        ms(10),
        "cancelled",
    )
    assert [(e.name, e.attributes) for e in root.events] == [
        ("cancel_requested", {"loom.cancel.by": "ann", "loom.cancel.reason": "test"}),
        ("cancelled", {"loom.cancel.by": "ann", "loom.cancel.reason": "test"}),
    ]
    assert (b.summary.status, b.summary.steps_done, b.summary.duration_ms) == ("cancelled", 2, 10.0)


def test_paused_time_is_on_the_run_span() -> None:
    s = Script()
    start(s, plan("a", "b"))
    s.add(1, StepScheduled(step_id="a"))
    s.tool_call(1, "a", 1)
    s.add(10, RunPaused(by="ann", reason="look first"))
    done(s, 20, "a", 1)
    s.add(20, StepCompleted(step_id="a", output=1))
    b = TraceBuilder(RUN)
    for rec in s.records:
        b.apply(rec)
    assert b.summary.status == "paused"
    s.add(50, RunUnpaused(by="bob"))
    s.add(50, StepScheduled(step_id="b"))
    s.tool_call(50, "b", 1)
    s.add(70, RunPaused(by="ann"))
    for rec in s.records[len(s.records) - 5 : len(s.records) - 1]:
        b.apply(rec)
    root = next(x for x in b.spans() if x.span_id == sid_of("run"))
    assert b.summary.status == "running" and root.attributes["loom.run.paused_ms"] == 40.0
    s.add(100, RunCancelled(by="ann"))  # still paused when it ends: counted to the end
    for rec in s.records[-2:]:
        b.apply(rec)
    root = next(x for x in b.spans() if x.span_id == sid_of("run"))
    assert root.attributes["loom.run.paused_ms"] == 70.0
    assert [(e.name, e.at, e.attributes) for e in root.events] == [
        ("paused", ms(10), {"loom.paused.by": "ann", "loom.paused.reason": "look first"}),
        ("unpaused", ms(50), {"loom.unpaused.by": "bob"}),
        ("paused", ms(70), {"loom.paused.by": "ann"}),
        ("cancelled", ms(100), {"loom.cancel.by": "ann", "loom.cancel.reason": ""}),
    ]
    # a run never paused has no paused_ms
    assert "loom.run.paused_ms" not in got(two_step_success().records)[sid_of("run")].attributes


def test_needs_review_is_an_event_with_the_error_on_run_and_step() -> None:
    s = Script()
    start(s, plan("pay"))
    s.add(1, StepScheduled(step_id="pay"))
    s.tool_call(1, "pay", 1)
    error = failed(s, 5, "pay", 1, "ambiguous_outcome")
    s.add(5, RunNeedsReview(step_id="pay", error=error))
    b = TraceBuilder(RUN)
    for rec in s.records:
        b.apply(rec)
    spans = {x.span_id: x for x in b.spans()}
    expected = {
        "loom.step.id": "pay",
        "error.type": "ambiguous_outcome",
        "loom.error.message": "ambiguous_outcome happened",
    }
    root, step = spans[sid_of("run")], step_span(spans, "pay")
    assert [(e.name, e.at, e.attributes) for e in root.events] == [
        ("needs_review", ms(5), expected)
    ]
    assert [(e.name, e.attributes) for e in step.events] == [("needs_review", expected)]
    assert root.attributes["loom.run.status"] == "needs_review" and root.end is None
    assert step.attributes["loom.step.status"] == "needs_review"
    assert b.summary.status == "needs_review"


# --------------------------------------------------------------------------- trace context


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def with_traceparent(header: str | None) -> list[EventRecord]:
    records = two_step_success().records
    first = records[0]
    event = msgspec.structs.replace(first.event, traceparent=header)
    return [msgspec.structs.replace(first, event=event), *records[1:]]


def test_the_requests_traceparent_becomes_the_runs_parent() -> None:
    spans = build_spans(with_traceparent(f"00-{TRACE}-{PARENT}-01"))
    assert {x.trace_id for x in spans} == {TRACE}
    root = next(x for x in spans if x.span_id == sid_of("run"))
    assert root.parent_span_id == PARENT
    assert "loom.traceparent_invalid" not in root.attributes
    plain = {x.span_id: x.parent_span_id for x in build_spans(two_step_success().records)}
    assert {x.span_id: x.parent_span_id for x in spans} == {**plain, root.span_id: PARENT}
    # an explicit parent wins over the header
    other = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    spans = build_spans(with_traceparent(f"00-{TRACE}-{PARENT}-01"), parent=other)
    assert {x.trace_id for x in spans} == {other[0]}


def test_an_invalid_traceparent_is_ignored_and_kept_as_an_attribute() -> None:
    spans = build_spans(with_traceparent("00-nope-01"))
    assert {x.trace_id for x in spans} == {ids.trace_id(RUN)}
    root = next(x for x in spans if x.span_id == sid_of("run"))
    assert root.parent_span_id is None
    assert root.attributes["loom.traceparent_invalid"] == "00-nope-01"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT)),
        (f"  00-{TRACE}-{PARENT}-00 ", (TRACE, PARENT)),
        (f"01-{TRACE}-{PARENT}-01-future-field", (TRACE, PARENT)),  # later versions may extend
        (f"00-{TRACE}-{PARENT}-01-extra", None),  # version 00 has exactly four fields
        (f"ff-{TRACE}-{PARENT}-01", None),
        (f"00-{TRACE.upper()}-{PARENT}-01", None),
        (f"00-{'0' * 32}-{PARENT}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE[:-1]}-{PARENT}-01", None),
        (f"00-{TRACE}-{PARENT}-1", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_parse_traceparent(header: object, expected: tuple[str, str] | None) -> None:
    assert parse_traceparent(header) == expected


# --------------------------------------------------------------------------- inputs and outputs


def test_inputs_and_outputs_are_captured_only_when_enabled() -> None:
    records = two_step_success().records
    plain = step_span(got(records), "fetch")
    assert "loom.step.input" not in plain.attributes and "loom.step.output" not in plain.attributes
    spans = got(records, TraceOptions(capture_io=True))
    fetch = step_span(spans, "fetch")
    assert (fetch.attributes["loom.step.input"], fetch.attributes["loom.step.output"]) == (
        '{"x":1}',
        '{"a":1}',
    )
    assert step_span(spans, "summarize").attributes["loom.step.output"] == '"ok"'


def test_captured_io_is_redacted_and_truncated() -> None:
    s = Script()
    start(s, plan("call"))
    s.add(1, StepScheduled(step_id="call"))
    s.add(1, StepStarted(step_id="call", attempt=1))
    big = {"api_key": "k-123", "headers": {"Authorization": "Bearer abcdefghijkl"}, "q": "x" * 500}
    s.add(
        1,
        ToolCallRequested(
            step_id="call", attempt=1, tool="http_get", input=big, idempotency_key=key("call", 1)
        ),
    )
    spans = got(s.records, TraceOptions(capture_io=True, io_limit=80))
    captured = step_span(spans, "call").attributes["loom.step.input"]
    assert isinstance(captured, str)
    assert "k-123" not in captured and "abcdefghijkl" not in captured
    full = capture_json(big, 10_000)
    assert captured == full[:80] + f"…[truncated {len(full.encode()) - 80} bytes]"
    assert full.startswith('{"api_key":"[redacted]","headers":{"Authorization":"[redacted]"}')
    with pytest.raises(ValueError, match="io_limit"):
        TraceOptions(io_limit=-1)


def test_redact_masks_secret_keys_and_credential_shaped_strings() -> None:
    jwt = (
        "eyJhbGciOiJIUzI1NiJ9."
        "eyJzdWIiOiIxMjM0NTY3ODkwIn0."
        "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    )
    value = {
        "password": "p",
        "Api-Key": "k",
        "apiKey": "k",
        "X-Private_Key": "-----BEGIN",
        "Set-Cookie": "sid=1",
        "nested": {"client_secret": "s", "list": [{"access_token": "t"}, "plain"]},
        "credentials": {"user": "u"},
        "token": None,
        "passwd": "",
        "max_tokens": 100,
        "input_tokens": 7,
        "note": "call with Bearer abcdefgh12345 now",
        "key": "sk-proj-abcdefghijklmnopqrstuv",
        "jwt": f"token={jwt}",
        "url": "https://ada:s3cr3t@example.com/x",
        "aws": "AKIAIOSFODNN7EXAMPLE",
        "gh": "ghp_" + "a" * 36,
        "slack": "xoxb-1234567890-abcdef",
        "n": 3,
        "ok": True,
    }
    before = msgspec.json.encode(value)
    out = redact(value)
    assert msgspec.json.encode(value) == before  # the input is not changed
    assert out == {
        "password": REDACTED,
        "Api-Key": REDACTED,
        "apiKey": REDACTED,
        "X-Private_Key": REDACTED,
        "Set-Cookie": REDACTED,
        "nested": {"client_secret": REDACTED, "list": [{"access_token": REDACTED}, "plain"]},
        "credentials": REDACTED,
        "token": None,  # nothing to hide
        "passwd": "",
        "max_tokens": 100,  # counts of tokens are not secrets
        "input_tokens": 7,
        "note": f"call with Bearer {REDACTED} now",
        "key": f"sk-{REDACTED}",
        "jwt": f"token={REDACTED}",
        "url": f"https://ada:{REDACTED}@example.com/x",
        "aws": REDACTED,
        "gh": REDACTED,
        "slack": REDACTED,
        "n": 3,
        "ok": True,
    }
    assert redact("sk-short") == "sk-short"  # too short to be a key
    assert redact(["Basic dXNlcjpwYXNzd29yZA=="]) == [f"Basic {REDACTED}"]


def test_capture_json_cuts_on_character_boundaries_and_says_how_much() -> None:
    text = "é" * 10  # JSON: 1 + 20 + 1 bytes
    assert capture_json(text, 100) == '"' + text + '"'
    assert capture_json(text, 22) == '"' + text + '"'
    assert capture_json(text, 5) == '"éé…[truncated 17 bytes]'
    assert capture_json(text, 4) == '"é…[truncated 19 bytes]'  # never half a character
    assert capture_json(text, 0) == "…[truncated 22 bytes]"
    assert capture_json({"when": ms(0)}, 100) == '{"when":"2026-11-02T09:00:00Z"}'


# --------------------------------------------------------------------------- categories


def test_span_category_names_what_each_span_stands_for() -> None:
    s = failing_then_retried()
    spans = got(s.records)
    assert span_category(spans[sid_of("run")]) == "run"
    assert span_category(spans[sid_of("plan")]) == "plan"
    assert span_category(step_span(spans, "a")) == "step"
    assert span_category(spans[sid_of("step", "a", "attempt", "1")]) == "attempt"
    assert span_category(spans[sid_of("step", "a", "attempt", "1", "tool")]) == "tool"
    nested = got(
        [
            EventRecord(run_id=RUN, seq=1, at=ms(0), event=RunRequested()),
            EventRecord(run_id=RUN, seq=2, at=ms(0), event=StepScheduled(step_id="fe/0")),
        ]
    )
    assert span_category(step_span(nested, "fe/0")) == "step"  # no plan: unknown kind
    base = spans[sid_of("plan")]
    model = msgspec.structs.replace(
        base, name="chat gpt-x", attributes={"gen_ai.operation.name": "chat"}
    )
    assert span_category(model) == "model"
    assert span_category(msgspec.structs.replace(base, name="wait retry")) == "wait"
    assert span_category(msgspec.structs.replace(base, name="x", attributes={})) == "other"
    scope = got(
        [
            EventRecord(
                run_id=RUN,
                seq=1,
                at=ms(0),
                event=PlanAccepted(
                    plan=Plan(
                        steps=[ForeachStep(id="fe", items=[], do=[ToolStep(id="t", tool="x")])]
                    )
                ),
            ),
            EventRecord(run_id=RUN, seq=2, at=ms(0), event=StepScheduled(step_id="fe/0")),
        ]
    )
    assert span_category(step_span(scope, "fe/0")) == "scope"


# --------------------------------------------------------------------------- properties

Factory = Any  # a callable making one event when it is emitted (so it can read the clock)
BOOM = ErrorInfo(code="boom", message="tool failed")
TOOL_SHAPES = ("ok", "retry_ok", "fail", "lost", "skip", "no_attempt", "cancelled")


def merge(draw: st.DrawFn, lists: list[list[Factory]]) -> list[Factory]:
    """A random interleaving of ``lists`` that keeps each list's own order."""
    pending = [list(x) for x in lists if x]
    out: list[Factory] = []
    while pending:
        i = draw(st.integers(0, len(pending) - 1))
        out.append(pending[i].pop(0))
        if not pending[i]:
            pending.pop(i)
    return out


@st.composite
def generated_runs(draw: st.DrawFn) -> list[EventRecord]:
    """A run as the executor could record it: steps (tool, foreach of tool steps, sleep,
    approval, tool with fallback) progress concurrently (their event sequences interleave
    in a random order), attempts fail and retry after backoff timers (fired or not),
    results can be lost, calls and steps get cancelled, steps can be skipped or fail
    before any attempt, the run is paused and unpaused, needs review, is cancelled, or may
    still be going. Time advances by 0-3 ms per event so equal timestamps are common."""
    s = Script()
    clock = [0.0]

    def tick() -> float:
        clock[0] += draw(st.sampled_from([0, 0, 1, 3]))
        return clock[0]

    def now() -> datetime:
        return ms(clock[0])

    def tool_events(iid: str, shape: str) -> tuple[list[Factory], str]:
        """The events of one tool step instance and how it ends."""
        if shape == "skip":
            return [lambda: StepSkipped(step_id=iid, reason="upstream failed")], "skipped"
        q: list[Factory] = [lambda: StepScheduled(step_id=iid)]
        attempts = {
            "ok": 1,
            "retry_ok": 2,
            "fail": draw(st.integers(1, 2)),
            "lost": 1,
            "no_attempt": 0,
            "cancelled": 1,
        }[shape]
        for n in range(1, attempts + 1):
            k, last = key(iid, n), n == attempts
            q.append(lambda n=n: StepStarted(step_id=iid, attempt=n))
            q.append(
                lambda n=n, k=k: ToolCallRequested(
                    step_id=iid, attempt=n, tool="echo", input={"n": n}, idempotency_key=k
                )
            )
            if shape == "lost" and last:
                continue  # no result: the step is failed by a timeout decision
            if shape == "cancelled":
                q.append(
                    lambda n=n, k=k: ToolCallCancelled(
                        step_id=iid, attempt=n, idempotency_key=k, reason="stop"
                    )
                )
                continue
            if last and shape in ("ok", "retry_ok"):
                q.append(
                    lambda n=n, k=k: ToolCallCompleted(
                        step_id=iid,
                        attempt=n,
                        idempotency_key=k,
                        output=n,
                        started_at=now(),
                        finished_at=now(),
                    )
                )
                continue
            q.append(
                lambda n=n, k=k: ToolCallFailed(
                    step_id=iid,
                    attempt=n,
                    idempotency_key=k,
                    error=BOOM,
                    started_at=now() if n % 2 else None,
                    finished_at=now() if n % 2 else None,
                )
            )
            if not last:
                tid = f"{iid}:retry:{n + 1}"
                q.append(
                    lambda n=n: StepRetryScheduled(
                        step_id=iid, attempt=n + 1, delay_s=0.001, error=BOOM
                    )
                )
                q.append(
                    lambda tid=tid: TimerStarted(
                        timer_id=tid, fire_at=now(), purpose="retry", step_id=iid
                    )
                )
                if draw(st.booleans()):
                    q.append(lambda tid=tid: TimerFired(timer_id=tid))
        end = {"ok": "completed", "retry_ok": "completed", "cancelled": "cancelled"}.get(
            shape, "failed"
        )
        return q, end

    def ending(iid: str, end: str) -> Factory:
        if end == "completed":
            return lambda: StepCompleted(step_id=iid, output=[1, {"password": "x"}])
        if end == "cancelled":
            return lambda: StepCancelled(step_id=iid, reason="stop")
        if end == "skipped":
            return lambda: StepSkipped(step_id=iid, reason="upstream failed")
        return lambda: StepFailed(step_id=iid, error=ErrorInfo(code="boom", message="failed"))

    kinds = draw(
        st.lists(
            st.sampled_from(["tool", "tool", "foreach", "sleep", "approval", "fallback"]),
            max_size=4,
        )
    )
    steps: list[Any] = []
    queues: list[list[Factory]] = []
    any_failed = False
    for i, kind in enumerate(kinds):
        sid = f"s{i}"
        if kind == "tool":
            steps.append(ToolStep(id=sid, tool="echo"))
            q, end = tool_events(sid, draw(st.sampled_from(TOOL_SHAPES)))
            if end != "skipped":
                q.append(ending(sid, end))
        elif kind == "foreach":
            n = draw(st.integers(0, 3))
            steps.append(ForeachStep(id=sid, items=[], do=[ToolStep(id="in", tool="echo")]))
            elements = []
            all_ok = True
            for k in range(n):
                inner, end = tool_events(f"{sid}/{k}/in", draw(st.sampled_from(TOOL_SHAPES)))
                if end != "skipped":
                    inner.append(ending(f"{sid}/{k}/in", end))
                all_ok &= end == "completed"
                scope = f"{sid}/{k}"
                elements.append(
                    [
                        lambda scope=scope: StepScheduled(step_id=scope),
                        *inner,
                        ending(scope, "completed" if end == "completed" else "failed"),
                    ]
                )
            end = "completed" if all_ok else "failed"
            q = [
                lambda sid=sid: StepScheduled(step_id=sid),
                lambda sid=sid: StepStarted(step_id=sid, attempt=1),
                lambda sid=sid, n=n: ForeachStarted(step_id=sid, count=n, items=list(range(n))),
                *merge(draw, elements),
                ending(sid, end),
            ]
        elif kind == "sleep":
            steps.append(SleepStep(id=sid, seconds=0.001))
            tid = f"{sid}:sleep"
            q = [
                lambda sid=sid: StepScheduled(step_id=sid),
                lambda sid=sid: StepStarted(step_id=sid, attempt=1),
                lambda sid=sid, tid=tid: TimerStarted(
                    timer_id=tid, fire_at=now(), purpose="sleep", step_id=sid
                ),
                lambda tid=tid: TimerFired(timer_id=tid),
            ]
            end = "completed"
            q.append(ending(sid, end))
        elif kind == "approval":
            steps.append(ApprovalStep(id=sid, label="ok"))
            q = [
                lambda sid=sid: StepScheduled(step_id=sid),
                lambda sid=sid: StepStarted(step_id=sid, attempt=1),
                lambda sid=sid: StepSuspended(
                    step_id=sid, suspension_id=f"{sid}#1", label="ok", payload={"token": "t"}
                ),
                lambda sid=sid: TimerStarted(
                    timer_id=f"{sid}#1:expiry",
                    fire_at=now(),
                    purpose="suspension_expiry",
                    step_id=sid,
                ),
            ]
            if draw(st.booleans()):
                q.append(
                    lambda sid=sid: StepResumed(
                        step_id=sid, suspension_id=f"{sid}#1", data=True, by="me", request_id="r"
                    )
                )
                end = "completed"
            else:
                q.append(lambda sid=sid: TimerFired(timer_id=f"{sid}#1:expiry"))
                end = "failed"
            q.append(ending(sid, end))
        else:  # a tool step whose attempts fail and whose fallback then runs
            steps.append(
                ToolStep(
                    id=sid,
                    tool="echo",
                    on_error="fallback",
                    fallback=ToolStep(id="fb", tool="echo"),
                )
            )
            q, _ = tool_events(sid, "fail")
            inner, end = tool_events(f"{sid}/fallback", draw(st.sampled_from(["ok", "fail"])))
            q += [*inner, ending(f"{sid}/fallback", end), ending(sid, end)]
        any_failed |= end != "completed"
        queues.append(q)

    p = Plan(steps=steps, name=draw(st.sampled_from(["", "wf"])))
    s.add(tick(), RunRequested(plan=p, thread_id=draw(st.sampled_from([None, "t1"]))))
    if draw(st.integers(0, 9)) == 0:
        s.add(tick(), PlanRejected(issues=[PlanIssue(code="invalid_plan", path="$", message="x")]))
        return s.records
    s.add(tick(), PlanAccepted(plan=p))
    events = merge(draw, queues)
    # pauses land anywhere; the last one may never be undone
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(events)))
        events.insert(at, lambda: RunPaused(by="ann", reason="look"))
        if draw(st.booleans()):
            events.insert(draw(st.integers(at + 1, len(events))), lambda: RunUnpaused(by="bob"))
    for factory in events:
        s.add(tick(), factory())
    end = draw(st.sampled_from(["end", "end", "open", "cancel", "review"]))
    if end == "end":
        if any_failed:
            s.add(tick(), RunFailed(error=ErrorInfo(code="boom", message="step failed")))
        else:
            s.add(tick(), RunCompleted(output=None))
    elif end == "cancel":
        s.add(tick(), RunCancelRequested(by="ann", reason="enough"))
        s.add(tick(), RunCancelled(by="ann", reason="enough"))
    elif end == "review":
        error = ErrorInfo(code="ambiguous_outcome", message="runner died")
        s.add(tick(), RunNeedsReview(step_id=steps[0].id if steps else "s0", error=error))
    return s.records


PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OPTIONS = st.sampled_from([None, TraceOptions(capture_io=True, io_limit=16)])


@PROPS
@given(generated_runs(), OPTIONS)
def test_incremental_apply_equals_rebuild_at_every_prefix(
    records: list[EventRecord], options: TraceOptions | None
) -> None:
    b = TraceBuilder(RUN, options=options)
    seen: dict[str, SpanRecord] = {}
    for i, rec in enumerate(records):
        before = {x.span_id: x for x in b.spans()}
        changed = b.apply(rec)
        after = {x.span_id: x for x in b.spans()}
        # apply reports exactly the spans that are new or differ, in their current version
        assert {c.span_id for c in changed} == {k for k, v in after.items() if before.get(k) != v}
        assert all(after[c.span_id] is c for c in changed)
        seen.update({c.span_id: c for c in changed})
        rebuilt = build_spans(records[: i + 1], options=options)
        assert b.spans() == rebuilt
        # a consumer that only keeps what apply returned holds the same trace
        assert seen == {x.span_id: x for x in rebuilt}


@PROPS
@given(generated_runs(), st.data())
def test_any_prefix_is_a_well_formed_tree(records: list[EventRecord], data: st.DataObject) -> None:
    prefix = records[: data.draw(st.integers(0, len(records)))]
    b = TraceBuilder(RUN)
    for rec in prefix:
        b.apply(rec)
    spans = b.spans()
    assert spans == build_spans(prefix) == build_spans(prefix)
    if not prefix:
        assert spans == [] and b.summary.status == "pending"
        return
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans)
    assert {s.trace_id for s in spans} == {ids.trace_id(RUN)}
    roots = [s for s in spans if s.parent_span_id is None]
    assert [r.span_id for r in roots] == [sid_of("run")]
    for s in spans:
        assert s.parent_span_id is None or s.parent_span_id in by_id
        assert s.end is None or s.end >= s.start
        path = s.attributes.get("loom.step.id")
        parent = by_id.get(s.parent_span_id or "")
        if isinstance(path, str) and parent is not None and span_category(s) in ("step", "scope"):
            # an instance hangs under the nearest enclosing instance (or the run)
            above = parent.attributes.get("loom.step.id")
            if span_category(parent) == "run":
                assert all(
                    by_id.get(sid_of("step", path.rsplit("/", j)[0])) is None
                    for j in range(1, path.count("/") + 1)
                )
            else:
                assert isinstance(above, str) and path.startswith(above + "/"), (path, above)
    terminal = isinstance(prefix[-1].event, RunCompleted | RunFailed | PlanRejected | RunCancelled)
    if terminal:
        assert all(s.end is not None for s in spans)
        assert b.summary.ended_at == prefix[-1].at
    summary = b.summary
    top = [
        s for s in spans if span_category(s) == "step" and "/" not in s.attributes["loom.step.id"]
    ]
    done_steps = [
        s
        for s in top
        if s.attributes["loom.step.status"] in ("completed", "failed", "skipped", "cancelled")
    ]
    assert summary.steps_done == len(done_steps) <= summary.steps_total
    assert all(s.end is not None for s in done_steps)
    # redelivering the whole prefix changes nothing
    assert all(b.apply(rec) == [] for rec in prefix)
    assert b.spans() == spans


def test_event_waits_and_sub_runs_show_in_the_trace() -> None:
    """From golden histories: the time waiting for an external event is a span that ends
    when the event arrives; a sub-run step names its child run."""
    from pathlib import Path

    from loom_core import codec

    golden = Path(__file__).resolve().parents[1] / "golden"

    def spans_of(name: str):
        lines = (golden / f"{name}.jsonl").read_text().splitlines()
        return build_spans([codec.decode_event(line.encode()) for line in lines])

    (wait,) = [s for s in spans_of("wait-event") if s.name == "wait event"]
    assert wait.status == "ok" and wait.end is not None
    assert [e.name for e in wait.events] == ["event_received"]
    assert wait.attributes["loom.wait.events"] == ["payment:A-17"]
    children = [s.attributes.get("loom.child_run.id") for s in spans_of("sub-run")]
    assert sum(c is not None for c in children) == 2
