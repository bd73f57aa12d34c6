"""How fast spans are rebuilt from events, and whether a step's cost grows with the run.

Builds a synthetic N-step run in memory (each step: scheduled, started, tool call
requested, completed, step completed), then prints
- spans rebuilt per second by ``build_spans`` over the whole run (and events/s);
- the cost of ``TraceBuilder.apply`` for the events of step 10 vs step N (median over
  passes): the target is that step 1,000 costs no more than ~1.2x step 10.

    .venv/bin/python bench/spans_bench.py [--steps 1000] [--passes 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime, timedelta

from loom_core import ids
from loom_core.contracts import (
    EventRecord,
    Plan,
    PlanAccepted,
    RunCompleted,
    RunEvent,
    RunRequested,
    StepCompleted,
    StepScheduled,
    StepStarted,
    ToolCallCompleted,
    ToolCallRequested,
    ToolStep,
)
from loom_core.spans import TraceBuilder, build_spans

RUN = "bench-run"
T0 = datetime(2026, 11, 2, tzinfo=UTC)


def synthetic_run(steps: int) -> tuple[list[EventRecord], list[range]]:
    """The run's records, and for each step the index range of its records."""
    plan = Plan(steps=[ToolStep(id=f"s{i}", tool="noop") for i in range(steps)], name="bench")
    events: list[RunEvent] = [RunRequested(plan=plan), PlanAccepted(plan=plan)]
    per_step: list[range] = []
    t = T0
    for i in range(steps):
        sid, key = f"s{i}", ids.idempotency_key(RUN, f"s{i}", 1)
        first = len(events)
        events += [
            StepScheduled(step_id=sid),
            StepStarted(step_id=sid, attempt=1),
            ToolCallRequested(
                step_id=sid, attempt=1, tool="noop", input={"i": i}, idempotency_key=key
            ),
            ToolCallCompleted(
                step_id=sid,
                attempt=1,
                idempotency_key=key,
                output=i,
                started_at=t,
                finished_at=t + timedelta(microseconds=300),
            ),
            StepCompleted(step_id=sid, output=i),
        ]
        per_step.append(range(first, len(events)))
        t += timedelta(milliseconds=1)
    events.append(RunCompleted(output=None))
    records = [
        EventRecord(run_id=RUN, seq=n, at=T0 + timedelta(microseconds=500 * n), event=e)
        for n, e in enumerate(events, start=1)
    ]
    return records, per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=30)
    args = parser.parse_args()
    steps, passes = args.steps, args.passes
    early = min(10, steps) - 1  # step 10, 0-based
    late = steps - 1

    records, per_step = synthetic_run(steps)

    # Whole-run rebuild throughput.
    rebuild_s: list[float] = []
    n_spans = 0
    for _ in range(passes):
        t0 = time.perf_counter()
        n_spans = len(build_spans(records))
        rebuild_s.append(time.perf_counter() - t0)
    best = min(rebuild_s)
    median = statistics.median(rebuild_s)

    # Per-step apply cost: time the events of step 10 and of the last step in full
    # incremental passes (the builder holds all earlier steps when the last one comes).
    early_ns: list[int] = []
    late_ns: list[int] = []
    for _ in range(passes):
        builder = TraceBuilder(RUN)
        for i, rec in enumerate(records):
            if i == per_step[early].start:
                t0 = time.perf_counter_ns()
                for r in records[per_step[early].start : per_step[early].stop]:
                    builder.apply(r)
                early_ns.append(time.perf_counter_ns() - t0)
            elif i == per_step[late].start:
                t0 = time.perf_counter_ns()
                for r in records[per_step[late].start : per_step[late].stop]:
                    builder.apply(r)
                late_ns.append(time.perf_counter_ns() - t0)
            elif i in per_step[early] or i in per_step[late]:
                continue
            else:
                builder.apply(rec)
        assert builder.summary.status == "completed"

    e_us = statistics.median(early_ns) / 1000
    l_us = statistics.median(late_ns) / 1000
    print(f"synthetic run: {steps} steps, {len(records)} events, {n_spans} spans")
    print(
        f"build_spans: median {median * 1000:.1f} ms, best {best * 1000:.1f} ms -> "
        f"{n_spans / median:,.0f} spans/s, {len(records) / median:,.0f} events/s (median)"
    )
    print(
        f"apply cost per step (5 events): step {early + 1}: {e_us:.1f} us, "
        f"step {late + 1}: {l_us:.1f} us, ratio {l_us / e_us:.2f} (target <= 1.2)"
    )


if __name__ == "__main__":
    main()
