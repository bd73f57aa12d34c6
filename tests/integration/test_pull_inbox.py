"""A pull consumer's inbox goes with it (``bus.OpenPull.close``): a consumer that stops
(a partition lost) or is cancelled leaves no subscription on its connection, so one
started again (a partition gained back, ``partitioned.keep_consuming``) does not add one
each time. The durable consumer itself stays, with what it has not settled.

Synchronisation: on what the handler saw and JetStream's consumer state, within a bound."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from nats.aio.msg import Msg
from tests.integration.waiting import eventually

from loom_core import codec, subjects
from loom_infra import bus

pytestmark = pytest.mark.integration

STREAM = subjects.RUN_EVENTS_STREAM


def consumer_of(js: Any, durable: str, handled: list[int], *, concurrency: int = 0
                ) -> bus.PullConsumer:  # fmt: skip
    async def batch(msgs: Sequence[Msg]) -> list[bool | BaseException]:
        handled.extend(m.metadata.sequence.stream for m in msgs)
        return [True] * len(msgs)

    async def one(msg: Msg) -> None:
        handled.append(msg.metadata.sequence.stream)

    return bus.PullConsumer(
        js=js, service="test", stream=STREAM, durable=durable,
        filter_subjects=[f"loom.run.{durable}.>"],
        handler=None if concurrency else batch,
        message_handler=one if concurrency else None, concurrency=concurrency,
    )  # fmt: skip


@pytest.mark.parametrize("concurrency", [0, 4])
async def test_a_stopped_consumer_leaves_no_subscription(nc: Any, concurrency: int) -> None:
    js = nc.jetstream()
    durable = f"inbox{concurrency}"
    before = len(nc._subs)
    await js.publish(f"loom.run.{durable}.e", codec.encode({"n": 1}))
    handled: list[int] = []
    stop = asyncio.Event()
    task = asyncio.ensure_future(
        consumer_of(js, durable, handled, concurrency=concurrency).run(stop)
    )
    await eventually(lambda: len(handled) == 1, "the message handled")
    assert len(nc._subs) == before + 1  # the pull's inbox, while it runs
    stop.set()
    await asyncio.wait_for(task, 10.0)
    assert len(nc._subs) == before
    assert (await js.consumer_info(STREAM, durable)).config.durable_name == durable


async def test_a_consumer_stopped_and_started_again_keeps_one_subscription(nc: Any) -> None:
    """A partition lost and gained again, over and over (a replica's lease moving): each
    stop takes its inbox with it, and each new consumer takes up what is unsettled."""
    js = nc.jetstream()
    before = len(nc._subs)
    handled: list[int] = []
    for attempt in range(1, 4):
        await js.publish("loom.run.moving.e", codec.encode({"n": attempt}))
        stop = asyncio.Event()
        task = asyncio.ensure_future(consumer_of(js, "moving", handled).run(stop))
        await eventually(lambda n=attempt: len(handled) == n, f"message {attempt} handled")
        stop.set()
        await asyncio.wait_for(task, 10.0)
        assert len(nc._subs) == before, attempt


async def test_a_cancelled_consumer_leaves_no_subscription(nc: Any) -> None:
    js = nc.jetstream()
    before = len(nc._subs)
    task = asyncio.ensure_future(consumer_of(js, "cancelled", []).run(asyncio.Event()))
    await eventually(lambda: len(nc._subs) == before + 1, "the pull subscribed")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(nc._subs) == before
