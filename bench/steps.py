"""Full-stack throughput: no-op tool steps through the executor, the store, the relay,
JetStream and the tool-runner (the embedded stack in this process, a real nats-server).

Prints, per store:
- one sequential run of N chained ``noop`` steps: steps/s, p50/p99 per-step latency
  (time between consecutive step completions, from the run's own events) and the cost
  of early steps vs late steps (a cost that grows with history shows up here);
- R runs of K steps at once: aggregate steps/s.

    python bench/steps.py --store sqlite --steps 200
    python bench/steps.py --store postgres --steps 200 --runs 50 --run-steps 20
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path

from loom_core.contracts import Plan, RunCompleted, RunRequest, StepCompleted, ToolStep
from loom_infra.client import LoomClient
from loom_infra.localpg import start_local_postgres
from loom_infra.settings import Settings, StoreSettings
from loom_services.stack import LocalStack


def chain(n: int) -> Plan:
    return Plan(
        steps=[
            ToolStep(id=f"s{i}", tool="noop", depends_on=[f"s{i - 1}"] if i else [])
            for i in range(n)
        ]
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(client: LoomClient, n: int) -> dict[str, float]:
    accepted = await client.submit(RunRequest(plan=chain(n)))
    records = await client.wait(accepted.run_id, timeout=600)
    assert isinstance(records[-1].event, RunCompleted), records[-1]
    done = [r.at for r in records if isinstance(r.event, StepCompleted)]
    gaps = [(b - a).total_seconds() * 1000 for a, b in zip(done, done[1:], strict=False)]
    total = (done[-1] - done[0]).total_seconds()
    early = statistics.mean(gaps[5:15]) if len(gaps) > 15 else float("nan")
    late = statistics.mean(gaps[-10:])
    return {
        "steps_per_s": (len(done) - 1) / total,
        "p50_ms": statistics.median(gaps),
        "p99_ms": pct(gaps, 0.99),
        "early_ms": early,
        "late_ms": late,
    }


async def concurrent(client: LoomClient, runs: int, steps: int) -> float:
    plan = chain(steps)
    t0 = time.perf_counter()
    accepted = await asyncio.gather(*(client.submit(RunRequest(plan=plan)) for _ in range(runs)))
    results = await asyncio.gather(*(client.wait(a.run_id, timeout=600) for a in accepted))
    elapsed = time.perf_counter() - t0
    assert all(isinstance(r[-1].event, RunCompleted) for r in results)
    return runs * steps / elapsed


async def bench(store: str, steps: int, runs: int, run_steps: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="loom-bench-"))
    stop_pg = None
    if store == "postgres":
        url, stop_pg = start_local_postgres(base / "pg")
        store_settings = StoreSettings(kind="postgres", data_dir=base / "data", postgres_url=url)
    else:
        store_settings = StoreSettings(kind="sqlite", data_dir=base / "data")
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=store_settings)
    try:
        async with (
            LocalStack(settings, nats_port=-1) as stack,
            await LoomClient.connect(stack.url) as client,
        ):
            await sequential(client, 20)  # warm up
            seq = await sequential(client, steps)
            conc = await concurrent(client, runs, run_steps)
    finally:
        if stop_pg is not None:
            stop_pg()
    print(
        f"{store:8s} sequential {steps} steps: {seq['steps_per_s']:7.1f} steps/s  "
        f"p50 {seq['p50_ms']:.2f} ms  p99 {seq['p99_ms']:.2f} ms  "
        f"steps 5-15 {seq['early_ms']:.2f} ms vs last 10 {seq['late_ms']:.2f} ms "
        f"(x{seq['late_ms'] / seq['early_ms']:.2f})"
    )
    print(f"{store:8s} {runs} runs x {run_steps} steps at once: {conc:7.1f} steps/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--run-steps", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    for store in stores:
        asyncio.run(bench(store, args.steps, args.runs, args.run_steps))


if __name__ == "__main__":
    main()
