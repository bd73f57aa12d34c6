"""Fork and diff: new runs from recorded ones, and what differs between two runs (pure).

Fork (``loom fork RUN --from-step S``): a new run with the same plan whose top-level
steps that are not S and do not depend on S (transitively) are not executed again: their
recorded outputs are reused (``ForkOrigin.reused``; ``--set-output`` edits one first,
and the steps depending on an edited one run again). Everything from S on runs anew.

Diff (``loom diff A B``): the two runs' step instances lined up by id, with what differs
in outputs, tool calls and their inputs, errors, attempts and durations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loom_core.contracts import (
    EventRecord,
    ForkOrigin,
    Plan,
    PlanAccepted,
    RunRequest,
    RunRequested,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepScheduled,
    StepSkipped,
    ToolCallRequested,
)
from loom_core.validation import dependencies


class ForkError(ValueError):
    """The fork cannot be made as asked (names the step or field; ``path`` is where in
    a ForkRun request)."""

    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(message)
        self.path = path


def _downstream(plan: Plan, roots: set[str]) -> set[str]:
    deps = dependencies(plan.steps)
    out = set(roots)
    changed = True
    while changed:
        changed = False
        for sid, ds in deps.items():
            if sid not in out and out.intersection(ds):
                out.add(sid)
                changed = True
    return out


def fork_request(
    records: Sequence[EventRecord],
    from_step: str,
    set_outputs: Mapping[str, Any] | None = None,
    new_input: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> RunRequest:
    """The run request of a fork of the recorded run ``records``."""
    if not records or not isinstance(records[0].event, RunRequested):
        raise ForkError("the run has no run_requested event to fork from", "$.run_id")
    first = records[0].event
    plan = next((r.event.plan for r in records if isinstance(r.event, PlanAccepted)), None)
    if plan is None:
        raise ForkError("the run never had an accepted plan: there is nothing to reuse", "$.run_id")
    top = {s.id for s in plan.steps}
    if from_step not in top:
        raise ForkError(
            f"--from-step: no top-level step '{from_step}' (steps: {sorted(top)})", "$.from_step"
        )
    edits = dict(set_outputs or {})
    unknown = sorted(set(edits) - top)
    if unknown:
        raise ForkError(
            f"--set-output: no top-level step {unknown} (steps: {sorted(top)})", "$.set_output"
        )
    recorded = {
        r.event.step_id: r.event.output
        for r in records
        if isinstance(r.event, StepCompleted) and r.event.step_id in top
    }
    missing = sorted(s for s in edits if s not in recorded and s != from_step)
    rerun = _downstream(plan, {from_step})
    # steps downstream of an edited output must see the edit: they run again
    rerun |= _downstream(plan, set(edits)) - set(edits)
    reused = {sid: out for sid, out in recorded.items() if sid not in rerun}
    reused.update(edits)
    if missing and any(m in rerun for m in missing):
        raise ForkError(
            f"--set-output {missing}: those steps run again in the fork", "$.set_output"
        )
    origin = ForkOrigin(
        run_id=records[0].run_id, from_step=from_step, reused=reused, edited=sorted(edits)
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
    "different" on their own."""
    fa, fb = step_facts(a), step_facts(b)
    out: list[StepDiff] = []
    for sid in [*fa, *(s for s in fb if s not in fa)]:
        x, y = fa.get(sid), fb.get(sid)
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
