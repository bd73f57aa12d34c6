"""Where a sequential run's slow steps come from (issue 10: p99 per step <= 3x p50).

Runs ``bench/steps.py``'s sequential hop run (tool-runner in its own process, read
models in theirs) and records, with wall timestamps, what might hold a step:
- garbage collections of generation 1 and 2 (and any over 0.2 ms) in every Python
  process (``bench/tailprobe/sitecustomize.py``, put on PYTHONPATH here);
- in this process: the executor's snapshot encodes, its writer batches and store
  appends over 1 ms, and the event loop's late wakes (a 2 ms sleeper);
- in the tracing child: its folds, its span-store saves and the stretches it ran under
  the normal CPU policy instead of ``SCHED_IDLE`` (``bench/tailprobe/sitecustomize.py``);
- every 1 ms, each process's CPU and run-queue wait (``bench/tailprobe/sampler.py``,
  /proc schedstat: the time a thread was ready but had no core).
Then, for each step slower than 3x the median (``--slow``), what overlapped its window
(previous completion to its own), and how often the same things overlap a normal step.

    python bench/tails.py --store sqlite --steps 2000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left, bisect_right
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROBE = HERE / "tailprobe"

from loom_core.contracts import StepCompleted  # noqa: E402
from loom_infra.settings import Settings  # noqa: E402
from loom_services import runhost  # noqa: E402
from loom_services.stack import LocalStack  # noqa: E402

sys.path.insert(0, str(HERE))
import stepcost  # noqa: E402
import steps  # noqa: E402

Span = tuple[float, float, str]  # start, end, label


class Marks:
    def __init__(self) -> None:
        self.spans: dict[str, list[Span]] = {}

    def add(self, kind: str, start: float, end: float, label: str = "") -> None:
        self.spans.setdefault(kind, []).append((start, end, label))


def instrument(marks: Marks, host: runhost.RunHost) -> None:
    encode = runhost.snapshot

    def timed_snapshot(state):  # type: ignore[no-untyped-def]
        t0, p0 = time.time(), time.perf_counter()
        data = encode(state)
        marks.add("snapshot", t0, t0 + time.perf_counter() - p0, f"{len(data) // 1024} KB")
        return data

    runhost.snapshot = timed_snapshot  # type: ignore[assignment]
    process = host._process

    async def timed_process(batch):  # type: ignore[no-untyped-def]
        t0, p0 = time.time(), time.perf_counter()
        await process(batch)
        took = time.perf_counter() - p0
        if took > 0.001:
            marks.add("batch>1ms", t0, t0 + took, f"{len(batch)} msgs")

    host._process = timed_process  # type: ignore[method-assign]
    append = host.store.append

    def timed_append(records):  # type: ignore[no-untyped-def]
        t0, p0, c0 = time.time(), time.perf_counter(), time.thread_time()
        out = append(records)
        took = time.perf_counter() - p0
        if took > 0.001:
            cpu = (time.thread_time() - c0) * 1000
            marks.add("append>1ms", t0, t0 + took, f"{took * 1000:.1f} cpu {cpu:.1f}")
        return out

    host.store.append = timed_append  # type: ignore[method-assign]


async def loop_probe(marks: Marks, every_s: float = 0.002) -> None:
    while True:
        t0, c0 = time.perf_counter(), time.thread_time()
        await asyncio.sleep(every_s)
        late = time.perf_counter() - t0 - every_s
        if late > 0.001:
            end = time.time()
            cpu = (time.thread_time() - c0) * 1000
            marks.add("loop late>1ms", end - late, end, f"late {late * 1000:.1f} cpu {cpu:.1f}")


def read_gc(folder: Path, roles: dict[int, str], marks: Marks) -> list[str]:
    summary = []
    for path in sorted(folder.glob("gc-*.txt")):
        pid = int(path.stem.split("-")[1])
        role = roles.get(pid, "main" if pid == os.getpid() else f"pid{pid}")
        lines = path.read_text().splitlines()
        summary.append(f"  {role}: {lines[0][2:][-60:]}")
        for line in lines[1:]:
            start, took, gen, _ = line.split()
            marks.add(f"gc{gen} {role}", float(start), float(start) + float(took) / 1000, took)
    return summary


def read_child_marks(folder: Path, marks: Marks) -> None:
    """The marks a child process wrote (``tailprobe``: the tracing read model's folds,
    saves and stretches under the normal CPU policy)."""
    for path in sorted(folder.glob("marks-*.txt")):
        for line in path.read_text().splitlines():
            start, end, kind, *label = line.split()
            marks.add(kind.replace("_", " "), float(start), float(end), " ".join(label))


def read_samples(path: Path) -> dict[str, tuple[list[float], list[list[int]]]]:
    series: dict[str, tuple[list[float], list[list[int]]]] = {}
    for line in path.read_text().splitlines():
        t, role, *values = line.split()
        times, rows = series.setdefault(role, ([], []))
        times.append(float(t))
        rows.append([int(v) for v in values])
    return series


def window_cpu(series, role: str, a: float, b: float) -> list[float]:  # type: ignore[no-untyped-def]
    """ms of (cpu, wait, main cpu, main wait) of ``role`` from the sample at or before a
    to the sample at or after b."""
    if role not in series:
        return [0.0] * 4
    times, rows = series[role]
    i = max(0, bisect_right(times, a) - 1)
    j = min(len(times) - 1, bisect_left(times, b))
    return [(rows[j][k] - rows[i][k]) / 1e6 for k in range(4)]


def overlaps(spans: list[Span], a: float, b: float) -> list[Span]:
    return [s for s in spans if s[0] < b and s[1] > a]


async def measure(
    store: str, n: int, slow_x: float, every_ms: float, runs: int, renice: int
) -> None:
    base = Path(tempfile.mkdtemp(prefix="loom-tails-"))
    probe_dir = Path(os.environ["LOOM_TAILPROBE_DIR"])
    store_settings, stop_pg = steps.bench_store(store, base)
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=store_settings)
    marks = Marks()
    try:
        stack = LocalStack(settings, nats_port=-1, without=("toolrunner",))
        async with stack, steps.runner_beside(stack, settings):
            assert stack.stack is not None
            host = next(s.host for s in stack.stack.services if hasattr(s, "host"))
            instrument(marks, host)
            async with await stack.client() as client:
                await steps.run_to_end(client, steps.chain(20))
                roles = {p: r for r, ps in stepcost.helper_processes().items() for p in ps}
                roles[os.getpid()] = "stack"
                for pid, role in roles.items():
                    if role in ("tracing", "memory") and renice:
                        os.setpriority(os.PRIO_PROCESS, pid, renice)
                sampler = subprocess.Popen(
                    [sys.executable, str(PROBE / "sampler.py"), "--out",
                     str(probe_dir / "samples.txt"), "--every-ms", str(every_ms),
                     *(f"{r}={p}" for p, r in roles.items() if r != "postgres")],
                    env={k: v for k, v in os.environ.items() if k != "LOOM_TAILPROBE_DIR"},
                )  # fmt: skip
                all_records = []
                meter = stepcost.CpuMeter()
                meter.start()
                lag = asyncio.ensure_future(loop_probe(marks))
                for _ in range(runs):
                    records, _ = await steps.run_to_end(client, steps.chain(n))
                    all_records.append(records)
                lag.cancel()
                cpu = meter.stop()
                sampler.terminate()
                sampler.wait(10)
        import sitecustomize  # the probe, loaded at this process's start

        sitecustomize._dump()  # type: ignore[attr-defined]
        gc_summary = read_gc(probe_dir, roles, marks)
        read_child_marks(probe_dir, marks)
        series = read_samples(probe_dir / "samples.txt")
        for records in all_records:
            report(records, marks, series, slow_x, n)
        print("CPU " + stepcost.format_cpu(cpu, n * runs))
        print("gc per process (young = quick gen-0 count, total):")
        print("\n".join(gc_summary))
    finally:
        if stop_pg is not None:
            stop_pg()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(probe_dir, ignore_errors=True)


def report(records, marks: Marks, series, slow_x: float, n: int) -> None:  # type: ignore[no-untyped-def]
    done = [
        r.at.timestamp()
        for r in records
        if isinstance(r.event, StepCompleted) and "/" not in r.event.step_id
    ]
    gaps = [(b - a) * 1000 for a, b in zip(done, done[1:], strict=False)]
    p50 = statistics.median(gaps)
    p99 = steps.pct(gaps, 0.99)
    limit = slow_x * p50
    slow = [i for i, g in enumerate(gaps) if g > limit]
    print(f"\n{n} steps: p50 {p50:.2f} ms  p99 {p99:.2f} ({p99 / p50:.2f}x)  mean "
          f"{statistics.mean(gaps):.3f}; {len(slow)} steps over {limit:.2f} ms")  # fmt: skip
    kinds = sorted(marks.spans)
    roles = sorted(series)

    def features(i: int) -> dict[str, float]:
        a, b = done[i], done[i + 1]
        out: dict[str, float] = {}
        for kind in kinds:
            hits = overlaps(marks.spans[kind], a, b)
            if hits:
                out[kind] = sum(min(e, b) - max(s, a) for s, e, _ in hits) * 1000
        for role in roles:
            cpu, wait, mcpu, mwait = window_cpu(series, role, a, b)
            out[f"cpu {role}"] = cpu
            out[f"wait {role}"] = wait
        return out

    feats = [features(i) for i in range(len(gaps))]
    normal = [f for i, f in enumerate(feats) if gaps[i] <= limit]
    print("  the slow steps (ms; overlapping marks with their overlap in ms; CPU and run-queue "
          "wait per process in the window):")  # fmt: skip
    for i in slow:
        f = feats[i]
        marks_text = ", ".join(
            f"{k} {v:.1f}" for k, v in f.items() if not k.startswith(("cpu", "wait"))
        )
        labels = [
            lab for _, _, lab in overlaps(marks.spans.get("append>1ms", []), done[i], done[i + 1])
        ]
        marks_text += f" ({'; '.join(labels)})" if labels else ""
        cpu_text = " ".join(f"{r}:{f[f'cpu {r}']:.1f}/{f[f'wait {r}']:.1f}" for r in roles)
        print(f"  #{i:5d} {gaps[i]:6.2f}  [{marks_text}]  cpu/wait {cpu_text}")
    print("  share of windows where (slow | normal):")
    for kind in kinds:
        s = sum(kind in feats[i] for i in slow) / max(1, len(slow))
        o = sum(kind in f for f in normal) / max(1, len(normal))
        print(f"    {kind:24s} {s:6.1%} | {o:6.1%}")
    for role in roles:
        key = f"cpu {role}"
        s = sum(feats[i][key] > 0.5 for i in slow) / max(1, len(slow))
        o = sum(f[key] > 0.5 for f in normal) / max(1, len(normal))
        print(f"    {role + ' on CPU > 0.5 ms':24s} {s:6.1%} | {o:6.1%}")
    for role in roles:
        for what in ("cpu", "wait"):
            key = f"{what} {role}"
            sv = [feats[i][key] for i in slow]
            ov = [f[key] for f in normal]
            if sv and ov:
                med, mean = statistics.median, statistics.mean
                print(f"    {key:24s} median {med(sv):6.2f} | {med(ov):6.2f} ms"
                      f"   mean {mean(sv):6.2f} | {mean(ov):6.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--slow", type=float, default=3.0, help="x the median")
    parser.add_argument("--every-ms", type=float, default=1.0)
    parser.add_argument("--renice", type=int, default=0, help="the read models' niceness")
    args = parser.parse_args()
    if not os.environ.get("LOOM_TAILPROBE_DIR"):
        # every Python process of the run (this one too) loads the probe at its start
        os.environ["LOOM_TAILPROBE_DIR"] = tempfile.mkdtemp(prefix="loom-tailprobe-")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(PROBE), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        os.execv(sys.executable, [sys.executable, *sys.argv])  # noqa: S606 - this script again
    logging.basicConfig(level=logging.WARNING)
    os.environ["LOOM_LOCAL_TOOLS"] = ""
    asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> None:
    await measure(args.store, args.steps, args.slow, args.every_ms, args.runs, args.renice)


if __name__ == "__main__":
    main()
