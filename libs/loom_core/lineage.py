"""Fork and diff: new runs from recorded ones, and what differs between two runs (pure).

Fork (``loom fork RUN --from-step S``): a new run with the same plan that reuses every
recorded result not depending on the step instance S (any depth: ``each/2/ok``,
``reviews/legal/legal_ok``) nor on an edited one (``--set-output P=JSON``); S and
everything downstream of it run anew. The rules are in ``loom_core.fork_reuse``.

Diff (``loom diff A B``): the two runs' step instances lined up by id, with what differs
in outputs, tool calls and their inputs, errors, attempts and durations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loom_core.contracts import (
    EventRecord,
    ForkOrigin,
    PlanAccepted,
    PlanRevised,
    RunRequest,
    RunRequested,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepScheduled,
    StepSkipped,
    ToolCallRequested,
)
from loom_core.fork_reuse import ForkError, Recorded, check_edit, plan_reuse, resolve

__all__ = ["ForkError", "StepDiff", "StepFacts", "diff_runs", "fork_request", "step_facts"]


def fork_request(
    records: Sequence[EventRecord],
    from_step: str,
    set_outputs: Mapping[str, Any] | None = None,
    new_input: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> RunRequest:
    """The run request of a fork of the recorded run ``records`` from the step instance
    ``from_step`` (any depth), with ``set_outputs`` edits (instance path -> output).
    What it reuses follows ``loom_core.fork_reuse``; raises ForkError (typed)."""
    if not records or not isinstance(records[0].event, RunRequested):
        raise ForkError("the run has no run_requested event to fork from", "$.run_id")
    first = records[0].event
    # the plan the run ended with: a re-planned run's revised plan (loom_core.replanning)
    plans = [r.event.plan for r in records if isinstance(r.event, PlanAccepted | PlanRevised)]
    plan = plans[-1] if plans else None
    if plan is None:
        raise ForkError("the run never had an accepted plan: there is nothing to reuse", "$.run_id")
    recorded = Recorded.of(records)
    target = resolve(plan, from_step, recorded, "--from-step", "$.from_step")
    edits: dict[str, Any] = {}
    for raw, value in (set_outputs or {}).items():
        where = f"$.set_output[{json.dumps(raw)}]"
        edited = resolve(plan, raw, recorded, "--set-output", where)
        check_edit(edited, value, "--set-output", where)
        edits[edited.path] = value
    reused = plan_reuse(plan, recorded, target.path, edits)
    origin = ForkOrigin(
        run_id=records[0].run_id, from_step=target.path, reused=reused, edited=sorted(edits)
    )
    return RunRequest(
        plan=plan,
        input=dict(new_input) if new_input is not None else first.input,
        thread_id=first.thread_id,
        labels=first.labels,
        run_id=run_id,
        fork=origin,
    )


# --------------------------------------------------------------------------- diff


@dataclass
class StepFacts:
    status: str = "pending"
    output: Any = None
    error: Any = None
    tool: str | None = None
    inputs: list[Any] = field(default_factory=list)
    attempts: int = 0
    duration_ms: float | None = None
    reused: bool = False


def step_facts(records: Sequence[EventRecord]) -> dict[str, StepFacts]:
    facts: dict[str, StepFacts] = {}
    started = {}
    for r in records:
        e = r.event
        sid = getattr(e, "step_id", None)
        if sid is None:
            continue
        f = facts.setdefault(sid, StepFacts())
        match e:
            case StepScheduled():
                started[sid] = r.at
            case ToolCallRequested(tool=tool, input=inp):
                f.tool, f.attempts = tool, f.attempts + 1
                f.inputs.append(inp)
            case StepCompleted(output=output, reused_from=reused):
                f.status, f.output, f.reused = "succeeded", output, reused is not None
            case StepFailed(error=error):
                f.status, f.error = "failed", {"code": error.code, "message": error.message}
            case StepSkipped():
                f.status = "skipped"
            case StepCancelled():
                f.status = "cancelled"
        if (
            isinstance(e, StepCompleted | StepFailed | StepSkipped | StepCancelled)
            and sid in started
        ):
            f.duration_ms = (r.at - started[sid]).total_seconds() * 1000
    return facts


@dataclass(frozen=True)
class StepDiff:
    step_id: str
    changes: dict[str, tuple[Any, Any]]  # field -> (in A, in B)


def diff_runs(a: Sequence[EventRecord], b: Sequence[EventRecord]) -> list[StepDiff]:
    """Per step id (in A's order, then B's new ones): the fields that differ. Durations
    are always reported (they differ between any two runs) but do not make a step
    "different" on their own. A fork that reused a whole composite, element or branch
    (``reused`` differs there) did not run what was inside it: those instances of the
    other run are carried by it and not listed as missing."""
    fa, fb = step_facts(a), step_facts(b)
    whole = {sid for facts in (fa, fb) for sid, f in facts.items() if f.reused}
    out: list[StepDiff] = []
    for sid in [*fa, *(s for s in fb if s not in fa)]:
        x, y = fa.get(sid), fb.get(sid)
        if (x is None or y is None) and _inside_any(sid, whole):
            continue
        if x is None or y is None:
            out.append(StepDiff(sid, {"present": (x is not None, y is not None)}))
            continue
        changes = {
            name: (getattr(x, name), getattr(y, name))
            for name in ("status", "output", "error", "tool", "inputs", "attempts", "reused")
            if getattr(x, name) != getattr(y, name)
        }
        if changes:
            changes["duration_ms"] = (x.duration_ms, y.duration_ms)
            out.append(StepDiff(sid, changes))
    return out


def _inside_any(sid: str, paths: set[str]) -> bool:
    head = sid.rpartition("/")[0]
    while head:
        if head in paths:
            return True
        head = head.rpartition("/")[0]
    return False
