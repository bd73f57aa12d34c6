"""Reading long runs: a 100k-event run's state, history and trace, and a 100-step run's
history, on SQLite or PostgreSQL (issue 9.4).

Builds, directly through the stores (no services needed for that part):
- a foreach run of ~100k events decided by the real executor core, its events in the
  event store and its snapshots in the snapshot store exactly as the host saves them
  (every SNAPSHOT_EVERY events, the last LOOM_SNAPSHOTS_KEPT kept);
- a 100-step sequential run (100 no-op tool steps, ~600 events);
- a trace of 100k spans for a third run in the tracing service's span store.

Then starts a real nats-server and the executor and tracing services on those stores
(the relay's position set to the head, so it does not republish the history while
we measure) and prints:
- state load time with the latest snapshot (what ``RunHost._load`` does);
- the snapshot store's size;
- the history read end to end through the events API (``client.iter_events``: NATS
  request/reply, byte-bounded pages) with the first page's latency, and the same read
  from the store alone;
- the 100-step run's history read (``client.events``), median of 30;
- the first page of the 100k-span trace (``loom.api.trace``), median of 20, next to
  loading the whole trace from the store (what every page cost before keyset pages).

Wall times are noisy on a shared machine: each line also gives the CPU seconds this
process spent (client and services run in it).

    python bench/read_bench.py                    # SQLite
    python bench/read_bench.py --store postgres   # a local PostgreSQL (pgserver)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loom_core import subjects
from loom_core.contracts import (
    EventRecord,
    Plan,
    PlanProposed,
    RunRequest,
    RunSummary,
    SpanRecord,
    ToolCallRequested,
    ToolResult,
    ToolStep,
    TraceQuery,
    TraceReply,
)
from loom_core.executor import advance, initial_state
from loom_infra import bus
from loom_infra.client import LoomClient
from loom_infra.localpg import start_local_postgres
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings, StoreSettings
from loom_infra.spanstore import open_span_store
from loom_infra.store import open_event_store, open_snapshot_store
from loom_services.executor import ExecutorService
from loom_services.runtime import Stack
from loom_services.tracing import TracingService

HERE = Path(__file__).resolve().parent
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _snapshot_bench() -> Any:
    """The long-run builder of bench/snapshot_bench.py (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("snapshot_bench", HERE / "snapshot_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["snapshot_bench"] = module
    spec.loader.exec_module(module)
    return module


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def __str__(self) -> str:
        return f"{1000 * self.wall:.1f} ms wall, {1000 * self.cpu:.1f} ms CPU"


def chain_run(run_id: str, steps: int) -> list[EventRecord]:
    """A sequential run of ``steps`` no-op tool steps, decided by the executor core."""
    plan = Plan(steps=[
        ToolStep(id=f"s{i}", tool="noop", depends_on=[f"s{i - 1}"] if i else [])
        for i in range(steps)
    ])  # fmt: skip
    state, now, out = initial_state(run_id), T0, []

    def send(message: Any) -> list[ToolCallRequested]:
        nonlocal now
        now += timedelta(milliseconds=1)
        before = state.version
        produced = advance(state, message, now)
        out.extend(
            EventRecord(run_id=run_id, seq=seq, at=now, event=event)
            for seq, event in enumerate(produced, start=before + 1)
        )
        return [e for e in produced if isinstance(e, ToolCallRequested)]

    send(RunRequest(plan=plan))
    pending = send(PlanProposed(run_id=run_id, plan=plan))
    while pending:
        req = pending.pop(0)
        pending += send(
            ToolResult(
                run_id=run_id, step_id=req.step_id, attempt=req.attempt,
                idempotency_key=req.idempotency_key, ok=True, started_at=now,
                finished_at=now, output={"ok": True},
            )
        )  # fmt: skip
    return out


def spans(run_id: str, n: int) -> list[SpanRecord]:
    return [
        SpanRecord(
            trace_id="0" * 32, span_id=f"{i:016x}", run_id=run_id, name=f"step s{i}",
            start=T0 + timedelta(milliseconds=i), end=T0 + timedelta(milliseconds=i + 1),
            status="ok", attributes={"loom.step.id": f"s{i}", "loom.step.kind": "tool"},
        )
        for i in range(n)
    ]  # fmt: skip


async def median(times: int, make: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """Median wall ms of ``times`` awaits, and CPU ms per await."""
    walls = []
    cpu = time.process_time()
    for _ in range(times):
        t = time.perf_counter()
        await make()
        walls.append(1000 * (time.perf_counter() - t))
    return statistics.median(walls), 1000 * (time.process_time() - cpu) / times


async def measure(
    settings: StoreSettings, long_id: str, short_id: str, trace_id: str, n_spans: int
) -> None:
    server = EmbeddedNats(data_dir=settings.data_dir / "nats", port=-1).start()
    config = Settings(nats_url=server.url, store=settings, insecure=True)
    stack = Stack([ExecutorService(config), TracingService(config)], config)
    await stack.start()
    try:
        async with await LoomClient.connect(server.url) as client:
            await client.wait_ready(["executor", "tracing"])
            for page in (1000, 5000):
                first = None
                with Clock() as whole:
                    t = time.perf_counter()
                    n = 0
                    async for _ in client.iter_events(long_id, page=page, timeout=60):
                        if first is None:
                            first = 1000 * (time.perf_counter() - t)
                        n += 1
                print(
                    f"history of {n:,} events through the events API (pages of <= {page}): "
                    f"{whole}; first page {first:.1f} ms"
                )
            wall, cpu = await median(30, lambda: client.events(short_id))
            n = len(await client.events(short_id))
            print(
                f"100-step run ({n} events) history through the events API: "
                f"median {wall:.2f} ms wall, {cpu:.2f} ms CPU per read"
            )
            query = TraceQuery(run_id=trace_id, limit=1000)
            ask = lambda: bus.request(client.nc, subjects.API_TRACE, query, TraceReply, 30)  # noqa: E731
            reply = await ask()
            assert reply.error is None and len(reply.spans) == 1000, reply.error
            wall, cpu = await median(20, ask)
            print(
                f"first page (1000 spans) of a {n_spans:,}-span trace via loom.api.trace: "
                f"median {wall:.1f} ms wall, {cpu:.1f} ms CPU"
            )
    finally:
        await stack.close()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--events", type=int, default=100_000, help="approximate run length")
    parser.add_argument("--spans", type=int, default=100_000, help="spans of the long trace")
    parser.add_argument("--batch", type=int, default=500, help="events per append")
    args = parser.parse_args()
    snap = _snapshot_bench()
    base = Path(tempfile.mkdtemp(prefix="loom-readbench-"))
    stop_pg = None
    try:
        if args.store == "postgres":
            url, stop_pg = start_local_postgres(base / "pg")
            settings = StoreSettings(kind="postgres", data_dir=base, postgres_url=url)
        else:
            settings = StoreSettings(kind="sqlite", data_dir=base / "data")
        long_id, short_id, trace_id = "long-run", "short-run", "long-trace"
        events, snaps = open_event_store(settings), open_snapshot_store(settings)
        try:
            probe = snap.record("probe", 100, None, {})[0]
            items = max(1, round(args.events * 100 / probe))
            with Clock() as built:
                n, _, saved, largest = snap.record(long_id, items, events, {"s": snaps}, args.batch)
            print(
                f"{args.store}: foreach of {items:,} items, {n:,} events decided and stored "
                f"({built}); {saved} snapshots taken, the largest {largest / 1e6:.2f} MB"
            )
            events.append(chain_run(short_id, 100))
            size, split = snap.stored_bytes(settings)
            print(
                f"snapshot store: {len(snaps.taken(long_id))} kept, {size / 1e6:.1f} MB ({split})"
            )
            with Clock() as loading:
                load_s, tail = snap.load(events, snaps, long_id)
            print(f"state load with snapshot: {loading} (snapshot + {tail} events + verify)")
            with Clock() as reading:
                after, count = 0, 0
                while True:
                    chunk = events.load(long_id, after, 5000)
                    count += len(chunk)
                    if len(chunk) < 5000:
                        break
                    after = chunk[-1].seq
            print(f"history of {count:,} events from the store alone (5000 a read): {reading}")
            # the relay starts at the head: it must not republish while we measure
            events.set_position("relay", events.max_notification_id())
        finally:
            events.close()
            snaps.close()
        traces = open_span_store(settings)
        try:
            with Clock() as stored:
                summary = RunSummary(run_id=trace_id, status="completed", started_at=T0)
                traces.replace_trace(trace_id, spans(trace_id, args.spans), summary)
            with Clock() as whole:
                loaded = traces.trace(trace_id)
            print(
                f"span store: {len(loaded):,} spans of one run stored ({stored}); loading the "
                f"whole trace (what every page cost before): {whole}"
            )
            with Clock() as page:
                traces.trace_page(trace_id, None, 1000)
            print(f"one page of 1000 spans from the store (keyset): {page}")
        finally:
            traces.close()
        asyncio.run(measure(settings, long_id, short_id, trace_id, args.spans))
    finally:
        if stop_pg is not None:
            stop_pg()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
