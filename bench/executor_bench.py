"""The interpreter alone (no servers): what ``advance`` costs per step, and whether that
cost grows with the run's history (docs/design.md target: step 1,000 within 1.2x step 10).

Driven like the ``World`` of tests/unit/test_executor.py: every ``ToolCallRequested``
is answered at once with a ``ToolResult``; the clock moves 1 ms per message.

Prints:
- a chain of N ``noop`` steps (N = 1,000 and 10,000): µs per step around step 10 and
  around step N (mean over a window of the per-step minimum over repeats) and the ratio;
  the very last step, which also completes the run, is shown apart;
- a foreach of 1,000 items at concurrency 16: µs per item, early vs late items;
- fold (``evolve`` over the recorded events, i.e. replay): events/s.
When a ratio is over 1.2 (or with ``--profile``) a cProfile of the longest chain shows
where the time goes.

    python bench/executor_bench.py
    python bench/executor_bench.py --steps 1000 --repeat 7 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from loom_core.contracts import (
    ForeachStep,
    Plan,
    PlanProposed,
    RunCompleted,
    RunEvent,
    RunRequest,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_core.executor import advance, fold, initial_state

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TICK = timedelta(milliseconds=1)
WINDOW = 20
LIMIT = 1.2


def chain(n: int) -> Plan:
    return Plan(
        steps=[
            ToolStep(id=f"s{i}", tool="noop", depends_on=[f"s{i - 1}"] if i else [])
            for i in range(n)
        ]
    )


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


def drive(plan: Plan, run_id: str = "bench") -> tuple[list[int], list[RunEvent]]:
    """Run ``plan`` to its end; returns the ns spent in each ``advance`` that answered a
    tool call (in order of answering) and every event."""
    state = initial_state(run_id)
    now = T0
    events: list[RunEvent] = []
    pending: list[ToolCallRequested] = []

    def send(message: Any) -> int:
        t = time.perf_counter_ns()
        produced = advance(state, message, now)
        took = time.perf_counter_ns() - t
        events.extend(produced)
        pending.extend(e for e in produced if isinstance(e, ToolCallRequested))
        return took

    send(RunRequest(plan=plan))
    send(PlanProposed(run_id=run_id, plan=plan))
    costs: list[int] = []
    head = 0  # FIFO without list.pop(0) (which would grow with the queue)
    while head < len(pending):
        req = pending[head]
        head += 1
        now += TICK
        result = ToolResult(
            run_id=run_id, step_id=req.step_id, attempt=req.attempt,
            idempotency_key=req.idempotency_key, ok=True, started_at=now, finished_at=now,
            output={},
        )  # fmt: skip
        costs.append(send(result))
    assert isinstance(events[-1], RunCompleted), events[-1]
    return costs, events


def per_step(plan: Plan, repeat: int) -> tuple[list[float], list[RunEvent]]:
    """µs per answered call, the minimum over ``repeat`` runs (robust to noise)."""
    runs = [drive(plan) for _ in range(repeat)]
    best = [min(costs) / 1000 for costs in zip(*(r[0] for r in runs), strict=True)]
    return best, runs[0][1]


def window(costs: list[float], at: int) -> float:
    """Mean cost of the WINDOW steps ending at step ``at`` (1-based)."""
    lo = max(0, at - WINDOW)
    return statistics.mean(costs[lo:at])


def fold_rate(events: list[RunEvent], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fold("bench", events)
        best = min(best, time.perf_counter() - t)
    return len(events) / best


def profile(fn: Callable[[], object], top: int = 15) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="always print a profile")
    args = parser.parse_args()

    worst = 0.0
    for n in args.steps:
        t = time.perf_counter()
        costs, events = per_step(chain(n), args.repeat)
        wall = (time.perf_counter() - t) / args.repeat
        # the last answer also completes the run (one pass over the root scope, once):
        # reported apart so it does not hide in the late window
        early, late = window(costs, 15), window(costs, n - 1)
        worst = max(worst, late / early)
        print(
            f"chain {n:>6} steps: {early:6.1f} µs/step at ~10, {late:6.1f} µs/step at ~{n} "
            f"(x{late / early:.2f}); mean {statistics.mean(costs):.1f} µs/step; "
            f"last step (completes the run) {costs[-1]:.0f} µs; "
            f"{wall * 1000:.0f} ms per run incl. plan validation; "
            f"fold {fold_rate(events, args.repeat):,.0f} events/s ({len(events)} events)"
        )

    costs, events = per_step(foreach(args.items, args.concurrency), args.repeat)
    # late window: before the last `concurrency` items, when no new item starts any more
    early, late = window(costs, 40), window(costs, len(costs) - args.concurrency)
    worst = max(worst, late / early)
    print(
        f"foreach {args.items} items @{args.concurrency}: {statistics.mean(costs):6.1f} µs/item "
        f"(items ~20-40 {early:.1f} µs vs ~{args.items - args.concurrency} {late:.1f} µs, "
        f"x{late / early:.2f}); "
        f"fold {fold_rate(events, args.repeat):,.0f} events/s ({len(events)} events)"
    )

    if worst > LIMIT or args.profile:
        n = max(args.steps)
        print(f"\nworst late/early ratio x{worst:.2f} (limit x{LIMIT}); profile of chain {n}:")
        print(profile(lambda: drive(chain(n))))


if __name__ == "__main__":
    main()
