"""The relay publishes every stored event exactly once, in order, even when it is
killed mid-flight (SIGKILL) and restarted."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
import waiting  # type: ignore[import-not-found]  # tests/integration on sys.path
from nats.js.api import DeliverPolicy

from loom_core import subjects
from loom_core.contracts import EventRecord, StepScheduled
from loom_infra import bus
from loom_infra.natsserver import EmbeddedNats
from loom_infra.relay import Relay
from loom_infra.settings import StoreSettings
from loom_infra.store import open_event_store

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def seed(store_settings: StoreSettings, runs: int, per_run: int) -> list[str]:
    """Append events interleaved across runs; return event ids in store order."""
    store = open_event_store(store_settings)
    order: list[str] = []
    try:
        for seq in range(1, per_run + 1):
            batch = [
                EventRecord(
                    run_id=f"run-{r}", seq=seq, at=T0, event=StepScheduled(step_id=f"s{seq}")
                )
                for r in range(runs)
            ]
            store.append(batch)
            order.extend(rec.event_id for rec in batch)
    finally:
        store.close()
    return order


async def stream_count(js) -> int:
    return (await js.stream_info(subjects.RUN_EVENTS_STREAM)).state.messages


async def published_ids(js, expected: int) -> list[str]:
    sub = await js.subscribe(
        subjects.RUN_EVENTS_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        return [
            (await sub.next_msg(timeout=10)).headers[subjects.MSG_ID].rsplit("/", 1)[0]
            for _ in range(expected)
        ]
    finally:
        await sub.unsubscribe()


async def wait_count(js, at_least: int, timeout: float = 60.0) -> int:
    async def counted() -> int | None:
        n = await stream_count(js)
        return n if n >= at_least else None

    return await waiting.eventually(counted, f"{at_least} messages", timeout, 0.005)


async def js_ready(js, timeout: float = 30.0) -> None:
    """Until JetStream answers again after a restart (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await js.stream_info(subjects.RUN_EVENTS_STREAM)
            return
        except (TimeoutError, nats.errors.Error):
            assert loop.time() < deadline, "JetStream did not come back"


def start_relay(nats_url: str, data_dir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LOOM_NATS_URL": nats_url,
        "LOOM_STORE": "sqlite",
        "LOOM_DATA_DIR": str(data_dir),
        "LOOM_RELAY_BATCH": "20",
        "LOOM_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "loom_services.relay"], env=env, stdout=subprocess.DEVNULL
    )


async def test_relay_killed_mid_flight_publishes_everything_exactly_once_in_order(
    nats_server: EmbeddedNats, sqlite_store_settings: StoreSettings
) -> None:
    expected = seed(sqlite_store_settings, runs=4, per_run=1500)
    nc = await bus.connect(nats_server.url, "test")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    try:
        proc = start_relay(nats_server.url, sqlite_store_settings.data_dir)
        await wait_count(js, 300)
        proc.kill()  # SIGKILL: no chance to record its position
        proc.wait(10)
        at_kill = await stream_count(js)
        assert at_kill < len(expected), "relay finished before it could be killed"
        proc = start_relay(nats_server.url, sqlite_store_settings.data_dir)
        try:
            await wait_count(js, len(expected))
        finally:
            proc.terminate()
            proc.wait(10)
        assert await stream_count(js) == len(expected)  # nothing twice
        assert await published_ids(js, len(expected)) == expected  # all, in store order
    finally:
        await nc.close()


async def test_relay_that_lost_its_position_does_not_republish(
    nats_server: EmbeddedNats, sqlite_store_settings: StoreSettings
) -> None:
    """Crash between publish acks and the tracking write: the stream's last
    notification id, not only the tracking record, decides where to resume."""
    expected = seed(sqlite_store_settings, runs=2, per_run=50)
    store = open_event_store(sqlite_store_settings)
    nc = await bus.connect(nats_server.url, "test")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    try:
        first = Relay(store, js, name="r", batch=40)
        first.position = 0
        assert await first.publish_once() == 40
        # simulate the crash: tracking says 0 although 40 are published
        store.set_position("r2", 0)
        second = Relay(store, js, name="r2", batch=1000)
        assert await second.start_position() == 40
        second.position = await second.start_position()
        assert await second.publish_once() == len(expected) - 40
        assert await stream_count(js) == len(expected)
        assert await published_ids(js, len(expected)) == expected
    finally:
        await nc.close()
        store.close()


async def test_events_a_restarted_nats_lost_are_published_again(
    nats_server: EmbeddedNats, sqlite_store_settings: StoreSettings
) -> None:
    """LOOM_RUNS persists asynchronously (acked before it is on disk): a crash of
    nats-server can lose the newest acked events. After the reconnect the relay checks
    its latest publishes against the stream and publishes what is missing again."""
    expected = seed(sqlite_store_settings, runs=2, per_run=30)
    store = open_event_store(sqlite_store_settings)
    nc = await bus.connect(nats_server.url, "test")  # reconnects, as a service does
    js = nc.jetstream()
    await bus.ensure_streams(js)
    stop = asyncio.Event()
    relay = Relay(store, js, name="r")
    task = asyncio.ensure_future(relay.run(stop))
    try:
        await wait_count(js, len(expected))
        # what a crash before the server's write would lose: its newest messages
        last = (await js.stream_info(subjects.RUN_EVENTS_STREAM)).state.last_seq
        for seq in range(last - 9, last + 1):
            await js.delete_msg(subjects.RUN_EVENTS_STREAM, seq)
        assert await stream_count(js) == len(expected) - 10
        nats_server.kill()
        nats_server.start()
        await js_ready(js)
        await wait_count(js, len(expected))
        assert await published_ids(js, len(expected)) == expected  # all, in store order
        assert await stream_count(js) == len(expected)  # and nothing twice
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await nc.close()
        store.close()
