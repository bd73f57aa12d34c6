"""What a run costs to start and to end, around its steps (issue 10, startcost).

The embedded stack in this process (SQLite, every call hopping to a tool-runner in its own
process, as ``bench/steps.py --store sqlite --hop --runner-process``), one run of N chained
no-op steps at a time, as ``bench/peers.py``'s client runs it: it names the run, listens
for its ``run_completed`` (plain NATS), then submits. Per run, from the client's clock and
the run's own event times (one machine, one clock):

- submit -> accepted: the client's request until the executor's answer (the run stored);
- submit -> plan accepted: the planner's check of the explicit plan and its verdict;
- submit -> first step decided: the first ``tool_call_requested``;
- last step's result -> ``run_completed`` decided, and -> the client has it.

Then what a run costs beyond its steps, in CPU: runs of N and of 10 steps alternate; the
intercept of CPU(steps) = a + b x steps is the per-run cost (this process, the runner, the
nats-server). ``--profile`` adds a cProfile of this process over some runs, restricted to
the functions on the start path.

    python bench/startcost.py --steps 200 --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import logging
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import stepcost  # noqa: E402
from loom_core import codec, subjects  # noqa: E402
from loom_core.contracts import (  # noqa: E402
    ApprovalStep,
    Plan,
    PlanAccepted,
    RunCompleted,
    RunRequest,
    RunRequested,
    ToolCallCompleted,
    ToolCallRequested,
)
from loom_infra.client import LoomClient  # noqa: E402
from loom_infra.settings import Settings, StoreSettings  # noqa: E402
from loom_services.stack import LocalStack  # noqa: E402
from steps import chain, runner_beside  # noqa: E402

# the start path's functions, for --profile (substring of "file:function")
START_PATH = (
    "validation.py:validate_plan", "validation.py:check_run_request",
    "limits.py:check_json", "secrets.py:redact_request", "executor.py:_submit",
    "executor.py:request_digest", "executor.py:plan_digest", "planner.py:_one",
    "planner.py:plan", "planner.py:_check", "foreign.py:foreign_syntax_issues",
    "tool_access.py:check_tool_access", "codec.py:encode", "codec.py:decode_event",
    "codec.py:decode_inbox", "runhost.py:_process", "store.py:append", "relay.py",
    "tracing.py", "memory.py", "executor.py:handle", "executor.py:evolve",
    "executor.py:snapshot", "progress.py",
)  # fmt: skip


# --trace: when each hop of a run's start happened (time.time()), by run id
STAMPS: dict[str, dict[str, float]] = {}


def trace_start() -> None:
    """Stamp the start path's hops: the planner takes the run_requested, its verdict is
    stored in LOOM_INBOX (the publish's ack), the executor's inbox consumer takes it."""
    from loom_infra import bus  # noqa: PLC0415
    from loom_services import executor, planner  # noqa: PLC0415

    took = planner.PlannerService._one

    async def one(self: Any, msg: Any) -> Any:
        run_id = msg.subject.split(".")[2]
        STAMPS.setdefault(run_id, {})["planner takes it"] = time.time()
        return await took(self, msg)

    planner.PlannerService._one = one  # type: ignore[method-assign]
    acked = bus.publish_acked

    async def publish_acked(js: Any, subject: str, data: bytes, *args: Any, **kw: Any) -> Any:
        run_id = subject.split(".")[2]
        stamps = STAMPS.setdefault(run_id, {})
        stamps.setdefault("verdict sent", time.time())
        try:
            return await acked(js, subject, data, *args, **kw)
        finally:
            stamps.setdefault("verdict acked", time.time())

    planner.bus.publish_acked = publish_acked  # type: ignore[attr-defined]
    inbox = executor.ExecutorService.on_inbox

    async def on_inbox(self: Any, msgs: Any) -> Any:
        for msg in msgs:
            run_id = codec.decode_inbox(msg.data).run_id  # (a bench: the decode is paid twice)
            STAMPS.setdefault(run_id, {}).setdefault("executor takes it", time.time())
        return await inbox(self, msgs)

    executor.ExecutorService.on_inbox = on_inbox  # type: ignore[method-assign]


async def one_run(
    client: LoomClient, n: int, cpu: dict[str, float] | None = None
) -> dict[str, float]:
    """One run, timed. With ``cpu``: the CPU it cost (this process and its helpers) until
    the client has its end, before its events are read for the times."""
    meter = stepcost.CpuMeter() if cpu is not None else None
    run_id = f"sc-{uuid.uuid4().hex[:20]}"
    sub = await client.nc.subscribe(subjects.run_event(run_id, "run_completed"))
    try:
        if meter is not None:
            meter.start()
        t0 = time.time()
        await client.submit(RunRequest(plan=chain(n), run_id=run_id))
        t_acc = time.time()
        msg = await sub.next_msg(timeout=600)
        t_end = time.time()
        if meter is not None and cpu is not None:
            cpu.update(meter.stop())
    finally:
        await sub.unsubscribe()
    assert isinstance(codec.decode_event(msg.data).event, RunCompleted)
    records = await client.events(run_id, timeout=60)
    at = lambda r: r.at.timestamp()  # noqa: E731
    requested = next(at(r) for r in records if isinstance(r.event, RunRequested))
    accepted = next(at(r) for r in records if isinstance(r.event, PlanAccepted))
    first = next(at(r) for r in records if isinstance(r.event, ToolCallRequested))
    last_result = [at(r) for r in records if isinstance(r.event, ToolCallCompleted)][-1]
    completed = at(records[-1])
    ms = lambda a, b: (b - a) * 1000  # noqa: E731
    hops = {}
    if run_id in STAMPS:
        previous, stamps = requested, STAMPS.pop(run_id)
        for key in ("planner takes it", "verdict sent", "verdict acked", "executor takes it"):
            if key in stamps:
                hops[f"  -> {key}"] = ms(previous, stamps[key])
                previous = stamps[key]
        hops["  -> plan_accepted decided"] = ms(previous, accepted)
    return {
        "submit->accepted": ms(t0, t_acc),
        "submit->run_requested": ms(t0, requested),
        "run_requested->plan_accepted": ms(requested, accepted),
        **hops,
        "submit->first step decided": ms(t0, first),
        "last result->run_completed": ms(last_result, completed),
        "run_completed->client": ms(completed, t_end),
        "whole run": ms(t0, t_end),
    }


def held(n: int) -> Plan:
    """``n`` steps whose first waits for a person: a run of it stops once its first
    step is decided, so what it costs is the start alone."""
    first = ApprovalStep(id="s0", label="go")
    return Plan(steps=[first, *chain(n).steps[1:]])


async def start_cpu(client: LoomClient, n: int, runs: int) -> dict[str, float]:
    """CPU per run (ms) of submit -> first step decided (its suspension published), each
    process; ``runs`` runs one after another."""
    meter = stepcost.CpuMeter()
    collected = _GcClock()
    meter.start()
    for _ in range(runs):
        run_id = f"held-{uuid.uuid4().hex[:20]}"
        sub = await client.nc.subscribe(subjects.run_event(run_id, "step_suspended"))
        try:
            await client.submit(RunRequest(plan=held(n), run_id=run_id))
            await sub.next_msg(timeout=60)
        finally:
            await sub.unsubscribe()
    cpu = meter.stop()
    cpu["python: garbage collection"] = collected.stop()
    return {k: v * 1000 / runs for k, v in cpu.items()}


class _GcClock:
    """Wall time this process spends in garbage collection (all threads), from now."""

    def __init__(self) -> None:
        self.spent = 0.0
        self._began = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.spent += time.perf_counter() - self._began

    def stop(self) -> float:
        gc.callbacks.remove(self._on)
        return self.spent


async def burst(stack: Any, client: LoomClient, runs: int, steps: int) -> str:
    """``runs`` clients submit a ``steps``-step chain at once: how long until every one
    is answered (each answer means its run is stored), and in how many commits."""
    from loom_services.executor import ExecutorService  # noqa: PLC0415

    executor = next(s for s in stack.stack.services if isinstance(s, ExecutorService))
    commits: list[int] = []

    def count(_ids: list[int], records: list[Any]) -> None:
        created = sum(isinstance(r.event, RunRequested) for r in records)
        if created:
            commits.append(created)

    executor.host.listeners.append(count)
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(client.submit(RunRequest(plan=chain(steps))) for _ in range(runs)))
    finally:
        executor.host.listeners.remove(count)
    took = (time.perf_counter() - t0) * 1000
    return f"{runs} submissions at once answered in {took:.1f} ms, in {len(commits)} commits"


async def per_run_cpu(client: LoomClient, n: int, rounds: int) -> dict[str, tuple[float, float]]:
    """CPU(steps) = a + b x steps over alternating runs of ``n`` and 10 steps: per key, (a
    ms per run, b ms per step)."""
    samples: dict[int, list[dict[str, float]]] = {n: [], 10: []}
    for _ in range(rounds):
        for size in (n, 10):
            cpu: dict[str, float] = {}
            await one_run(client, size, cpu)
            samples[size].append(cpu)
    out = {}
    for key in samples[n][0]:
        big = statistics.median(s.get(key, 0.0) for s in samples[n])
        small = statistics.median(s.get(key, 0.0) for s in samples[10])
        b = (big - small) / (n - 10)
        out[key] = ((small - 10 * b) * 1000, b * 1000)
    return out


async def main_async(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="loom-startcost-"))
    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=StoreSettings(kind="sqlite", data_dir=base / "data"),
        direct_dispatch=True,
    )
    try:
        async with contextlib.AsyncExitStack() as scope:
            stack = await scope.enter_async_context(
                LocalStack(settings, nats_port=-1, without=("toolrunner",))
            )  # the hop: the tool-runner in a process of its own
            await scope.enter_async_context(runner_beside(stack, settings))
            client = await scope.enter_async_context(await stack.client())
            for _ in range(3):
                await one_run(client, 20)  # warm up
            rows = [await one_run(client, args.steps) for _ in range(args.rounds)]
            print(f"one run of {args.steps} chained hop steps, {args.rounds} runs "
                  "(median, min, max ms):")  # fmt: skip
            for key in rows[0]:
                values = [r.get(key, float("nan")) for r in rows]
                print(f"  {key:30s} {statistics.median(values):8.2f} "
                      f"{min(values):8.2f} {max(values):8.2f}")  # fmt: skip
            if args.burst:
                print(await burst(stack, client, args.burst, 20))
                await asyncio.sleep(3)  # their steps run out before the next part
            for key, value in (await start_cpu(client, args.steps, 4 * args.rounds)).items():
                print(f"  start only (first step waits for a person): {key:8s} "
                      f"{value:7.2f} ms per run")  # fmt: skip
            cpu = await per_run_cpu(client, args.steps, args.rounds)
            print("CPU(steps) = a + b x steps (medians; ms):")
            for key, (a, b) in cpu.items():
                print(f"  {key:8s} per run {a:7.2f}   per step {b:6.3f}")
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                await start_cpu(client, args.steps, 4 * args.rounds)
                profile.disable()
                text = io.StringIO()
                stats = pstats.Stats(profile, stream=text).sort_stats("cumulative")
                stats.print_stats(70)
                stats.print_callers("msgspec.json.Decoder")
                print(f"cProfile of {4 * args.rounds} starts (tottime):")
                print(text.getvalue())
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(args.rounds):
                    await one_run(client, args.steps)
                profile.disable()
                text = io.StringIO()
                stats = pstats.Stats(profile, stream=text).sort_stats("cumulative")
                stats.print_stats(400)
                print(f"cProfile of {args.rounds} runs, start-path functions (cumulative):")
                for line in text.getvalue().splitlines():
                    if any(_match(line, key) for key in START_PATH) or _per_run(line, args.rounds):
                        print(" ", line)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _per_run(line: str, rounds: int) -> bool:
    """A function called a few times per run (not per step) that costs >= 0.5 ms a run."""
    fields = line.split()
    if len(fields) < 6 or not fields[0].split("/")[0].isdigit():
        return False
    calls = int(fields[0].split("/")[0])
    return calls <= 4 * rounds and float(fields[3]) >= 0.0005 * rounds


def _match(line: str, key: str) -> bool:
    file, _, func = key.partition(":")
    return file in line and (not func or f"({func})" in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--trace", action="store_true", help="stamp the start path's hops")
    parser.add_argument(
        "--burst", type=int, default=0, metavar="N",
        help="also: N clients submit a 20-step chain at once (time to answer them all)",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["LOOM_LOCAL_TOOLS"] = ""  # every call hops to the tool-runner
    if args.trace:
        trace_start()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
