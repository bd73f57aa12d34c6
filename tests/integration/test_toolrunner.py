"""One idempotency key never executes twice, even when JetStream redelivers the request
or a second tool-runner replica receives it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from loom_core import codec, subjects
from loom_core.contracts import (
    Plan,
    RunCompleted,
    RunRequest,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_infra.client import LoomClient
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings, StoreSettings
from loom_services.executor import ExecutorService
from loom_services.memory import MemoryService
from loom_services.planner import PlannerService
from loom_services.runtime import Stack
from loom_services.toolrunner import ToolRunnerService
from loom_services.tools import (
    ToolContext,
    ToolInput,
    ToolOutput,
    ToolRegistry,
    default_registry,
    tool,
)
from loom_services.tracing import TracingService

pytestmark = pytest.mark.integration

CALLS: list[str] = []


class CountIn(ToolInput):
    label: str


class CountOut(ToolOutput):
    calls: int


@tool("count_calls", "Counts how often it really ran (test tool).", idempotent=False)
async def count_calls(args: CountIn, ctx: ToolContext) -> CountOut:
    CALLS.append(ctx.idempotency_key)
    return CountOut(calls=len(CALLS))


def registry() -> ToolRegistry:
    reg = default_registry()
    reg.register(count_calls)
    return reg


@pytest.fixture
async def two_runner_stack(
    tmp_path: Path, sqlite_store_settings: StoreSettings
) -> AsyncIterator[tuple[Stack, list[ToolRunnerService], str]]:
    CALLS.clear()
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    settings = Settings(nats_url=server.url, store=sqlite_store_settings)
    runners = [ToolRunnerService(settings, registry=registry()) for _ in range(2)]
    stack = Stack(
        [
            ExecutorService(settings),
            PlannerService(settings),
            *runners,
            MemoryService(settings),
            TracingService(settings),
        ],
        settings,
    )
    await stack.start()
    try:
        yield stack, runners, server.url
    finally:
        await stack.close()
        server.stop()


async def test_redelivered_and_duplicated_requests_run_the_tool_once(two_runner_stack) -> None:
    stack, runners, url = two_runner_stack
    async with await LoomClient.connect(url) as client:
        plan = Plan(steps=[ToolStep(id="once", tool="count_calls", input={"label": "x"})])
        accepted = await client.submit(RunRequest(plan=plan))
        records = await client.wait(accepted.run_id, timeout=30)
        assert isinstance(records[-1].event, RunCompleted)
        request = next(r for r in records if isinstance(r.event, ToolCallRequested))
        assert [request.event.idempotency_key] == CALLS

        # Re-publish the same request event under new message ids: JetStream cannot
        # dedupe these, so the runners (two replicas, one durable consumer) get copies.
        # A plain subscription sees every answer they publish.
        results = await client.nc.subscribe(subjects.inbox(accepted.run_id, "tool"))
        for i in range(3):
            await client.js.publish(
                subjects.run_event(accepted.run_id, "tool_call_requested"),
                codec.encode(request),
                headers={subjects.MSG_ID: f"dup-{i}"},
            )
        # every copy is answered (from the ledger), none runs the tool again
        answers = []
        for _ in range(3):
            msg = await results.next_msg(timeout=10)
            answers.append(codec.decode(msg.data, ToolResult))
        await results.unsubscribe()
        assert {a.idempotency_key for a in answers} == {request.event.idempotency_key}
        assert {msgspec.json.encode(a.output) for a in answers} == {b'{"calls":1}'}
        assert [request.event.idempotency_key] == CALLS
        assert sum(r.executed for r in runners) == 1
        # and the run's stream did not change
        assert [r.seq for r in await client.events(accepted.run_id)] == [r.seq for r in records]
