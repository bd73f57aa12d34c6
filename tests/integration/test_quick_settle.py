"""A pull consumer's quick settle (``bus.PullConsumer.quick``, issue 10, runnercpu), on a
real nats-server: the tool-runner knows the stream copy of a request it took from its
dispatch by its bytes, and settles it without a task: acked at once when answered, or
as the handling it waits for ends, with that handling's outcome (an ack, or a nak and a
redelivery to the handler when it failed), kept alive by ``in_progress`` meanwhile.
Anything the quick look does not know goes to the handler as before. Its acks ride in
the connection's next write (``bus.publish_lazily``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
from tests.integration.waiting import eventually

from loom_infra import bus
from loom_infra.natsserver import EmbeddedNats

pytestmark = pytest.mark.integration

STREAM, SUBJECT = "QUICKSETTLE", "quicksettle.work"
BOUND_S = 10.0


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Any]:
    nc = await bus.connect(nats_server.url, "quicksettle-test", persistent=False)
    await nc.jetstream().add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT]))
    yield nc
    await nc.close()


async def settled(js: Any) -> bool:
    info = await js.consumer_info(STREAM, "quick")
    return not (info.num_ack_pending or info.num_pending)


async def test_a_quick_settle_acks_waits_or_hands_over(nc: Any) -> None:
    js = nc.jetstream()
    loop = asyncio.get_running_loop()
    handled: list[bytes] = []
    waiting: dict[bytes, asyncio.Future[bool | BaseException]] = {
        b"waits": loop.create_future(),
        b"fails": loop.create_future(),
    }
    looked: list[tuple[bytes, int]] = []

    def quick(msg: Msg) -> bool | asyncio.Future[bool | BaseException] | None:
        looked.append((msg.data, msg.metadata.num_delivered))
        if msg.data == b"answered":
            return True
        if msg.metadata.num_delivered == 1:
            return waiting.get(msg.data)
        return None  # a redelivery: the handler's

    async def handler(msg: Msg) -> bool:
        handled.append(msg.data)
        return True

    consumer = bus.PullConsumer(
        js, "toolrunner", STREAM, "quick", [SUBJECT],
        message_handler=handler, concurrency=4, quick=quick, ack_wait_s=0.6,
    )  # fmt: skip
    progress: list[bytes] = []  # the in_progress acks the consumer sends (+WPI)

    async def noted(msg: Msg) -> None:
        progress.append(msg.data)

    watch = await nc.subscribe(f"$JS.ACK.{STREAM}.quick.>", cb=noted)
    stop = asyncio.Event()
    task = asyncio.ensure_future(consumer.run(stop))
    try:
        for data in (b"answered", b"waits", b"fails", b"unknown"):
            await js.publish(SUBJECT, data)
        await eventually(lambda: len(looked) >= 4, "the quick look at each message")
        # the one it does not know goes to the handler; the answered one is acked
        await eventually(lambda: handled == [b"unknown"], "the handler to get the unknown one")

        async def two_pending() -> bool:  # the two waiting for their handling
            return (await js.consumer_info(STREAM, "quick")).num_ack_pending == 2

        await eventually(two_pending, "the answered and the handled one acked")
        # a handling longer than the ack wait is kept alive by in_progress (every 0.2 s):
        # after 4 of each (0.8 s > the ack wait) neither was redelivered
        await eventually(lambda: progress.count(b"+WPI") >= 8, "in_progress beats")
        assert [d for d, n in looked if n > 1] == []
        waiting[b"waits"].set_result(True)
        waiting[b"fails"].set_result(RuntimeError("the handling failed"))
        # the failed one is naked and comes back, to the handler this time
        await eventually(lambda: b"fails" in handled, "the failed one's redelivery")
        await eventually(lambda: settled(js), "every message acked", bound_s=10)
        assert sorted(handled) == [b"fails", b"unknown"]
    finally:
        stop.set()
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        await watch.unsubscribe()


async def test_a_lazy_publish_rides_with_the_next_write_or_goes_within_its_linger(
    nats_server: EmbeddedNats,
) -> None:
    """``bus.publish_lazily`` (the quick settle's acks): the message waits in the outgoing
    buffer for the connection's next write, and goes by its own timer when none comes."""
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("lazy.>")
        bus.publish_lazily(nc, "lazy.a", b"1", 30.0)
        bus.publish_soon(nc, "lazy.b", b"2")
        first = await sub.next_msg(timeout=BOUND_S)
        assert first.subject == "lazy.a"
        assert nc in bus._LAZY  # its own timer (30 s) has not fired: it rode with lazy.b
        assert (await sub.next_msg(timeout=BOUND_S)).subject == "lazy.b"
        bus._LAZY.pop(nc).cancel()
        bus.publish_lazily(nc, "lazy.c", b"3", 0.05)  # nothing else written: its timer
        assert (await sub.next_msg(timeout=BOUND_S)).subject == "lazy.c"
        assert nc not in bus._LAZY
    finally:
        await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        bus.publish_lazily(nc, "lazy.closed", b"x", 0.05)


async def test_a_request_now_is_answered_times_out_or_has_no_responder_as_nats_py_says(
    nats_server: EmbeddedNats,
) -> None:
    """``bus.request_now`` (the tool-runner's direct result): written at once with what
    the buffer holds (a lazy ack goes first), answered through nats-py's response
    subscription; no answer is ``nats.errors.TimeoutError``, no subscriber at all
    ``NoRespondersError``, as ``nc.request`` says."""
    nc = await nats.connect(nats_server.url)
    other = await nats.connect(nats_server.url)
    try:
        order: list[str] = []

        async def answer(msg: Msg) -> None:
            order.append(msg.subject)
            if msg.subject == "ask.me":
                await msg.respond(b"yes:" + msg.data)

        await other.subscribe("ask.>", cb=answer)
        await other.flush()
        bus.publish_lazily(nc, "ask.lazy", b"", 30.0)
        reply = await bus.request_now(nc, "ask.me", b"1", BOUND_S)
        assert reply.data == b"yes:1"
        assert order == ["ask.lazy", "ask.me"]  # the buffered one went with it, first
        assert not nc._resp_map  # nothing left waiting
        with pytest.raises(nats.errors.TimeoutError):
            await bus.request_now(nc, "ask.silent", b"2", 0.2)
        with pytest.raises(nats.errors.NoRespondersError):
            await bus.request_now(nc, "nobody.listens", b"3", BOUND_S)
        assert not nc._resp_map
    finally:
        await other.close()
        await nc.close()
