"""Re-planning after a failed step (``Plan.replan``), the pure part.

When a top-level step's failure would fail the run and the plan opts in, the executor
records ``replan_requested`` instead of ``run_failed`` (at most ``Replan.max`` times per
run): the failed step and its error, the plan, the top-level steps that succeeded and
their outputs (each told up to ``OUTPUT_TOLD_BYTES``). The planner service asks its
model for the steps that remain (the same prompt, validator and bounded repairs as a
natural-language plan) and answers the run's inbox with the whole revised plan: the
kept steps verbatim, then the new ones. The executor checks it (structure, kept steps
unchanged) and records ``plan_revised``, or ``replan_refused`` then the failure.

Replay and fork read the revised plan from ``plan_revised``: no model is asked again.
The kept steps are not re-run: the revised plan's root scope starts with them done
(their outputs as they were), so their side effects happen once.
"""

from __future__ import annotations

from typing import Any

import msgspec

from loom_core.contracts import ErrorInfo, Plan, PlanIssue, ReplanRequested, Step

MAX_REPLANS = 5  # the largest Replan.max a plan may ask for
OUTPUT_TOLD_BYTES = 2048  # a kept step's output told to the planner, at most


def request(plan: Plan, done: int, failed: str, error: ErrorInfo, outputs: dict[str, Any],
            retired: list[str]) -> ReplanRequested | None:  # fmt: skip
    """The re-planning request for a run whose step ``failed`` would fail it, or None
    when the plan did not opt in or its re-plannings are used up (``done``).
    ``retired``: top-level ids of earlier plans' steps that were dropped."""
    if plan.replan is None or done >= plan.replan.max:
        return None
    kept = [s.id for s in plan.steps if s.id in outputs]
    dropped = [s.id for s in plan.steps if s.id not in outputs]
    return ReplanRequested(
        attempt=done + 1, step_id=failed, error=error, plan=plan, kept=kept,
        outputs={k: told(outputs[k]) for k in kept}, model=plan.replan.model,
        retired=sorted({*retired, *dropped}),
    )  # fmt: skip


def told(output: Any) -> Any:
    """An output as the planner may see it: itself when small, else a description."""
    size = len(msgspec.json.encode(output))
    if size <= OUTPUT_TOLD_BYTES:
        return output
    return {"_large_output": f"{size} bytes of JSON, not shown; reference it by template"}


def revise(failed: ReplanRequested, tail: Plan) -> Plan:
    """The whole revised plan: the kept steps verbatim, then the model's steps; the
    model's ``output`` (the old one may read a step that is gone); the rest as before."""
    by_id = {s.id: s for s in failed.plan.steps}
    steps: list[Step] = [by_id[k] for k in failed.kept if k in by_id]
    return msgspec.structs.replace(failed.plan, steps=steps + list(tail.steps), output=tail.output)


def kept_issues(failed: ReplanRequested, proposed: Plan) -> list[PlanIssue]:
    """A revised plan must start with the kept steps, unchanged: they are not run again,
    so a proposal that rewrote one would claim an output it never produced."""
    by_id = {s.id: s for s in failed.plan.steps}
    head = proposed.steps[: len(failed.kept)]
    if [s.id for s in head] != failed.kept or any(s != by_id[s.id] for s in head):
        return [PlanIssue(code="invalid_plan", path="$.plan.steps",
                          message="a revised plan starts with the steps that succeeded, "
                          f"unchanged ({', '.join(failed.kept) or 'none'}), then the new "
                          "ones")]  # fmt: skip
    retired = set(failed.retired)
    return [
        PlanIssue(
            code="duplicate_step_id",
            path=f"$.plan.steps[{i}].id",
            message=f"step id {step.id!r} was used in this run by a step that did not "
            "succeed (its calls and child runs keep that id): choose a new id",
        )  # fmt: skip
        for i, step in enumerate(proposed.steps)
        if i >= len(failed.kept) and step.id in retired
    ]


def replan_issues(path: str, plan: Plan) -> list[PlanIssue]:
    if plan.replan is None or 1 <= plan.replan.max <= MAX_REPLANS:
        return []
    return [PlanIssue(code="invalid_plan", path=f"{path}.replan.max",
                      message=f"replan.max must be 1 to {MAX_REPLANS} (got "
                      f"{plan.replan.max}); omit replan to fail at the first "
                      "failure")]  # fmt: skip
