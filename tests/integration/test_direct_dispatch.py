"""Tool requests and results taken from their publish (LOOM_DIRECT_DISPATCH, issue 10):
the tool-runner starts a call from the relay's publish, the executor records a result
from the tool-runner's publish, and each stream copy, which always follows, is settled
as that handling was: every call runs once, is recorded once, nothing is dead-lettered
or left unacked. With two tool-runner replicas the stream copy of a publish one of them
took usually reaches the other, which puts it back instead of running the call again.
With the setting off, the streams alone carry them, as before."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from waiting import eventually  # type: ignore[import-not-found]

from loom_core import subjects
from loom_core.contracts import (
    Plan,
    RunCompleted,
    RunRequest,
    ToolCallCompleted,
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

RAN: list[str] = []
STEPS = 12


class TickIn(ToolInput):
    n: int = 0


class TickOut(ToolOutput):
    n: int


@tool("tick", "Counts its executions by idempotency key (test tool).")
async def tick(args: TickIn, ctx: ToolContext) -> TickOut:
    RAN.append(ctx.idempotency_key)
    return TickOut(n=args.n + 1)


def registry() -> ToolRegistry:
    reg = default_registry()
    reg.register(tick)
    return reg


def chain() -> Plan:
    return Plan(
        steps=[
            ToolStep(id=f"s{i}", tool="tick", depends_on=[f"s{i - 1}"] if i else [])
            for i in range(STEPS)
        ]
    )


@dataclasses.dataclass
class Running:
    url: str
    executor: ExecutorService
    runners: list[ToolRunnerService]


async def stack_of(
    tmp_path: Path, store: StoreSettings, replicas: int, direct: bool
) -> AsyncIterator[Running]:
    RAN.clear()
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    settings = Settings(nats_url=server.url, store=store, direct_dispatch=direct)
    executor = ExecutorService(settings)
    runners = [ToolRunnerService(settings, registry=registry()) for _ in range(replicas)]
    stack = Stack(
        [executor, PlannerService(settings), *runners, MemoryService(settings),
         TracingService(settings)],
        settings,
    )  # fmt: skip
    await stack.start()
    try:
        yield Running(server.url, executor, runners)
    finally:
        await stack.close()
        server.stop()


@pytest.fixture(params=[True, False], ids=["direct", "streams-only"])
async def one_runner(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_store_settings: StoreSettings
) -> AsyncIterator[Running]:
    async for running in stack_of(tmp_path, sqlite_store_settings, 1, request.param):
        yield running


@pytest.fixture
async def two_runners(
    tmp_path: Path, sqlite_store_settings: StoreSettings
) -> AsyncIterator[Running]:
    async for running in stack_of(tmp_path, sqlite_store_settings, 2, True):
        yield running


async def settled(client: LoomClient) -> None:
    """Every stream copy acked (none waiting or to be redelivered), and no dead letter."""

    async def quiet() -> bool:
        # the tool-runner's durable, and the executor's one per partition it owns
        infos = [await client.js.consumer_info(subjects.RUN_EVENTS_STREAM, "toolrunner")]
        infos += [
            info
            for info in await client.js.consumers_info(subjects.INBOX_STREAM)
            if (info.name or "").startswith("executor-p")
        ]
        assert len(infos) > 1, "no executor partition consumer"
        return not any(info.num_ack_pending or info.num_pending for info in infos)

    await eventually(quiet, "the tool-runner's and the executor's consumers to settle")
    dlq = await client.js.stream_info(subjects.DLQ_STREAM)
    assert dlq.state.messages == 0


async def run_chain(client: LoomClient) -> list[ToolCallCompleted]:
    accepted = await client.submit(RunRequest(plan=chain()))
    records = await client.wait(accepted.run_id, timeout=60)
    assert isinstance(records[-1].event, RunCompleted), records[-1]
    return [r.event for r in records if isinstance(r.event, ToolCallCompleted)]


async def test_each_call_runs_and_is_recorded_once(one_runner: Running) -> None:
    async with await LoomClient.connect(one_runner.url) as client:
        completed = await run_chain(client)
        await settled(client)
    keys = [c.idempotency_key for c in completed]
    assert len(keys) == STEPS and sorted(RAN) == sorted(keys)  # once each, recorded once
    (runner,) = one_runner.runners
    direct = runner.settings.direct_dispatch
    # with direct dispatch every request and result was taken from its publish
    assert runner.from_publish == (STEPS if direct else 0)
    assert one_runner.executor.results_from_publish == (STEPS if direct else 0)
    assert not one_runner.executor.taken  # every stream copy came and was settled


async def test_two_replicas_run_each_call_once(two_runners: Running) -> None:
    async with await LoomClient.connect(two_runners.url) as client:
        completed = await run_chain(client)
        await settled(client)
    keys = [c.idempotency_key for c in completed]
    assert sorted(RAN) == sorted(keys)
    assert sum(r.from_publish for r in two_runners.runners) == STEPS
