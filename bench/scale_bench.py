"""Scale-out: 1 vs 2 vs 3 executor replicas (separate OS processes sharing the
partitions) over one nats-server and one PostgreSQL, with one planner and one
tool-runner process.

For each replica count, on a fresh nats-server and a fresh database: wait until the
replicas have split the partitions, then submit R runs of K chained ``noop`` steps at
once (explicit run ids, so a submission lands on any replica and is passed to the
owner when it is not it) and measure

- throughput: steps completed / wall time from the first submission to the last run's end;
- p50 / p99 step latency: per run, the time from its request to its last step's
  completion divided by its steps (the median and 99th percentile over the runs);
- CPU seconds per step of every process (executors summed, planner, tool-runner,
  nats-server, PostgreSQL), read from /proc: on a shared 2-core machine the wall
  numbers are noisy, the CPU per step is what predicts the gain per replica.

    python bench/scale_bench.py                        # 1, 2, 3 replicas; 50 runs x 20 steps
    python bench/scale_bench.py --replicas 1 3 --runs 100 --steps 20
    python bench/scale_bench.py --hop       # each step a tool-runner round trip
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from loom_core import codec, partitions, subjects
from loom_core.contracts import (
    EventRecord,
    PartitionLease,
    Plan,
    RunCompleted,
    RunRequest,
    StepCompleted,
    ToolStep,
)
from loom_infra.client import LoomClient
from loom_infra.credentials import ADMIN, ensure_credentials
from loom_infra.localpg import start_local_postgres
from loom_infra.natsserver import EmbeddedNats
from loom_infra.processes import ServiceProcess
from loom_services.runtime import provision

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` and its reaped children (seconds)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return sum(int(f) for f in fields[11:15]) / TICKS


def postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in ("postgres", "postgres:"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def chain(n: int) -> Plan:
    return Plan(
        steps=[
            ToolStep(id=f"s{i}", tool="noop", depends_on=[f"s{i - 1}"] if i else [])
            for i in range(n)
        ]
    )


def step_ms(records: list[EventRecord]) -> float:
    """A run's mean step latency: from its request to its last step's completion, per
    step (steps answered in one batch share a timestamp, so gaps between consecutive
    completions say little)."""
    done = [r.at for r in records if isinstance(r.event, StepCompleted)]
    return (done[-1] - records[0].at).total_seconds() * 1000 / max(1, len(done))


async def split(client: LoomClient, replicas: int, timeout: float = 60.0) -> None:
    """Until ``replicas`` replicas hold all partitions between them, evenly."""
    kv = await client.js.key_value(subjects.PARTITIONS_BUCKET)
    count = partitions.DEFAULT_COUNT
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owners: dict[int, str] = {}
        for p in range(count):
            with contextlib.suppress(Exception):  # not held (yet)
                entry = await kv.get(f"p-{p}")
                if not entry.value:
                    continue
                owners[p] = codec.decode(entry.value, PartitionLease).replica
        held = sorted(list(owners.values()).count(r) for r in set(owners.values()))
        if len(owners) == count and len(held) == replicas and held[-1] - held[0] <= 1:
            return
        await asyncio.sleep(0.2)  # a bench polls a table; no test relies on this timing
    raise TimeoutError(f"{replicas} replicas did not split the partitions in {timeout}s")


async def one(
    base: Path, pg_url: str, replicas: int, runs: int, steps: int, warmup: int, hop: bool
) -> dict[str, float]:
    here = base / f"r{replicas}"
    creds = ensure_credentials(here / "creds")
    server = EmbeddedNats(
        data_dir=here / "nats", port=-1, authorization=creds.authorization()
    ).start()
    dbname = f"scale_{replicas}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {dbname}")
        conn.execute(f"CREATE DATABASE {dbname}")
    url = urlunsplit(urlsplit(pg_url)._replace(path=f"/{dbname}"))
    env = {
        **os.environ,
        "LOOM_NATS_URL": server.url,
        "LOOM_STORE": "postgres",
        "LOOM_POSTGRES_URL": url,
        "LOOM_DATA_DIR": str(here / "data"),
        "LOOM_LOG_LEVEL": "WARNING",
        "LOOM_EMBEDDER": "hash",
    }
    if hop:  # every noop through the tool-runner and the run's inbox partition
        env["LOOM_LOCAL_TOOLS"] = ""
    procs: list[ServiceProcess] = []
    try:
        await provision(server.url, creds.seed_file(ADMIN))
        for i in range(replicas):
            procs.append(ServiceProcess(
                "executor",
                {**env, "LOOM_NKEY_SEED_FILE": str(creds.seed_file("executor")),
                 "LOOM_REPLICA_ID": f"ex-{i}"},
                here, label=f"executor-{i}",
            ))  # fmt: skip
        for name in ("planner", "toolrunner"):
            procs.append(
                ServiceProcess(
                    name, {**env, "LOOM_NKEY_SEED_FILE": str(creds.seed_file(name))}, here
                )  # fmt: skip
            )
        for proc in procs[:1] + procs[replicas:]:
            proc.start()
        seed = str(creds.seed_file("operator"))
        async with await LoomClient.connect(server.url, seed=seed) as client:
            # the first creates the tables (concurrent first-time CREATE TABLEs collide)
            await procs[0].wait_healthy(client, timeout=60)
            for proc in procs[1:replicas]:
                proc.start()
            await client.wait_ready(("executor", "planner", "toolrunner"), timeout=60)
            await split(client, replicas)

            async def batch(tag: str, n: int) -> list[list[EventRecord]]:
                ids = [f"{tag}-{i:04d}" for i in range(n)]
                await asyncio.gather(
                    *(client.submit(RunRequest(plan=chain(steps), run_id=i), timeout=60)
                      for i in ids)
                )  # fmt: skip
                return list(await asyncio.gather(*(client.wait(i, timeout=600) for i in ids)))

            await batch("warm", warmup)
            pids = {
                "executors": [p.proc.pid for p in procs[:replicas] if p.proc],
                "planner": [procs[replicas].proc.pid] if procs[replicas].proc else [],
                "toolrunner": [procs[-1].proc.pid] if procs[-1].proc else [],
                "nats": [server.process.pid] if server.process else [],
                "postgres": postgres_pids(),
            }
            before = {k: sum(cpu_s(p) for p in v) for k, v in pids.items()}
            t0 = time.monotonic()
            done = await batch("run", runs)
            wall = time.monotonic() - t0
            after = {k: sum(cpu_s(p) for p in v) for k, v in pids.items()}
        for records in done:
            assert isinstance(records[-1].event, RunCompleted), records[-1]
        total = runs * steps
        per_run = sorted(step_ms(records) for records in done)
        out: dict[str, float] = {
            "steps_per_s": total / wall,
            "p50_ms": statistics.median(per_run),
            "p99_ms": per_run[int(0.99 * (len(per_run) - 1))],
        }
        for k in before:
            out[f"{k}_ms_per_step"] = (after[k] - before[k]) * 1000 / total
        return out
    finally:
        for proc in procs:
            proc.stop()
        server.stop()


async def main_async(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="loom-scale-"))
    pg_url, stop_pg = start_local_postgres(base / "pg")
    try:
        cores = os.cpu_count()
        where = "via the tool-runner" if args.hop else "answered in the executor"
        print(f"{args.runs} runs x {args.steps} noop steps ({where}) at once; "
              f"{partitions.DEFAULT_COUNT} partitions; {cores} cores", flush=True)  # fmt: skip
        print("replicas  steps/s   p50 ms   p99 ms | CPU ms/step: executors planner "
              "toolrunner nats postgres  total", flush=True)  # fmt: skip
        for n in args.replicas:
            r = await one(base, pg_url, n, args.runs, args.steps, args.warmup, args.hop)
            cpu = [r[f"{k}_ms_per_step"] for k in
                   ("executors", "planner", "toolrunner", "nats", "postgres")]  # fmt: skip
            print(
                f"{n:8d} {r['steps_per_s']:8.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} | "
                + " ".join(f"{c:6.3f}" for c in cpu)
                + f"  {sum(cpu):6.3f}",
                flush=True,
            )
    finally:
        stop_pg()
        if args.keep:
            print(f"logs and data kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10, help="runs before measuring")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data")
    parser.add_argument(
        "--hop",
        action="store_true",
        help="noop through the tool-runner (default: answered in the executor's batch)",
    )
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("reads CPU times from /proc: Linux only")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
