"""Replay: re-run the executor's decisions over a recorded run, with no tool or model.

Every message a run receives is recorded as the first event it causes (requests are
events): ``run_requested`` (the submission), ``plan_accepted``/``plan_rejected`` (the
planner's verdict), ``tool_call_completed``/``tool_call_failed`` (a tool's result),
``timer_fired``, ``run_paused``/``run_unpaused``/``run_cancel_requested`` (operators)
and ``step_resumed`` (a person's answer). So the messages can be rebuilt from the
stream alone, fed to ``advance`` at their recorded times, and each decision compared
with what was recorded. The first difference is the divergence: its event number, what
the stream holds and what the current code decides.

This is how a change to the executor is checked against old runs (golden histories in
the tests), and how a run is checked when it is loaded after a deploy. Events are
compared by their decisions only (``loom_core.decisions``): rewording a message or a
reason is never a divergence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import msgspec

from loom_core.contracts import (
    EventReceived,
    EventRecord,
    ExternalEventArrived,
    ModelCallCompleted,
    ModelCallFailed,
    ModelResult,
    PlanAccepted,
    PlanProposed,
    PlanRefused,
    PlanRejected,
    PlanRevised,
    ReplanRefused,
    ResumeRun,
    RunAdmitted,
    RunCancelRequested,
    RunControl,
    RunDiverged,
    RunEvent,
    RunPaused,
    RunPublishFailed,
    RunRequest,
    RunRequested,
    RunUnpaused,
    StepResumed,
    SubRunEnded,
    SubRunFinished,
    TimerElapsed,
    TimerFired,
    ToolCallCompleted,
    ToolCallFailed,
    ToolResult,
)
from loom_core.decisions import differing_fields, same_decision
from loom_core.executor import (
    Admit,
    Message,
    RunState,
    Submission,
    advance,
    evolve,
    initial_state,
)


class Advance(Protocol):
    """``executor.advance``'s signature (tests pass a stand-in)."""

    def __call__(
        self,
        state: RunState,
        message: Message,
        now: datetime,
        recorded: Callable[[int], RunEvent | None] | None = None,
    ) -> list[RunEvent]: ...


@dataclass(frozen=True)
class Divergence:
    seq: int  # the first event where the decision differs
    recorded: Any  # that event as stored (JSON), or None if the code decides more
    decided: Any  # what the current code decides there (JSON), or None if less
    message: str

    def as_event(self) -> RunDiverged:
        return RunDiverged(
            seq=self.seq, recorded=self.recorded, decided=self.decided, message=self.message
        )


@dataclass(frozen=True)
class ReplayReport:
    run_id: str
    events: int  # events checked
    divergence: Divergence | None

    @property
    def identical(self) -> bool:
        return self.divergence is None


def message_for(run_id: str, event: RunEvent) -> Message | None:
    """The message that ``event`` records, when it is one that starts a decision."""
    match event:
        case RunRequested():
            request = RunRequest(
                plan=event.plan, request=event.request, input=event.input,
                thread_id=event.thread_id, labels=event.labels, traceparent=event.traceparent,
                fork=event.fork, parent=event.parent, run_id=run_id, budget=event.budget,
                queue=event.queue, priority=event.priority,
            )  # fmt: skip
            # the principal and what was redacted came with the submission, not its body
            if (
                event.principal
                or event.redacted
                or event.limits
                or event.caps
                or event.turn_messages != "new"
                or event.queued
            ):
                return Submission(
                    request,
                    event.principal,
                    tuple(event.redacted),
                    limits=event.limits,
                    caps=event.caps,
                    turn_messages=event.turn_messages,
                    queued=event.queued,
                )
            return request
        case RunPublishFailed():
            return event  # the relay's report is itself the message
        case PlanAccepted(plan=plan, planner=planner):
            return PlanProposed(run_id=run_id, plan=plan, planner=planner, planning=event.planning)
        case PlanRejected(issues=issues):
            return PlanRefused(run_id=run_id, issues=issues, planning=event.planning)
        case PlanRevised(plan=plan):
            return PlanProposed(run_id=run_id, plan=plan, planner="replan",
                                planning=event.planning)  # fmt: skip
        case ReplanRefused(issues=issues):
            return PlanRefused(run_id=run_id, issues=issues, planning=event.planning)
        case ModelCallCompleted():
            return ModelResult(
                run_id=run_id, step_id=event.step_id, turn=event.turn,
                idempotency_key=event.idempotency_key, ok=True, started_at=event.started_at,
                finished_at=event.finished_at, message=event.message,
                finish_reason=event.finish_reason, model=event.model, provider=event.provider,
                attempts=event.attempts, usage=event.usage, throttled_ms=event.throttled_ms,
            )  # fmt: skip
        case ModelCallFailed():
            return ModelResult(
                run_id=run_id, step_id=event.step_id, turn=event.turn,
                idempotency_key=event.idempotency_key, ok=False,
                started_at=event.started_at or datetime.min,
                finished_at=event.finished_at or datetime.min, error=event.error,
                attempts=event.attempts, usage=event.usage, throttled_ms=event.throttled_ms,
            )  # fmt: skip
        case ToolCallCompleted():
            return ToolResult(
                run_id=run_id, step_id=event.step_id, attempt=event.attempt,
                idempotency_key=event.idempotency_key, ok=True, started_at=event.started_at,
                finished_at=event.finished_at, output=event.output, suspend=event.suspend,
                breaker=event.breaker, throttled_ms=event.throttled_ms,
            )  # fmt: skip
        case ToolCallFailed():
            return ToolResult(
                run_id=run_id, step_id=event.step_id, attempt=event.attempt,
                idempotency_key=event.idempotency_key, ok=False,
                started_at=event.started_at or datetime.min,
                finished_at=event.finished_at or datetime.min, error=event.error,
                throttled_ms=event.throttled_ms,
            )  # fmt: skip
        case TimerFired(timer_id=tid):
            return TimerElapsed(run_id=run_id, timer_id=tid)
        case EventReceived():
            return ExternalEventArrived(
                run_id=run_id, step_id=event.step_id, name=event.name, key=event.key,
                payload=event.payload, signal_id=event.signal_id,
            )  # fmt: skip
        case SubRunEnded():
            return SubRunFinished(
                run_id=run_id, step_id=event.step_id, child_run_id=event.child_run_id,
                status=event.status, output=event.output, error=event.error,
            )  # fmt: skip
        case RunPaused(by=by, reason=reason):
            return RunControl(run_id=run_id, action="pause", by=by, reason=reason)
        case RunUnpaused(by=by):
            return RunControl(run_id=run_id, action="unpause", by=by)
        case RunAdmitted():
            return Admit()
        case RunCancelRequested(by=by, reason=reason):
            return RunControl(run_id=run_id, action="cancel", by=by, reason=reason)
        case StepResumed():
            return ResumeRun(
                run_id=run_id, data=event.data, suspension_id=event.suspension_id,
                request_id=event.request_id, by=event.by,
            )  # fmt: skip
    return None


def _json(event: RunEvent | None) -> Any:
    return msgspec.to_builtins(event) if event is not None else None


def replay(
    records: Sequence[EventRecord],
    advance_fn: Advance = advance,
    stop_at: int | None = None,
    start: RunState | None = None,
) -> tuple[ReplayReport, RunState]:
    """Re-decide a recorded run; returns the report and the state replay reached.
    ``start`` continues from a snapshot's state (``records`` are the events after it)."""
    if not records:
        raise ValueError("nothing to replay: the run has no events")
    run_id = records[0].run_id
    state = start if start is not None else initial_state(run_id)
    i = 0
    end = len(records) if stop_at is None else min(stop_at, len(records))
    while i < end:
        record = records[i]
        if isinstance(record.event, RunDiverged):
            break  # the executor parked the run here; nothing after it was decided
        message = message_for(run_id, record.event)
        if message is None:
            why = "this event does not start a decision: the current code did not decide it"
            return _diverged(run_id, i, record, None, why), state
        decided = advance_fn(state, message, record.at, _history(records, i))
        for k, event in enumerate(decided):
            if i + k >= len(records):
                why = "the current code decides more than was recorded"
                return _diverged(run_id, len(records), None, event, why), state
            if not same_decision(records[i + k].event, event):
                # prose (messages, reasons) never counts: a deploy may reword it
                fields = ", ".join(differing_fields(records[i + k].event, event))
                why = f"the current code decides differently ({fields})"
                return _diverged(run_id, i + k, records[i + k], event, why), state
        if not decided:
            why = "the current code decides nothing for this message"
            return _diverged(run_id, i, record, None, why), state
        i += len(decided)
    return ReplayReport(run_id=run_id, events=i, divergence=None), state


def _history(records: Sequence[EventRecord], start: int) -> Callable[[int], RunEvent | None]:
    """The recorded events from ``start`` on, by offset (what ``advance`` folds in place
    of a decided event that differs from it in prose only)."""

    def at(k: int) -> RunEvent | None:
        return records[start + k].event if start + k < len(records) else None

    return at


def _diverged(
    run_id: str, index: int, record: EventRecord | None, decided: RunEvent | None, why: str
) -> ReplayReport:
    seq = record.seq if record is not None else index + 1
    return ReplayReport(
        run_id=run_id,
        events=index,
        divergence=Divergence(
            seq=seq,
            recorded=_json(record.event) if record is not None else None,
            decided=_json(decided),
            message=f"event {seq}: {why}",
        ),
    )


def state_at(records: Sequence[EventRecord], n: int) -> RunState:
    """The run's state just after its event ``n`` (time travel): a fold, no decisions."""
    if not records:
        raise ValueError("the run has no events")
    if not 0 <= n <= len(records):
        raise ValueError(
            f"--at must be between 0 and {len(records)} (the run has {len(records)} events)"
        )
    state = initial_state(records[0].run_id)
    for record in records[:n]:
        evolve(state, record.event, record.at)
    return state


def state_view(state: RunState) -> dict[str, Any]:
    """A readable, JSON-able picture of a run's state (for ``loom state --at``)."""
    return {
        "run_id": state.run_id,
        "version": state.version,
        "status": state.status,
        "last_event_at": state.last_at.isoformat() if state.last_at else None,
        "paused": state.paused,
        "input": state.input,
        "steps": {
            iid: {
                "status": inst.status,
                **({"attempt": inst.attempt} if inst.attempt else {}),
                **({"output": inst.output} if inst.status == "succeeded" else {}),
                **({"error": msgspec.to_builtins(inst.error)} if inst.error else {}),
            }
            for iid, inst in state.insts.items()
        },
        "timers": {tid: {"purpose": p, "step_id": sid} for tid, (p, sid) in state.timers.items()},
        "suspensions": {
            sid: {
                "step_id": x.step_id,
                "label": x.label,
                "payload": x.payload,
                "resumed_by": x.resumed.by if x.resumed else None,
            }
            for sid, x in state.suspensions.items()
        },
        "output": state.output,
        "error": msgspec.to_builtins(state.error) if state.error else None,
    }
