"""``bus.publish_now`` against a real nats-server (the executor's early dispatch, issue
10): the message and whatever the connection had pending are written in one go, in
order, before it returns, without waking the connection's flusher; what nats-py refuses
and a connection that is not up answer False and send nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from tests.integration.waiting import eventually

from loom_infra import bus
from loom_infra.natsserver import EmbeddedNats

pytestmark = pytest.mark.integration


async def test_written_at_once_after_what_was_pending(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        got: list[tuple[str, bytes]] = []
        both = asyncio.Event()

        async def take(msg: Msg) -> None:
            got.append((msg.subject, msg.data))
            if len(got) == 2:
                both.set()

        await nc.subscribe("now.*", cb=take)
        await nc.flush()
        nc._pending.append(b"PUB now.first  5\r\nfirst\r\n")  # pending, not yet written
        nc._pending_data_size += 24
        assert await bus.publish_now(nc, "now.second", b"second")
        # on the socket already: nothing left pending, no flush asked of the flusher
        assert nc._pending == [] and nc._pending_data_size == 0
        assert nc._flush_queue.empty()
        await asyncio.wait_for(both.wait(), 10)
        assert got == [("now.first", b"first"), ("now.second", b"second")]
        assert nc.stats["out_msgs"] >= 1
    finally:
        await nc.close()


async def test_refused_or_not_connected_is_false_and_sends_nothing(
    nats_server: EmbeddedNats,
) -> None:
    nc = await nats.connect(nats_server.url)
    seen: list[Any] = []

    async def take(msg: Msg) -> None:
        seen.append(msg.data)

    await nc.subscribe("now.>", cb=take)
    await nc.flush()
    assert not await bus.publish_now(nc, "now.bad subject", b"x")
    assert not await bus.publish_now(nc, "now.big", b"x" * (nc.max_payload + 1))
    assert nc._pending == []
    await nc.publish("now.marker", b"marker")  # everything before it has arrived with it
    await nc.flush()
    await eventually(lambda: seen, "the marker")
    assert seen == [b"marker"]
    await nc.close()
    assert not await bus.publish_now(nc, "now.closed", b"x")
