"""Full-stack throughput: no-op tool steps through the executor, the store, the relay,
JetStream and the tool-runner (the embedded stack in this process, a real nats-server).

Prints, per store:
- one sequential run of N chained ``noop`` steps: steps/s, p50/p99 per-step latency
  (time between consecutive step completions, from the run's own events) and the cost
  of early steps vs late steps (a cost that grows with history shows up here);
- R runs of K steps at once: aggregate steps/s;
- chains of 10, 100 and 1,000 steps, one run each: steps/s and the per-step overhead
  around step 10 and around the last step (docs/design.md target:
  step 1,000 within 1.2x step 10);
- a foreach of 1,000 items at concurrency 16: items/s.
Each part can be resized or skipped (0, or ``--chains`` with no value).

    python bench/steps.py                      # both stores, everything (~3 min, 2 cores)
    python bench/steps.py --store sqlite --steps 200
    python bench/steps.py --store postgres --steps 200 --runs 50 --run-steps 20
    python bench/steps.py --store sqlite --steps 0 --runs 0 --chains 1000 --foreach 0
    python bench/steps.py --store sqlite --steps 200 --runs 0 --chains --foreach 0 --breakdown

Every part also prints the CPU it cost per step: this process (all five services), the
nats-server and PostgreSQL; 1000 / the sum is what 2 cores could at best do. The
sequential run also prints how long each process waited for a core (its threads'
``schedstat``) and how busy the whole machine was: a slow tail is queueing for a core.
``--breakdown`` adds a pass of the sequential run that counts, per step, NATS publishes
by kind, acks, decodes, store calls and fsyncs (``bench/stepcost.py``); ``--profile``
prints a cProfile of the sequential run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from loom_core import subjects
from loom_core.contracts import (
    EventRecord,
    ForeachStep,
    Plan,
    PlanAccepted,
    RunCompleted,
    RunRequest,
    StepCompleted,
    ToolCallCompleted,
    ToolCallRequested,
    ToolStep,
)
from loom_infra.client import LoomClient
from loom_infra.localpg import start_local_postgres
from loom_infra.settings import Settings, StoreSettings
from loom_services.stack import LocalStack

try:
    import stepcost  # bench/stepcost.py, when run as ``python bench/steps.py``
except ImportError:  # pragma: no cover - imported as bench.steps
    from bench import stepcost


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


def foreach(items: int, concurrency: int) -> Plan:
    return Plan(
        steps=[
            ForeachStep(
                id="fe",
                items=list(range(items)),
                concurrency=concurrency,
                do=[ToolStep(id="t", tool="noop")],
            )
        ]
    )


# How the bench's client waits for a run: by following every event of it over JetStream
# (``--follow``: 5 more deliveries and decodes per step in this process, which also runs
# the services), or, as a client wanting only the result does, by its ``run_completed``
# (the default); the events are then read from the store, outside the measured time.
FOLLOW = {"every_event": False}


async def finished(client: LoomClient, run_id: str) -> list[EventRecord]:
    """Wait for the run's end; its events (the measured part ends before they are read)."""
    if FOLLOW["every_event"]:
        return await client.wait(run_id, timeout=600)
    sub = await client.js.subscribe(
        subjects.run_event(run_id, "run_completed"), ordered_consumer=True
    )
    try:
        await sub.next_msg(timeout=600)
    finally:
        await sub.unsubscribe()
    return []


async def events_of(
    client: LoomClient, run_id: str, records: list[EventRecord]
) -> list[EventRecord]:
    return records or await client.events(run_id, timeout=60)


async def run_to_end(
    client: LoomClient,
    plan: Plan,
    meter: stepcost.CpuMeter | None = None,
    ended: asyncio.Future[None] | None = None,
) -> tuple[list[EventRecord], dict[str, float]]:
    """``ended``: cancelled as the run ends, before its history is read (a probe of the
    run alone)."""
    accepted = await client.submit(RunRequest(plan=plan))
    records = await finished(client, accepted.run_id)
    cpu = meter.stop() if meter is not None else {}
    if ended is not None:
        ended.cancel()
    records = await events_of(client, accepted.run_id, records)
    assert isinstance(records[-1].event, RunCompleted), records[-1]
    return records, cpu


def completion_gaps(records: list[EventRecord]) -> list[float]:
    """ms between consecutive top-level step completions (one per chained step)."""
    done = [
        r.at for r in records if isinstance(r.event, StepCompleted) and "/" not in r.event.step_id
    ]
    return [(b - a).total_seconds() * 1000 for a, b in zip(done, done[1:], strict=False)]


LOOP_LAG = {"probe": False}  # --loop-lag


async def _probe_loop(lags: list[tuple[float, float]], every_s: float = 0.005) -> None:
    """How late this process's event loop wakes a sleeper (ms), and the loop thread's
    CPU between two wakes (ms): a fold or a commit that holds the loop shows up in both;
    a loaded machine's scheduler (the thread waits for a core) only in the first."""
    while True:
        t0, c0 = time.perf_counter(), time.thread_time()
        await asyncio.sleep(every_s)
        late = (time.perf_counter() - t0 - every_s) * 1000
        lags.append((late, (time.thread_time() - c0) * 1000))


def loop_lag_text(lags: list[tuple[float, float]]) -> str:
    if not lags:
        return "loop lag: no sample"
    late = [lag for lag, _ in lags]
    busy = [cpu for _, cpu in lags]
    return (
        f"loop (5 ms sleeper, {len(lags)} wakes): late p50 {pct(late, 0.5):.2f} "
        f"p99 {pct(late, 0.99):.2f} max {max(late):.2f} ms; loop-thread CPU between wakes "
        f"p99 {pct(busy, 0.99):.2f} max {max(busy):.2f} ms, >3 ms: {sum(b > 3 for b in busy)}"
    )


def bench_store(store: str, base: Path) -> tuple[StoreSettings, Callable[[], None] | None]:
    """The store settings of a benchmark under ``base`` (PostgreSQL: a local server
    started for it) and how to stop that server (None for SQLite)."""
    if store == "postgres":
        url, stop_pg = start_local_postgres(base / "pg")
        return StoreSettings(kind="postgres", data_dir=base / "data", postgres_url=url), stop_pg
    return StoreSettings(kind="sqlite", data_dir=base / "data"), None


async def sequential(client: LoomClient, n: int) -> dict[str, float]:
    lags: list[tuple[float, float]] = []
    probe = asyncio.ensure_future(_probe_loop(lags)) if LOOP_LAG["probe"] else None
    meter = stepcost.CpuMeter()
    meter.start()
    try:
        records, cpu = await run_to_end(client, chain(n), meter, probe)
    finally:
        if probe is not None:
            probe.cancel()
    if probe is not None:
        cpu["loop"] = loop_lag_text(lags)  # type: ignore[assignment]
    done = [r.at for r in records if isinstance(r.event, StepCompleted)]
    gaps = completion_gaps(records)
    total = (done[-1] - done[0]).total_seconds() or 1e-9
    # a step's cost early vs late: medians of 100-step windows (10 steps, as before, put
    # one scheduler hiccup in a window's mean); windows shrink for short runs
    window = max(5, min(100, (len(gaps) - 10) // 2))
    early = statistics.median(gaps[10 : 10 + window]) if len(gaps) > 20 else float("nan")
    late = statistics.median(gaps[-window:])
    return {
        "steps_per_s": (len(done) - 1) / total,
        "p50_ms": statistics.median(gaps),
        "mean_ms": total * 1000 / max(1, len(done) - 1),
        "p99_ms": pct(gaps, 0.99),
        "early_ms": early,
        "late_ms": late,
        "window": window,
        "cpu": stepcost.format_cpu({k: v for k, v in cpu.items() if k != "loop"}, n)
        + f"\n         {stepcost.format_waits(meter.waits, n)}"
        + (f"\n         {cpu['loop']}" if "loop" in cpu else ""),  # type: ignore[dict-item]
    }


def segments(records: list[EventRecord]) -> str:
    """Median ms of a step's path, from its own events' times: decided -> the tool-runner
    starts the call (the commit, the relay, the runner's fetch), the call, and its end ->
    the executor takes the result (the result's publish, the inbox fetch, the writer)."""
    requested = {
        r.event.idempotency_key: r.at for r in records if isinstance(r.event, ToolCallRequested)
    }
    dispatch, call, back = [], [], []
    for r in records:
        if isinstance(r.event, ToolCallCompleted) and r.event.idempotency_key in requested:
            ev = r.event
            dispatch.append((ev.started_at - requested[ev.idempotency_key]).total_seconds())
            call.append((ev.finished_at - ev.started_at).total_seconds())
            back.append((r.at - ev.finished_at).total_seconds())
    if not dispatch:
        return "segments: no tool calls"
    med = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    return (
        f"segments (median ms): decided->runner starts {med(dispatch):.3f}  "
        f"call {med(call):.3f}  runner ends->executor takes result {med(back):.3f}"
    )


async def breakdown(client: LoomClient, n: int, profile: bool) -> None:
    """Counts per step on one sequential run of ``n`` steps (slower: it is counting)."""
    fsyncs = stepcost.FsyncCounter()
    fsyncs.start()
    with stepcost.counting() as counts:
        await run_to_end(client, chain(n))
    counts.counter.update(fsyncs.stop())
    print(stepcost.format_counts(counts.counter, n), flush=True)
    print(segments((await run_to_end(client, chain(n)))[0]), flush=True)
    if profile:
        with stepcost.profiling() as out:
            await run_to_end(client, chain(n))
        print(out.getvalue(), flush=True)


async def concurrent(client: LoomClient, runs: int, steps: int) -> tuple[float, str]:
    plan = chain(steps)
    meter = stepcost.CpuMeter()
    meter.start()
    t0 = time.perf_counter()
    accepted = await asyncio.gather(*(client.submit(RunRequest(plan=plan)) for _ in range(runs)))
    results = await asyncio.gather(*(finished(client, a.run_id) for a in accepted))
    elapsed = time.perf_counter() - t0
    cpu = meter.stop()
    results = [await events_of(client, a.run_id, r) for a, r in zip(accepted, results, strict=True)]
    assert all(isinstance(r[-1].event, RunCompleted) for r in results)
    return runs * steps / elapsed, stepcost.format_cpu(cpu, runs * steps)


async def chain_costs(client: LoomClient, n: int) -> str:
    """One run of ``n`` chained steps: steps/s, ms/step around step 10 and step n.
    Local calls (``loom_services.local_tools``) finish up to LOOM_LOCAL_BUDGET steps in
    one commit, so a step's cost is taken over a window of 64 steps (several commits)."""
    meter = stepcost.CpuMeter()
    meter.start()
    records, _ = await run_to_end(client, chain(n))
    cpu = stepcost.format_cpu(meter.stop(), n)  # a whole run's CPU per step: flat or not
    done = [
        r.at for r in records if isinstance(r.event, StepCompleted) and "/" not in r.event.step_id
    ]
    total = (done[-1] - done[0]).total_seconds()
    if not total:
        return f"chain {n:>5} steps: all in one commit (local calls)"
    line = f"chain {n:>5} steps: {(len(done) - 1) / total:7.1f} steps/s"
    window = 64 if n >= 256 else 10

    def cost(a: int, b: int) -> float:  # ms per step from completion a to completion b
        return (done[b] - done[a]).total_seconds() * 1000 / (b - a)

    if n >= 20:
        early = cost(4, 4 + window)
        late = cost(len(done) - 1 - window, len(done) - 1)
        ratio = f"x{late / early:.2f}" if early else "x-"
        line += f"  steps 5-{4 + window} {early:.3f} ms/step  last {window} {late:.3f} ({ratio})"
    else:
        line += f"  {total * 1000 / max(1, len(done) - 1):.3f} ms/step"
    return f"{line}\n         {cpu}"


async def foreach_rate(client: LoomClient, items: int, concurrency: int) -> str:
    t0 = time.perf_counter()
    records, _ = await run_to_end(client, foreach(items, concurrency))
    wall = time.perf_counter() - t0
    start = next(r.at for r in records if isinstance(r.event, PlanAccepted))
    span = (records[-1].at - start).total_seconds()
    return (
        f"foreach {items} items @{concurrency}: {items / span:7.1f} items/s "
        f"({span:.2f} s from plan accepted to completed; {wall:.2f} s from submit)"
    )


@contextlib.asynccontextmanager
async def runner_beside(
    stack: LocalStack, settings: Settings
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A tool-runner in a process of its own beside ``stack`` (made ``without`` its own:
    the issue's hop is to another process), ready when this enters, stopped at the end.
    ``stack`` is up: it does not wait for a service it was made without."""
    proc = start_runner(stack, settings, settings.direct_dispatch)
    try:
        async with await stack.client() as client:
            await client.wait_ready(["toolrunner"])
        yield proc
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def start_runner(stack: LocalStack, settings: Settings, direct: bool) -> subprocess.Popen[bytes]:
    store = settings.store
    env = {
        **os.environ,
        "LOOM_NATS_URL": stack.url,
        "LOOM_STORE": store.kind,
        "LOOM_DATA_DIR": str(store.data_dir),
        "LOOM_POSTGRES_URL": store.postgres_url or "",
        "LOOM_NKEY_SEED_FILE": str(stack.seed_file("toolrunner") or ""),
        "LOOM_DIRECT_DISPATCH": "true" if direct else "false",
        "LOOM_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen([sys.executable, "-m", "loom_services.toolrunner"], env=env)


async def bench(
    store: str,
    steps: int,
    runs: int,
    run_steps: int,
    chains: list[int],
    items: int,
    concurrency: int,
    insecure: bool = False,
    breakdown_steps: int = 0,
    profile: bool = False,
    direct: bool = True,
    runner_process: bool = False,
    without: tuple[str, ...] = (),
    read_models: str | None = None,
) -> None:
    base = Path(tempfile.mkdtemp(prefix="loom-bench-"))
    store_settings, stop_pg = bench_store(store, base)
    # per-service NATS credentials by default; --insecure measures the stack without them
    settings = Settings(
        nats_url="nats://127.0.0.1:4222", store=store_settings, insecure=insecure,
        direct_dispatch=direct,
    )  # fmt: skip
    if read_models is not None:  # else LOOM_READ_MODELS (default: process)
        settings = dataclasses.replace(settings, read_models=read_models)
    if runner_process:
        without = (*without, "toolrunner")
    try:
        await _bench(store, settings, steps, runs, run_steps, chains, items, concurrency,
                     breakdown_steps, profile, direct, without)  # fmt: skip
    finally:
        if stop_pg is not None:
            stop_pg()
        shutil.rmtree(base, ignore_errors=True)


async def _bench(
    store: str,
    settings: Settings,
    steps: int,
    runs: int,
    run_steps: int,
    chains: list[int],
    items: int,
    concurrency: int,
    breakdown_steps: int,
    profile: bool,
    direct: bool,
    without: tuple[str, ...],
) -> None:
    current = LocalStack(settings, nats_port=-1, without=without)
    print(f"{store:8s} read models: {current.read_models} (LOOM_READ_MODELS)", flush=True)
    async with contextlib.AsyncExitStack() as scope:
        stack = await scope.enter_async_context(current)
        if "toolrunner" in without:  # --runner-process: one starts beside the stack
            await scope.enter_async_context(runner_beside(stack, settings))
        client = await scope.enter_async_context(await stack.client())
        await sequential(client, 20)  # warm up
        # each line as soon as measured: a long part should not hide the others
        if steps:
            seq = await sequential(client, steps)
            print(
                f"{store:8s} sequential {steps} steps: {seq['steps_per_s']:7.1f} steps/s  "
                f"mean {seq['mean_ms']:.3f} ms/step  "
                f"p50 {seq['p50_ms']:.2f} ms  p99 {seq['p99_ms']:.2f} ms  "
                f"median of steps 11-{10 + seq['window']} {seq['early_ms']:.2f} ms vs last "
                f"{seq['window']} {seq['late_ms']:.2f} ms "
                f"(x{seq['late_ms'] / max(seq['early_ms'], 1e-9):.2f})\n"
                f"{store:8s}   {seq['cpu']}",
                flush=True,
            )
            if breakdown_steps:
                await breakdown(client, breakdown_steps, profile)
        if runs:
            conc, cpu = await concurrent(client, runs, run_steps)
            print(
                f"{store:8s} {runs} runs x {run_steps} steps at once: {conc:7.1f} steps/s"
                f"\n{store:8s}   {cpu}",
                flush=True,
            )
        for n in chains:
            print(f"{store:8s} {await chain_costs(client, n)}", flush=True)
        if items:
            print(f"{store:8s} {await foreach_rate(client, items, concurrency)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--run-steps", type=int, default=20)
    parser.add_argument(
        "--chains", type=int, nargs="*", default=[10, 100, 1000], metavar="N",
        help="lengths of single chained runs (none: skip)",
    )  # fmt: skip
    parser.add_argument("--foreach", type=int, default=1000, help="items (0: skip)")
    parser.add_argument("--concurrency", type=int, default=16, help="of the foreach")
    parser.add_argument("--insecure", action="store_true", help="NATS without credentials")
    parser.add_argument(
        "--breakdown", action="store_true",
        help="count publishes, acks, decodes, store calls, fsyncs per step (sequential run)",
    )  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="cProfile the sequential run")
    parser.add_argument(
        "--hop", action="store_true",
        help="no local calls (LOOM_LOCAL_TOOLS=''): every noop goes to the tool-runner",
    )  # fmt: skip
    parser.add_argument(
        "--runner-process", action="store_true",
        help="the tool-runner in its own process (its CPU is not in 'python')",
    )  # fmt: skip
    parser.add_argument(
        "--no-direct", action="store_true",
        help="LOOM_DIRECT_DISPATCH=false: requests and results only through their streams",
    )  # fmt: skip
    parser.add_argument(
        "--follow", action="store_true",
        help="the client follows every event of its runs (as before perf3), not run_completed",
    )  # fmt: skip
    parser.add_argument(
        "--without", action="append", default=[], metavar="SERVICE",
        help="leave a service out of the stack (ablation: what it costs per step)",
    )  # fmt: skip
    parser.add_argument(
        "--read-models", choices=["process", "inline"], default=None,
        help="tracing and memory in child processes or in this one (default: "
        "LOOM_READ_MODELS, else process; their CPU is counted apart)",
    )  # fmt: skip
    parser.add_argument(
        "--loop-lag", action="store_true",
        help="measure how late this process's event loop wakes a 5 ms sleeper (sequential)",
    )  # fmt: skip
    args = parser.parse_args()
    FOLLOW["every_event"] = args.follow
    LOOP_LAG["probe"] = args.loop_lag
    logging.basicConfig(level=logging.WARNING)
    if args.hop:
        os.environ["LOOM_LOCAL_TOOLS"] = ""
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    for store in stores:
        asyncio.run(
            bench(
                store,
                args.steps,
                args.runs,
                args.run_steps,
                args.chains,
                args.foreach,
                args.concurrency,
                args.insecure,
                args.steps if args.breakdown or args.profile else 0,
                args.profile,
                not args.no_direct,
                args.runner_process,
                tuple(args.without),
                args.read_models,
            )
        )


if __name__ == "__main__":
    main()
