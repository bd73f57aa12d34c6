"""Lean agent turns through the whole stack: each ``model_call_requested`` holds only the
messages new since the previous turn, yet the model server receives the whole
conversation every turn; a planner that lost its copy (a restart, another replica)
rebuilds it from the run's stored events; the history grows linearly with the turns;
replay asks no model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_agents import BOUND_S, model_stack, of  # type: ignore[import-not-found]

from loom_core import codec
from loom_core.agent import conversation
from loom_core.contracts import (
    AgentStep,
    ModelCallRequested,
    Plan,
    RunCompleted,
    RunRequest,
)
from loom_core.replay import replay
from loom_infra.client import LoomClient
from loom_infra.fakemodel import FakeModelServer, Reply, ToolCall
from loom_infra.settings import StoreSettings
from loom_services.planner import PlannerService
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

TURNS = 20


@pytest.fixture
async def stack(
    sqlite_store_settings: StoreSettings, tmp_path: Path
) -> AsyncIterator[tuple[LocalStack, LoomClient, FakeModelServer]]:
    async with model_stack(sqlite_store_settings, tmp_path) as (s, c, server):
        yield s, c, server


def planner_of(stack: LocalStack) -> PlannerService:
    assert stack.stack is not None
    return next(s for s in stack.stack.services if isinstance(s, PlannerService))


async def test_a_long_agent_sends_whole_conversations_from_lean_events(
    stack: tuple[LocalStack, LoomClient, FakeModelServer],
) -> None:
    s, c, server = stack
    planner = planner_of(s)
    turn = 0

    def model(body: dict[str, Any]) -> Reply:
        nonlocal turn
        turn += 1
        if turn == 5:  # as if the planner restarted: its copies are gone
            planner.conversations._sent.clear()
        if turn == TURNS:
            return Reply(content="done")
        return Reply(tool_calls=[ToolCall("echo", {"message": f"step {turn} " + "x" * 200})])

    server.default = model
    plan = Plan(steps=[AgentStep(id="a", instructions="Echo until done.", input="go",
                                 tools=["echo"], max_turns=TURNS)])  # fmt: skip
    run = await c.submit(RunRequest(plan=plan))
    records = await c.wait(run.run_id, timeout=BOUND_S * 3)
    assert of(records, RunCompleted)[0].output == {"a": "done"}
    requests = of(records, ModelCallRequested)
    assert len(requests) == TURNS
    assert [r.appended for r in requests] == [False] + [True] * (TURNS - 1)
    # every turn the model got the whole conversation: 2 + 2 per earlier turn
    assert [len(b["messages"]) for b in server.bodies] == [2 + 2 * k for k in range(TURNS)]
    assert planner.conversations.reads == 1  # turn 5 was rebuilt from the stored events
    for k, body in enumerate(server.bodies, start=1):
        folded = conversation(requests, k)
        assert folded is not None
        assert body["messages"][-1].get("content") == folded[-1].content
    # linear, not quadratic: the requests together are about one whole conversation
    lean = sum(len(codec.encode(r)) for r in requests)
    whole = sum(
        len(codec.encode(ModelCallRequested(step_id="a", turn=k, messages=conversation(
            requests, k) or [], idempotency_key=r.idempotency_key, tools=r.tools)))
        for k, r in enumerate(requests, start=1)
    )  # fmt: skip
    assert lean * 5 < whole, (lean, whole)
    seen = server.total
    report, _ = replay(records)
    assert report.identical, report.divergence
    assert server.total == seen


async def test_a_turn_redelivered_after_a_planner_restart_is_not_paid_for_twice(
    stack: tuple[LocalStack, LoomClient, FakeModelServer],
) -> None:
    from nats.aio.msg import Msg

    from loom_core import subjects

    s, c, server = stack
    planner = planner_of(s)
    server.script("main-model", Reply(tool_calls=[ToolCall("echo", {"message": "a"})]),
                  Reply(content="done"))  # fmt: skip
    plan = Plan(steps=[AgentStep(id="a", instructions="Echo.", input="go", tools=["echo"])])
    run = await c.submit(RunRequest(plan=plan))
    records = await c.wait(run.run_id, timeout=BOUND_S)
    assert of(records, RunCompleted)
    paid = server.total
    # a restart forgets everything in memory; JetStream redelivers the stored request
    planner._once.clear()
    planner.conversations._sent.clear()
    for record in (r for r in records if isinstance(r.event, ModelCallRequested)):
        redelivered = Msg(_client=c.nc, subject=subjects.run_event(run.run_id, record.kind),
                          data=codec.encode(record))  # fmt: skip
        assert await planner.on_model_request(redelivered) is True
    assert server.total == paid and planner.reused == 2  # answered from the kept copies
