"""Which run a resume request is for: the run it names, or one of its sub-runs.

Users address the run they started; a question may be asked deep inside it, by a child
run (a ``sub_run`` step) or a grandchild. ``route_resume`` picks the run whose
suspension a request answers, from the states of the addressed run and its descendants
(the caller loads them: ``descendants`` lists the child run ids to load). Pure: no I/O.

Order (docs/people-in-the-loop.md, "through the parent"):
1. A run where this ``request_id`` was already recorded for that label / suspension id:
   a repeat goes where the first one went, whichever run it was (idempotent).
2. The addressed run itself when something of its own matches and is open (its own
   ambiguity and schema checks then apply as before).
3. Exactly one descendant with a matching open suspension: that run. Several: refused
   ``ambiguous_label`` (or ``ambiguous_suspension``) naming each run and suspension id.
4. Nothing open: the addressed run's own answered or closed match (the reply says who
   answered or why it is closed), else a descendant's, else refused
   ``unknown_label`` / ``unknown_suspension`` naming the sub-runs that wait and on what.
"""

from __future__ import annotations

from collections.abc import Mapping

from loom_core.contracts import ErrorInfo, ResumeRun
from loom_core.executor import RunState, Suspension, is_open

__all__ = ["MAX_DEPTH", "children_of", "route_resume"]

# Sub-runs nest; a plan cannot make a cycle (child ids derive from the parent's), but a
# bound keeps a malformed store from making a resume walk forever.
MAX_DEPTH = 8


def children_of(state: RunState) -> list[str]:
    """Child run ids of ``state``'s sub_run steps (running or not), in step order: a
    repeat of a request answered in a child that has since ended must still find it;
    then those of its running agents' delegate calls."""
    steps = [i.child_run_id for i in state.insts.values() if i.child_run_id is not None]
    # an agent's delegates (loom_core.agent_delegates) while the agent runs
    return steps + [c for a in state.agents.values() for c in a.children.values()]


def _matches(state: RunState, request: ResumeRun) -> list[Suspension]:
    if request.suspension_id is not None:
        found = state.suspensions.get(request.suspension_id)
        return [found] if found is not None else []
    return [x for x in state.suspensions.values() if x.label == request.label]


def route_resume(states: Mapping[str, RunState], root: str, request: ResumeRun) -> str | ErrorInfo:
    """The id of the run to apply ``request`` to (``root`` or a descendant in
    ``states``), or why none. ``states`` holds ``root`` and the descendants loaded."""
    top = states[root]
    if request.suspension_id is None and request.label is None:
        return root  # the run's own reply names what is missing
    order = _walk(states, root)
    # 1. a repeat goes where the first went
    if request.request_id:
        for run_id in order:
            for x in _matches(states[run_id], request):
                if x.resumed is not None and x.resumed.request_id == request.request_id:
                    return run_id
    # 2. the addressed run's own open match
    if any(is_open(top, x) for x in _matches(top, request)):
        return root
    # 3. the one descendant that waits under it
    waiting = {
        run_id: [x for x in _matches(states[run_id], request) if is_open(states[run_id], x)]
        for run_id in order[1:]
    }
    waiting = {run_id: found for run_id, found in waiting.items() if found}
    if len(waiting) == 1:
        return next(iter(waiting))
    what, path = _what(request)
    if len(waiting) > 1:
        listed = "; ".join(
            f"run '{r}': {', '.join(x.suspension_id for x in found)}"
            for r, found in waiting.items()
        )
        return ErrorInfo(
            code="ambiguous_label" if request.suspension_id is None else "ambiguous_suspension",
            message=f"{what} waits in {len(waiting)} sub-runs of run '{root}' ({listed}): "
            "resume that sub-run directly (loom resume SUB_RUN ...)",
            path=path,
            details={"waiting": {r: [x.suspension_id for x in f] for r, f in waiting.items()}},
        )
    # 4. nothing open: who answered, or what waits instead
    for run_id in order:
        if _matches(states[run_id], request):
            return run_id
    if len(order) == 1:
        return root  # no sub-runs: the run's own reply (waiting labels) says it all
    return _unknown(states, order, root, what, path)


def _what(request: ResumeRun) -> tuple[str, str]:
    if request.suspension_id is not None:
        return f"suspension '{request.suspension_id}'", "$.suspension_id"
    return f"label '{request.label}'", "$.label"


def _walk(states: Mapping[str, RunState], root: str) -> list[str]:
    """``root`` then its loaded descendants, depth first in step order."""
    out: list[str] = []
    todo: list[tuple[str, int]] = [(root, 0)]
    while todo:
        run_id, depth = todo.pop()
        if run_id in out or run_id not in states:
            continue
        out.append(run_id)
        if depth < MAX_DEPTH:
            todo.extend((c, depth + 1) for c in reversed(children_of(states[run_id])))
    return out


def _unknown(
    states: Mapping[str, RunState], order: list[str], root: str, what: str, path: str
) -> ErrorInfo:
    waits: dict[str, list[str]] = {}
    for run_id in order:
        state = states[run_id]
        open_ = [
            f"{x.label} ({x.suspension_id})"
            for x in state.suspensions.values()
            if is_open(state, x)
        ]  # fmt: skip
        if open_:
            waits[run_id] = open_
    own = waits.pop(root, [])
    top = states[root]
    labels = sorted({x.label for x in top.suspensions.values() if is_open(top, x)})
    parts = [f"waiting labels: {labels}"]
    if waits:
        parts.append(
            "in its sub-runs: " + "; ".join(f"'{r}': {', '.join(w)}" for r, w in waits.items())
        )
    else:
        subs = order[1:]
        parts.append(
            f"its sub-runs ({', '.join(subs)}) wait for nobody" if subs else "it has no sub-runs"
        )
    code = "unknown_suspension" if path == "$.suspension_id" else "unknown_label"
    return ErrorInfo(
        code=code,
        message=f"nothing in run '{root}' or its sub-runs waits under {what}; " + "; ".join(parts),
        path=path,
        details={"waiting": {root: own, **waits}},
    )
