"""What a live run waits on, and when it counts as ``suspended`` (one rule for all views).

``loom describe`` (``loom_core.stats``), ``loom runs`` (the tracing read model's
``RunSummary``, ``loom_core.spans``) and live progress (``RunProgress``, from the
executor's state) each compute a run's waits their own way (a fold of events, or the
executor's ``RunState``), then apply :func:`run_status` here, so they agree.

The rule (docs/people-in-the-loop.md):
- A run is ``suspended`` when its status is otherwise ``running``, no tool call of it is
  in flight, at least one person is waited on (its own suspension, or one of a child
  run's), and every child run it waits on is itself known to be ``suspended``. Timers
  and external events are waits too, so they never make a run "busy": a run with one
  branch at an approval and another sleeping is suspended (a person must act for it to
  finish), and both waits are listed.
- A child run whose state is unknown (a pure fold of the parent's own events) counts as
  work in progress: the parent stays ``running`` and lists the ``sub_run`` wait naming
  the child. Whoever holds the child's state too (the tracing read model, the executor)
  passes it in ``child_status`` and lifts the child's people with :func:`lift_children`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import msgspec

from loom_core.contracts import RunSummary, Wait

if TYPE_CHECKING:  # the executor's state, only read (no import cycle at run time)
    from loom_core.executor import RunState

__all__ = [
    "WAIT_TIMER_PURPOSES",
    "lift_children",
    "lifted_state",
    "lift_runs",
    "lift_summary",
    "run_status",
    "state_waits",
]

# Only these timers are waits; step/run timeouts and suspension expiry run beside the
# work they guard (an expiry is shown on its person wait as ``until``).
WAIT_TIMER_PURPOSES: frozenset[str] = frozenset({"sleep", "retry"})


def run_status(
    base: str, waits: Sequence[Wait], busy: bool, child_status: Mapping[str, str] | None = None
) -> str:
    """``suspended`` or ``base`` by the rule above. ``busy``: a tool call of this run is
    in flight. ``child_status``: the status of child runs whose state is known."""
    if base != "running" or busy:
        return base
    known = child_status or {}
    children = [w.ref for w in waits if w.kind == "sub_run"]
    if any(known.get(child) != "suspended" for child in children):
        return base  # a child that works (or whose state is unknown) is work in progress
    if children or any(w.kind == "person" for w in waits):
        return "suspended"
    return base


def lift_children(waits: Sequence[Wait], child_waits: Mapping[str, Iterable[Wait]]) -> list[Wait]:
    """``waits`` plus the people each waited-on child (recursively already lifted) waits
    on, each marked with the run it belongs to (so it is answered there, or through
    this run: ``loom resume PARENT --label L``)."""
    out = list(waits)
    for w in waits:
        if w.kind != "sub_run":
            continue
        for inner in child_waits.get(w.ref, ()):
            if inner.kind == "person":
                out.append(inner if inner.run_id else _owned(inner, w.ref))
    return out


def _owned(wait: Wait, run_id: str) -> Wait:
    return msgspec.structs.replace(wait, run_id=run_id)


def state_waits(state: RunState) -> list[Wait]:
    """The waits of a live run from the executor's state (for ``RunProgress``), in the
    order: people (by their latest suspension), timers, external events, children
    (each in the order its step began waiting: the order of ``loom runs``,
    ``loom_core.spans``). Empty once the run ended.

    Read after every commit, so it visits only what may wait now (the state's
    ``_suspended`` and ``_awaiting``, kept by ``evolve``), never every instance the run
    has had: a step's cost must not grow with the run's length (issue 10)."""
    from loom_core.executor import TERMINAL_RUN, is_open  # read-only helpers

    if state.status in TERMINAL_RUN:
        return []
    out: list[Wait] = []
    for step_id in state._suspended:
        inst = state.insts[step_id]
        susp = state.suspensions.get(f"{step_id}#{inst.suspensions}")
        if susp is not None and is_open(state, susp):
            out.append(
                Wait(
                    kind="person",
                    step_id=susp.step_id,
                    ref=susp.suspension_id,
                    label=susp.label,
                    until=susp.expires_at,
                )
            )
    for timer_id, (purpose, iid) in state.timers.items():
        if purpose in WAIT_TIMER_PURPOSES:
            until = state.timer_due.get(timer_id)
            out.append(Wait(kind="timer", step_id=iid or "", ref=timer_id, until=until))
    awaiting = [i for i in map(state.insts.__getitem__, state._awaiting) if i.status == "running"]
    for inst in awaiting:
        for match in inst.matches:
            if match.name not in inst.received:
                out.append(Wait(kind="event", step_id=inst.iid, ref=f"{match.name}:{match.key}"))
    for inst in awaiting:
        if inst.child_run_id is not None:
            out.append(Wait(kind="sub_run", step_id=inst.iid, ref=inst.child_run_id))
    return out


def lifted_state(
    state: RunState, lookup: Callable[[str], RunState | None], max_depth: int = 8
) -> tuple[str, list[Wait]]:
    """A live run's status and waits from the executor's states (progress): its own
    waits, plus the people of each child run ``lookup`` finds (recursively, to
    ``max_depth``), the status by :func:`run_status` with the children's statuses. A
    child not in memory counts as work in progress, as everywhere."""
    waits = state_waits(state)
    children: dict[str, tuple[str, list[Wait]]] = {}
    if max_depth > 0:
        for wait in waits:
            child = lookup(wait.ref) if wait.kind == "sub_run" else None
            if child is not None and wait.ref not in children:
                children[wait.ref] = lifted_state(child, lookup, max_depth - 1)
    waits = lift_children(waits, {c: w for c, (_, w) in children.items()})
    status = run_status(
        state.status, waits, state.running > 0, {c: s for c, (s, _) in children.items()}
    )
    return status, waits


def lift_summary(summary: RunSummary, children: Mapping[str, RunSummary]) -> RunSummary:
    """``summary`` (one run's own fold) seen with the summaries of the child runs it
    waits on (each already lifted, for grandchildren): the children's people join its
    ``waits`` and its status follows :func:`run_status` with the children's statuses.
    ``waiting`` keeps the run's own suspensions (the ids it can be resumed by directly)."""
    if not children or summary.status not in ("running", "suspended"):
        return summary
    waits = lift_children(summary.waits, {c: s.waits for c, s in children.items()})
    status = run_status(
        "running", waits, summary.tools_in_flight > 0, {c: s.status for c, s in children.items()}
    )
    return msgspec.structs.replace(summary, status=status, waits=waits)


async def lift_runs(
    runs: Sequence[RunSummary],
    summary_of: Callable[[str], Awaitable[RunSummary | None]],
    status: str | None,
    limit: int,
    max_depth: int = 8,
) -> list[RunSummary]:
    """``runs`` (stored summaries, each its run's own fold) lifted with the children they
    wait on (:func:`lift_summary`, recursively to ``max_depth``), then those with
    ``status`` (when given), newest first, at most ``limit``. ``summary_of`` reads one
    run's own summary (None: unknown, the parent stays as it is)."""
    memo: dict[str, RunSummary | None] = {}

    async def lifted(summary: RunSummary, depth: int) -> RunSummary:
        children: dict[str, RunSummary] = {}
        if depth < max_depth:
            for wait in summary.waits:
                if wait.kind != "sub_run":
                    continue
                if wait.ref not in memo:
                    own = await summary_of(wait.ref)
                    memo[wait.ref] = None if own is None else await lifted(own, depth + 1)
                child = memo[wait.ref]
                if child is not None:
                    children[wait.ref] = child
        return lift_summary(summary, children)

    out: dict[str, RunSummary] = {}
    for run in runs:
        if run.run_id not in out:
            out[run.run_id] = await lifted(run, 0)
    kept = [r for r in out.values() if status is None or r.status == status]
    kept.sort(key=lambda r: (r.started_at is not None, r.started_at, r.run_id), reverse=True)
    return kept[:limit]
