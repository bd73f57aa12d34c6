"""What replay compares: the decisions in a run event, never its prose.

A deploy may reword any message (a skip reason, an error's explanation, a plan issue's
advice); runs recorded before it must still replay as identical, or ``RunHost._load``
would park every open run holding such an event as ``diverged``. So every field of every
run event is classified here, once:

- ``DECISION``: what the engine decided or the data it acted on: the event kind, ids
  (step ids / instance paths, idempotency keys, timer ids, suspension ids, child run
  ids), attempt numbers, tool names, inputs it rendered, outputs it recorded, error
  *codes*, paths and details, retry delays, times, and every input the run received
  (plan, request, tool outputs, answers, external events), even when written in words.
- ``PROSE``: text for people that no decision reads: error/skip/cancel/refusal
  *messages* and free-text reasons. Replay blanks these before comparing. So does it
  the messages of an error's ``details.problems`` (``[path, message]`` pairs of a
  schema check); their paths stay decisions.
- ``NESTED``: a struct (or list of structs, or None) whose own fields are classified
  here too (``ErrorInfo``, ``PlanIssue``).

What a later change must keep true: prose never flows into a decision (no template,
predicate or branch reads a message or a reason; templates see outputs, inputs and
scope variables only). A new event type or field must be added to ``FIELDS``:
``tests/unit/test_replay_prose.py`` fails until it is. Classifying a field ``DECISION``
is the safe default; ``PROSE`` only for text the engine writes for people.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from loom_core import contracts as c

Kind = Literal["decision", "prose", "nested"]
DECISION: Final[Kind] = "decision"
PROSE: Final[Kind] = "prose"
NESTED: Final[Kind] = "nested"


D, P, N = DECISION, PROSE, NESTED

# Every field, explicitly: a field added to an event without being classified here
# fails tests/unit/test_replay_prose.py (and is compared, prose or not, meanwhile).
FIELDS: Final[dict[type[msgspec.Struct], dict[str, Kind]]] = {
    # structs nested in events (their own fields)
    c.ErrorInfo: {"code": D, "message": P, "path": D, "retryable": D, "details": D},
    c.PlanIssue: {"code": D, "path": D, "message": P},
    # run events. Opaque decisions holding structs are inputs echoed as received: the
    # plan (step descriptions included), fork origin, parent link, principal, a tool's
    # suspend request, rendered event matches. ``request`` is the user's own words.
    c.RunRequested: {
        "plan": D, "request": D, "input": D, "thread_id": D, "labels": D, "traceparent": D,
        "fork": D, "parent": D, "principal": D, "redacted": D, "limits": D, "caps": D,
        "budget": D, "turn_messages": D, "queue": D, "priority": D, "queued": D,
    },
    c.PlanAccepted: {"plan": D, "planner": D, "planning": D},
    c.PlanRejected: {"issues": N, "planning": D},
    # model turns: what the model answered is an input to the run (decision)
    c.ModelCallRequested: {
        "step_id": D, "turn": D, "messages": D, "idempotency_key": D, "model": D, "tools": D,
        "output_schema": D, "appended": D, "delegates": D,
    },
    c.ModelCallCompleted: {
        "step_id": D, "turn": D, "idempotency_key": D, "message": D, "started_at": D,
        "finished_at": D, "finish_reason": D, "model": D, "provider": D, "attempts": D,
        "usage": D, "throttled_ms": D,
    },
    c.ModelCallFailed: {
        "step_id": D, "turn": D, "idempotency_key": D, "error": N, "started_at": D,
        "finished_at": D, "attempts": D, "usage": D, "throttled_ms": D,
    },
    c.ModelOutputRefused: {"step_id": D, "turn": D, "error": N, "call_id": D},
    c.ReplanRequested: {
        "attempt": D, "step_id": D, "error": N, "plan": D, "kept": D, "outputs": D, "model": D,
        "retired": D,
    },
    c.PlanRevised: {"attempt": D, "plan": D, "kept": D, "planning": D},
    c.ReplanRefused: {"attempt": D, "issues": N, "planning": D},
    c.StepScheduled: {"step_id": D},
    c.StepStarted: {"step_id": D, "attempt": D},
    c.ToolCallRequested: {
        "step_id": D, "attempt": D, "tool": D, "input": D, "idempotency_key": D,
        "timeout_s": D, "resume": D, "secret_refs": D,
    },
    c.ToolCallCompleted: {
        "step_id": D, "attempt": D, "idempotency_key": D, "output": D, "started_at": D,
        "finished_at": D, "suspend": D, "breaker": D, "throttled_ms": D,
    },
    c.ToolCallFailed: {
        "step_id": D, "attempt": D, "idempotency_key": D, "error": N, "started_at": D,
        "finished_at": D, "throttled_ms": D,
    },
    c.StepCompleted: {"step_id": D, "output": D, "reused_from": D},
    c.StepFailed: {"step_id": D, "error": N},
    c.StepSkipped: {"step_id": D, "reason": P},
    c.StepCancelled: {"step_id": D, "reason": P},
    c.StepRetryScheduled: {"step_id": D, "attempt": D, "delay_s": D, "error": N},
    c.TimerStarted: {"timer_id": D, "fire_at": D, "purpose": D, "step_id": D},
    c.TimerFired: {"timer_id": D},
    c.ForeachStarted: {"step_id": D, "count": D, "items": D},
    c.LoopIterationStarted: {"step_id": D, "iteration": D},
    c.BranchTaken: {"step_id": D, "branch": D},
    c.ToolCallCancelled: {"step_id": D, "attempt": D, "idempotency_key": D, "reason": P},
    c.RunPaused: {"by": D, "reason": P},
    c.RunUnpaused: {"by": D},
    c.RunQueued: {"queue": D, "priority": D},
    c.RunAdmitted: {"queue": D},
    c.RunNeedsReview: {"step_id": D, "error": N},
    # the label is how a person finds the suspension (resume --label): an id
    c.StepSuspended: {
        "step_id": D, "suspension_id": D, "label": D, "payload": D, "schema": D,
        "expires_at": D,
    },
    c.StepResumed: {
        "step_id": D, "suspension_id": D, "data": D, "by": D, "request_id": D,
    },
    c.SubRunRequested: {"step_id": D, "child_run_id": D, "plan": D, "input": D},
    c.SubRunEnded: {"step_id": D, "child_run_id": D, "status": D, "output": D, "error": N},
    c.EventWaitStarted: {"step_id": D, "matches": D, "mode": D},
    c.EventReceived: {"step_id": D, "name": D, "key": D, "payload": D, "signal_id": D},
    c.RunCancelRequested: {"by": D, "reason": P},
    # the relay's report, received as is (like an external event): an input
    c.RunPublishFailed: {
        "seq": D, "event_type": D, "code": D, "size": D, "limit": D, "message": D,
    },
    c.RunDiverged: {"seq": D, "recorded": D, "decided": D, "message": P},
    c.RunCompleted: {"output": D},
    c.RunFailed: {"error": N},
    c.RunCancelled: {"by": D, "reason": P},
}  # fmt: skip

# per type: (prose fields, nested fields), precomputed for the replay loop
_PLAN: Final = {
    t: (
        tuple(n for n, k in kinds.items() if k == PROSE),
        tuple(n for n, k in kinds.items() if k == NESTED),
    )
    for t, kinds in FIELDS.items()
}


def _blank_flat(value: Any) -> Any:
    """A nested struct (ErrorInfo, PlanIssue) with its prose blanked. These hold no
    further nesting, so this goes one level down the *schema*, never into user data."""
    prose, nested = _PLAN.get(type(value), ((), ()))
    assert not nested, f"{type(value).__name__}: two levels of nesting are not handled"
    changes: dict[str, Any] = dict.fromkeys(prose, "")
    if isinstance(value, c.ErrorInfo) and isinstance(value.details, dict):
        problems = value.details.get("problems")
        if isinstance(problems, list):
            changes["details"] = {**value.details, "problems": _blank_problems(problems)}
    return msgspec.structs.replace(value, **changes) if changes else value


def _blank_problems(problems: list[Any]) -> list[Any]:
    """``details.problems`` of a schema check (``loom_core.schemas``): ``[path,
    message]`` pairs. Where the value failed is a decision; how it is worded is prose
    (issue 16 reworded every one of them)."""
    return [
        [p[0], ""] if isinstance(p, list) and len(p) == 2 and isinstance(p[1], str) else p
        for p in problems
    ]


def decision(event: Any) -> Any:
    """``event`` with every prose field blanked: the part replay compares. An event
    type missing from ``FIELDS`` is compared whole (a test makes sure none is)."""
    prose, nested = _PLAN.get(type(event), ((), ()))  # unclassified: all compared
    if not prose and not nested:
        return event
    changes: dict[str, Any] = dict.fromkeys(prose, "")
    for name in nested:
        value = getattr(event, name)
        if isinstance(value, list):
            changes[name] = [_blank_flat(v) for v in value]
        elif value is not None:
            changes[name] = _blank_flat(value)
    return msgspec.structs.replace(event, **changes)


def same_decision(recorded: Any, decided: Any) -> bool:
    """True when two events differ at most in prose."""
    if recorded == decided:  # the common case, and the cheap one
        return True
    return type(recorded) is type(decided) and decision(recorded) == decision(decided)


def differing_fields(recorded: Any, decided: Any) -> list[str]:
    """The top-level decision fields in which two events of one type differ."""
    if type(recorded) is not type(decided):
        return ["type"]
    a, b = decision(recorded), decision(decided)
    return [n for n in type(a).__struct_fields__ if getattr(a, n) != getattr(b, n)]
