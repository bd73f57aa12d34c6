"""agentloom side by side with its peers, in one sitting: LangGraph (SqliteSaver and
PostgresSaver, ``durability="sync"`` and the default ``"async"``) and DBOS (SQLite and
PostgreSQL), no-op steps, every system in its own process, rounds interleaved (each
round runs every system once, in turn), medians printed with the ratio to agentloom.

    python bench/peers.py                         # 3 rounds, 200 steps, 50 runs x 20 steps
    python bench/peers.py --rounds 5 --only langgraph-sqlite,agentloom-sqlite

The peers are installed into ``.bench-venv`` (created on first use, gitignored) from the
package registry with pip, never into the project's environment; nothing else is
fetched. PostgreSQL is the local one the tests use (``loom_infra.localpg``: the pgserver
wheel), started once and shared, each system in its own database.

Per system and round, one process: a warm-up run, then
- one run of N sequential no-op steps: wall ms per step (submit to result / N), and this
  process's CPU ms per step (agentloom: the client names the run, listens for its
  ``run_completed`` event, then submits over NATS, as a client that wants only the
  result does);
- R runs of K steps at once: steps per second.
``floor-*`` is the issue's floor for a hop step, no engine: commit a row, a NATS
request answered by a responder in another process, commit a row; the issue's target for
the hop is within 1.5x of it, which the table prints, so a slow sitting of the machine
is read against the floor measured in the same sitting.
agentloom's numbers include its nats-server (CPU also printed apart) and, with
``-hop``, a tool-runner hop per step (``LOOM_LOCAL_TOOLS=''``), to a tool-runner in the
same process, or with ``-hopproc`` in a process of its own (the issue's hop; its CPU
printed apart); without either ``noop`` is a local call answered in the executor
(``loom_services.local_tools``). Database servers'
CPU is not counted for anyone. The machine is shared: read the CPU columns with the
wall ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, TypedDict

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".bench-venv"
# the versions measured (pip resolves their dependencies); bump deliberately
PEERS = (
    "langgraph==1.2.24",
    "langgraph-checkpoint-sqlite==3.1.2",
    "langgraph-checkpoint-postgres==3.2.0",
    "psycopg[binary]==3.3.9",
    "psycopg-pool==3.3.3",
    "dbos==3.4.0",
)
SYSTEMS = (
    "agentloom-sqlite",
    "agentloom-sqlite-hop",
    "agentloom-sqlite-hopproc",
    "agentloom-postgres",
    "agentloom-postgres-hop",
    "agentloom-postgres-hopproc",
    "langgraph-sqlite",
    "langgraph-sqlite-sync",
    "langgraph-postgres",
    "langgraph-postgres-sync",
    "dbos-sqlite",
    "dbos-postgres",
    "floor-sqlite",
    "floor-postgres",
)


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    marker = VENV / ".installed"
    if marker.exists() and marker.read_text() == "\n".join(PEERS):
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS], check=True)
    marker.write_text("\n".join(PEERS))
    return python


# ----------------------------------------------------------------------------- workers


class Counting(TypedDict):  # LangGraph's state (resolved by name: module level)
    i: int
    n: int


def _cpu() -> float:
    return time.process_time()


async def _agentloom(
    store: str, hop: bool, pg_url: str, args: argparse.Namespace, runner_process: bool = False
) -> dict:
    if hop:
        os.environ["LOOM_LOCAL_TOOLS"] = ""
    sys.path.insert(0, str(ROOT / "bench"))
    from loom_infra.settings import Settings, StoreSettings  # noqa: PLC0415
    from loom_services.stack import LocalStack  # noqa: PLC0415
    from steps import runner_beside  # noqa: PLC0415

    base = Path(tempfile.mkdtemp(prefix="peers-loom-"))
    if store == "postgres":
        store_settings = StoreSettings(kind="postgres", data_dir=base, postgres_url=pg_url)
    else:
        store_settings = StoreSettings(kind="sqlite", data_dir=base)
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=store_settings)
    # -hopproc: the tool-runner in a process of its own (the hop), as steps.py does
    without = ("toolrunner",) if runner_process else ()
    try:
        async with contextlib.AsyncExitStack() as scope:
            stack = await scope.enter_async_context(
                LocalStack(settings, nats_port=-1, without=without)
            )
            if runner_process:
                await scope.enter_async_context(runner_beside(stack, settings))
            return await _agentloom_measured(stack, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _agentloom_measured(stack: Any, args: argparse.Namespace) -> dict:
    """The measurements on ``stack``, a started ``LocalStack``."""
    import stepcost  # noqa: PLC0415
    from loom_core import codec, subjects  # noqa: PLC0415
    from loom_core.contracts import RunCompleted, RunRequest  # noqa: PLC0415
    from steps import chain  # noqa: PLC0415

    async with await stack.client() as client:

        async def one(n: int) -> None:
            # as a client that wants only the result: it names the run, listens for its
            # run_completed event (plain NATS: the relay's publish), then submits
            run_id = f"peers-{uuid.uuid4().hex[:20]}"
            sub = await client.nc.subscribe(subjects.run_event(run_id, "run_completed"))
            try:
                await client.submit(RunRequest(plan=chain(n), run_id=run_id))
                msg = await sub.next_msg(timeout=600)
            finally:
                await sub.unsubscribe()
            assert isinstance(codec.decode_event(msg.data).event, RunCompleted)

        await one(20)
        meter = stepcost.CpuMeter()
        meter.start()
        await one(args.steps)
        cpu = meter.stop()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(args.run_steps) for _ in range(args.runs)))
        conc = args.runs * args.run_steps / (time.perf_counter() - t0)
    read_models = cpu.get("tracing", 0.0) + cpu.get("memory", 0.0)
    return {
        "ms_per_step": cpu["wall"] * 1000 / args.steps,
        "cpu_ms_per_step": cpu["python"] * 1000 / args.steps,
        "nats_cpu_ms_per_step": cpu.get("nats", 0.0) * 1000 / args.steps,
        "runner_cpu_ms_per_step": cpu.get("runner", 0.0) * 1000 / args.steps,
        # the read models' own processes (LOOM_READ_MODELS=process, the default)
        "read_models_cpu_ms_per_step": read_models * 1000 / args.steps,
        "steps_per_s": conc,
    }


async def _langgraph(
    store: str, durability: str | None, pg_url: str, args: argparse.Namespace
) -> dict:
    from langgraph.graph import END, START, StateGraph  # noqa: PLC0415

    def step(state: Counting) -> dict:
        return {"i": state["i"] + 1}

    def more(state: Counting) -> str:
        return "step" if state["i"] < state["n"] else END

    builder = StateGraph(Counting)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_conditional_edges("step", more)
    base = Path(tempfile.mkdtemp(prefix="peers-lg-"))
    extra = {} if durability is None else {"durability": durability}
    try:
        if store == "postgres":
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver  # noqa: PLC0415
            from psycopg.rows import dict_row  # noqa: PLC0415
            from psycopg_pool import AsyncConnectionPool  # noqa: PLC0415

            pool = AsyncConnectionPool(
                pg_url, max_size=8, open=False,
                kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
            )  # fmt: skip
            await pool.open()
            saver: Any = AsyncPostgresSaver(pool)
            await saver.setup()
            closer = pool.close
        else:
            import aiosqlite  # noqa: PLC0415
            from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver  # noqa: PLC0415

            conn = await aiosqlite.connect(str(base / "lg.sqlite"))
            saver = AsyncSqliteSaver(conn)
            await saver.setup()  # WAL; synchronous stays SQLite's default (FULL)
            closer = conn.close
        graph = builder.compile(checkpointer=saver)
        counter = iter(range(10**9))

        async def one(n: int) -> None:
            config = {"configurable": {"thread_id": f"t{next(counter)}"}, "recursion_limit": n + 10}
            out = await graph.ainvoke({"i": 0, "n": n}, config, **extra)
            assert out["i"] == n

        await one(20)
        c0, t0 = _cpu(), time.perf_counter()
        await one(args.steps)
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        t0 = time.perf_counter()
        await asyncio.gather(*(one(args.run_steps) for _ in range(args.runs)))
        conc = args.runs * args.run_steps / (time.perf_counter() - t0)
        await closer()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {
        "ms_per_step": wall * 1000 / args.steps,
        "cpu_ms_per_step": cpu * 1000 / args.steps,
        "steps_per_s": conc,
    }


FLOOR_SUBJECT = "peers.floor.echo"
FLOOR_ROW = b"x" * 300  # about a step event's size


async def _floor_responder(url: str) -> None:
    """The floor's other process: answers each request at once (``--responder``)."""
    import nats  # noqa: PLC0415

    nc = await nats.connect(url)

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(FLOOR_SUBJECT, cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()  # until the measuring process terminates it


def _floor_committer(store: str, pg_url: str, base: Path) -> Any:
    """A function committing one row per call, durably: SQLite in WAL with
    ``synchronous=FULL`` (as the store), or a PostgreSQL autocommit INSERT (fsync on)."""
    if store == "sqlite":
        import sqlite3  # noqa: PLC0415

        conn = sqlite3.connect(base / "floor.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, body BLOB)")

        def commit_sqlite() -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO rows (body) VALUES (?)", (FLOOR_ROW,))
            conn.execute("COMMIT")

        return commit_sqlite
    import psycopg  # noqa: PLC0415

    pg = psycopg.connect(pg_url, autocommit=True)
    pg.execute("CREATE TABLE IF NOT EXISTS floor_rows (id bigserial PRIMARY KEY, body bytea)")

    def commit_postgres() -> None:
        pg.execute("INSERT INTO floor_rows (body) VALUES (%s)", (FLOOR_ROW,))

    return commit_postgres


async def _floor(store: str, pg_url: str, args: argparse.Namespace) -> dict:
    """commit + NATS request/reply to another process + commit, ``--steps`` times."""
    import nats  # noqa: PLC0415

    sys.path.insert(0, str(ROOT / "libs"))
    from loom_infra.natsserver import EmbeddedNats  # noqa: PLC0415

    base = Path(tempfile.mkdtemp(prefix="peers-floor-"))
    server = EmbeddedNats(data_dir=base / "nats", port=-1).start()
    responder = subprocess.Popen(
        [sys.executable, __file__, "--responder", server.url],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert responder.stdout is not None and responder.stdout.readline().strip() == "ready"
        commit = _floor_committer(store, pg_url, base)
        nc = await nats.connect(server.url)
        for _ in range(20):  # warm-up, as the others' warm-up run
            commit()
            await nc.request(FLOOR_SUBJECT, FLOOR_ROW, timeout=10)
            commit()
        cpu0, t0 = _cpu(), time.perf_counter()
        for _ in range(args.steps):
            commit()
            await nc.request(FLOOR_SUBJECT, FLOOR_ROW, timeout=10)
            commit()
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        await nc.close()
    finally:
        responder.terminate()
        responder.wait(10)
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return {"ms_per_step": wall * 1000 / args.steps, "cpu_ms_per_step": cpu * 1000 / args.steps}


def _dbos(store: str, pg_url: str, args: argparse.Namespace) -> dict:
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from dbos import DBOS  # noqa: PLC0415

    base = Path(tempfile.mkdtemp(prefix="peers-dbos-"))
    url = (
        pg_url.replace("postgresql://", "postgresql+psycopg://", 1)
        if store == "postgres"
        else f"sqlite:///{base / 'dbos.sqlite'}"
    )
    DBOS(config={"name": "peers", "system_database_url": url, "log_level": "WARNING"})

    @DBOS.step()
    def step(i: int) -> int:
        return i + 1

    @DBOS.workflow()
    def flow(n: int) -> int:
        i = 0
        while i < n:
            i = step(i)
        return i

    DBOS.launch()
    try:
        flow(20)
        c0, t0 = _cpu(), time.perf_counter()
        assert flow(args.steps) == args.steps
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.runs) as pool:
            results = list(pool.map(flow, [args.run_steps] * args.runs))
        conc = args.runs * args.run_steps / (time.perf_counter() - t0)
        assert results == [args.run_steps] * args.runs
    finally:
        DBOS.destroy()
        shutil.rmtree(base, ignore_errors=True)
    return {
        "ms_per_step": wall * 1000 / args.steps,
        "cpu_ms_per_step": cpu * 1000 / args.steps,
        "steps_per_s": conc,
    }


def worker(system: str, pg_url: str, args: argparse.Namespace) -> dict:
    kind, store, *rest = system.split("-")
    if kind == "agentloom":
        hop = bool({"hop", "hopproc"} & set(rest))
        return asyncio.run(_agentloom(store, hop, pg_url, args, runner_process="hopproc" in rest))
    if kind == "langgraph":
        return asyncio.run(_langgraph(store, "sync" if "sync" in rest else None, pg_url, args))
    if kind == "floor":
        return asyncio.run(_floor(store, pg_url, args))
    return _dbos(store, pg_url, args)


# ----------------------------------------------------------------------------- driver


def measure(system: str, pg_url: str, args: argparse.Namespace, peer_python: Path) -> dict | None:
    ours = system.startswith(("agentloom", "floor"))
    python = sys.executable if ours else str(peer_python)
    url = with_database(pg_url, system.replace("-", "_")) if "postgres" in system else pg_url
    cmd = [
        python, __file__, "--worker", system, "--pg-url", url, "--steps", str(args.steps),
        "--runs", str(args.runs), "--run-steps", str(args.run_steps),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ""} if python != sys.executable else dict(os.environ)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    except subprocess.TimeoutExpired:
        print(f"  {system}: timed out", flush=True)
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  {system}: failed ({done.returncode}): {done.stderr.strip()[-800:]}", flush=True)
        return None
    return json.loads(lines[-1])


def with_database(url: str, db: str) -> str:
    """``url`` (``postgresql://user:pw@host/db?host=/socket/dir``) naming database ``db``."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + db))


def create_databases(pg_url: str, systems: list[str]) -> None:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(pg_url, autocommit=True) as conn:
        for system in systems:
            if "postgres" in system:
                db = system.replace("-", "_")
                conn.execute(f"DROP DATABASE IF EXISTS {db}")
                conn.execute(f"CREATE DATABASE {db}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--run-steps", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated systems (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--pg-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--responder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.responder:
        asyncio.run(_floor_responder(args.responder))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.pg_url, args)), flush=True)
        return
    systems = [s for s in args.only.split(",") if s] or list(SYSTEMS)
    peer_python = ensure_venv()
    sys.path.insert(0, str(ROOT / "libs"))
    from loom_infra.localpg import start_local_postgres  # noqa: PLC0415

    base = Path(tempfile.mkdtemp(prefix="peers-pg-"))
    pg_url, stop_pg = start_local_postgres(base / "pg")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    try:
        for r in range(args.rounds):
            create_databases(pg_url, systems)  # every round starts from empty databases
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for system in systems:
                got = measure(system, pg_url, args, peer_python)
                if got is not None:
                    results[system].append(got)
                    print(f"  {system:24s} {got}", flush=True)
    finally:
        stop_pg()
        shutil.rmtree(base, ignore_errors=True)
    print_table(results, args)


def print_table(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    med = {
        s: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for s, rs in results.items()
        if rs
    }

    def ref(system: str) -> dict | None:
        store = "postgres" if "postgres" in system else "sqlite"
        return med.get(f"agentloom-{store}")

    print(
        f"\nmedians of {args.rounds} interleaved rounds; sequential: one run of {args.steps} "
        f"steps; concurrent: {args.runs} runs x {args.run_steps} steps; ratios: the system "
        "over agentloom on the same store (ms: >1 means agentloom is faster; steps/s: <1)"
    )
    print(
        f"| system | ms/step | CPU ms/step (own process) | steps/s, {args.runs} runs "
        "| ms/step ÷ agentloom | steps/s ÷ agentloom |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for system, m in med.items():
        base = ref(system)
        cpu = f"{m['cpu_ms_per_step']:.3f}"
        if m.get("runner_cpu_ms_per_step"):
            cpu += f" (+ runner {m['runner_cpu_ms_per_step']:.3f})"
        if m.get("read_models_cpu_ms_per_step"):
            cpu += f" (+ read models {m['read_models_cpu_ms_per_step']:.3f})"
        if "nats_cpu_ms_per_step" in m:
            cpu += f" (+ nats {m['nats_cpu_ms_per_step']:.3f})"
        ratio_ms = f"{m['ms_per_step'] / base['ms_per_step']:.2f}" if base else "-"
        # the floor has no concurrent figure: 50 runs' commits are not grouped there
        throughput = m.get("steps_per_s")
        ratio_s = f"{throughput / base['steps_per_s']:.2f}" if base and throughput else "-"
        shown = f"{throughput:.0f}" if throughput else "-"
        print(f"| {system} | {m['ms_per_step']:.3f} | {cpu} | {shown} | {ratio_ms} | {ratio_s} |")
    for store in ("sqlite", "postgres"):
        hop, floor = med.get(f"agentloom-{store}-hopproc"), med.get(f"floor-{store}")
        if hop and floor:
            print(
                f"{store}: the hop step (agentloom-{store}-hopproc) is "
                f"{hop['ms_per_step'] / floor['ms_per_step']:.2f}x the floor measured in "
                "this sitting (issue 10's target: within 1.5x)"
            )


if __name__ == "__main__":
    main()
