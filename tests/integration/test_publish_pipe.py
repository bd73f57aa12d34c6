"""The relay's publish pipe against a real nats-server: one batch written at once, each
message's own answer in its slot (stored, duplicate, refused), what nats would refuse
refused before anything is written, and a relay that skips an event NATS can never take
while the rest of its batch goes out (issue 10: the pipe replaced publish_async)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from nats.errors import BadSubjectError
from nats.js.api import StreamConfig
from nats.js.errors import APIError, NoStreamResponseError

from loom_core import subjects
from loom_core.contracts import DeadLetter, EventRecord, StepScheduled
from loom_infra.publish_pipe import PublishPipe, header_block
from loom_infra.relay import Relay
from loom_infra.settings import StoreSettings
from loom_infra.store import open_event_store

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def _stream(js: Any, name: str, **config: Any) -> None:
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], **config))


async def test_a_batch_is_stored_in_order_with_each_ack_in_its_slot(js: Any) -> None:
    await _stream(js, "PIPE", duplicate_window=60.0)
    pipe = PublishPipe(js._nc)
    messages = [
        (f"PIPE.{i}", header_block([("Nats-Msg-Id", f"m{i}"), ("Loom-N", str(i))]), b"%d" % i)
        for i in range(5)
    ]
    acks = await asyncio.wait_for(await pipe.send(messages), 10)
    assert [ack.seq for ack in acks] == [1, 2, 3, 4, 5]
    assert not any(ack.duplicate for ack in acks) and {ack.stream for ack in acks} == {"PIPE"}
    held = await js.get_msg("PIPE", 3)
    assert (held.subject, held.data, held.headers) == (
        "PIPE.2", b"2", {"Nats-Msg-Id": "m2", "Loom-N": "2"},
    )  # fmt: skip
    # the same ids again (a republish after a crash): each one said to be a duplicate
    again = await asyncio.wait_for(await pipe.send(messages[1:3] + [messages[0]]), 10)
    assert [(ack.duplicate, ack.seq) for ack in again] == [(True, 2), (True, 3), (True, 1)]
    assert pipe.pending() == 0


async def test_a_refused_message_is_an_error_in_its_slot_and_the_others_are_stored(
    js: Any,
) -> None:
    await _stream(js, "SMALL", max_msg_size=64)
    pipe = PublishPipe(js._nc)
    hdr = header_block([("Nats-Msg-Id", "x")])
    sent = [("SMALL.a", hdr, b"1"), ("SMALL.b", hdr.replace(b"x", b"y"), b"z" * 200),
            ("SMALL.c", hdr.replace(b"x", b"w"), b"3"), ("NOSTREAM.d", hdr, b"4")]  # fmt: skip
    first, too_big, third, nowhere = await asyncio.wait_for(await pipe.send(sent), 10)
    assert (first.seq, third.seq) == (1, 2)
    assert isinstance(too_big, APIError) and too_big.err_code == 10054  # max_msg_size
    assert isinstance(nowhere, NoStreamResponseError)  # no stream takes that subject


async def test_what_nats_would_refuse_is_refused_before_anything_is_written(js: Any) -> None:
    await _stream(js, "SAFE")
    pipe = PublishPipe(js._nc)
    ok = ("SAFE.a", header_block([("K", "v")]), b"1")
    for subject in ("SAFE.a b", "SAFE.a\r\nPUB SAFE.x 1", "SAFE.\tx"):
        with pytest.raises(BadSubjectError):
            await pipe.send([ok, (subject, header_block([("K", "v")]), b"2")])
    # a line break in a header value cannot start a header of the sender's choosing
    injected = header_block([("Nats-Msg-Id", "id\r\nNats-Expected-Stream: OTHER")])
    (ack,) = await asyncio.wait_for(await pipe.send([("SAFE.b", injected, b"3")]), 10)
    assert ack.seq == 1  # the only message stored: nothing of the refused batches
    held = await js.get_msg("SAFE", 1)
    assert held.headers == {"Nats-Msg-Id": "idNats-Expected-Stream: OTHER"}


async def test_a_batch_given_up_leaves_nothing_pending(js: Any) -> None:
    await _stream(js, "LATE")
    pipe = PublishPipe(js._nc)
    future = await pipe.send([("LATE.a", header_block([("K", "v")]), b"1")])
    future.cancel()  # what the relay does on a timeout or a reconnect
    assert pipe.pending() == 0
    await js._nc.flush()  # its ack came (and was dropped) meanwhile
    (ack,) = await asyncio.wait_for(await pipe.send([("LATE.b", header_block([]), b"2")]), 10)
    assert ack.seq == 2


async def test_the_relay_skips_an_event_nats_cannot_take_and_publishes_the_rest(
    js: Any, sqlite_store_settings: StoreSettings
) -> None:
    """A run id with a space (written to the store by some other writer) made every
    publish of the relay fail, forever: now that event is dead-lettered, its run told,
    and the events around it go out in order."""
    store = open_event_store(sqlite_store_settings)
    told: list[tuple[str, str]] = []

    async def on_unpublishable(record: EventRecord, error: Any) -> None:
        told.append((record.event_id, error.code))

    records = [
        EventRecord(run_id=run, seq=1, at=T0, event=StepScheduled(step_id="s"))
        for run in ("run-a", "run b", "run-c")
    ]
    try:
        nids = store.append(records)
        relay = Relay(store, js, name="r", on_unpublishable=on_unpublishable)
        relay.offer(nids, records)
        assert await relay.publish_once() == 3
        assert relay.position == nids[-1]
        info = await js.stream_info(subjects.RUN_EVENTS_STREAM)
        held = [await js.get_msg(subjects.RUN_EVENTS_STREAM, s) for s in (1, 2)]
        assert info.state.messages == 2
        assert [m.subject for m in held] == [
            subjects.run_event("run-a", "step_scheduled"),
            subjects.run_event("run-c", "step_scheduled"),
        ]
        assert told == [("run b/1", "event_unpublishable")]
        letter = await js.get_last_msg(subjects.DLQ_STREAM, subjects.dead_letter("executor"))
        dead = msgspec.json.decode(letter.data, type=DeadLetter)
        assert dead.error.code == "event_unpublishable" and "run b/1" in dead.error.message
    finally:
        store.close()
