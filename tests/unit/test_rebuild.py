"""How the executor host rebuilds a run it loads (``runhost._rebuild``, issue 10): the
snapshot decoded once, the events after it re-decided, and the state the replay reached
used as the fold. These tests hold that to the fold it replaces, at every point of every
golden history, and check the rarer paths: a divergence, a parked run, a snapshot that
does not restore; and that the collector comes back as it was."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import msgspec
import pytest
from golden_runs import FILES, GOLDEN, read

import loom_core.executor as executor
from loom_core.contracts import EventRecord, RunDiverged, StepRetryScheduled
from loom_core.executor import evolve, initial_state, restore, snapshot
from loom_core.replay import replay
from loom_infra import collector
from loom_services.runhost import _rebuild, _Unrestorable


def fold(records: list[EventRecord], start: bytes | None, run_id: str) -> executor.RunState:
    state = restore(start) if start is not None else initial_state(run_id)
    for record in records:
        evolve(state, record.event, record.at)
    return state


def loaded_before(
    run_id: str, data: bytes | None, records: list[EventRecord], verify: bool
) -> executor.RunState:
    """What the host did before (issue 10): restore, fold, then re-decide the events
    from a second restore and mark a divergence."""
    state = fold(records, data, run_id)
    if records and verify and state.status != "diverged":
        base = restore(data) if data is not None else None
        report, _ = replay(records, start=base)
        if report.divergence is not None:
            state.divergence = report.divergence.as_event()
    return state


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_the_rebuilt_state_is_what_the_old_load_gave_from_any_snapshot(path: Path) -> None:
    """At every cut, also inside a decision's batch (where replay reports a divergence,
    before as now; the host snapshots only between batches)."""
    records = read(path)
    run_id = records[0].run_id
    for cut in range(len(records)):
        before = initial_state(run_id)
        for record in records[:cut]:
            evolve(before, record.event, record.at)
        data = snapshot(before) if cut else None
        tail = records[cut:]
        for verify in (True, False):
            expected = snapshot(loaded_before(run_id, data, tail, verify))
            assert snapshot(_rebuild(run_id, data, tail, verify)) == expected, (cut, verify)


def test_a_history_this_code_decides_differently_is_folded_and_marked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = read(GOLDEN / "tool-retry.jsonl")
    run_id = records[0].run_id
    monkeypatch.setattr(executor, "retry_delay", lambda policy, attempt, key: 99.0)
    state = _rebuild(run_id, None, records, verify=True)
    retry = next(r for r in records if isinstance(r.event, StepRetryScheduled))
    assert state.divergence is not None and state.divergence.seq == retry.seq
    # the state is the stored history's, not what the replay reached when it stopped
    marked = msgspec.json.decode(snapshot(state))
    folded = msgspec.json.decode(snapshot(fold(records, None, run_id)))
    assert marked["state"].pop("divergence") is not None
    assert folded["state"].pop("divergence") is None
    assert marked == folded


def test_a_parked_run_is_folded_as_stored() -> None:
    records = read(GOLDEN / "tool-retry.jsonl")
    run_id = records[0].run_id
    cut = len(records) // 2
    parked = records[:cut] + [
        EventRecord(
            run_id=run_id, seq=cut + 1, at=records[cut - 1].at,
            event=RunDiverged(seq=cut, recorded=None, decided=None, message="parked"),
        )
    ]  # fmt: skip
    state = _rebuild(run_id, None, parked, verify=True)
    assert state.status == "diverged"
    assert snapshot(state) == snapshot(fold(parked, None, run_id))


def test_a_snapshot_that_does_not_restore_says_so() -> None:
    records = read(GOLDEN / "tool-retry.jsonl")
    with pytest.raises(_Unrestorable) as caught:
        _rebuild(records[0].run_id, b'{"layout": 1, "state": {}}', records[3:], verify=True)
    assert caught.value.__cause__ is not None


def test_the_collector_is_paused_meanwhile_and_back_after() -> None:
    assert gc.isenabled()
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with collector.paused():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with collector.paused():
        assert not gc.isenabled()
        thread.start()
        assert entered.wait(10)
    assert not gc.isenabled()  # the other thread's rebuild is still under way
    release.set()
    thread.join(10)
    assert gc.isenabled()
    gc.disable()
    try:  # a collector someone else turned off stays off
        with collector.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def _scopes(state: executor.RunState) -> dict[str, tuple[list[object], dict[str, object]]]:
    return {sid: (scope.steps, scope.by_id) for sid, scope in state.scopes.items()}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_a_restored_scope_runs_the_steps_it_ran_before(path: Path) -> None:
    """Layout 5 saves no scope's steps: ``restore`` takes them from the plan or the
    owning composite's body. The bytes compared above cannot see that, so compare the
    scopes themselves at every cut (foreach, parallel, if, loop, fallback, revision)."""
    records = read(path)
    state = initial_state(records[0].run_id)
    for record in records:
        evolve(state, record.event, record.at)
        restored = restore(snapshot(state))
        assert _scopes(restored) == _scopes(state), record.seq
        if "" in restored.scopes and restored.plan is not None:
            assert restored.scopes[""].steps is restored.plan.steps  # one copy, as live


def test_a_snapshot_whose_scope_has_no_owner_does_not_restore() -> None:
    """A damaged snapshot is refused (and the host then folds the history)."""
    records = read(GOLDEN / "foreach.jsonl")
    state = initial_state(records[0].run_id)
    for record in records:
        evolve(state, record.event, record.at)
        if any(state.scopes.get(sid) for sid in state.scopes if sid):
            break
    child = next(sid for sid in state.scopes if sid)
    body = msgspec.json.decode(snapshot(state))
    del body["state"]["insts"][child.rpartition("/")[0]]
    with pytest.raises(LookupError):
        restore(msgspec.json.encode(body))
    with pytest.raises(_Unrestorable):
        _rebuild(state.run_id, msgspec.json.encode(body), [], verify=True)


def test_a_snapshot_keeps_no_digest_of_an_answered_request() -> None:
    """Only an outstanding tool request's answer is checked against its digest."""
    records = read(GOLDEN / "tool-retry.jsonl")
    state = initial_state(records[0].run_id)
    for record in records:
        evolve(state, record.event, record.at)
        for inst in state.insts.values():
            assert (inst.request_digest is not None) == inst.inflight, (record.seq, inst.iid)


def large_block() -> list[list[int]]:
    """Objects made in a block large enough for the collector's move (MOVE_AT_LEAST)."""
    with collector.paused():
        return [[i] for i in range(collector.MOVE_AT_LEAST + 1000)]


def in_oldest_generation(objects: list[list[int]]) -> bool:
    oldest = {id(o) for o in gc.get_objects(generation=2)}
    return all(id(x) in oldest for x in objects)


def test_what_a_rebuild_creates_goes_to_the_oldest_generation() -> None:
    """The collector does not walk a freshly decoded state twice on its way there
    (``loom_infra.collector``); what someone else froze stays frozen. A service process
    freezes its start-up heap (``runtime.freeze_startup_objects``), and one may have run
    in this process before: thawed first, frozen again after."""
    frozen_before = gc.get_freeze_count()
    gc.unfreeze()
    gc.collect()
    made = large_block()
    assert gc.isenabled()
    assert in_oldest_generation(made)
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with collector.paused():
            more = [[i] for i in range(100)]
        assert gc.get_freeze_count() == frozen  # not handed back to the collector
        assert not any(id(x) in {id(o) for o in gc.get_objects(generation=2)} for x in more)
    finally:
        gc.unfreeze()
        if frozen_before:
            gc.freeze()


def test_a_small_block_leaves_its_objects_to_the_collector_and_costs_no_walk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every run's first load passes through the block: with a few hundred objects it
    neither promotes the young generation nor asks how many objects are frozen (a walk of
    the frozen list: ~3 ms in a service, at every run start: 50 runs' throughput fell
    from ~3,500 to ~800 steps/s)."""
    asked: list[int] = []
    real = gc.get_freeze_count
    monkeypatch.setattr(gc, "get_freeze_count", lambda: asked.append(1) or real())
    gc.collect()
    with collector.paused():
        few = [[i] for i in range(100)]
    assert not asked
    oldest = {id(o) for o in gc.get_objects(generation=2)}
    assert not any(id(x) in oldest for x in few)


def test_a_large_rebuild_in_a_service_is_walked_once_and_stays_unfrozen() -> None:
    """A service froze its start-up heap: a large block's objects are collected once at
    its end (``gc.collect(1)``) and go to the oldest generation, where full collections
    see them; nothing more is frozen, nothing frozen is handed back."""
    frozen_before = gc.get_freeze_count()
    gc.collect()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        made = large_block()
        assert gc.get_freeze_count() == frozen
        assert gc.get_count()[0] < 1000  # the young generation was collected
        assert in_oldest_generation(made)
    finally:
        gc.unfreeze()
        if frozen_before:
            gc.freeze()


def test_a_heap_frozen_by_the_service_is_not_walked_at_a_large_rebuild(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``runtime.freeze_startup_objects`` freezes through ``collector.freeze_heap``: the
    end of a large block then knows it without ``gc.get_freeze_count`` (a walk of the
    frozen list, 1-5 ms in a service at every large load)."""
    frozen_before = gc.get_freeze_count()
    asked: list[int] = []
    real = gc.get_freeze_count
    monkeypatch.setattr(collector, "_heap_frozen", False)
    try:
        collector.freeze_heap()
        frozen = real()
        monkeypatch.setattr(gc, "get_freeze_count", lambda: asked.append(1) or real())
        made = large_block()
        assert not asked
        assert real() == frozen
        assert in_oldest_generation(made)
    finally:
        gc.unfreeze()
        if frozen_before:
            gc.freeze()
