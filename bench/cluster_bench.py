"""What replication costs: acknowledged JetStream publishes on one nats-server (R1) vs a
local 3-node cluster (R3), both with ``sync_interval: always``, on the streams the normal
provisioning creates. Measures wall time and the CPU of the nats-server processes (from
/proc, all nodes summed) per message, sequential (one publish, wait for its ack) and
pipelined (``window`` acks in flight, as the relay publishes).

    python bench/cluster_bench.py                 # 3 rounds x 2,000 messages each way
    python bench/cluster_bench.py --messages 500 --rounds 1

The figures size NATS for deploy/README.md ("Sizing"): a step publishes about six
JetStream messages (its run events through the relay, and a tool result into the inbox).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nats

from loom_core import subjects
from loom_infra.natsserver import EmbeddedNats, NatsCluster
from loom_infra.settings import OpsSettings
from loom_services.runtime import provision

TICKS = os.sysconf("SC_CLK_TCK")
PAYLOAD = b"x" * 600  # about one encoded run event


def cpu_s(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, in ticks
    return total / TICKS


async def publish(url: str, messages: int, window: int, tag: str) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    started = time.perf_counter()
    pending: list = []
    for i in range(messages):
        subject = subjects.inbox(f"bench-{tag}-{i % 50}", "tool")
        headers = {"Nats-Msg-Id": f"{tag}-{i}"}
        if window == 1:
            await js.publish(subject, PAYLOAD, headers=headers)
            continue
        pending.append(await js.publish_async(subject, PAYLOAD, headers=headers))
        if len(pending) >= window:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    elapsed = time.perf_counter() - started
    await nc.close()
    return elapsed


async def measure(
    url: str, pids: Sequence[int], messages: int, window: int, tag: str
) -> tuple[float, float]:
    before = cpu_s(pids)
    wall = await publish(url, messages, window, tag)
    return wall / messages * 1e3, (cpu_s(pids) - before) / messages * 1e3


async def main(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    single = EmbeddedNats(data_dir=base / "single", port=-1).start()
    cluster = NatsCluster(base / "cluster").start()
    try:
        await provision(single.url, None, OpsSettings(stream_replicas=1))
        await provision(cluster.urls[0], None, OpsSettings(stream_replicas=3))
        setups = {
            "R1, 1 node": (single.url, [single.process.pid]),  # type: ignore[union-attr]
            "R3, 3 nodes": (cluster.urls[0], [n.process.pid for n in cluster.nodes]),  # type: ignore[union-attr]
        }
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for round_ in range(args.rounds):  # interleaved, so load from others hits both
            for name, (url, pids) in setups.items():
                for window in (1, args.window):
                    tag = f"{name[:2]}-{window}-{round_}"
                    results.setdefault((name, window), []).append(
                        await measure(url, pids, args.messages, window, tag)
                    )
        print(
            f"{args.messages} acked publishes x {args.rounds} rounds, medians; "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print("| setup | in flight | wall ms/msg | msgs/s | nats CPU ms/msg (all nodes) |")
        print("|---|---:|---:|---:|---:|")
        for (name, window), samples in results.items():
            wall = statistics.median(s[0] for s in samples)
            cpu = statistics.median(s[1] for s in samples)
            print(f"| {name} | {window} | {wall:.3f} | {1e3 / wall:,.0f} | {cpu:.3f} |")
    finally:
        cluster.stop()
        single.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=64, help="acks in flight, pipelined")
    asyncio.run(main(parser.parse_args()))
