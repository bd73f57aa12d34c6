"""The hop step's leaner path (issue 10, hopcpu), against a real nats-server and SQLite:
a direct tool result's receipt is written by its work's done-callback
(``bus.publish_soon``, no task per call), results waiting for their commit are answered
"unavailable" when the executor stops, and a tool call runs in its handling task, so a
run's cancel of a running call is taken there and the handling goes on to answer it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from waiting import eventually  # type: ignore[import-not-found]

from loom_core import codec, routes, subjects
from loom_core.contracts import (
    InboxReceipt,
    Plan,
    RunCompleted,
    RunRequest,
    ToolResult,
    ToolStep,
)
from loom_infra import bus
from loom_infra.client import LoomClient
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings, StoreSettings
from loom_services.executor import STOPPING, ExecutorService
from loom_services.planner import PlannerService
from loom_services.runtime import Stack
from loom_services.toolrunner import ToolRunnerService
from loom_services.tools import ToolContext, ToolInput, ToolOutput, default_registry, tool

pytestmark = pytest.mark.integration

BOUND_S = 10.0


class HoldIn(ToolInput):
    pass


class HoldOut(ToolOutput):
    pass


held: dict[str, asyncio.Event] = {}  # made in each test's loop


@tool("hold", "Waits until the test lets it go (test tool).")
async def hold(args: HoldIn, ctx: ToolContext) -> HoldOut:
    held.setdefault("started", asyncio.Event()).set()
    await held.setdefault("release", asyncio.Event()).wait()
    return HoldOut()


class BumpIn(ToolInput):
    n: int = 0


class BumpOut(ToolOutput):
    n: int


@tool("bump", "Adds one (test tool; not a local call, so it hops to the tool-runner).")
async def bump(args: BumpIn, ctx: ToolContext) -> BumpOut:
    return BumpOut(n=args.n + 1)


async def test_publish_soon_goes_out_with_the_next_flush_and_refuses_what_nats_refuses(
    nats_server: EmbeddedNats,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("soon.>")
        done = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda _: bus.publish_soon(nc, "soon.a", b"from a callback"))
        done.set_result(None)
        msg = await sub.next_msg(timeout=BOUND_S)
        assert (msg.subject, msg.data, msg.reply, msg.headers) == (
            "soon.a", b"from a callback", "", None,
        )  # fmt: skip
        bus.publish_soon(nc, "soon.empty", b"")
        assert (await sub.next_msg(timeout=BOUND_S)).data == b""
        for bad in ("soon.a b", "soon.a\r\nPUB x 1", ""):
            with pytest.raises(nats.errors.BadSubjectError):
                bus.publish_soon(nc, bad, b"x")
        with pytest.raises(nats.errors.MaxPayloadError):
            bus.publish_soon(nc, "soon.big", b"x" * (nc.max_payload + 1))
        await nc.flush()  # nothing refused was written: the next message is the next one
        bus.publish_soon(nc, "soon.after", b"1")
        assert (await sub.next_msg(timeout=BOUND_S)).subject == "soon.after"
    finally:
        await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        bus.publish_soon(nc, "soon.closed", b"x")


async def test_results_waiting_for_their_commit_are_answered_unavailable_at_stop(
    nats_server: EmbeddedNats, sqlite_store_settings: StoreSettings
) -> None:
    """A direct result is answered by its work's done-callback; one still waiting when
    the executor stops is answered "unavailable" at once (the runner then sends it to
    the inbox stream, for the next owner), and never a second time."""
    nc = await nats.connect(nats_server.url)
    executor = ExecutorService(Settings(nats_url=nats_server.url, store=sqlite_store_settings))
    try:
        inbox = nc.new_inbox()
        answers = await nc.subscribe(inbox)
        run_id = "run-waitingforcommit0000"
        now = bus.now()
        result = ToolResult(
            run_id=run_id, step_id="s0", attempt=1, idempotency_key=f"{run_id}:s0:1",
            ok=True, output={}, started_at=now, finished_at=now,
        )  # fmt: skip
        subject = routes.TOOL_RESULT.subject(run_id=run_id)
        msg = Msg(_client=nc, subject=subject, reply=inbox, data=codec.encode(result))
        await executor.on_result(msg)
        assert executor.host.queue.qsize() == 1  # taken, waiting for the writer
        await executor.close()
        receipt = codec.decode((await answers.next_msg(timeout=BOUND_S)).data, InboxReceipt)
        assert (receipt.recorded, receipt.error) == (False, STOPPING)
        work = executor.host.queue.get_nowait()
        after = asyncio.Event()  # callbacks run in order: this one after the receipt's
        work.done.add_done_callback(lambda _: after.set())
        work.done.set_exception(RuntimeError("the writer is gone"))  # settled after all
        await after.wait()
        assert isinstance(work.done.exception(), RuntimeError)
        await nc.flush()  # anything it had written would be delivered before the PONG
        assert answers.pending_msgs == 0 and not executor._receipts

        # malformed: answered at once, nothing queued
        await executor.on_result(Msg(_client=nc, subject=subject, reply=inbox, data=b"{"))
        receipt = codec.decode((await answers.next_msg(timeout=BOUND_S)).data, InboxReceipt)
        assert receipt.error is not None and receipt.error.code == "malformed_json"
        assert executor.host.queue.empty()
    finally:
        await nc.close()


@pytest.fixture
async def hop_stack(tmp_path: Path, sqlite_store_settings: StoreSettings) -> AsyncIterator[Any]:
    held.clear()
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    settings = Settings(nats_url=server.url, store=sqlite_store_settings, direct_dispatch=True)
    registry = default_registry()
    registry.register(hold)
    registry.register(bump)
    runner = ToolRunnerService(settings, registry=registry)
    stack = Stack([ExecutorService(settings), PlannerService(settings), runner], settings)
    await stack.start()
    try:
        yield server.url, runner
    finally:
        held.setdefault("release", asyncio.Event()).set()
        await stack.close()
        server.stop()


async def test_direct_results_are_stored_without_the_inbox_stream(hop_stack: Any) -> None:
    """Every result of a chain of hops is answered ``recorded`` by the writer (a refused
    or unanswered one would go to LOOM_INBOX): the receipts written by the done-callback
    reach the runner."""
    url, runner = hop_stack
    plan = Plan(
        steps=[
            ToolStep(id=f"s{i}", tool="bump", depends_on=[f"s{i - 1}"] if i else [])
            for i in range(10)
        ]
    )
    async with await LoomClient.connect(url) as client:
        accepted = await client.submit(RunRequest(plan=plan))
        records = await client.wait(accepted.run_id, timeout=BOUND_S * 3)
        assert isinstance(records[-1].event, RunCompleted), records[-1]
        assert runner.from_publish == 10  # every call started from its dispatch
        tool_results = routes.INBOX_TOOL.subject(run_id=accepted.run_id)
        with pytest.raises(nats.js.errors.NotFoundError):  # (the plan's verdict is there)
            await client.js.get_last_msg(subjects.INBOX_STREAM, tool_results)


async def test_a_cancelled_call_is_answered_and_its_request_acked_once(hop_stack: Any) -> None:
    """The call runs in its handling task: the run's cancel cancels that task while it
    waits in the tool, is taken there, and the handling goes on to answer the call as
    cancelled and to ack its request once (the cancel escaping the call would fail the
    answer, and the request would be redelivered)."""
    url, runner = hop_stack
    plan = Plan(steps=[ToolStep(id="h", tool="hold", input={})])
    async with await LoomClient.connect(url) as client:
        accepted = await client.submit(RunRequest(plan=plan))
        await asyncio.wait_for(held.setdefault("started", asyncio.Event()).wait(), BOUND_S)
        assert len(runner.inflight) == 1
        reply = await client.control(accepted.run_id, "cancel", by="tester", reason="test")
        assert reply.ok

        async def answered() -> bool:
            info = await client.js.consumer_info(subjects.RUN_EVENTS_STREAM, "toolrunner")
            return (
                runner.executed == 1
                and not runner.inflight
                and not runner.handling
                and not info.num_ack_pending
                and not info.num_pending
            )

        await eventually(answered, "the cancelled call answered and its request acked")
        info = await client.js.consumer_info(subjects.RUN_EVENTS_STREAM, "toolrunner")
        assert info.num_redelivered == 0
        assert not runner.cancelled
