"""Snapshot layout 6 (issue 10): an instance running its scope's step saves no copy of it,
and a restored state leaves few objects to the garbage collector (steps and instances
are never tracked: ``gc=False``), so a long run loads fast in a service, whose start-up
heap is frozen (docs/decisions.md, "Performance, fourteenth part")."""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from golden_runs import FILES, GOLDEN, read

from loom_core.contracts import (
    ForeachStep,
    Plan,
    PlanProposed,
    RunRequest,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_core.executor import Inst, RunState, advance, evolve, initial_state, restore, snapshot

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def chain(steps: int) -> RunState:
    """A run that ran a chain of ``steps`` no-op tool steps to its last one."""
    plan = Plan(steps=[
        ToolStep(id=f"s{i}", tool="noop", depends_on=[f"s{i - 1}"] if i else [])
        for i in range(steps)
    ])  # fmt: skip
    state = initial_state("chain")
    now = T0
    advance(state, RunRequest(plan=plan), now)
    pending = [e for e in advance(state, PlanProposed(run_id="chain", plan=plan), now)
               if isinstance(e, ToolCallRequested)]  # fmt: skip
    while pending:
        req = pending.pop()
        now += timedelta(milliseconds=1)
        result = ToolResult(
            run_id="chain", step_id=req.step_id, attempt=1, idempotency_key=req.idempotency_key,
            ok=True, started_at=now, finished_at=now, output={},
        )  # fmt: skip
        if req.step_id == f"s{steps - 1}":
            break  # the run stays running: its last step is in flight
        pending += [e for e in advance(state, result, now) if isinstance(e, ToolCallRequested)]
    return state


def layout_5(state: RunState) -> bytes:
    """The snapshot layout 5 saved: every instance with its step."""
    body = msgspec.json.decode(snapshot(state))
    for iid, inst in body["state"]["insts"].items():
        inst["step"] = msgspec.to_builtins(state.insts[iid].step)
    body["layout"] = 5
    return msgspec.json.encode(body)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_a_restored_instance_runs_the_step_it_ran_before(path: Path) -> None:
    """At every cut of every golden history (foreach, parallel, if, loop, fallback, sub-run,
    revision): each restored instance has the step it had, the scope's very object where
    it was live; the state snapshotted is left as it was; a layout 5 snapshot restores
    into the same state."""
    records = read(path)
    state = initial_state(records[0].run_id)
    for record in records:
        evolve(state, record.event, record.at)
        steps = {iid: inst.step for iid, inst in state.insts.items()}
        data = snapshot(state)
        assert all(state.insts[iid].step is step for iid, step in steps.items()), record.seq
        restored = restore(data)
        for iid, inst in state.insts.items():
            again = restored.insts[iid]
            assert again.step == inst.step, (record.seq, iid)
            scope = state.scopes.get(inst.scope)
            if inst.step is not None and scope and scope.by_id.get(inst.step.id) is inst.step:
                assert again.step is restored.scopes[inst.scope].by_id[inst.step.id]
        assert snapshot(restored) == data, record.seq
        assert snapshot(restore(layout_5(state))) == data, record.seq


def test_a_chain_saves_each_step_once() -> None:
    """Layout 5 saved a chain's steps twice (the plan's, each instance's own)."""
    state = chain(50)
    data = snapshot(state)
    assert data.count(b'"kind":"tool"') == 50
    assert len(data) < 0.85 * len(layout_5(state))


def test_a_fallback_keeps_its_own_step() -> None:
    """A fallback instance's step is not its scope's: saved with it."""
    records = read(GOLDEN / "tool-fallback.jsonl")
    state = initial_state(records[0].run_id)
    for record in records:
        evolve(state, record.event, record.at)
        if any(i.fallback_of for i in state.insts.values()):
            break
    fallback = next(i for i in state.insts.values() if i.fallback_of)
    saved = msgspec.json.decode(snapshot(state))["state"]["insts"][fallback.iid]
    assert saved["step"] == msgspec.to_builtins(fallback.step)


def test_other_layouts_are_refused() -> None:
    body = msgspec.json.decode(snapshot(chain(3)))
    for layout in (4, 7):
        body["layout"] = layout
        with pytest.raises(ValueError, match="layout"):
            restore(msgspec.json.encode(body))


def test_steps_and_instances_are_never_tracked_by_the_collector() -> None:
    """No reference cycle can go through them (see ``executor.Inst``), so the collector
    need not walk them: a long run holds one instance per step it ran."""
    step = ToolStep(id="a", tool="noop", input={"x": [1]}, depends_on=["b"])
    composite = ForeachStep(id="f", items=[1], do=[step])
    inst = Inst(iid="a", scope="", step=step, output={"y": [2]}, items=[[3]])
    assert not any(gc.is_tracked(x) for x in (step, composite, inst))


def test_a_restored_long_run_leaves_few_objects_to_the_collector() -> None:
    """What the next young collection walks after a load (in a service, whose start-up
    heap is frozen, nothing moves it to the oldest generation before): 9 objects per
    step with layout 5, 4 now (a dependency list, two dependency tuples, an output)."""
    data = snapshot(chain(500))
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        before = len(gc.get_objects(generation=0))
        state = restore(data)
        made = len(gc.get_objects(generation=0)) - before
    finally:
        if enabled:
            gc.enable()
    assert len(state.insts) == 500
    assert made <= 4 * 500 + 50


def test_the_parts_that_never_change_are_encoded_once_per_run() -> None:
    """The plan and a scope's dependency maps are most of a long chain's snapshot and never
    change once made: the second snapshot reuses their JSON, and the bytes are those of
    an encode from nothing."""
    state = chain(200)
    first = snapshot(state)
    plan_json = state._encoded[id(state.plan)][1]
    second = snapshot(state)
    assert state._encoded[id(state.plan)][1] is plan_json
    state._encoded = {}
    assert snapshot(state) == second == first
    assert snapshot(restore(second)) == second


def test_a_plan_replaced_by_another_is_encoded_again() -> None:
    """Cached by the object it was encoded from: a revised plan (another object, even an
    equal one at another address) is never saved as the JSON of the plan it replaced."""
    state = chain(20)
    snapshot(state)
    assert state.plan is not None
    replaced = state.plan
    revised = Plan(steps=state.plan.steps[:5])
    state.plan = revised
    body = msgspec.json.decode(snapshot(state))
    assert len(body["state"]["plan"]["steps"]) == 5
    # the revised plan is held, the replaced one let go (each snapshot keeps what it used)
    assert id(revised) in state._encoded and id(replaced) not in state._encoded
    held = {id(part) for part, _ in state._encoded.values()}
    assert held == set(state._encoded)  # each entry keeps its object alive: ids stay theirs
