"""``loom describe``'s view of a parent and its sub-runs (``loom_core.stats.family_stats``),
on the pure core: the parent's own events say ``running`` (the child's state is not
in them); with the child's events it is ``suspended`` and lists the child's person,
as ``loom runs`` (``waits.lift_summary``) does with the same rule."""

from __future__ import annotations

import asyncio

from test_debugging import records_of  # type: ignore[import-not-found]
from test_executor import World, echo  # type: ignore[import-not-found]

from loom_core.contracts import ApprovalStep, EventRecord, Plan, SubRunRequested, SubRunStep
from loom_core.stats import family_stats, run_stats
from loom_core.waits import lifted_state

ASK = Plan(steps=[ApprovalStep(id="ok", label="legal", schema={"type": "boolean"})])


def family(depth: int) -> dict[str, list[EventRecord]]:
    """Runs nested ``depth`` deep, the innermost asking; events by run id, outermost
    first (each child is driven by itself, as its own executor run would be)."""
    plan = ASK
    for _ in range(depth):
        plan = Plan(steps=[SubRunStep(id="sub", plan=plan)])
    out: dict[str, list[EventRecord]] = {}
    run_id = "top"
    while True:
        w = World(plan, run_id=run_id)
        w.run(echo)
        out[run_id] = records_of(w)
        started = w.of(SubRunRequested)
        if not started:
            return out
        run_id, plan = started[0].child_run_id, started[0].plan


def test_a_parent_is_suspended_on_its_descendants_person() -> None:
    runs = family(2)
    top, child, grandchild = runs  # in the order each started the next
    assert top == "top"

    async def events_of(run_id: str) -> list[EventRecord]:
        return runs.get(run_id, [])

    own = run_stats(runs["top"])
    assert own.status == "running" and [w.kind for w in own.waits] == ["sub_run"]
    lifted = asyncio.run(family_stats("top", events_of))
    assert lifted is not None and lifted.status == "suspended"
    people = [(w.run_id, w.ref, w.label) for w in lifted.waits if w.kind == "person"]
    assert people == [(grandchild, "ok#1", "legal")]
    texts = [p.text for p in lifted.pending_work]
    assert f"step sub: child run {child} (suspended, waiting on 'legal' ({grandchild}: ok#1))" in (
        texts
    )
    # a child whose events are unknown counts as work in progress, as in a pure fold
    unknown = asyncio.run(family_stats("top", lambda r: events_of(r if r == "top" else "x")))
    assert unknown is not None and unknown.status == "running"
    assert asyncio.run(family_stats("nope", events_of)) is None


def test_progress_lifts_children_in_memory_to_any_depth() -> None:
    worlds: dict[str, World] = {}
    plan = Plan(steps=[SubRunStep(id="sub", plan=Plan(steps=[SubRunStep(id="sub", plan=ASK)]))])
    run_id = "top"
    while True:
        w = worlds[run_id] = World(plan, run_id=run_id)
        w.run(echo)
        started = w.of(SubRunRequested)
        if not started:
            break
        run_id, plan = started[0].child_run_id, started[0].plan
    top, child, grandchild = worlds
    states = {r: w.state for r, w in worlds.items()}
    status, waits = lifted_state(states[top], states.get)
    assert status == "suspended"
    assert [(w.kind, w.ref, w.run_id) for w in waits] == [
        ("sub_run", child, ""), ("person", "ok#1", grandchild),
    ]  # fmt: skip
    # the child not in memory: work in progress, as a pure fold says
    assert lifted_state(states[top], lambda r: None)[0] == "running"
    assert lifted_state(states[top], states.get, max_depth=1)[0] == "running"
