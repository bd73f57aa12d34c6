"""What a JetStream delivery's reply subject tells a read model (``bus.num_pending``,
``bus.stored_at_ns``), read against a real nats-server: the tracing service decides from
them whether it is behind (``loom_infra.cpu_priority``), so the pending count must count
down to the end of what is stored, and the time must be when the message was stored, not
when it was delivered (the same on a redelivery)."""

from __future__ import annotations

import time
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig

from loom_infra import bus

STREAM = "DELIVERY_TOKENS"
MESSAGES = 5
BOUND_S = 5.0


async def test_pending_counts_down_and_the_time_is_the_store_time(js: Any) -> None:
    await js.add_stream(name=STREAM, subjects=["tokens.>"])
    before = time.time_ns()
    for i in range(MESSAGES):
        await js.publish(f"tokens.{i}", b"x", stream=STREAM)
    after = time.time_ns()
    sub = await js.pull_subscribe(
        "tokens.>", durable="reader", stream=STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
    )  # fmt: skip
    msgs = await sub.fetch(MESSAGES, timeout=BOUND_S)
    assert [bus.num_pending(m) for m in msgs] == list(range(MESSAGES - 1, -1, -1))
    stored = [bus.stored_at_ns(m) for m in msgs]
    assert all(before <= s <= after for s in stored), (before, stored, after)
    assert stored == sorted(stored)
    # redelivered (a nak): the same store time, so an old message reads as old
    await msgs[0].nak()
    again = (await sub.fetch(1, timeout=BOUND_S))[0]
    assert again.metadata.num_delivered == 2
    assert bus.stored_at_ns(again) == stored[0]
