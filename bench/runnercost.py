"""What one hop costs the tool-runner, alone: its process's CPU per call of a no-op tool,
taken as in one sequential run (issue 10, hopcpu). A stand-in executor dispatches each
request (``loom.dispatch``, as ``dispatch_early``), publishes its stream copy to LOOM_RUNS
(as the relay), waits for the runner's direct result and answers it ``recorded`` (as the
writer after its commit), then sends the next. The runner is a process of its own
(``python -m loom_services.toolrunner``, as ``bench/steps.py --runner-process``); its CPU
is read from /proc, so this script's own work is not in it; so is nats-server's, and the
messages the runner's connection sent and received (nats-server's ``/connz``), per call.

    .venv/bin/python bench/runnercost.py --calls 3000 --rounds 3

To compare with another version of the code, run the same script with that version's
``libs`` and ``services`` first on PYTHONPATH (the runner process inherits it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
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
    user, system = cpu_split(pid)
    return user + system


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def runner_messages(monitor_port: int) -> tuple[int, int]:
    """(messages the runner's connections sent, messages delivered to them) so far."""
    url = f"http://127.0.0.1:{monitor_port}/connz?limit=1000"
    with urllib.request.urlopen(url, timeout=5) as reply:
        conns = json.load(reply)["connections"]
    mine = [c for c in conns if c.get("name") == "loom-toolrunner"]
    return sum(c["in_msgs"] for c in mine), sum(c["out_msgs"] for c in mine)


def start_runner(url: str, data_dir: Path, profile: str | None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LOOM_NATS_URL": url,
        "LOOM_STORE": "sqlite",
        "LOOM_DATA_DIR": str(data_dir),
        "LOOM_INSECURE": "true",
        "LOOM_DIRECT_DISPATCH": "true",
        "LOOM_LOG_LEVEL": "ERROR",
    }
    if profile:  # the runner's event loop thread under cProfile while the rounds are timed
        return subprocess.Popen([sys.executable, "-c", PROFILED, profile], env=env)
    return subprocess.Popen([sys.executable, "-m", "loom_services.toolrunner"], env=env)


# ``--profile FILE``: the runner with a profiler that SIGUSR1 starts and SIGUSR2 stops and
# writes (the loop's thread only: where the messages are handled), so the figures are
# the timed rounds' and not the start's imports
PROFILED = """
import cProfile, runpy, signal, sys
profiler = cProfile.Profile()
def stop(*_):
    profiler.disable()
    profiler.dump_stats(sys.argv[1])
signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
signal.signal(signal.SIGUSR2, stop)
runpy.run_module("loom_services.toolrunner", run_name="__main__")
"""


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


@dataclass
class Round:
    """One round's figures, per call: CPU ms (runner user, runner system, nats-server),
    wall ms, and the runner connection's messages sent and received."""

    user: float
    system: float
    nats: float
    wall: float
    sent: float
    received: float

    @property
    def cpu(self) -> float:
        return self.user + self.system


async def one_round(
    url: str,
    pid: int,
    server_pid: int,
    monitor_port: int,
    round_no: int,
    count: int,
    profile: bool = False,
) -> Round:
    nc = await nats.connect(url)
    try:
        await calls(nc, f"run-runnercost{round_no:02d}warm000000", 50)  # warm up
        await asyncio.sleep(0.1)  # the warm-up's ledger backfill and acks are done
        (u0, s0), n0, wall0 = cpu_split(pid), cpu_of(server_pid), time.perf_counter()
        sent0, received0 = runner_messages(monitor_port)
        if profile:
            os.kill(pid, signal.SIGUSR1)
        await calls(nc, f"run-runnercost{round_no:02d}000000000", count)
        await asyncio.sleep(0.1)  # the last calls' acks are counted
        if profile:
            os.kill(pid, signal.SIGUSR2)
        wall = time.perf_counter() - wall0 - 0.1
        (u1, s1), n1 = cpu_split(pid), cpu_of(server_pid)
        sent1, received1 = runner_messages(monitor_port)
    finally:
        await nc.close()
    per = 1000 / count
    return Round(
        user=(u1 - u0) * per,
        system=(s1 - s0) * per,
        nats=(n1 - n0) * per,
        wall=wall * per,
        sent=(sent1 - sent0) / count,
        received=(received1 - received0) / count,
    )


async def main(count: int, rounds: int, profile: str | None) -> None:
    base = Path(tempfile.mkdtemp(prefix="loom-runnercost-"))
    server = EmbeddedNats(data_dir=base / "nats", port=-1, monitor=True).start()
    assert server.process is not None and server.monitor_port is not None
    runner = None
    try:
        nc = await nats.connect(server.url)
        await bus.ensure_streams(nc.jetstream())
        await nc.close()
        runner = start_runner(server.url, base / "data", profile)
        async with await LoomClient.connect(server.url) as client:
            await client.wait_ready(["toolrunner"])
        measured = [
            await one_round(
                server.url,
                runner.pid,
                server.process.pid,
                server.monitor_port,
                i,
                count,
                profile=profile is not None and i == rounds - 1,
            )
            for i in range(rounds)
        ]
    finally:
        if runner is not None:
            runner.terminate()
            runner.wait(10)
        server.stop()

    def median(values: list[float]) -> float:
        return statistics.median(values)

    cpu = [r.cpu for r in measured]
    print(
        f"tool-runner CPU per call: median {median(cpu):.3f} ms "
        f"(rounds: {', '.join(f'{c:.3f}' for c in cpu)}; "
        f"user {median([r.user for r in measured]):.3f}, "
        f"system {median([r.system for r in measured]):.3f}); "
        f"nats-server {median([r.nats for r in measured]):.3f} ms; "
        f"wall per call {median([r.wall for r in measured]):.3f} ms; "
        f"runner messages per call: sent {median([r.sent for r in measured]):.2f}, "
        f"received {median([r.received for r in measured]):.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", help="write the runner's cProfile stats to this file")
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.rounds, args.profile))
