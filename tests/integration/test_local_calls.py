"""Local calls (loom_services.local_tools): pure built-ins answered inside the executor,
recorded exactly like a tool call, never run by a tool-runner; and the consumer
heartbeats that let ack waits be short (bus.Heartbeat)."""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import DeliverPolicy

from loom_core import codec, subjects
from loom_core.contracts import (
    Plan,
    RunCompleted,
    RunRequest,
    ToolCallCompleted,
    ToolCallRequested,
    ToolStep,
)
from loom_core.replay import replay
from loom_core.sizes import DEFAULT_LIMITS
from loom_infra import bus
from loom_infra.client import LoomClient
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import delivery_settings_from_env
from loom_services.local_tools import PURE_BUILTINS, LocalTools
from loom_services.stack import LocalStack
from loom_services.toolrunner import ToolRunnerService

pytestmark = pytest.mark.integration


def runner_of(stack: LocalStack) -> ToolRunnerService:
    assert stack.stack is not None
    return next(s for s in stack.stack.services if isinstance(s, ToolRunnerService))


async def test_a_pure_builtin_is_answered_in_the_executor_and_recorded_as_a_tool_call(
    stack: LocalStack, client: LoomClient
) -> None:
    plan = Plan(
        steps=[
            ToolStep(id="a", tool="echo", input={"message": "hi"}),
            ToolStep(id="b", tool="text", input={"text": "{{ steps.a.output.message }}",
                                                   "op": "upper"}, depends_on=["a"]),
        ]
    )  # fmt: skip
    accepted = await client.submit(RunRequest(plan=plan))
    records = await client.wait(accepted.run_id, timeout=30)
    assert records[-1].event == RunCompleted(output={"b": {"result": "HI"}})
    requests = [r for r in records if isinstance(r.event, ToolCallRequested)]
    results = [r for r in records if isinstance(r.event, ToolCallCompleted)]
    assert [r.event.tool for r in requests] == ["echo", "text"]
    assert [r.event.idempotency_key for r in results] == [r.event.idempotency_key for r in requests]
    # replay feeds the recorded results back: the same decisions
    report, _ = replay(records)
    assert report.divergence is None
    # the relay marked each request answered; the runner ran nothing
    sub = await client.js.subscribe(
        subjects.run_event(accepted.run_id, "tool_call_requested"),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    try:
        for _ in requests:
            msg = await sub.next_msg(timeout=10)
            assert msg.headers and msg.headers.get(subjects.ANSWERED) == "1"
    finally:
        await sub.unsubscribe()
    assert runner_of(stack).executed == 0


async def test_a_tool_with_effects_still_goes_to_the_runner(
    stack: LocalStack, client: LoomClient
) -> None:
    plan = Plan(steps=[ToolStep(id="nap", tool="sleep", input={"seconds": 0})])
    accepted = await client.submit(RunRequest(plan=plan))
    records = await client.wait(accepted.run_id, timeout=30)
    assert isinstance(records[-1].event, RunCompleted)
    assert runner_of(stack).executed == 1


def test_only_pure_builtins_can_be_local() -> None:
    def local(env: dict[str, str]) -> LocalTools:
        return LocalTools.from_settings(DEFAULT_LIMITS, delivery_settings_from_env(env))

    assert local({}).names == frozenset(PURE_BUILTINS)
    assert local({"LOOM_LOCAL_TOOLS": ""}).names == frozenset()
    assert local({"LOOM_LOCAL_TOOLS": "noop, echo"}).names == {"noop", "echo"}
    with pytest.raises(ValueError, match="http_get"):
        local({"LOOM_LOCAL_TOOLS": "noop,http_get"})


async def test_a_handler_longer_than_the_ack_wait_is_not_redelivered(
    nats_server: EmbeddedNats,
) -> None:
    """The consumer heartbeats (in_progress every third of the ack wait) while a handler
    runs, so a 0.3 s ack wait holds a 1.2 s handler's message (a process that dies stops
    beating: its messages come back within the ack wait, as the chaos test measures)."""
    nc = await bus.connect(nats_server.url, "test")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    deliveries: list[int] = []
    slow = asyncio.Event()

    async def handle(msg) -> bool:  # type: ignore[no-untyped-def]
        deliveries.append(msg.metadata.num_delivered)
        await asyncio.sleep(1.2)  # a long handler, not synchronisation
        slow.set()
        return True

    consumer = bus.PullConsumer(
        js=js, service="test", stream=subjects.RUN_EVENTS_STREAM, durable="hb",
        filter_subjects=["loom.run.hb.>"], message_handler=handle, concurrency=4,
        ack_wait_s=0.3,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.ensure_future(consumer.run(stop))
    try:
        await js.publish("loom.run.hb.x", codec.encode({"n": 1}))
        async with asyncio.timeout(10):
            await slow.wait()
        info = await js.consumer_info(subjects.RUN_EVENTS_STREAM, "hb")
        assert deliveries == [1]
        assert info.num_redelivered == 0  # held 4 ack waits long by heartbeats alone
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await nc.close()
