"""A run's trace, rebuilt from its events alone.

Design notes
- Pure: no clock, no I/O. Every timestamp comes from an event (the envelope's ``at``, or
  the tool-runner's ``started_at``/``finished_at``), every id from ``loom_core.ids``, so
  the same events always give byte-identical ``SpanRecord``s (DESIGN decision 4).
- Incremental: ``TraceBuilder.apply`` touches only the spans one event is about, found by
  dict lookups, so its cost does not grow with the run's length. ``build_spans`` is just
  ``apply`` in a loop, which is why incremental and batch results agree by construction
  (and a property test checks it).
- Spans are frozen structs; a change makes a new version (``msgspec.structs.replace`` and
  a copied attribute dict) so versions already handed out never change under a caller.
- Redelivery is normal: an event whose ``seq`` is not past the last one applied is
  ignored (``apply`` returns ``[]``).
- Names follow the OpenTelemetry GenAI conventions: the run is ``invoke_workflow {name}``,
  each tool call ``execute_tool {tool}`` (kind client).

Tree::

    invoke_workflow {plan name | run}    span_id(run, "run")
    ├── plan                             span_id(run, "plan")
    └── step {id}                        span_id(run, "step", id)
        └── attempt {n}                  span_id(run, "step", id, "attempt", n)
            └── execute_tool {tool}      span_id(run, "step", id, "attempt", n, "tool")

A span left open when its parent ends (an attempt whose step failed before a result, any
span still open when the run ends) is closed at that moment with ``loom.incomplete=true``
so a finished run's trace has no dangling span.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from msgspec.structs import replace

from loom_core import ids
from loom_core.contracts import (
    JSON,
    ErrorInfo,
    EventRecord,
    PlanAccepted,
    PlanRejected,
    RunCompleted,
    RunFailed,
    RunRequested,
    RunSummary,
    SpanEvent,
    SpanRecord,
    StepCompleted,
    StepFailed,
    StepScheduled,
    StepSkipped,
    StepStarted,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
)

__all__ = ["TraceBuilder", "build_spans"]

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_DONE = frozenset({"completed", "failed", "skipped"})


class TraceBuilder:
    """Folds one run's events into its span tree and summary.

    ``parent`` is the submitter's W3C context ``(trace_id, span_id)`` (lower-case hex,
    32 and 16 chars): the run then joins that trace under that span."""

    def __init__(self, run_id: str, parent: tuple[str, str] | None = None) -> None:
        self.run_id = run_id
        if parent is not None:
            trace, span = parent
            if not _HEX32.match(trace) or not _HEX16.match(span) or not int(trace, 16):
                raise ValueError(
                    f"invalid parent trace context {parent!r}: expected (trace_id, span_id) "
                    "as lower-case hex of 32 and 16 chars, trace id not all zero "
                    "(the W3C traceparent fields)"
                )
            self.trace_id, self._root_parent = trace, span
        else:
            self.trace_id, self._root_parent = ids.trace_id(run_id), None
        self._root_id = ids.span_id(run_id, "run")
        self._plan_id = ids.span_id(run_id, "plan")

        self._spans: dict[str, SpanRecord] = {}
        self._order: dict[str, int] = {}  # span id -> creation index (stable tie-break)
        self._open: dict[str, None] = {}  # insertion-ordered set of spans with no end
        self._changed: dict[str, SpanRecord] = {}  # spans touched by the current apply
        self._last_seq = 0

        # per step: kind from the plan, latest status, open attempt numbers
        self._step_kind: dict[str, str] = {}
        self._step_status: dict[str, str] = {}
        self._open_attempts: dict[str, dict[int, None]] = {}

        # summary
        self._status = "pending"
        self._name = ""
        self._started_at: datetime | None = None
        self._ended_at: datetime | None = None
        self._steps_total = 0
        self._steps_done = 0

    # ------------------------------------------------------------------ public API

    def apply(self, record: EventRecord) -> list[SpanRecord]:
        """Fold one event; return the current versions of the spans it created or
        changed (``[]`` for an event already applied)."""
        if record.run_id != self.run_id:
            raise ValueError(
                f"event {record.event_id} belongs to run {record.run_id!r}, not "
                f"{self.run_id!r}: use one TraceBuilder per run"
            )
        if record.seq <= self._last_seq:
            return []
        self._last_seq = record.seq
        self._changed = {}
        at = record.at
        if self._root_id not in self._spans and not isinstance(record.event, RunRequested):
            # A stream that does not start with RunRequested (a truncated history):
            # anchor the tree at the first event seen rather than fail.
            self._create_root(at, {})
        match record.event:
            case RunRequested() as ev:
                self._on_requested(at, ev)
            case PlanAccepted() as ev:
                self._on_plan_accepted(at, ev)
            case PlanRejected() as ev:
                self._on_plan_rejected(at, ev)
            case StepScheduled(step_id=sid):
                self._ensure_step(sid, at)
                self._set_step_status(sid, "scheduled")
            case StepStarted(step_id=sid, attempt=n):
                self._ensure_attempt(sid, n, at)
                self._set_step_status(sid, "running")
            case ToolCallRequested() as ev:
                self._on_tool_requested(at, ev)
            case ToolCallCompleted() as ev:
                self._on_tool_result(
                    at,
                    ev.step_id,
                    ev.attempt,
                    ev.idempotency_key,
                    ev.started_at,
                    ev.finished_at,
                    None,
                )
            case ToolCallFailed() as ev:
                self._on_tool_result(
                    at,
                    ev.step_id,
                    ev.attempt,
                    ev.idempotency_key,
                    ev.started_at,
                    ev.finished_at,
                    ev.error,
                )
            case StepCompleted(step_id=sid):
                self._end_step(sid, at, "completed", "ok")
            case StepFailed(step_id=sid, error=error):
                self._end_step(
                    sid, at, "failed", "error", error.message, {"error.type": error.code}
                )
            case StepSkipped(step_id=sid, reason=reason):
                self._end_step(sid, at, "skipped", "unset", "", {"loom.step.skip_reason": reason})
            case RunCompleted():
                self._end_run(at, "completed", "ok", "")
            case RunFailed(error=error):
                self._end_run(at, "failed", "error", error.message, {"error.type": error.code})
        return list(self._changed.values())

    def spans(self) -> list[SpanRecord]:
        """Every span's current version, by start time then creation order."""
        order = self._order
        return sorted(self._spans.values(), key=lambda s: (s.start, order[s.span_id]))

    @property
    def summary(self) -> RunSummary:
        duration = None
        if self._started_at is not None and self._ended_at is not None:
            duration = (self._ended_at - self._started_at).total_seconds() * 1000.0
        return RunSummary(
            run_id=self.run_id,
            status=self._status,
            started_at=self._started_at,
            ended_at=self._ended_at,
            duration_ms=duration,
            name=self._name,
            steps_total=self._steps_total,
            steps_done=self._steps_done,
        )

    # ------------------------------------------------------------------ run and plan

    def _on_requested(self, at: datetime, ev: RunRequested) -> None:
        self._started_at = at
        self._status = "planning"
        if ev.plan is not None and ev.plan.name:
            self._name = ev.plan.name
        attrs: dict[str, JSON] = {
            "gen_ai.operation.name": "invoke_workflow",
            "loom.run.id": self.run_id,
        }
        if ev.thread_id:
            attrs["gen_ai.conversation.id"] = ev.thread_id
        attrs["loom.run.status"] = self._status
        if self._root_id not in self._spans:
            self._create_root(at, attrs)
        else:  # unreachable in a seq-ordered stream (RunRequested is seq 1); be lenient
            self._update(self._root_id, attrs=attrs)

    def _create_root(self, at: datetime, attrs: dict[str, JSON]) -> None:
        base: dict[str, JSON] = {
            "gen_ai.operation.name": "invoke_workflow",
            "loom.run.id": self.run_id,
            "loom.run.status": self._status,
        }
        self._create(self._root_id, self._root_name(), at, self._root_parent, {**base, **attrs})
        self._create(self._plan_id, "plan", at, self._root_id, {})

    def _on_plan_accepted(self, at: datetime, ev: PlanAccepted) -> None:
        plan = ev.plan
        if plan.name:
            self._name = plan.name
        self._steps_total = len(plan.steps)
        for step in plan.steps:
            self._step_kind[step.id] = type(step).__struct_config__.tag  # type: ignore[assignment]
        self._status = "running"
        self._update(self._root_id, name=self._root_name(), attrs={"loom.run.status": self._status})
        self._update(
            self._plan_id,
            end=at,
            status="ok",
            attrs={"loom.plan.steps": len(plan.steps), "loom.planner": ev.planner},
        )

    def _on_plan_rejected(self, at: datetime, ev: PlanRejected) -> None:
        issues = ev.issues
        first = f": {issues[0].path}: {issues[0].message}" if issues else ""
        message = f"plan rejected ({len(issues)} issue{'s' if len(issues) != 1 else ''}){first}"
        events = [
            SpanEvent(
                name="loom.plan.issue",
                at=at,
                attributes={
                    "loom.issue.code": i.code,
                    "loom.issue.path": i.path,
                    "loom.issue.message": i.message,
                },
            )
            for i in issues
        ]
        self._update(
            self._plan_id,
            end=at,
            status="error",
            message=message,
            attrs={"error.type": "plan_rejected"},
            events=events,
        )
        self._end_run(at, "rejected", "error", message, {"error.type": "plan_rejected"})

    def _end_run(
        self,
        at: datetime,
        status: str,
        span_status: str,
        message: str,
        attrs: dict[str, JSON] | None = None,
    ) -> None:
        self._status = status
        self._ended_at = at
        # Close whatever is still open (children first: they were created later).
        for sid in reversed(list(self._open)):
            if sid != self._root_id:
                self._update(sid, end=at, attrs={"loom.incomplete": True})
        self._update(
            self._root_id,
            end=at,
            status=span_status,
            message=message,
            attrs={"loom.run.status": status, **(attrs or {})},
        )

    def _root_name(self) -> str:
        return f"invoke_workflow {self._name or 'run'}"

    # ------------------------------------------------------------------ steps

    def _ensure_step(self, sid: str, at: datetime) -> str:
        span_id = ids.span_id(self.run_id, "step", sid)
        if span_id not in self._spans:
            self._create(
                span_id,
                f"step {sid}",
                at,
                self._root_id,
                {
                    "loom.step.id": sid,
                    "loom.step.kind": self._step_kind.get(sid, "tool"),
                    "loom.step.status": "scheduled",
                },
            )
            self._step_status[sid] = "scheduled"
        return span_id

    def _set_step_status(self, sid: str, status: str) -> None:
        if self._step_status.get(sid) != status:
            self._step_status[sid] = status
            self._update(ids.span_id(self.run_id, "step", sid), attrs={"loom.step.status": status})

    def _end_step(
        self,
        sid: str,
        at: datetime,
        status: str,
        span_status: str,
        message: str = "",
        attrs: dict[str, JSON] | None = None,
    ) -> None:
        # A skipped step usually was never scheduled: its span is created here, so it
        # starts and ends at the same instant (zero duration).
        span_id = self._ensure_step(sid, at)
        for n in list(self._open_attempts.get(sid, ())):
            self._close_attempt(sid, n, at)
        if self._step_status.get(sid) not in _DONE:
            self._steps_done += 1
        self._step_status[sid] = status
        self._update(
            span_id,
            end=at,
            status=span_status,
            message=message,
            attrs={"loom.step.status": status, **(attrs or {})},
        )

    # ------------------------------------------------------------------ attempts

    def _ensure_attempt(self, sid: str, n: int, at: datetime) -> str:
        step_span = self._ensure_step(sid, at)
        span_id = ids.span_id(self.run_id, "step", sid, "attempt", str(n))
        if span_id not in self._spans:
            self._create(
                span_id, f"attempt {n}", at, step_span, {"loom.step.id": sid, "loom.attempt": n}
            )
            self._open_attempts.setdefault(sid, {})[n] = None
            self._update(step_span, attrs={"loom.step.attempts": n})
        return span_id

    def _close_attempt(self, sid: str, n: int, at: datetime) -> None:
        """An attempt that ends without a result (its step ended first)."""
        self._open_attempts[sid].pop(n, None)
        tool_id = ids.span_id(self.run_id, "step", sid, "attempt", str(n), "tool")
        if tool_id in self._open:
            self._update(tool_id, end=at, attrs={"loom.incomplete": True})
        attempt_id = ids.span_id(self.run_id, "step", sid, "attempt", str(n))
        if attempt_id in self._open:
            self._update(attempt_id, end=at, attrs={"loom.incomplete": True})

    def _tool_attrs(self, key: str, n: int) -> dict[str, JSON]:
        return {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.call.id": key,
            "loom.idempotency_key": key,
            "loom.attempt": n,
        }

    def _on_tool_requested(self, at: datetime, ev: ToolCallRequested) -> None:
        sid, n = ev.step_id, ev.attempt
        attempt_id = self._ensure_attempt(sid, n, at)
        self._set_step_status(sid, "running")
        tool_id = ids.span_id(self.run_id, "step", sid, "attempt", str(n), "tool")
        attrs = {"gen_ai.tool.name": ev.tool, **self._tool_attrs(ev.idempotency_key, n)}
        if tool_id not in self._spans:
            # In flight: the request time stands in for the start until the result
            # brings the tool-runner's own clock.
            self._create(tool_id, f"execute_tool {ev.tool}", at, attempt_id, attrs, kind="client")
        else:
            self._update(tool_id, name=f"execute_tool {ev.tool}", attrs=attrs)

    def _on_tool_result(
        self,
        at: datetime,
        sid: str,
        n: int,
        key: str,
        started_at: datetime | None,
        finished_at: datetime | None,
        error: ErrorInfo | None,
    ) -> None:
        attempt_id = self._ensure_attempt(sid, n, at)
        tool_id = ids.span_id(self.run_id, "step", sid, "attempt", str(n), "tool")
        start = started_at
        if tool_id not in self._spans:  # result without a recorded request
            self._create(
                tool_id,
                "execute_tool",
                start or at,
                attempt_id,
                self._tool_attrs(key, n),
                kind="client",
            )
        end = finished_at or at
        if error is None:
            self._update(tool_id, start=start, end=end, status="ok")
            self._update(attempt_id, end=at, status="ok")
        else:
            err = {"error.type": error.code}
            self._update(
                tool_id, start=start, end=end, status="error", message=error.message, attrs=err
            )
            self._update(attempt_id, end=at, status="error", message=error.message, attrs=err)
        self._open_attempts.get(sid, {}).pop(n, None)

    # ------------------------------------------------------------------ span plumbing

    def _create(
        self,
        span_id: str,
        name: str,
        start: datetime,
        parent: str | None,
        attrs: dict[str, JSON],
        kind: str = "internal",
    ) -> None:
        span = SpanRecord(
            trace_id=self.trace_id,
            span_id=span_id,
            run_id=self.run_id,
            name=name,
            start=start,
            parent_span_id=parent,
            kind=kind,  # type: ignore[arg-type]
            attributes=attrs,
        )
        self._order[span_id] = len(self._order)
        self._open[span_id] = None
        self._put(span)

    def _update(
        self,
        span_id: str,
        *,
        name: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        status: str | None = None,
        message: str | None = None,
        attrs: dict[str, JSON] | None = None,
        events: list[SpanEvent] | None = None,
    ) -> None:
        """Make a new version of a span with the given fields changed (none if nothing
        actually differs, so ``apply`` reports only real changes)."""
        span = self._spans[span_id]
        changes: dict[str, Any] = {}
        if name is not None and name != span.name:
            changes["name"] = name
        if start is not None and start != span.start:
            changes["start"] = start
        if end is not None:
            self._open.pop(span_id, None)
            if end != span.end:
                changes["end"] = end
        if status is not None and status != span.status:
            changes["status"] = status
        if message and message != span.status_message:
            changes["status_message"] = message
        if attrs and any(span.attributes.get(k, _MISSING) != v for k, v in attrs.items()):
            changes["attributes"] = {**span.attributes, **attrs}
        if events:
            changes["events"] = [*span.events, *events]
        if changes:
            self._put(replace(span, **changes))

    def _put(self, span: SpanRecord) -> None:
        self._spans[span.span_id] = span
        self._changed[span.span_id] = span


_MISSING = object()


def build_spans(
    records: Iterable[EventRecord], parent: tuple[str, str] | None = None
) -> list[SpanRecord]:
    """The span tree of one run's events (in ``seq`` order), as ``TraceBuilder.spans``."""
    builder: TraceBuilder | None = None
    for record in records:
        if builder is None:
            builder = TraceBuilder(record.run_id, parent)
        builder.apply(record)
    return builder.spans() if builder is not None else []
