"""After a nats-server kill the relay publishes again at once, not after its ack timeout.

Seen in the chaos suite (``bench/chaos.py``): 5 of 26 nats-server kills were followed by
a 10.3 s recovery, each with ``relay publish failed at N: TimeoutError()`` in the
executor's log. The relay had published a batch whose acks the
killed server never sent; nats-py never fails such a future on a disconnect, so the
relay waited out its 10 s ack timeout while every run's events queued behind it.
Reproduced here deterministically: the server is stopped (SIGSTOP) so the relay's
publishes get no ack, then killed (-9) and restarted on the same port and data dir.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import waiting  # type: ignore[import-not-found]  # tests/integration on sys.path
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from loom_core import subjects
from loom_core.contracts import EventRecord, StepScheduled
from loom_infra import bus
from loom_infra.natsserver import EmbeddedNats
from loom_infra.relay import Relay
from loom_infra.settings import StoreSettings
from loom_infra.store import open_event_store

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ACK_TIMEOUT_S = 10.0  # the relay's default: what a stall costs


async def _bounded(check, what: str, bound_s: float) -> float:  # noqa: ANN001
    """Seconds until ``check()`` holds (fails past ``bound_s``): measured around the
    shared bounded wait."""
    start = time.monotonic()
    await waiting.eventually(check, what, bound_s, 0.01)
    return time.monotonic() - start


async def test_the_relay_republishes_as_soon_as_the_server_is_back(
    tmp_path: Path, sqlite_store_settings: StoreSettings
) -> None:
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    port = server.port
    nc = await bus.connect(server.url, "relay-test", persistent=True)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    store = open_event_store(sqlite_store_settings)
    relay = Relay(store, js, ack_timeout_s=ACK_TIMEOUT_S)
    stop = asyncio.Event()
    task = asyncio.ensure_future(relay.run(stop))

    async def stored_in_stream() -> int:
        return (await js.stream_info(subjects.RUN_EVENTS_STREAM)).state.messages

    try:
        first = [EventRecord(run_id="r", seq=1, at=T0, event=StepScheduled(step_id="a"))]
        relay.offer(store.append(first), first)
        await _bounded(lambda: _is(stored_in_stream, 1), "the first event", 10)

        await stopped(server)  # takes bytes, acks nothing
        more = [
            EventRecord(run_id="r", seq=seq, at=T0, event=StepScheduled(step_id=f"s{seq}"))
            for seq in range(2, 12)
        ]
        relay.offer(store.append(more), more)

        async def acks_pending() -> bool:
            return relay.acks_pending() > 0

        await _bounded(acks_pending, "the relay's publishes awaiting acks", 5)
        server.kill()
        server.port = port
        await asyncio.to_thread(server.start)

        took = await _bounded(lambda: _is(stored_in_stream, 11), "the rest republished", 30)
        # before: ~ACK_TIMEOUT_S; now the reconnect (0.2 s) and the relay's retry (0.5 s)
        assert took < ACK_TIMEOUT_S / 2, took
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        store.close()
        await nc.close()
        server.stop()


def _all_threads_stopped(pid: int) -> bool:
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        states.append(stat.rsplit(")", 1)[1].split()[0])
    return bool(states) and all(state in "tT" for state in states)


async def stopped(server: EmbeddedNats) -> None:
    """SIGSTOP the server and wait until every thread of it has stopped: ``kill``
    returns before the kernel stopped them all, and a thread still running may ack a
    publish made right after (seen once in CI)."""
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    await waiting.eventually(lambda: _all_threads_stopped(pid), "nats-server stopped", 5)


async def _is(count, n: int) -> bool:  # noqa: ANN001
    try:
        return await count() == n
    except Exception:  # the server is restarting: not yet
        return False


async def test_a_pending_publish_fails_at_once_when_the_server_dies(tmp_path: Path) -> None:
    """The tool-runner's and planner's result publish (request/reply on the stream's
    ack) waited its whole 5 s timeout after a kill: a 5.3 s recovery in the chaos suite.
    ``bus.publish_acked`` raises ConnectionError as the connection drops, so the
    message is nak'ed and redelivered at once instead."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    port = server.port
    nc = await bus.connect(server.url, "publish-test", persistent=True)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    try:
        subject = subjects.run_event("r", "step_scheduled")
        assert (await bus.publish_acked(js, subject, b"{}")).seq == 1
        await stopped(server)
        pending = asyncio.ensure_future(bus.publish_acked(js, subject, b"{}", timeout=5.0))
        done, _ = await asyncio.wait({pending}, timeout=0.3)
        assert not done  # no ack from a stopped server
        start = time.monotonic()
        server.kill()
        server.port = port
        await asyncio.to_thread(server.start)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(pending, 10)
        assert time.monotonic() - start < 4.0
        ack = await bus.publish_acked(js, subject, b"{}")  # and the next one goes through
        # (seq 1 again when the kill took the first: LOOM_RUNS persists asynchronously,
        # the relay republishes from the store what a restart lost)
        assert ack.stream == "LOOM_RUNS" and ack.seq >= 1
    finally:
        await nc.close()
        server.stop()


async def test_a_waiting_fetch_asks_again_as_soon_as_the_server_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted nats-server forgot every open pull request; the consumers waited for
    theirs to expire (``PULL_EXPIRES_S``) before asking again, up to 1 s after the
    restart in the chaos suite (issue 10, perf5). A reconnect wakes the waiting fetch,
    which asks again at once. Proved with a pull request that would stay open for 60 s:
    the message published after the restart arrives within the bound."""
    monkeypatch.setattr(bus, "PULL_EXPIRES_S", 60.0)
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()  # fsyncs every write
    port = server.port
    nc = await bus.connect(server.url, "pull-test", persistent=True)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="PULLTEST", subjects=["pulltest.>"]))
    config = ConsumerConfig(durable_name="pull-test", ack_policy=AckPolicy.EXPLICIT)
    pull = bus.OpenPull(await bus.pull_subscribe(js, "PULLTEST", config))
    try:
        fetching = asyncio.ensure_future(pull.fetch(1, timeout=30))  # its request stays open
        done, _ = await asyncio.wait({fetching}, timeout=0.3)
        assert not done
        server.kill()
        server.port = port
        await asyncio.to_thread(server.start)
        await waiting.eventually(lambda: nc.is_connected, "the client reconnected", 10, 0.01)
        start = time.monotonic()
        await bus.publish_acked(js, "pulltest.a", b"after the restart")
        (msg,) = await asyncio.wait_for(fetching, 10)
        assert msg.data == b"after the restart"
        assert time.monotonic() - start < 5.0  # not the 60 s the forgotten request had
        await msg.ack()
    finally:
        await nc.close()
        server.stop()


async def test_a_failed_publish_is_retried_at_the_reconnect_not_after_its_back_off(
    tmp_path: Path,
) -> None:
    """``back_or_stop``: the relay's back-off after a failed publish (and a consumer's
    after a failed fetch) ends at the connection's next reconnect, not after its whole
    timeout (60 s here)."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    port = server.port
    nc = await bus.connect(server.url, "backoff-test", persistent=True)
    stop = asyncio.Event()
    try:
        server.kill()
        await waiting.eventually(lambda: not nc.is_connected, "the kill noticed", 10, 0.01)
        backing_off = asyncio.ensure_future(bus.back_or_stop(nc, stop, 60.0))
        server.port = port
        await asyncio.to_thread(server.start)
        await asyncio.wait_for(backing_off, 10)  # the reconnect ended it
        assert nc.is_connected
    finally:
        await nc.close()
        server.stop()


async def test_a_message_failed_by_the_outage_comes_back_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result publish cut by a nats-server restart (``publish_acked``'s
    ConnectionError) was nak'ed with NAK_DELAY_S (0.5 s x deliveries): the chaos
    suite's nats recovery waited for it. Such a failure is the connection's, not the
    message's: redelivered after OUTAGE_NAK_DELAY_S. A handler's own failure keeps the
    longer delay (60 s here, so the bound below would catch a mix-up)."""
    monkeypatch.setattr(bus, "NAK_DELAY_S", 60.0)
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    nc = await bus.connect(server.url, "nak-test", persistent=True)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="NAKTEST", subjects=["naktest.>"]))
    deliveries: list[bytes] = []
    again = asyncio.Event()

    async def handle(msg):  # noqa: ANN001, ANN202
        deliveries.append(msg.data)
        if len(deliveries) == 1:
            return ConnectionError("the NATS connection dropped while publish acks were pending")
        again.set()
        return True

    consumer = bus.PullConsumer(
        js=js, service="test", stream="NAKTEST", durable="nak-test",
        filter_subjects=["naktest.>"], message_handler=handle, concurrency=4,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.ensure_future(consumer.run(stop))
    try:
        await bus.publish_acked(js, "naktest.a", b"cut by the outage")
        await asyncio.wait_for(again.wait(), 10)  # not the 60 s of a handler's failure
        assert deliveries == [b"cut by the outage"] * 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()
        server.stop()
