"""Spans rebuilt from a run's events: shape, names, times, determinism, and that folding
events one by one gives exactly what a rebuild from scratch gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_core import ids
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    Plan,
    PlanAccepted,
    PlanIssue,
    PlanRejected,
    RunCompleted,
    RunEvent,
    RunFailed,
    RunRequested,
    SpanRecord,
    StepCompleted,
    StepFailed,
    StepScheduled,
    StepSkipped,
    StepStarted,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolStep,
)
from loom_core.spans import TraceBuilder, build_spans

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


# --------------------------------------------------------------------------- properties


@st.composite
def generated_runs(draw: st.DrawFn) -> list[EventRecord]:
    """A run as the executor could record it: steps progress concurrently (their event
    sequences interleave in a random order), attempts fail and retry, results can be
    lost, steps can be skipped or fail before any attempt, the run may still be going.
    Time advances by 0-3 ms per event so equal timestamps are common."""
    s = Script()
    clock = [0.0]

    def tick() -> float:
        clock[0] += draw(st.sampled_from([0, 0, 1, 3]))
        return clock[0]

    n_steps = draw(st.integers(0, 5))
    p = plan(*(f"s{i}" for i in range(n_steps)), name=draw(st.sampled_from(["", "wf"])))
    s.add(tick(), RunRequested(plan=p, thread_id=draw(st.sampled_from([None, "t1"]))))
    if draw(st.integers(0, 9)) == 0:
        s.add(tick(), PlanRejected(issues=[PlanIssue(code="invalid_plan", path="$", message="x")]))
        return s.records
    s.add(tick(), PlanAccepted(plan=p))

    # Per step, a queue of event factories (time is taken when the event is emitted).
    queues: dict[str, list[Any]] = {}
    failed = False
    for i in range(n_steps):
        sid = f"s{i}"
        shape = draw(st.sampled_from(["ok", "retry_ok", "fail", "lost", "skip", "no_attempt"]))
        q: list[Any] = []
        if shape == "skip":
            q.append(lambda sid=sid: StepSkipped(step_id=sid, reason="upstream failed"))
            queues[sid] = q
            continue
        q.append(lambda sid=sid: StepScheduled(step_id=sid))
        attempts = {
            "ok": 1,
            "retry_ok": 2,
            "fail": draw(st.integers(1, 2)),
            "lost": 1,
            "no_attempt": 0,
        }[shape]
        for n in range(1, attempts + 1):
            key = ids.idempotency_key(RUN, sid, n)
            last = n == attempts
            q.append(lambda sid=sid, n=n: StepStarted(step_id=sid, attempt=n))
            q.append(
                lambda sid=sid, n=n, key=key: ToolCallRequested(
                    step_id=sid, attempt=n, tool="echo", input={}, idempotency_key=key
                )
            )
            if shape == "lost" and last:
                continue  # no result: the step is failed by a timeout decision
            if last and shape in ("ok", "retry_ok"):
                q.append(
                    lambda sid=sid, n=n, key=key: ToolCallCompleted(
                        step_id=sid,
                        attempt=n,
                        idempotency_key=key,
                        output=n,
                        started_at=ms(clock[0]),
                        finished_at=ms(clock[0]),
                    )
                )
            else:
                q.append(
                    lambda sid=sid, n=n, key=key: ToolCallFailed(
                        step_id=sid,
                        attempt=n,
                        idempotency_key=key,
                        error=ErrorInfo(code="boom", message="tool failed"),
                        started_at=ms(clock[0]) if n % 2 else None,
                        finished_at=ms(clock[0]) if n % 2 else None,
                    )
                )
        if shape in ("ok", "retry_ok"):
            q.append(lambda sid=sid: StepCompleted(step_id=sid, output=1))
        else:
            failed = True
            q.append(
                lambda sid=sid: StepFailed(
                    step_id=sid, error=ErrorInfo(code="boom", message="step failed")
                )
            )
        queues[sid] = q
    while queues:
        sid = draw(st.sampled_from(sorted(queues)))
        s.add(tick(), queues[sid].pop(0)())
        if not queues[sid]:
            del queues[sid]
    ending = draw(st.sampled_from(["end", "end", "open"]))
    if ending == "end":
        if failed:
            s.add(tick(), RunFailed(error=ErrorInfo(code="boom", message="step failed")))
        else:
            s.add(tick(), RunCompleted(output=None))
    return s.records


PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(generated_runs())
def test_incremental_apply_equals_rebuild_at_every_prefix(records: list[EventRecord]) -> None:
    b = TraceBuilder(RUN)
    seen: dict[str, SpanRecord] = {}
    for i, rec in enumerate(records):
        before = {x.span_id: x for x in b.spans()}
        changed = b.apply(rec)
        after = {x.span_id: x for x in b.spans()}
        # apply reports exactly the spans that are new or differ, in their current version
        assert {c.span_id for c in changed} == {k for k, v in after.items() if before.get(k) != v}
        assert all(after[c.span_id] is c for c in changed)
        seen.update({c.span_id: c for c in changed})
        rebuilt = build_spans(records[: i + 1])
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
    assert [(s.start) for s in spans] == sorted(s.start for s in spans)
    terminal = isinstance(prefix[-1].event, RunCompleted | RunFailed | PlanRejected)
    if terminal:
        assert all(s.end is not None for s in spans)
        assert b.summary.ended_at == prefix[-1].at
    summary = b.summary
    steps = [s for s in spans if s.name.startswith("step ")]
    done = [
        s for s in steps if s.attributes["loom.step.status"] in ("completed", "failed", "skipped")
    ]
    assert summary.steps_done == len(done) <= summary.steps_total
    assert all(s.end is not None for s in done)
    # redelivering the whole prefix changes nothing
    assert all(b.apply(rec) == [] for rec in prefix)
    assert b.spans() == spans
