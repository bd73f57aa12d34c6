"""What the console shows of a run, computed from its events alone (pure: no I/O).

Every value taken from an event goes through ``loom_core.spans.redact`` (the one
redaction of traces and exports), and big values stay references (``blobs.readable``):
the page never sees more than the CLI would print."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

from loom_console import api
from loom_core import blobs
from loom_core.contracts import (
    EventReceived,
    EventRecord,
    EventWaitStarted,
    ForeachStarted,
    ModelCallCompleted,
    ModelCallFailed,
    ModelCallRequested,
    PlanAccepted,
    PlanRejected,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunPaused,
    RunRequested,
    RunUnpaused,
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
    TimerFired,
    TimerStarted,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
)
from loom_core.spans import redact
from loom_core.stats import run_stats
from loom_core.validation import topological_order

# The fields of RunStats that are one number or word each; per-step detail is the
# timeline's, and would grow with the run
_STATS_SKIP = frozenset({"per_step", "pending_work"})


def clean(value: Any) -> Any:
    """A value from an event as the page may show it: JSON, redacted, blobs as refs."""
    return redact(blobs.readable(msgspec.to_builtins(value)))


def iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds() * 1000, 3)


def step_of(record: EventRecord) -> str | None:
    step = getattr(record.event, "step_id", None)
    return step if isinstance(step, str) else None


def summary(record: EventRecord) -> str:
    """One line saying what the event is about (the row's text in the event list)."""
    e = record.event
    parts: list[str] = []
    for name in ("tool", "label", "model", "branch", "reason", "child_run_id", "name", "key"):
        value = getattr(e, name, None)
        if isinstance(value, str) and value:
            parts.append(f"{name} {value}")
    for name in ("attempt", "turn", "count", "iteration"):
        value = getattr(e, name, None)
        if isinstance(value, int) and value:
            parts.append(f"{name} {value}")
    delay = getattr(e, "delay_s", None)
    if isinstance(delay, float | int):
        parts.append(f"in {delay:g}s")
    error = getattr(e, "error", None)
    if error is not None and hasattr(error, "code"):
        parts.append(f"{error.code}: {error.message}"[:200])
    if isinstance(e, PlanRejected):
        parts.append(f"{len(e.issues)} problem(s)")
    return ", ".join(parts)


def event_row(record: EventRecord) -> api.EventRow:
    data = clean(record.event)
    if isinstance(data, dict):
        data.pop("type", None)  # the kind says it
    return api.EventRow(
        seq=record.seq,
        at=record.at.isoformat(),
        kind=record.kind,
        step_id=step_of(record),
        summary=summary(record),
        data=data,
    )


# ------------------------------------------------------------------ the run


def open_suspensions(records: Sequence[EventRecord]) -> list[api.Suspension]:
    """Suspensions asked and not answered, while the run has not ended."""
    open_: dict[str, api.Suspension] = {}
    for record in records:
        e = record.event
        if isinstance(e, StepSuspended):
            open_[e.suspension_id] = api.Suspension(
                suspension_id=e.suspension_id, step_id=e.step_id, label=e.label,
                payload=clean(e.payload), schema=clean(e.schema), expires_at=iso(e.expires_at),
            )  # fmt: skip
        elif isinstance(e, StepResumed):
            open_.pop(e.suspension_id, None)
        elif isinstance(e, StepCompleted | StepFailed | StepCancelled | StepSkipped):
            for key, s in list(open_.items()):
                if s.step_id == e.step_id:
                    del open_[key]
        elif isinstance(e, RunCompleted | RunFailed | RunCancelled | PlanRejected):
            return []
    return list(open_.values())


def model_usage(records: Sequence[EventRecord]) -> tuple[int, int, float]:
    """(input tokens, output tokens, cost) of every model call the run recorded: its
    agent turns and the planning of its plan."""
    tokens_in = tokens_out = 0
    cost = 0.0
    for record in records:
        e = record.event
        usage = None
        if isinstance(e, ModelCallCompleted | ModelCallFailed):
            usage = e.usage
        elif isinstance(e, PlanAccepted | PlanRejected) and e.planning is not None:
            usage = e.planning.usage
        if usage is not None:
            tokens_in += usage.input_tokens
            tokens_out += usage.output_tokens
            cost += usage.cost_usd
    return tokens_in, tokens_out, round(cost, 6)


def run_view(records: Sequence[EventRecord]) -> api.RunView:
    """The run's header: status, timings, input and output, what a person can answer,
    tokens and cost."""
    stats = run_stats(records)
    first = records[0].event
    requested = first if isinstance(first, RunRequested) else None
    output: Any = None
    error: Any = None
    top: list[str] = []
    paused = False
    for record in records:
        e = record.event
        if isinstance(e, RunCompleted):
            output = clean(e.output)
        elif isinstance(e, RunFailed):
            error = clean(e.error)
        elif isinstance(e, PlanRejected):
            error = clean(e.issues)
        elif isinstance(e, PlanAccepted):
            top = topological_order(e.plan)
        elif isinstance(e, RunPaused):
            paused = True
        elif isinstance(e, RunUnpaused):
            paused = False
    stats_doc = {
        k: v for k, v in msgspec.to_builtins(stats).items() if k not in _STATS_SKIP
    }  # fmt: skip
    tokens_in, tokens_out, cost = model_usage(records)
    fork = requested.fork if requested else None
    return api.RunView(
        run_id=records[0].run_id,
        status=stats.status,
        name=stats.name,
        events=len(records),
        started_at=iso(stats.started_at),
        ended_at=iso(stats.ended_at),
        duration_ms=stats.duration_ms,
        labels=dict(requested.labels) if requested else {},
        input=clean(requested.input) if requested else None,
        output=output,
        error=error,
        paused=paused,
        suspensions=open_suspensions(records),
        top_steps=top,
        stats=stats_doc,
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost_usd=cost,
        forked_from=fork.run_id if fork else None,
        fork_from_step=fork.from_step if fork else None,
    )


# ------------------------------------------------------------------ the timeline


def _depth_and_group(step_id: str) -> tuple[int, str]:
    """``fe/3/fetch`` is element 3 of ``fe``: depth 1, group ``fe/3``."""
    parts = step_id.split("/")
    return (len(parts) - 1) // 2, "/".join(parts[:-1])


class _Step:
    def __init__(self, step_id: str) -> None:
        depth, group = _depth_and_group(step_id)
        self.row = api.StepRow(step_id=step_id, depth=depth, group=group, status="scheduled")
        self.attempts: dict[int, api.Attempt] = {}
        self.waits: list[api.Wait] = []

    def attempt(self, n: int) -> api.Attempt:
        if n not in self.attempts:
            self.attempts[n] = api.Attempt(attempt=n)
        return self.attempts[n]

    def close_wait(self, kind: str, at: datetime) -> None:
        for wait in reversed(self.waits):
            if wait.kind == kind and wait.ended_at is None:
                wait.ended_at = at.isoformat()
                return


def timeline(records: Sequence[EventRecord]) -> list[api.StepRow]:
    """Every step instance in the order it was first seen, with its attempts (start,
    end, error, the retry delay that followed) and its waits (people, timers, external
    events, child runs). Foreach elements and branches carry their group."""
    steps: dict[str, _Step] = {}
    timers: dict[str, tuple[str, str]] = {}  # timer id -> (step id, wait kind)

    def get(step_id: str) -> _Step:
        if step_id not in steps:
            steps[step_id] = _Step(step_id)
        return steps[step_id]

    for record in records:
        e, at = record.event, record.at
        sid = step_of(record)
        if sid is None:
            if isinstance(e, TimerFired) and e.timer_id in timers:
                owner, kind = timers.pop(e.timer_id)
                get(owner).close_wait(kind, at)
            continue
        s = get(sid)
        row = s.row
        if isinstance(e, StepScheduled):
            row.scheduled_at = row.scheduled_at or at.isoformat()
        elif isinstance(e, StepStarted):
            row.status = "running"
            row.started_at = row.started_at or at.isoformat()
            s.attempt(e.attempt).started_at = at.isoformat()
        elif isinstance(e, ToolCallRequested):
            row.status = "running"
            row.tool = e.tool
            row.started_at = row.started_at or at.isoformat()
            a = s.attempt(e.attempt)
            a.started_at = a.started_at or at.isoformat()
        elif isinstance(e, ToolCallCompleted):
            a = s.attempt(e.attempt)
            a.started_at, a.finished_at = iso(e.started_at), iso(e.finished_at)
            a.duration_ms = _ms(e.started_at, e.finished_at)
        elif isinstance(e, ToolCallFailed):
            a = s.attempt(e.attempt)
            a.finished_at = iso(e.finished_at or at)
            a.duration_ms = _ms(e.started_at, e.finished_at)
            a.error = f"{e.error.code}: {e.error.message}"
        elif isinstance(e, StepRetryScheduled):
            s.attempt(e.attempt - 1 if e.attempt > 1 else e.attempt).retry_delay_s = e.delay_s
            s.waits.append(
                api.Wait(kind="retry", label=f"{e.delay_s:g}s", started_at=at.isoformat())
            )
            row.status = "retrying"
        elif isinstance(e, StepSuspended):
            row.status = "suspended"
            s.waits.append(api.Wait(kind="person", label=e.label, started_at=at.isoformat()))
        elif isinstance(e, StepResumed):
            row.status = "running"
            s.close_wait("person", at)
        elif isinstance(e, TimerStarted):
            open_retry = any(w.kind == "retry" and w.ended_at is None for w in s.waits)
            kind = "retry" if e.purpose == "retry" and open_retry else "timer"
            timers[e.timer_id] = (sid, kind)  # a retry's timer is the retry's wait
            if kind == "timer":
                s.waits.append(api.Wait(kind="timer", label=e.purpose, started_at=at.isoformat()))
        elif isinstance(e, EventWaitStarted):
            names = ", ".join(f"{m.name}/{m.key}" for m in e.matches)
            s.waits.append(api.Wait(kind="event", label=names, started_at=at.isoformat()))
        elif isinstance(e, EventReceived):
            s.close_wait("event", at)
        elif isinstance(e, SubRunRequested):
            s.waits.append(api.Wait(kind="child", label=e.child_run_id, started_at=at.isoformat()))
        elif isinstance(e, SubRunEnded):
            s.close_wait("child", at)
        elif isinstance(e, ForeachStarted | ModelCallRequested):
            row.status = "running"
            row.started_at = row.started_at or at.isoformat()
        elif isinstance(e, StepCompleted | StepFailed | StepSkipped | StepCancelled):
            row.status = {
                StepCompleted: "succeeded", StepFailed: "failed",
                StepSkipped: "skipped", StepCancelled: "cancelled",
            }[type(e)]  # fmt: skip
            row.ended_at = at.isoformat()
            if isinstance(e, StepFailed):
                row.detail = f"{e.error.code}: {e.error.message}"
            elif isinstance(e, StepSkipped | StepCancelled):
                row.detail = e.reason
            elif isinstance(e, StepCompleted):
                row.reused = e.reused_from is not None
            for wait in s.waits:
                wait.ended_at = wait.ended_at or at.isoformat()
    out = []
    for s in _grouped(steps):
        row = s.row
        start = row.started_at or row.scheduled_at
        if start and row.ended_at:
            row.duration_ms = _ms(
                datetime.fromisoformat(start), datetime.fromisoformat(row.ended_at)
            )
        row.attempts = [s.attempts[n] for n in sorted(s.attempts)]
        row.waits = s.waits
        out.append(row)
    return out


def _grouped(steps: dict[str, _Step]) -> list[_Step]:
    """The steps with each group's rows together (a foreach element's, a branch's), in
    the order each was first seen: concurrent elements interleave in the events."""
    first: dict[str, int] = {}
    for n, step_id in enumerate(steps):
        parts = step_id.split("/")
        for k in range(1, len(parts) + 1):
            first.setdefault("/".join(parts[:k]), n)

    def key(step_id: str) -> list[int]:
        parts = step_id.split("/")
        return [first["/".join(parts[:k])] for k in range(1, len(parts) + 1)]

    return [steps[sid] for sid in sorted(steps, key=key)]


# ------------------------------------------------------------------ tool calls and model turns


def calls(records: Sequence[EventRecord]) -> list[api.Call]:
    """Each tool call attempt and each model turn, its input beside its output."""
    found: dict[tuple[str, str, int], api.Call] = {}
    for record in records:
        e = record.event
        if isinstance(e, ToolCallRequested):
            found[("tool", e.step_id, e.attempt)] = api.Call(
                kind="tool", step_id=e.step_id, attempt=e.attempt, name=e.tool,
                seq=record.seq, input=clean(e.input),
            )  # fmt: skip
        elif isinstance(e, ToolCallCompleted | ToolCallFailed):
            call = found.get(("tool", e.step_id, e.attempt))
            if call is None:
                continue
            call.duration_ms = _ms(e.started_at, e.finished_at)
            if isinstance(e, ToolCallCompleted):
                call.output = clean(e.output)
            else:
                call.error = clean(e.error)
        elif isinstance(e, ModelCallRequested):
            found[("model", e.step_id, e.turn)] = api.Call(
                kind="model", step_id=e.step_id, attempt=e.turn, name=e.model or "(default)",
                seq=record.seq, input=clean(e.messages),
            )  # fmt: skip
        elif isinstance(e, ModelCallCompleted | ModelCallFailed):
            call = found.get(("model", e.step_id, e.turn))
            if call is None:
                continue
            call.duration_ms = _ms(e.started_at, e.finished_at)
            call.input_tokens = e.usage.input_tokens
            call.output_tokens = e.usage.output_tokens
            call.cost_usd = e.usage.cost_usd
            if isinstance(e, ModelCallCompleted):
                call.output = clean(e.message)
                call.name = e.model or call.name
            else:
                call.error = clean(e.error)
    return list(found.values())
