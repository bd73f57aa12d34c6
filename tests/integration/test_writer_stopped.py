"""Work for a run host whose writer loop has ended gets a typed, retryable error at once,
never a wait without end (``runhost.WriterStopped``): the batch a stop cut, the work
queued behind it, and work submitted afterwards. Real stores (SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from loom_core.contracts import EventRecord, Plan, RunRequest, SleepStep
from loom_core.executor import Submission
from loom_infra.blocking import Blocking
from loom_infra.processes import wait_until
from loom_infra.settings import StoreSettings
from loom_infra.store import open_event_store
from loom_services.runhost import RunHost, WriterStopped

BOUND_S = 5.0  # a waiter that has not heard by then would have waited for ever


@pytest.fixture
async def host(store_settings: StoreSettings) -> AsyncIterator[RunHost]:
    store = open_event_store(store_settings)
    io = Blocking("writer-stopped", workers=1)
    yield RunHost(store, io, verify_on_load=False)
    await io.close()
    store.close()


def nap(run_id: str) -> Submission:
    return Submission(RunRequest(plan=Plan(steps=[SleepStep(id="z", seconds=600)]), run_id=run_id))


async def test_a_cancelled_writer_fails_its_batch_its_queue_and_later_work(host: RunHost) -> None:
    in_commit = asyncio.Event()
    held = asyncio.Event()  # never set: the batch stays in its commit until the cancel

    async def hold(records: list[EventRecord]) -> None:
        in_commit.set()
        await held.wait()

    host.before_commit = hold
    writer = asyncio.ensure_future(host.run(asyncio.Event()))
    first = asyncio.ensure_future(host.submit("ws-1", nap("ws-1")))
    await asyncio.wait_for(in_commit.wait(), BOUND_S)
    queued = asyncio.ensure_future(host.submit("ws-2", nap("ws-2")))
    queued_up = await wait_until(asyncio.Event(), lambda: host.queue.qsize() == 1, BOUND_S, 0.001)
    assert queued_up and not queued.done()  # behind the batch in its commit
    writer.cancel()
    done: Any = await asyncio.wait_for(
        asyncio.gather(first, queued, return_exceptions=True), BOUND_S
    )
    assert [type(e) for e in done] == [WriterStopped, WriterStopped]
    assert [e.info.code for e in done] == ["unavailable", "unavailable"]
    assert all(e.info.retryable for e in done)
    assert done[1].details == {"run_id": "ws-2"}
    assert writer.cancelled()
    # the cut batch may have advanced its actor past the store: it is forgotten
    assert "ws-1" not in host.actors
    with pytest.raises(WriterStopped, match="retry"):
        await asyncio.wait_for(host.submit("ws-3", nap("ws-3")), BOUND_S)
    # nothing the stop cut was stored (the hold kept the commit from happening)
    assert (await host.state_of("ws-1")).version == 0


async def test_a_stopped_writer_ends_at_its_next_work_and_refuses_it(host: RunHost) -> None:
    stop = asyncio.Event()
    writer = asyncio.ensure_future(host.run(stop))
    assert len(await host.submit("ws-4", nap("ws-4"))) > 0  # written while it runs
    stop.set()  # seen after the next batch: that batch is still written
    assert len(await asyncio.wait_for(host.submit("ws-5", nap("ws-5")), BOUND_S)) > 0
    await asyncio.wait_for(writer, BOUND_S)
    with pytest.raises(WriterStopped):
        await host.submit("ws-6", nap("ws-6"))
    assert (await host.state_of("ws-5")).version > 0
    assert (await host.state_of("ws-6")).version == 0
