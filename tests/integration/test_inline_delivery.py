"""Messages handed to a handler as nats-py's reader parses them (``bus.deliver_inline``,
issue 10, stackcpu: the relay's publish acks and the executor's direct tool results),
against a real nats-server: every message, in order, no task of the subscription's own;
what was queued before the hand-over goes first; a handler's exception is logged and
does not stop the connection's reads; unsubscribe and drain still work."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from tests.integration.waiting import eventually

from loom_infra import bus
from loom_infra.natsserver import EmbeddedNats

pytestmark = pytest.mark.integration


@pytest.fixture
async def pair(nats_server: EmbeddedNats) -> AsyncIterator[tuple[Any, Any]]:
    """The receiving and the sending connection: one and the same, as the executor's
    (its own publishes and their acks). The server takes a connection's SUB before its
    later PUBs. (Across two connections, ``flush()`` orders them only since
    ``loom_infra.nats_flush``: nats-py alone wrote the flush's PING before the SUB.)"""
    nc = await nats.connect(nats_server.url)
    yield nc, nc
    await nc.close()


class _Taker:
    """A handler keeping what it was given; ``wait(n)`` waits (bounded) for n."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.more = asyncio.Event()

    def __call__(self, msg: Msg) -> None:
        self.got.append(msg.data)
        self.more.set()

    async def wait(self, n: int) -> None:
        async with asyncio.timeout(10):
            while len(self.got) < n:
                self.more.clear()
                await self.more.wait()


async def _send(sender: Any, subject: str, payloads: list[bytes]) -> None:
    for data in payloads:
        await sender.publish(subject, data)
    await sender.flush()


async def test_every_message_is_handed_over_in_order_without_a_task(pair: Any) -> None:
    receiver, sender = pair
    taker = _Taker()
    sub = await bus.subscribe_inline(receiver, "inline.*", taker)
    await receiver.flush()
    assert sub._wait_for_msgs_task is None  # no task of its own
    payloads = [b"%d" % i for i in range(200)]
    await _send(sender, "inline.a", payloads)
    await taker.wait(200)
    assert taker.got == payloads
    assert sub.pending_msgs == 0 and sub.pending_bytes == 0  # nothing counted as queued
    assert sub.delivered == 200


async def test_what_was_queued_before_is_handed_over_first(pair: Any) -> None:
    """A subscription made with a callback, whose task holds its first message while
    the rest wait in its queue: the hand-over gives the queued ones to the handler
    first, in order, then every later one; the callback keeps only the one it had."""
    receiver, sender = pair
    release = asyncio.Event()
    in_callback: list[bytes] = []

    async def slow(msg: Msg) -> None:
        in_callback.append(msg.data)
        await release.wait()

    sub = await receiver.subscribe("inline.q", cb=slow)
    await receiver.flush()
    await _send(sender, "inline.q", [b"0", b"1", b"2", b"3"])
    await eventually(  # the task holds the first, the rest are queued
        lambda: bool(in_callback) and sub.pending_msgs == 3, "three messages queued"
    )
    taker = _Taker()
    bus.deliver_inline(sub, taker)
    assert taker.got == [b"1", b"2", b"3"]
    await _send(sender, "inline.q", [b"4", b"5"])
    await taker.wait(5)
    release.set()
    assert taker.got == [b"1", b"2", b"3", b"4", b"5"]
    assert in_callback == [b"0"]


async def test_a_failing_handler_is_logged_and_the_reads_go_on(
    pair: Any, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, sender = pair
    taker = _Taker()

    def handle(msg: Msg) -> None:
        if msg.data == b"bad":
            raise ValueError("refused by the handler")
        taker(msg)

    await bus.subscribe_inline(receiver, "inline.f", handle)
    await receiver.flush()
    with caplog.at_level(logging.ERROR, logger="loom.bus"):
        await _send(sender, "inline.f", [b"1", b"bad", b"2"])
        await taker.wait(2)
    assert taker.got == [b"1", b"2"]
    assert any("refused by the handler" in (r.exc_text or "") for r in caplog.records)

    # the connection still reads: a request on it is answered
    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await sender.subscribe("echo", cb=echo)
    await sender.flush()
    reply = await receiver.request("echo", b"still here", timeout=5)
    assert reply.data == b"still here" and receiver.is_connected


async def test_unsubscribe_and_drain_end_the_deliveries(pair: Any) -> None:
    receiver, sender = pair
    first, second = _Taker(), _Taker()
    one = await bus.subscribe_inline(receiver, "inline.u", first)
    two = await bus.subscribe_inline(receiver, "inline.d", second)
    await receiver.flush()
    await _send(sender, "inline.u", [b"a"])
    await _send(sender, "inline.d", [b"b"])
    await first.wait(1)
    await second.wait(1)
    await one.unsubscribe()
    await asyncio.wait_for(two.drain(), 10)
    await receiver.flush()
    await _send(sender, "inline.u", [b"late"])
    await _send(sender, "inline.d", [b"late"])
    probe = _Taker()  # a later subscription on the same connection sees its message,
    await bus.subscribe_inline(receiver, "inline.p", probe)  # so the late ones were read
    await receiver.flush()
    await _send(sender, "inline.p", [b"p"])
    await probe.wait(1)
    assert first.got == [b"a"] and second.got == [b"b"]
