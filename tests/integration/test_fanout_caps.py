"""Issue 9 point 3 on a real stack (SQLite): fan-out over the configured caps is refused
with a typed error and stops only its own run.

Reproduced on main first: a foreach over 100,000 items was accepted and ran, the
executor's memory rising from 121 to 528 MB."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from tests.integration.conftest import make_settings

from loom_core import caps as fanout
from loom_core.contracts import ForeachStep, Plan, RunRequest, ToolStep
from loom_infra.client import LoomClient
from loom_infra.settings import StoreSettings
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

ECHO = Plan(steps=[ToolStep(id="a", tool="echo", input={"message": "ok"})])


@pytest.fixture
async def client(sqlite_store_settings: StoreSettings) -> AsyncIterator[LoomClient]:
    # default settings: LOOM_MAX_PAYLOAD 256 KiB, the default caps (10,000 items)
    async with (
        LocalStack(make_settings(sqlite_store_settings), nats_port=-1) as stack,
        await stack.client() as c,
    ):
        yield c


def each(items: object) -> Plan:
    return Plan(steps=[ForeachStep(
        id="fe", items=items, concurrency=16,
        do=[ToolStep(id="t", tool="echo", input={"message": "{{ item }}"})],
    )])  # fmt: skip


async def test_a_100k_item_foreach_is_refused_at_validation(client: LoomClient) -> None:
    accepted = await client.submit(RunRequest(plan=each([0] * 100_000)))
    records = await client.wait(accepted.run_id, timeout=30)
    requested = records[0].event
    assert requested.caps == fanout.DEFAULT_CAPS  # recorded from the executor's settings
    assert [r.kind for r in records] == ["run_requested", "plan_rejected"]
    [issue] = records[-1].event.issues
    assert (issue.code, issue.path) == ("too_many_items", "$.plan.steps[0].items")
    assert "'fe'" in issue.message and "100000" in issue.message
    assert fanout.ITEMS_SETTING in issue.message and "10000" in issue.message
    assert not any(r.kind == "step_scheduled" for r in records)


async def test_a_rendered_list_over_the_cap_fails_its_step_and_other_runs_go_on(
    client: LoomClient,
) -> None:
    over = await client.submit(RunRequest(plan=each("{{ input.xs }}"), input={"xs": [0] * 10_001}))
    others = [await client.submit(RunRequest(plan=ECHO)) for _ in range(3)]
    ended = await asyncio.gather(
        client.wait(over.run_id, timeout=30),
        *(client.wait(o.run_id, timeout=30) for o in others),
    )
    records = ended[0]
    assert records[-1].kind == "run_failed", [r.kind for r in records]
    [failed] = [r.event for r in records if r.kind == "step_failed"]
    assert failed.step_id == "fe" and failed.error.code == "too_many_items"
    assert failed.error.details == {
        "step_id": "fe", "count": 10_001, "cap": 10_000, "setting": fanout.ITEMS_SETTING,
    }  # fmt: skip
    assert not any(r.kind == "tool_call_requested" for r in records)
    assert all(o[-1].kind == "run_completed" for o in ended[1:])
