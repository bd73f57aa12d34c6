"""What the relay costs per committed step, alone: CPU and wall per commit of a step's
five events (scheduled, started, tool call requested and completed, completed), each
commit published and acked before the next, as in one sequential run (issue 10).

Real parts: a nats-server with JetStream (fsync always, LOOM_RUNS as provisioned by
``bus.ensure_streams``), a SQLite store. The store's append is timed apart and taken
out, so "relay cpu" is what the relay adds to the executor's process per step: encoding,
headers, the publishes, the acks, the bookkeeping. On a shared machine the CPU figure is
the steady one; rounds are reported with their median.

    .venv/bin/python bench/relaycost.py --commits 3000 --rounds 5

To compare with another version of the code, run the same script with that version's
``libs`` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loom_core.contracts import (
    EventRecord,
    RunEvent,
    StepCompleted,
    StepScheduled,
    StepStarted,
    ToolCallCompleted,
    ToolCallRequested,
)
from loom_infra import bus
from loom_infra.natsserver import EmbeddedNats
from loom_infra.relay import Relay
from loom_infra.settings import StoreSettings
from loom_infra.store import open_event_store

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def step_events(run_id: str, step: int) -> list[EventRecord]:
    """The five events one tool step commits (sizes like the bench's no-op steps)."""
    sid, key, at = f"s{step}", f"{run_id}/s{step}/1", T0 + timedelta(milliseconds=step)
    seq = 5 * step
    events: list[RunEvent] = [
        StepScheduled(step_id=sid),
        StepStarted(step_id=sid, attempt=1),
        ToolCallRequested(step_id=sid, attempt=1, tool="noop", input={"i": step},
                          idempotency_key=key),
        ToolCallCompleted(step_id=sid, attempt=1, idempotency_key=key, output={"i": step},
                          started_at=at, finished_at=at),
        StepCompleted(step_id=sid, output={"i": step}),
    ]  # fmt: skip
    return [
        EventRecord(run_id=run_id, seq=seq + i + 1, at=at, event=event)
        for i, event in enumerate(events)
    ]


class _Watched(Relay):
    """A relay that says when a batch went out (the bench waits on it, not on a timer)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.moved = asyncio.Event()

    async def publish_once(self) -> int:
        moved = await super().publish_once()
        if moved:
            self.moved.set()
        return moved


async def one_round(base: Path, server: EmbeddedNats, commits: int, warmup: int) -> dict:
    store = open_event_store(StoreSettings(kind="sqlite", data_dir=base))
    nc = await bus.connect(server.url, "relaycost")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    relay = _Watched(store, js, name=f"relay-{base.name}")
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    run_id = f"run-{base.name}"
    append_cpu = 0.0
    walls: list[float] = []
    try:
        for step in range(warmup + commits):
            if step == warmup:
                append_cpu = 0.0
                cpu0, wall0 = time.process_time(), time.perf_counter()
            records = step_events(run_id, step)
            t = time.process_time()
            nids = store.append(records)
            append_cpu += time.process_time() - t
            began = time.perf_counter()
            relay.moved.clear()
            relay.offer(nids, records)
            while relay.position < nids[-1]:
                await relay.moved.wait()  # bounded by the relay's ack timeout
                relay.moved.clear()
            walls.append(time.perf_counter() - began)
        cpu = time.process_time() - cpu0 - append_cpu
        wall = time.perf_counter() - wall0
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await nc.close()
        store.close()
    walls = walls[warmup:]
    return {
        "relay_cpu_ms": cpu * 1000 / commits,
        "wall_ms": wall * 1000 / commits,
        "publish_p50_ms": statistics.median(walls) * 1000,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        results = []
        for r in range(args.rounds):
            # a fresh server each round: its stream starts empty, as the store does
            server = EmbeddedNats(data_dir=base / f"nats{r}", port=-1).start()
            try:
                result = await one_round(base / f"r{r}", server, args.commits, args.warmup)
            finally:
                server.stop()
            results.append(result)
            print(
                f"round {r}: relay cpu {result['relay_cpu_ms']:.3f} ms/step  wall "
                f"{result['wall_ms']:.3f} ms/step  publish->acked p50 "
                f"{result['publish_p50_ms']:.3f} ms"
            )
        print(
            "median: relay cpu "
            f"{statistics.median(r['relay_cpu_ms'] for r in results):.3f} ms/step  "
            f"wall {statistics.median(r['wall_ms'] for r in results):.3f} ms/step  "
            "publish->acked p50 "
            f"{statistics.median(r['publish_p50_ms'] for r in results):.3f} ms"
        )


if __name__ == "__main__":
    asyncio.run(main())
