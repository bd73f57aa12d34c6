"""No stored event stays undelivered to a durable consumer after nats-server lost the
tail of LOOM_RUNS (it persists asynchronously: acked before it is on disk).

A SIGKILL soon after the newest events were published can lose them from the stream
but keep a consumer's position (measured: a kill within ~100 ms of the writes often
leaves the stream ending behind its consumers): the relay publishes the lost events
again (the store is the truth), and without fillers they take the sequence numbers the
consumer already passed and it never delivers them (found by bench/chaos.py --seed 32:
a run stuck at ``tool_call_requested``). A kill meets that state only by timing (and a
clean restart lines the consumers up with the stream), so these tests build it
deterministically: a consumer starting beyond the stream's end, the newest events
deleted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import nats
import pytest
import waiting  # type: ignore[import-not-found]  # tests/integration on sys.path
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from tests.integration.test_relay import T0

from loom_core import codec, subjects
from loom_core.contracts import EventRecord, StepScheduled, StreamFiller
from loom_infra import bus
from loom_infra.natsserver import EmbeddedNats
from loom_infra.relay import Relay
from loom_infra.settings import StoreSettings
from loom_infra.store import EventStore, open_event_store

pytestmark = pytest.mark.integration

# one consumer takes one kind (as the tool-runner takes tool_call_requested), one takes
# every run event (as tracing does): neither filter matches a filler
CONSUMERS = {"one-kind": "loom.run.*.step_scheduled", "every-kind": "loom.run.*.*"}
RUNS = 3


def append(store: EventStore, first_seq: int, count: int) -> set[str]:
    """``count`` events of each of RUNS runs from ``first_seq``; their event ids."""
    ids: set[str] = set()
    for seq in range(first_seq, first_seq + count):
        batch = [
            EventRecord(run_id=f"run-{r}", seq=seq, at=T0, event=StepScheduled(step_id=f"s{seq}"))
            for r in range(RUNS)
        ]
        store.append(batch)
        ids.update(record.event_id for record in batch)
    return ids


class Watcher:
    """The durable consumers, and the event ids each delivered."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.got: dict[str, list[str]] = {name: [] for name in CONSUMERS}
        self.subs: dict[str, object] = {}

    async def subscribe(self) -> None:
        for name, filter_ in CONSUMERS.items():
            self.subs[name] = await self.js.pull_subscribe(
                filter_, durable=name, stream=subjects.RUN_EVENTS_STREAM
            )

    async def take(self, name: str, wanted: set[str], bound_s: float = 30.0) -> None:
        """Fetch and ack until ``name`` delivered every id of ``wanted`` (bounded)."""
        sub = self.subs[name]
        async with asyncio.timeout(bound_s):
            while not wanted <= set(self.got[name]):
                try:
                    msgs = await sub.fetch(100, timeout=0.5)  # type: ignore[attr-defined]
                except (TimeoutError, nats.errors.Error):
                    continue  # nothing yet, or the server is coming back
                for msg in msgs:
                    assert msg.subject != subjects.RUN_GAP, f"{name} was given a filler"
                    self.got[name].append(codec.decode_event(msg.data).event_id)
                    await msg.ack()
        await self.js._nc.flush()  # the acks reached the server

    async def take_all(self, wanted: set[str]) -> None:
        for name in CONSUMERS:
            await self.take(name, wanted)

    async def positions(self) -> dict[str, int]:
        out = {}
        for name in CONSUMERS:
            info = await self.js.consumer_info(subjects.RUN_EVENTS_STREAM, name)
            out[name] = info.delivered.stream_seq
        return out


async def stream_events(js: JetStreamContext) -> tuple[list[str], int]:
    """The event ids LOOM_RUNS holds, in order, and how many fillers it holds."""
    info = await js.stream_info(subjects.RUN_EVENTS_STREAM)
    sub = await js.subscribe(
        subjects.RUN_EVENTS_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    ids: list[str] = []
    fillers = 0
    try:
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=10)
            if msg.subject == subjects.RUN_GAP:
                msgspec.json.decode(msg.data, type=StreamFiller)  # a typed message
                fillers += 1
            else:
                ids.append(codec.decode_event(msg.data).event_id)
    finally:
        await sub.unsubscribe()
    return ids, fillers


@asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[Relay]:
    stop = asyncio.Event()
    task = asyncio.ensure_future(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)


async def wait_stream(js: JetStreamContext, at_least: int, bound_s: float = 30.0) -> None:
    async def stored() -> bool:
        info = await js.stream_info(subjects.RUN_EVENTS_STREAM)
        return info.state.messages >= at_least

    await waiting.eventually(stored, f"{at_least} messages in the stream", bound_s, 0.005)


PART = 10  # events per run
LOST = 7  # of the newest


async def beyond_the_end(js: JetStreamContext, w: Watcher, position: int) -> None:
    """The consumers, standing at ``position``: what a crash that lost the stream's tail
    but not their positions leaves (a kill reproduces it only by timing: nats-server
    writes an asynchronous stream out within ~100 ms, and a consumer's position too)."""
    for name, filter_ in CONSUMERS.items():
        w.subs[name] = await js.pull_subscribe(
            filter_, durable=name, stream=subjects.RUN_EVENTS_STREAM,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=position + 1
            ),
        )  # fmt: skip
    assert min((await w.positions()).values()) == position


async def test_a_running_relay_publishes_what_a_restart_lost_past_the_consumers(
    nats_server: EmbeddedNats, sqlite_store_settings: StoreSettings
) -> None:
    """The chaos case, built deterministically: the relay runs through a reconnect
    after which the stream lacks its newest events (deleted) and the consumers stand
    past its end (a server restart would line them up again, so the relay's connection
    is cut instead: a network drop). Events stored while it was down went out then:
    nats-py sends them when it reconnects, before the relay's check, at sequences the
    consumers passed. Every event must reach both consumers, once."""
    store = open_event_store(sqlite_store_settings)
    relay_nc = await bus.connect(nats_server.url, "relay")  # reconnects, as a service does
    nc = await bus.connect(nats_server.url, "test")
    js = nc.jetstream()
    try:
        await bus.ensure_streams(js)
        async with running(Relay(store, relay_nc.jetstream(), name="r", idle_poll_s=0.2)) as relay:
            first = append(store, 1, PART)
            relay.wake()
            await wait_stream(js, len(first))
            last = (await js.stream_info(subjects.RUN_EVENTS_STREAM)).state.last_seq
            lost = set()
            for seq in range(last - LOST + 1, last + 1):
                msg = await js.get_msg(subjects.RUN_EVENTS_STREAM, seq)
                lost.add(codec.decode_event(msg.data).event_id)
                await js.delete_msg(subjects.RUN_EVENTS_STREAM, seq)
            w = Watcher(js)
            await beyond_the_end(js, w, last + 4 * PART * RUNS)
            reconnects = relay_nc.stats["reconnects"]
            relay_nc._transport._io_writer.transport.abort()  # type: ignore[union-attr]
            while_down = append(store, PART + 1, PART)
            relay.wake()  # it publishes them into the client's buffer
            await w.take_all(lost | while_down)  # bounded: fails when one is skipped
            assert relay_nc.stats["reconnects"] > reconnects
        for name in CONSUMERS:  # each once
            assert sorted(w.got[name]) == sorted(lost | while_down), name
        ids, fillers = await stream_events(js)
        assert sorted(ids) == sorted(first | while_down)  # each once on the stream
        assert fillers > 0
    finally:
        await nc.close()
        await relay_nc.close()
        store.close()


async def test_a_starting_relay_publishes_past_a_consumer_beyond_the_stream_end(
    nats_server: EmbeddedNats, sqlite_store_settings: StoreSettings
) -> None:
    """Deterministic: the state a crash leaves (a consumer whose position is past the
    stream's last sequence, events in the store the stream lost) built with a consumer
    that starts beyond the end. A relay starting then fills the gap and publishes."""
    store = open_event_store(sqlite_store_settings)
    nc = await bus.connect(nats_server.url, "test")
    js = nc.jetstream()
    try:
        await bus.ensure_streams(js)
        on_stream = append(store, 1, PART)
        async with running(Relay(store, js, name="r", idle_poll_s=0.2)):
            await wait_stream(js, len(on_stream))
        last = (await js.stream_info(subjects.RUN_EVENTS_STREAM)).state.last_seq
        lost = append(store, PART + 1, 2)  # stored, never on the new stream
        beyond = last + 2 * len(lost)  # the consumer's position the crash kept
        w = Watcher(js)
        await beyond_the_end(js, w, beyond)
        async with running(Relay(store, js, name="r", idle_poll_s=0.2)):
            await w.take_all(lost)  # bounded: without fillers they sit below ``beyond``
        ids, fillers = await stream_events(js)
        assert sorted(ids) == sorted(on_stream | lost)
        assert fillers == beyond - last
        for name in CONSUMERS:
            assert sorted(w.got[name]) == sorted(lost)  # each once, nothing else
    finally:
        await nc.close()
        store.close()
