"""A partition's inbox consumer is started again when it fails while the partition is
ours (``partitioned.keep_consuming``): a JetStream call a cluster failover left unanswered
ended it for good once (CI, test_jetstream_cluster.py), and that partition's runs waited
for a process restart."""

from __future__ import annotations

import asyncio
import logging

import pytest

from loom_services import partitioned
from loom_services.partitioned import keep_consuming

BOUND_S = 5.0


class FailingTwice:
    """A consumer whose first two runs fail as a failover made them fail; the third
    consumes until stopped."""

    def __init__(self) -> None:
        self.runs = 0
        self.failed = asyncio.Event()
        self.consuming = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        self.runs += 1
        if self.runs <= 2:
            self.failed.set()
            raise TimeoutError("nats: timeout")
        self.consuming.set()
        await stop.wait()


async def test_a_failed_consumer_is_started_again_until_stopped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(partitioned, "RESTART_FIRST_S", 0.01)
    consumer, stop = FailingTwice(), asyncio.Event()
    with caplog.at_level(logging.WARNING, "loom.partitions"):
        task = asyncio.ensure_future(keep_consuming(consumer, stop, "executor-inbox-p3"))
        await asyncio.wait_for(consumer.consuming.wait(), BOUND_S)
        assert consumer.runs == 3 and not task.done()
        stop.set()
        await asyncio.wait_for(task, BOUND_S)
    assert consumer.runs == 3  # a stop ends it; it is not started again
    assert caplog.text.count("executor-inbox-p3 stopped (TimeoutError") == 2


async def test_a_stop_during_the_back_off_ends_it_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partitioned, "RESTART_FIRST_S", 60.0)
    consumer, stop = FailingTwice(), asyncio.Event()
    task = asyncio.ensure_future(keep_consuming(consumer, stop, "executor-inbox-p0"))
    await asyncio.wait_for(consumer.failed.wait(), BOUND_S)  # now backing off for 60 s
    stop.set()
    await asyncio.wait_for(task, BOUND_S)
    assert consumer.runs == 1


async def test_a_cancel_is_not_taken_for_a_failure() -> None:
    class Blocked:
        runs = 0
        started = asyncio.Event()

        async def run(self, stop: asyncio.Event) -> None:
            self.runs += 1
            self.started.set()
            await asyncio.Event().wait()

    consumer = Blocked()
    task = asyncio.ensure_future(keep_consuming(consumer, asyncio.Event(), "executor-inbox-p1"))
    await asyncio.wait_for(consumer.started.wait(), BOUND_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert consumer.runs == 1
