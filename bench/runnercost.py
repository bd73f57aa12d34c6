"""What one hop costs the tool-runner, alone: its process's CPU per call of a no-op tool,
taken as in one sequential run (issue 10, hopcpu). A stand-in executor dispatches each
request (``loom.dispatch``, as ``dispatch_early``), publishes its stream copy to LOOM_RUNS
(as the relay), waits for the runner's direct result and answers it ``recorded`` (as the
writer after its commit), then sends the next. The runner is a process of its own
(``python -m loom_services.toolrunner``, as ``bench/steps.py --runner-process``); its CPU
is read from /proc, so this script's own work is not in it.

    .venv/bin/python bench/runnercost.py --calls 3000 --rounds 3

To compare with another version of the code, run the same script with that version's
``libs`` and ``services`` first on PYTHONPATH (the runner process inherits it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg

from loom_core import codec, routes, subjects
from loom_core.contracts import EventRecord, InboxReceipt, ToolCallRequested
from loom_infra import bus
from loom_infra.client import LoomClient
from loom_infra.natsserver import EmbeddedNats

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def start_runner(url: str, data_dir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LOOM_NATS_URL": url,
        "LOOM_STORE": "sqlite",
        "LOOM_DATA_DIR": str(data_dir),
        "LOOM_INSECURE": "true",
        "LOOM_DIRECT_DISPATCH": "true",
        "LOOM_LOG_LEVEL": "ERROR",
    }
    return subprocess.Popen([sys.executable, "-m", "loom_services.toolrunner"], env=env)


async def calls(nc: nats.NATS, run_id: str, count: int) -> None:
    """``count`` calls one after another, each answered before the next is sent."""
    js = nc.jetstream()
    results: asyncio.Queue[Msg] = asyncio.Queue()
    await nc.subscribe(routes.TOOL_RESULT.subject(run_id=run_id), cb=results.put)
    recorded = codec.encode(InboxReceipt(recorded=True))
    for seq in range(1, count + 1):
        request = ToolCallRequested(
            step_id=f"s{seq}", attempt=1, tool="noop", input={},
            idempotency_key=f"{run_id}:s{seq}:1",
        )  # fmt: skip
        data = codec.encode(EventRecord(run_id=run_id, seq=seq, at=bus.now(), event=request))
        await bus.publish_now(nc, routes.TOOL_DISPATCH.subject(run_id=run_id), data)
        await js.publish(subjects.run_event(run_id, "tool_call_requested"), data)
        result = await asyncio.wait_for(results.get(), 30)
        await result.respond(recorded)


async def one_round(url: str, pid: int, round_no: int, count: int) -> tuple[float, float]:
    """(runner CPU ms per call, wall ms per call)"""
    nc = await nats.connect(url)
    try:
        await calls(nc, f"run-runnercost{round_no:02d}warm000000", 50)  # warm up
        cpu0, wall0 = cpu_of(pid), time.perf_counter()
        await calls(nc, f"run-runnercost{round_no:02d}000000000", count)
        cpu, wall = cpu_of(pid) - cpu0, time.perf_counter() - wall0
    finally:
        await nc.close()
    return cpu * 1000 / count, wall * 1000 / count


async def main(count: int, rounds: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="loom-runnercost-"))
    server = EmbeddedNats(data_dir=base / "nats", port=-1).start()
    runner = None
    try:
        nc = await nats.connect(server.url)
        await bus.ensure_streams(nc.jetstream())
        await nc.close()
        runner = start_runner(server.url, base / "data")
        async with await LoomClient.connect(server.url) as client:
            await client.wait_ready(["toolrunner"])
        measured = [await one_round(server.url, runner.pid, i, count) for i in range(rounds)]
    finally:
        if runner is not None:
            runner.terminate()
            runner.wait(10)
        server.stop()
    cpu = [c for c, _ in measured]
    wall = [w for _, w in measured]
    print(
        f"tool-runner CPU per call: median {statistics.median(cpu):.3f} ms "
        f"(rounds: {', '.join(f'{c:.3f}' for c in cpu)}); "
        f"wall per call {statistics.median(wall):.3f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.rounds))
