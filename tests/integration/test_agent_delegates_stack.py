"""Another agent as a tool, end to end on both stores: the lead agent's model calls the
delegate ``researcher`` (a plan whose agent step answers), the call becomes an ordinary
child run linked to the lead's call, the child's output is the tool's answer, and the
lead answers with it. The fake OpenAI server serves both agents through litellm; replay
of the parent asks no model and starts no child."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_agents import BOUND_S, model_stack, of  # type: ignore[import-not-found]
from waiting import eventually  # type: ignore[import-not-found]

from loom_core.agent import conversation
from loom_core.contracts import (
    AgentDelegate,
    AgentStep,
    ModelCallRequested,
    ParentLink,
    Plan,
    RunCompleted,
    RunRequest,
    RunRequested,
    SubRunEnded,
    SubRunRequested,
)
from loom_core.replay import replay
from loom_infra.client import LoomClient
from loom_infra.fakemodel import FakeModelServer, Reply, ToolCall
from loom_infra.settings import StoreSettings

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(
    store_settings: StoreSettings, tmp_path: Path
) -> AsyncIterator[tuple[LoomClient, FakeModelServer]]:
    async with model_stack(store_settings, tmp_path) as (stack, c, server):
        yield c, server


RESEARCHER = AgentDelegate(
    description="Finds facts about a topic; give it the topic",
    plan=Plan(
        steps=[AgentStep(id="dig", instructions="Find one fact.", input="{{ input.topic }}")],
        output="{{ steps.dig.output }}",
    ),
    input_schema={"type": "object", "properties": {"topic": {"type": "string"}},
                  "required": ["topic"]},
)  # fmt: skip


async def test_the_lead_agent_calls_another_agent_as_a_tool(
    client: tuple[LoomClient, FakeModelServer],
) -> None:
    c, server = client
    server.script(
        "main-model",
        Reply(tool_calls=[ToolCall("researcher", {"topic": "owls"})]),  # the lead
        Reply(content="Owls hoot at night."),  # the researcher's agent, in the child run
        Reply(content="Summary: owls hoot at night."),  # the lead again
    )
    lead = AgentStep(id="lead", instructions="Delegate research, then summarise.",
                     input="owls", delegates={"researcher": RESEARCHER})  # fmt: skip
    run = await c.submit(RunRequest(plan=Plan(steps=[lead])))
    records = await c.wait(run.run_id, timeout=BOUND_S)
    assert of(records, RunCompleted)[0].output == {"lead": "Summary: owls hoot at night."}
    asked = of(records, SubRunRequested)[0]
    assert asked.step_id == "lead/c1-0" and asked.input == {"topic": "owls"}
    assert of(records, SubRunEnded)[0].output == "Owls hoot at night."
    # the model saw the delegate as a tool, and got the child's output as its answer
    assert [t["function"]["name"] for t in server.bodies[0]["tools"]] == ["researcher"]
    told = conversation(of(records, ModelCallRequested), 2)
    assert told is not None and told[-1].content == '"Owls hoot at night."'
    child = await c.events(asked.child_run_id)
    first = child[0].event
    assert isinstance(first, RunRequested)
    assert first.parent == ParentLink(run_id=run.run_id, step_id="lead/c1-0")
    assert first.input == {"topic": "owls"}

    async def call_span() -> list[Any]:
        spans = await c.trace(run.run_id)
        return [s for s in spans if s.name == "call delegate" and s.end is not None]

    await eventually(call_span, "the delegate call's span, ended")
    seen = server.total
    report, _ = replay(records)
    assert report.identical, report.divergence
    assert server.total == seen


async def test_a_delegate_that_asks_a_person_is_resumed_through_the_parent(
    client: tuple[LoomClient, FakeModelServer],
) -> None:
    from waiting import until  # type: ignore[import-not-found]

    from loom_core.contracts import ApprovalStep

    c, server = client
    approver = AgentDelegate(
        description="Asks a manager to approve an amount",
        plan=Plan(
            steps=[
                ApprovalStep(
                    id="ok",
                    label="manager",
                    payload="{{ input.amount }}",
                    schema={"type": "object"},
                )
            ]
        ),  # fmt: skip
        input_schema={"type": "object", "properties": {"amount": {"type": "integer"}}},
    )
    server.script("main-model", Reply(tool_calls=[ToolCall("approve", {"amount": 12})]),
                  Reply(content="approved"))  # fmt: skip
    lead = AgentStep(id="lead", instructions="Get approval.", input="pay 12",
                     delegates={"approve": approver})  # fmt: skip
    run = await c.submit(RunRequest(plan=Plan(steps=[lead])))
    seen = await until(c, run.run_id, lambda rs: any(
        isinstance(r.event, SubRunRequested) for r in rs), BOUND_S)  # fmt: skip
    child = next(r.event for r in seen if isinstance(r.event, SubRunRequested)).child_run_id
    await until(c, child, lambda rs: any(r.kind == "step_suspended" for r in rs), BOUND_S)
    reply = await c.resume(run.run_id, {"yes": True}, label="manager")  # the parent's id
    assert reply.ok, reply.error
    records = await c.wait(run.run_id, timeout=BOUND_S)
    assert of(records, RunCompleted)[0].output == {"lead": "approved"}
    assert of(records, SubRunEnded)[0].output == {"ok": {"yes": True}}
