"""A stop ends every consumer at once, also one whose next message has just arrived.

Python 3.11's ``asyncio.wait_for`` returns its result instead of raising when the task
awaiting it is cancelled just after what it waited for completed (CPython gh-86296,
fixed in 3.12 by a rewrite over ``asyncio.timeout``). The pull consumers fetched each
message through it, so a stop that came while a message was between the subscription
and the fetch was lost: the consumer handed the message to its handler as if never
cancelled. The executor's handler then waited for a writer the same stop had just
cancelled: the partition's consumer never ended (the failover test's "publishing
paused 2.05 s on a clean stop", one stop in five; the process then waited out the
runtime's 10 s and was killed). docs/decisions.md, "what held a partition consumer's
cancellation on a clean stop", has the evidence.

Each test acts at that moment on purpose: it polls once per event-loop iteration (the
moment lasts two iterations and no event marks it) until the consumer's subscription
holds the message the fetch has not taken yet, and cancels or stops right then. On
main (4c751b2) each of them failed every time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
from tests.integration.waiting import eventually

from loom_core import codec, partitions, routes, subjects
from loom_core.contracts import ToolResult
from loom_infra import bus
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings, StoreSettings
from loom_services.executor import ExecutorService
from loom_services.runtime import Stack

pytestmark = pytest.mark.integration

# how long a cancelled consumer may take to end: it has nothing to finish
ENDS_WITHIN_S = 0.3
STREAM, SUBJECT = "CLEANSTOP", "cleanstop.work"


def where(task: asyncio.Future[Any]) -> str:
    """The awaits ``task`` is suspended in, outermost first (``get_stack`` shows only the
    outermost coroutine)."""
    frames, coro = [], getattr(task, "get_coro", lambda: None)()
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        frames.append(f"{coro.cr_frame.f_code.co_name}:{coro.cr_frame.f_lineno}")
        coro = coro.cr_await
    return " > ".join(frames)


async def act_on_arrival(
    sub: Any, act: Callable[[], None], publish: Callable[[], Any], handled: Callable[[], int]
) -> None:
    """Publish, and ``act`` in the loop iteration in which the message has reached
    ``sub`` (a nats-py subscription: its pending bytes) and no fetch has taken it yet.
    A message the consumer's handler got first missed the moment: another is sent."""
    for _ in range(5):
        before = handled()
        publishing = asyncio.ensure_future(publish())

        def arrived(before: int = before) -> str | None:
            if sub._pending_size > 0:
                act()
                return "acted"
            return "missed" if handled() > before else None

        try:
            outcome = await eventually(arrived, "the message reaching the consumer", every_s=0)
        finally:
            await publishing
        if outcome == "acted":
            return
    pytest.fail("never acted between a message's arrival and its fetch")


async def ends_without_the_next_message(
    task: asyncio.Future[Any], sub: Any, publish: Callable[[], Any], got: list[Any]
) -> None:
    """Cancel ``task`` as its next message reaches ``sub``: it must end, cancelled, and
    never handle that message."""
    try:
        await act_on_arrival(sub, task.cancel, publish, lambda: len(got))
        handled = len(got)
        await ended(task)
        assert task.cancelled()
        assert len(got) == handled, "the message fetched after the cancel was handled"
    finally:
        task.cancel()


async def ended(task: asyncio.Future[Any], within: float = ENDS_WITHIN_S) -> float:
    """How long ``task`` took to end (fails naming where it is stuck, after ``within``)."""
    started = time.monotonic()
    await asyncio.wait({task}, timeout=within)
    assert task.done(), f"still running {within}s after its cancel, in {where(task)}"
    return time.monotonic() - started


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Any]:
    """A service's connection (``bus.connect``: its pull requests are tracked) with the
    stack's streams and one of this test's own."""
    nc = await bus.connect(nats_server.url, "cleanstop-test", persistent=False)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT]))
    yield nc
    await nc.close()


async def open_pull(nc: Any, durable: str) -> bus.OpenPull:
    """The open pull request a ``PullConsumer`` of ``durable`` fetches through."""
    events = bus._EVENTS[nc]  # the connection's registry of open pulls (reconnect wakes)

    def found() -> bus.OpenPull | None:
        return next((p for p in events.pulls if p.psub._consumer == durable), None)

    return await eventually(found, f"{durable}'s pull subscription")


@pytest.mark.parametrize("mode", ["batch", "per_message"])
async def test_a_pull_consumer_cancelled_as_its_next_message_arrives_ends_without_it(
    nc: Any, mode: str
) -> None:
    """Both shapes: a batch handler (the executor's inbox, the planner) and one task per
    message (the tool-runner, sub-runs, model turns). On main the task took the message
    to its handler and went on fetching, cancelled or not."""
    got: list[Msg] = []

    async def batch(msgs: Sequence[Msg]) -> list[bool | BaseException]:
        got.extend(msgs)
        return [True] * len(msgs)

    async def one(msg: Msg) -> bool:
        got.append(msg)
        return True

    handlers: dict[str, Any] = (
        {"handler": batch} if mode == "batch" else {"message_handler": one, "concurrency": 4}
    )
    js = nc.jetstream()
    consumer = bus.PullConsumer(js, "executor", STREAM, "cleanstop", [SUBJECT], **handlers)
    task = asyncio.ensure_future(consumer.run(asyncio.Event()))
    try:
        pull = await open_pull(nc, "cleanstop")
    except BaseException:
        task.cancel()
        raise
    await ends_without_the_next_message(task, pull.sub, lambda: js.publish(SUBJECT, b"x"), got)


async def test_a_held_events_consumer_cancelled_as_its_next_message_arrives_ends_without_it(
    nc: Any,
) -> None:
    """The timers' and signal waits' loop, which fetches with nats-py's own ``fetch``
    (``wait_for`` inside): the cancel it swallows is raised before the batch is handled."""
    got: list[Msg] = []

    async def handle(msg: Msg) -> None:
        got.append(msg)
        await msg.ack()

    js = nc.jetstream()
    (subject,) = routes.RUN_EVENTS.filters(routes.RUN_EVENTS.consumer("executor", "timers"))
    task = asyncio.ensure_future(bus.held_events(js, "cleanstop", subject, handle, asyncio.Event()))
    try:
        # its subscription: the connection's only one without a callback
        sub = await eventually(
            lambda: next((s for s in nc._subs.values() if s._cb is None), None),
            "the held events' subscription",
        )
    except BaseException:
        task.cancel()
        raise
    published = subjects.run_event("run-cleanstop-held", "timer_started")
    await ends_without_the_next_message(task, sub, lambda: js.publish(published, b"{}"), got)


async def test_a_stopping_executor_replica_ends_a_partition_consumer_at_once(
    tmp_path: Path, sqlite_store_settings: StoreSettings
) -> None:
    """The failover test's clean stop, reduced: one executor replica in this process,
    stopped as SIGTERM stops it (``run_main``: the stop event, then ``Stack.close``) in the
    iteration in which an inbox message reached a partition's consumer. On main the
    consumer handed it to the writer the stop had cancelled and waited for it for ever
    (stuck in ``run > _dispatch > on_inbox``); the stop took 9 s (the runtime's bound)."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    settings = Settings(nats_url=server.url, store=sqlite_store_settings, insecure=True)
    stack = Stack([ExecutorService(settings)], settings)
    await stack.start()

    async def main() -> None:  # as run_main's: a signal sets the stop, then the close
        await stack.stop.wait()
        await stack.close()

    closing = asyncio.ensure_future(main())
    try:
        ctx = stack.contexts[0]
        run_id = "run-cleanstop-0000000001"
        p = partitions.partition_of(run_id, partitions.DEFAULT_COUNT)
        consumer = next(t for t in ctx.tasks if t.get_name() == f"executor-inbox-p{p}")
        pull = await open_pull(ctx.nc, f"executor-p{p}")
        now = bus.now()
        result = ToolResult(
            run_id=run_id, step_id="s0", attempt=1, idempotency_key=f"{run_id}:s0:1",
            ok=True, output={}, started_at=now, finished_at=now,
        )  # fmt: skip
        async with await nats.connect(server.url) as client:
            js = client.jetstream()
            # a message the consumer took before the stop is refused (no such run) and
            # dead-lettered: the moment was missed
            letters = await client.subscribe(subjects.dead_letter("executor"))

            def handled() -> int:
                return letters.pending_msgs

            await act_on_arrival(
                pull.sub, stack.stop.set,
                lambda: js.publish(subjects.inbox(run_id, "tool"), codec.encode(result)),
                handled,
            )  # fmt: skip
            took = await ended(consumer)
            stopped = await ended(closing, within=5.0)
        print(f"\npartition {p}'s consumer ended {took * 1000:.1f} ms after the stop; "
              f"the stop took {stopped:.2f} s")  # fmt: skip
    finally:
        stack.stop.set()
        await closing
        server.stop()
