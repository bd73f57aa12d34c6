"""What a fork from a step instance re-runs and what it reuses (pure).

A fork names a **fork point** (``--from-step``) and optional **edits** (``--set-output``),
each an instance path as the executor forms them (``loom_core.executor``): a top-level
step ``b``; inside a composite, its child scope ``each/2`` (foreach/reduce element, loop
iteration), ``reviews/legal`` (parallel branch), ``cond/then`` (if branch); a step in a
child scope ``each/2/ok``, ``reviews/legal/legal_ok``, to any depth. A trailing
suspension or attempt number (``each/2/ok#1``) is dropped.

The fork reuses every recorded result that does not depend on the fork point or on an
edit. "Depends on" (``X`` depends on ``Y`` when ``Y``'s result can change ``X``'s):

1. in one scope, a step depends on the steps it depends on (``depends_on`` and the
   templates it reads, ``validation.dependencies``), transitively;
2. a composite's result depends on each of its child scopes, a child scope's result on
   each of its steps: an ancestor of the fork point runs again (its children are still
   reused where rules 3 and 4 allow);
3. foreach elements, parallel branches and if branches do not depend on each other; a
   loop iteration depends on every earlier iteration, a reduce element on every earlier
   element (the accumulator chain);
4. everything inside a composite depends on what the composite depends on (its items,
   condition and templates read the enclosing scopes).

So, walking from the root to each seed (the fork point and every edit): in each scope on
the way, the step holding a seed and every step downstream of it (rule 1) run anew;
the other steps that completed are reused whole (a composite with all its children).
Inside a composite on the way (rule 2), child scopes that hold no seed are reused whole
(rule 3), except: a reduce element or loop iteration after the first one holding a seed
runs anew, and a loop iteration before it is reused step by step (its ``until`` reads the
iteration's step outputs, which a whole-scope result does not carry). The fork point
itself runs anew; an edited instance is reused with the edited value and its dependents
run anew. An edit always wins: it is applied wherever the fork reaches its path, even
inside a step that runs anew. Only completed results are reused: a step that failed,
was skipped or cancelled, or never finished runs again.

The result is ``ForkOrigin.reused``: instance path -> output. The executor completes an
instance at once with that output (``step_completed`` with ``reused_from``) when it
would start it; an older fork's keys are top-level step ids, which are instance paths
too, so old forks replay as they were decided.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loom_core.contracts import (
    ApprovalStep,
    EventRecord,
    ForeachStep,
    IfStep,
    LoopStep,
    ParallelStep,
    Plan,
    ReduceStep,
    Step,
    StepCompleted,
    StepFailed,
    StepScheduled,
    SubRunRequested,
    SubRunStep,
    ToolStep,
)
from loom_core.errors import LoomError
from loom_core.schemas import problems
from loom_core.validation import dependencies

__all__ = [
    "ForkError", "Recorded", "Target", "body_of", "check_edit", "plan_reuse", "resolve", "within",
]  # fmt: skip

_SUFFIX = re.compile(r"#\d+$")
_COMPOSITES = (ForeachStep, ReduceStep, LoopStep, ParallelStep, IfStep)
_ORDERED = (ReduceStep, LoopStep)  # each child depends on the earlier ones (rule 3)
MAX_MATCHES = 5


class ForkError(LoomError, ValueError):
    """The fork cannot be made as asked. ``code`` types it (``invalid_fork``,
    ``unknown_step``, ``step_never_ran``, ``invalid_output``), ``path`` is where in the
    ForkRun request, ``details`` what a caller can act on (close matches, problems)."""

    def __init__(
        self,
        message: str,
        path: str = "$",
        code: str = "invalid_fork",
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.code = code
        self.details = details or {}


@dataclass
class Recorded:
    """What the origin run recorded, by instance path."""

    run_id: str
    completed: dict[str, Any] = field(default_factory=dict)  # path -> output
    ran: set[str] = field(default_factory=set)  # scheduled or ended
    children: dict[str, list[str]] = field(default_factory=dict)  # path -> child keys
    child_runs: dict[str, str] = field(default_factory=dict)  # sub_run step -> child run

    @classmethod
    def of(cls, records: Sequence[EventRecord]) -> Recorded:
        out = cls(run_id=records[0].run_id if records else "")
        for r in records:
            e = r.event
            match e:
                case StepCompleted(step_id=iid, output=output):
                    out.completed[iid] = output
                    out.ran.add(iid)
                case StepScheduled(step_id=iid) | StepFailed(step_id=iid):
                    out.ran.add(iid)
                case SubRunRequested(step_id=iid, child_run_id=child):
                    out.child_runs[iid] = child
        # a skipped or cancelled instance that was never scheduled (a branch not taken,
        # a blocked step) never ran
        for iid in out.ran:
            head, _, key = iid.rpartition("/")
            if head:
                out.children.setdefault(head, []).append(key)
        for keys in out.children.values():
            keys.sort(key=lambda k: (0, int(k), "") if k.isdigit() else (1, 0, k))
        return out


@dataclass(frozen=True)
class Target:
    """A resolved instance path: ``step`` is the step it names (None for a child scope,
    then ``owner`` is the composite step whose child it is)."""

    path: str
    step: Step | None
    owner: Step | None = None
    ancestors: tuple[str, ...] = ()  # proper ancestors, outermost first


def within(path: str, ancestor: str) -> bool:
    """``path`` is ``ancestor`` or inside it."""
    return path == ancestor or path.startswith(ancestor + "/")


def body_of(step: Step, key: str) -> list[Step] | None:
    """The steps of ``step``'s child scope ``key``, None when it has no such child."""
    match step:
        case ForeachStep(do=do) | ReduceStep(do=do) | LoopStep(do=do):
            return do if key.isdigit() and str(int(key)) == key else None
        case ParallelStep(branches=branches):
            return branches.get(key)
        case IfStep(then=then, else_=else_):
            return {"then": then, "else": else_}.get(key)
    return None


def resolve(plan: Plan, raw: str, recorded: Recorded, option: str, where: str) -> Target:
    """The instance ``raw`` names in ``plan``, checked against what ``recorded`` ran;
    raises ForkError ``unknown_step`` (with close matches) or ``step_never_ran``."""
    path = _SUFFIX.sub("", raw.strip())
    segments = path.split("/") if path else [""]
    steps: list[Step] = plan.steps
    step: Step | None = None
    owner: Step | None = None
    ancestors: list[str] = []
    done: list[str] = []
    i = 0
    while i < len(segments):
        seg = segments[i]
        found = next((s for s in steps if s.id == seg), None)
        if found is None:
            raise _unknown(plan, path, recorded, option, where, "/".join([*done, seg]))
        step, owner = found, None
        done.append(seg)
        if i + 1 == len(segments):
            break
        ancestors.append("/".join(done))
        key = segments[i + 1]
        if isinstance(step, ToolStep) and key == "fallback":
            raise ForkError(
                f"{option} '{path}': a fallback runs in place of its step; name "
                f"'{'/'.join(done)}' instead",
                where,
            )
        if isinstance(step, SubRunStep):
            child = recorded.child_runs.get("/".join(done))
            hint = f" (loom fork {child} --from-step ...)" if child else ""
            raise ForkError(
                f"{option} '{path}': '{'/'.join(done)}' is a sub_run step; its steps ran "
                f"in the child run: fork that run instead{hint}",
                where,
                details={"child_run_id": child} if child else None,
            )
        body = body_of(step, key)
        if body is None:
            raise _unknown(plan, path, recorded, option, where, "/".join([*done, key]))
        done.append(key)
        owner, step = step, None
        if i + 2 == len(segments):
            break
        ancestors.append("/".join(done))
        steps = body
        i += 2
    target = Target(path=path, step=step, owner=owner, ancestors=tuple(ancestors))
    # every enclosing instance must have run, and a child scope must have run itself
    must_have_run = [*target.ancestors, *([path] if step is None else [])]
    for anc in must_have_run:
        if anc not in recorded.ran:
            raise _never_ran(path, anc, recorded, option, where)
    return target


def _unknown(
    plan: Plan, path: str, recorded: Recorded, option: str, where: str, bad: str
) -> ForkError:
    known = sorted(recorded.ran | {s.id for s in plan.steps})
    close = difflib.get_close_matches(path, known, n=MAX_MATCHES, cutoff=0.5)
    if not close:  # the same parent's instances, the likeliest neighbours
        head = bad.rpartition("/")[0]
        close = [p for p in known if head and p.rpartition("/")[0] == head][:MAX_MATCHES]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    top = "" if close else f"; top-level steps: {', '.join(s.id for s in plan.steps)}"
    return ForkError(
        f"{option}: run '{recorded.run_id}' has no step instance '{path}' ('{bad}' is not "
        f"in its plan){hint}{top}",
        where,
        code="unknown_step",
        details={"close_matches": close},
    )


def _never_ran(path: str, anc: str, recorded: Recorded, option: str, where: str) -> ForkError:
    head = anc.rpartition("/")[0]
    ran = recorded.children.get(head, []) if head else []
    seen = f"; '{head}' ran: {', '.join(f'{head}/{k}' for k in ran[:10])}" if ran else ""
    what = "it" if anc == path else f"'{anc}'"
    return ForkError(
        f"{option} '{path}': {what} never ran in run '{recorded.run_id}' (not started, "
        f"skipped, cancelled, or a branch not taken){seen}",
        where,
        code="step_never_ran",
        details={"never_ran": anc, "ran": [f"{head}/{k}" for k in ran]},
    )


def check_edit(target: Target, value: Any, option: str, where: str) -> None:
    """An edited output must fit what its step declares: an approval's answer schema
    (its output is the answer). A loop iteration's result cannot be edited: the next
    iteration's ``until`` reads the iteration's steps, so edit one of those."""
    if target.step is None and isinstance(target.owner, LoopStep):
        raise ForkError(
            f"{option} '{target.path}': a loop iteration's result comes from its steps "
            "(the loop's `until` reads them): edit a step inside the iteration",
            where,
        )
    step = target.step
    if isinstance(step, ApprovalStep) and step.schema:
        issues = problems(step.schema, value, where)
        if issues:
            text = "; ".join(f"{p}: {m}" for p, m in issues)
            raise ForkError(
                f"{option} '{target.path}': the value does not fit the approval's schema: {text}",
                issues[0][0],
                code="invalid_output",
                details={"problems": [list(p) for p in issues], "schema": step.schema},
            )


def plan_reuse(
    plan: Plan, recorded: Recorded, from_path: str, edits: Mapping[str, Any]
) -> dict[str, Any]:
    """``ForkOrigin.reused`` for a fork from ``from_path`` with ``edits`` (paths already
    resolved): the rules of the module docstring."""
    seeds = {from_path, *edits}
    reused: dict[str, Any] = {}

    def hot(path: str) -> bool:
        return any(within(seed, path) for seed in seeds)

    def scope(sid: str, steps: list[Step]) -> None:
        deps = dependencies(steps)
        iid = {s.id: f"{sid}/{s.id}" if sid else s.id for s in steps}
        holding = {s.id for s in steps if hot(iid[s.id])}
        rerun = _downstream(deps, holding)  # strictly downstream of a seed-holding step
        for s in steps:
            path = iid[s.id]
            if s.id in rerun or path in edits or path == from_path:
                continue
            if s.id in holding:
                composite(path, s)
            elif path in recorded.completed:
                reused[path] = recorded.completed[path]

    def composite(path: str, step: Step) -> None:
        keys = recorded.children.get(path, [])
        holding = [k for k in keys if hot(f"{path}/{k}")]
        first = min((int(k) for k in holding), default=None) if isinstance(step, _ORDERED) else None
        for key in keys:
            child = f"{path}/{key}"
            body = body_of(step, key)
            if body is None:
                continue  # a fallback's path, no child scope
            if first is not None and int(key) > first:
                continue  # after the first changed element / iteration: runs anew
            if child in edits or child == from_path:
                continue
            if key in holding or isinstance(step, LoopStep):
                scope(child, body)  # a loop iteration is reused step by step
            elif child in recorded.completed:
                reused[child] = recorded.completed[child]

    scope("", plan.steps)
    reused.update(edits)
    return reused


def _downstream(deps: Mapping[str, Iterable[str]], roots: set[str]) -> set[str]:
    """Steps depending (transitively) on one of ``roots``, other than that root itself:
    a root downstream of another root is included."""
    dependents: dict[str, list[str]] = {}
    for sid, ds in deps.items():
        for d in ds:
            dependents.setdefault(d, []).append(sid)
    out: set[str] = set()
    todo = [d for r in roots for d in dependents.get(r, ())]
    while todo:
        sid = todo.pop()
        if sid not in out:
            out.add(sid)
            todo.extend(dependents.get(sid, ()))
    return out
