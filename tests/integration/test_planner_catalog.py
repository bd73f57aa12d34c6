"""The planner reads the tool catalog once per second, not once per run
(loom_infra.catalog_cache), and a tool registered since its last read is not refused:
a plan naming a tool the cached catalog lacks is checked against a fresh read."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tests.integration.conftest import make_settings
from waiting import until  # type: ignore[import-not-found]

from loom_core import codec
from loom_core.contracts import Plan, PlanAccepted, PlanRejected, RunRequest, ToolSpec, ToolStep
from loom_infra import bus
from loom_infra.client import LoomClient
from loom_infra.settings import StoreSettings
from loom_services.planner import PlannerService
from loom_services.stack import LocalStack


def one_step(tool: str) -> Plan:
    return Plan(steps=[ToolStep(id="a", tool=tool)])


@pytest.fixture
async def sqlite_stack(sqlite_store_settings: StoreSettings) -> AsyncIterator[LocalStack]:
    async with LocalStack(make_settings(sqlite_store_settings), nats_port=-1) as s:
        yield s


def planner_of(stack: LocalStack) -> PlannerService:
    assert stack.stack is not None
    return next(s for s in stack.stack.services if isinstance(s, PlannerService))


async def verdict(client: LoomClient, plan: Plan) -> object:
    accepted = await client.submit(RunRequest(plan=plan))
    seen = await until(
        client, accepted.run_id, lambda seen: seen[-1].kind in ("plan_accepted", "plan_rejected")
    )
    return seen[-1].event


async def test_runs_share_one_catalog_read_and_a_new_tool_is_not_refused(
    sqlite_stack: LocalStack,
) -> None:
    planner = planner_of(sqlite_stack)
    async with await sqlite_stack.client() as client:
        for _ in range(5):
            assert isinstance(await verdict(client, one_step("noop")), PlanAccepted)
        # five runs in well under a second: at most the warm-up's read and one more
        assert planner.catalog.reads <= 2
        reads = planner.catalog.reads

        # the tool-runner registers a tool after the planner's read
        nc = await bus.connect(
            sqlite_stack.url, "test-toolrunner",
            seed=sqlite_stack.seed_file("toolrunner"), identity="toolrunner",
        )  # fmt: skip
        try:
            kv = await bus.ensure_tools_bucket(nc.jetstream())
            obj = {"type": "object"}
            spec = ToolSpec(name="late_tool", description="", input_schema=obj, output_schema=obj)
            await kv.put(bus.tool_key(spec.name), codec.encode(spec))
        finally:
            await nc.close()
        assert isinstance(await verdict(client, one_step("late_tool")), PlanAccepted)
        assert planner.catalog.reads == reads + 1  # the fresh read, for the unknown name

        # a tool nobody registered is still refused, with the fresh catalog's names
        rejected = await verdict(client, one_step("no_such_tool"))
        assert isinstance(rejected, PlanRejected)
        (issue,) = rejected.issues
        assert issue.code == "unknown_tool" and "late_tool" in issue.message
