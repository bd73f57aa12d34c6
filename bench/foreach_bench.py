"""A big foreach through the pure core (no servers): time, executor memory and snapshot
size of one run of N ``noop`` elements at concurrency C (issue 9 point 3).

Driven like the ``World`` of tests/unit/test_executor.py: ``advance`` with synthetic
tool results, every ``ToolCallRequested`` answered in FIFO order; the clock moves 1 ms
per message. The bench keeps no events (only counts them), so what it measures is the
run's state. The run is submitted with size limits and caps raised for the bench (the
defaults refuse a 100k-item foreach: that is the point of the caps).

Prints, for the same run:
- wall time, µs per element, events;
- ``RunState`` size: instances and scopes at the midpoint and at the end;
- ``snapshot()`` bytes at the midpoint and at the end (what the snapshot store keeps);
- with ``--trace``: tracemalloc current at the midpoint and at the end, and the peak
  (slower: every allocation is traced);
- peak RSS of the process (``ru_maxrss``; includes the interpreter, ~20 MB).

    python bench/foreach_bench.py                       # 100,000 items @16
    python bench/foreach_bench.py --items 10000 --trace
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
import tracemalloc
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from loom_core.contracts import (
    Caps,
    ForeachStep,
    Plan,
    PlanProposed,
    RunCompleted,
    RunRequest,
    SizeLimits,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_core.executor import RunState, Submission, advance, initial_state, snapshot

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TICK = timedelta(milliseconds=1)
BIG = 1 << 30  # limits and caps out of the way: the bench measures the engine


def foreach(n: int, concurrency: int) -> Plan:
    return Plan(
        steps=[
            ForeachStep(
                id="fe",
                items=list(range(n)),
                concurrency=concurrency,
                do=[ToolStep(id="t", tool="noop", input={"v": "{{ item }}"})],
            )
        ]
    )


def drive(n: int, concurrency: int, trace: bool) -> dict[str, Any]:
    run_id = "bench"
    plan = foreach(n, concurrency)
    state = initial_state(run_id)
    now = T0
    pending: deque[ToolCallRequested] = deque()
    counts = {"events": 0}
    report: dict[str, Any] = {}

    def send(message: Any) -> None:
        produced = advance(state, message, now)
        counts["events"] += len(produced)
        pending.extend(e for e in produced if isinstance(e, ToolCallRequested))
        counts["last"] = produced[-1] if produced else None

    def sample(label: str, s: RunState) -> None:
        if trace:  # before the snapshot's bytes exist; they are not the run's
            gc.collect()
            current, peak = tracemalloc.get_traced_memory()
            report[f"{label}_traced"] = current
            report["peak_traced"] = max(report.get("peak_traced", 0), peak)
        report[f"{label}_insts"] = len(s.insts)
        report[f"{label}_scopes"] = len(s.scopes)
        report[f"{label}_snapshot"] = len(snapshot(s))
        if trace:
            tracemalloc.reset_peak()

    limits = SizeLimits(step_input_bytes=BIG, step_output_bytes=BIG)
    caps = Caps(foreach_items=BIG, foreach_concurrency=BIG, parallel_branches=BIG,
                loop_iterations=BIG)  # fmt: skip
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    send(Submission(RunRequest(plan=plan), limits=limits, caps=caps))
    send(PlanProposed(run_id=run_id, plan=plan))
    if trace:  # the plan itself (N items, twice: request and accepted plan) is a base
        gc.collect()
        report["base_traced"] = tracemalloc.get_traced_memory()[0]
    answered = 0
    while pending:
        req = pending.popleft()
        now += TICK
        send(ToolResult(
            run_id=run_id, step_id=req.step_id, attempt=req.attempt,
            idempotency_key=req.idempotency_key, ok=True, started_at=now, finished_at=now,
            output={},
        ))  # fmt: skip
        answered += 1
        if answered == n // 2:
            paused = time.perf_counter()
            sample("mid", state)
            start += time.perf_counter() - paused  # sampling is not the run's time
    report["wall_s"] = time.perf_counter() - start
    assert isinstance(counts["last"], RunCompleted), counts["last"]
    assert len(counts["last"].output["fe"]) == n
    sample("end", state)
    if trace:
        tracemalloc.stop()
    report["events"] = counts["events"]
    report["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--trace", action="store_true", help="tracemalloc (slower)")
    args = parser.parse_args()
    r = drive(args.items, args.concurrency, args.trace)
    mb = 1024**2
    print(f"foreach {args.items} items @{args.concurrency}: {r['wall_s']:.1f} s "
          f"({r['wall_s'] / args.items * 1e6:.0f} µs/item), {r['events']} events")  # fmt: skip
    for label in ("mid", "end"):
        line = (f"  {label}: {r[f'{label}_insts']} instances, {r[f'{label}_scopes']} scopes, "
                f"snapshot {r[f'{label}_snapshot'] / mb:.2f} MB")  # fmt: skip
        if args.trace:
            line += f", traced {r[f'{label}_traced'] / mb:.1f} MB"
        print(line)
    if args.trace:
        print(f"  traced: base (plan accepted) {r['base_traced'] / mb:.1f} MB, "
              f"peak {r['peak_traced'] / mb:.1f} MB")  # fmt: skip
    print(f"  peak RSS {r['maxrss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
