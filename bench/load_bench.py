"""Loading a long run: from its whole history vs from a snapshot; and replay speed.

For runs of ~1k, 10k and 100k events (a chain of no-op tool steps, decided by the real
executor in memory and stored in a real SQLite event store), prints:
- full load: read every event + fold + verify by replay (what a load costs without a
  snapshot);
- snapshot load: read the latest snapshot + the events after it + fold + verify them
  (what ``RunHost`` does; median and min of ``--repeat`` loads, and the median of their
  CPU time, steadier than wall time on a shared machine);
- replay speed: events re-decided per second, and fold speed (events per second).

    python bench/load_bench.py [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loom_core.contracts import (
    EventRecord,
    Plan,
    PlanProposed,
    RunRequest,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_core.executor import SNAPSHOT_EVERY, advance, evolve, initial_state, restore, snapshot
from loom_core.replay import replay
from loom_infra import collector
from loom_infra.settings import StoreSettings
from loom_infra.store import open_event_store, open_snapshot_store
from loom_services.runhost import _rebuild
from loom_services.runtime import freeze_startup_objects

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record_run(run_id: str, steps: int) -> tuple[list[EventRecord], list[tuple[int, bytes]]]:
    """Decide a chain of ``steps`` no-op steps; snapshots every SNAPSHOT_EVERY events."""
    plan = Plan(steps=[
        ToolStep(id=f"s{i}", tool="noop", depends_on=[f"s{i - 1}"] if i else [])
        for i in range(steps)
    ])  # fmt: skip
    state = initial_state(run_id)
    records: list[EventRecord] = []
    snaps: list[tuple[int, bytes]] = []
    now = T0

    def send(message: object) -> list[ToolCallRequested]:
        nonlocal now
        now += timedelta(milliseconds=1)
        before = state.version
        produced = advance(state, message, now)  # type: ignore[arg-type]
        for i, e in enumerate(produced, start=before + 1):
            records.append(EventRecord(run_id=run_id, seq=i, at=now, event=e))
            if i % SNAPSHOT_EVERY == 0 and i == state.version:
                snaps.append((i, snapshot(state)))
        return [e for e in produced if isinstance(e, ToolCallRequested)]

    send(RunRequest(plan=plan))
    pending = send(PlanProposed(run_id=run_id, plan=plan))
    while pending:
        req = pending.pop()
        pending += send(
            ToolResult(
                run_id=run_id, step_id=req.step_id, attempt=1, idempotency_key=req.idempotency_key,
                ok=True, started_at=now, finished_at=now, output={},
            )
        )  # fmt: skip
    return records, snaps


def _allocate() -> None:
    """What the next code does after a load: allocates (a young collection due runs)."""
    for _ in range(2000):
        [].append(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="approximate event counts")
    parser.add_argument(
        "--repeat", type=int, default=5, help="snapshot loads timed per size (median and min)"
    )
    parser.add_argument(
        "--frozen-start",
        action="store_true",
        help="freeze the heap first, as a service does at its start "
        "(runtime.freeze_startup_objects): then what a load decoded is collected at its "
        "end, timed in the load",
    )
    args = parser.parse_args()
    if args.frozen_start:
        freeze_startup_objects()
    base = Path(tempfile.mkdtemp(prefix="loom-load-"))
    settings = StoreSettings(kind="sqlite", data_dir=base)
    events, snaps_store = open_event_store(settings), open_snapshot_store(settings)
    try:
        for size in (int(x) for x in args.sizes.split(",")):
            run_id = f"run-{size}"
            t = time.perf_counter()
            records, snaps = record_run(run_id, max(1, size // 5))
            decide_s = time.perf_counter() - t
            for i in range(0, len(records), 2000):
                events.append(records[i : i + 2000])
            if snaps:
                snaps_store.save(run_id, *snaps[-1])

            t = time.perf_counter()
            loaded = events.load(run_id)
            state = initial_state(run_id)
            for r in loaded:
                evolve(state, r.event, r.at)
            fold_s = time.perf_counter() - t
            t = time.perf_counter()
            report, _ = replay(loaded)
            replay_s = time.perf_counter() - t
            assert report.identical, report.divergence

            # what the executor host does (``RunHost._load``): the latest snapshot, the
            # events after it, folded and verified by replay, the collector paused
            loads: list[float] = []
            cpus: list[float] = []  # the process's CPU time: less noisy on a shared machine
            for _ in range(max(1, args.repeat)):
                gc.collect()  # each load starts from the same heap, not the last one's garbage
                c = time.process_time()
                t = time.perf_counter()
                taken = snaps_store.latest(run_id)
                tail = events.load(run_id, taken[0] if taken else 0)
                _rebuild(run_id, taken[1] if taken else None, tail, True)
                _allocate()  # a collection the load left pending runs here, timed with it
                loads.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
            snap_s = statistics.median(loads)
            t = time.perf_counter()
            with collector.paused():
                restore(taken[1]) if taken else None
            decode_s = time.perf_counter() - t
            t = time.perf_counter()
            restore(taken[1]) if taken else None
            decode_gc_s = time.perf_counter() - t
            n = len(records)
            print(
                f"{n:>7} events: full load {1000 * (fold_s + replay_s):8.1f} ms "
                f"(read+fold {1000 * fold_s:.1f}, verify {1000 * replay_s:.1f}); "
                f"from snapshot {1000 * snap_s:6.1f} ms (median of {len(loads)}, min "
                f"{1000 * min(loads):.1f}; CPU {1000 * statistics.median(cpus):.1f}; "
                f"{len(tail)} events after it; "
                f"snapshot {len(taken[1]) / 1e6 if taken else 0:.1f} MB, decoded in "
                f"{1000 * decode_s:.1f} ms, {1000 * decode_gc_s:.1f} with the collector on); "
                f"replay {n / replay_s:,.0f} events/s; decide {n / decide_s:,.0f} events/s"
            )
    finally:
        events.close()
        snaps_store.close()


if __name__ == "__main__":
    main()
