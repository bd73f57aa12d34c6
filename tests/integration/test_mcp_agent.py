"""An agent step calling an MCP tool, end to end (issue 13): the whole stack in this
process, a real nats-server, the demo MCP server over stdio, and the fake model server
(a real HTTP server reached through litellm) that refuses function names outside
OpenAI's rule, as OpenAI does. The model asks for ``demo.add`` (sent to it as
``demo__add``: dots are not allowed in a function name), the tool runs on the MCP
server, its result goes back to the model, and the run ends with the model's answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.integration.conftest import make_settings
from tests.mcp_servers.fixtures import demo_stdio

from loom_core.contracts import (
    AgentStep,
    ModelCallRequested,
    Plan,
    RunCompleted,
    RunRequest,
    ToolCallCompleted,
    ToolCallRequested,
)
from loom_infra.client import LoomClient
from loom_infra.fakemodel import FakeModelServer, Reply, ToolCall
from loom_infra.settings import StoreSettings
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

BOUND_S = 30.0


@pytest.fixture
async def mcp_agent_stack(
    tmp_path: Path, sqlite_store_settings: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[LoomClient, FakeModelServer]]:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"mcp_servers": {"demo": demo_stdio()}}))
    monkeypatch.setenv("LOOM_TOOLS_CONFIG", str(tools))
    with FakeModelServer() as model_server:
        models = tmp_path / "models.yaml"
        models.write_text(
            f"default: main\nnum_retries: 0\ntimeout_s: 10\nmodels:\n  main:\n"
            f"    model: openai/main-model\n    api_base: {model_server.base_url}\n"
        )
        settings = make_settings(sqlite_store_settings, models_file=models)
        async with LocalStack(settings, nats_port=-1) as stack, await stack.client() as client:
            yield client, model_server


def adding_plan() -> Plan:
    step = AgentStep(
        id="think", instructions="Add the numbers with the tool.", input="40 and 2",
        tools=["demo.add"],
    )  # fmt: skip
    return Plan(steps=[step], output="{{ steps.think.output }}")


async def submit_when_listed(client: LoomClient, plan: Plan) -> str:
    """MCP servers connect in the background: a plan naming their tools validates once
    the catalog lists them (a refusal before that is `unknown_tool`)."""
    for _ in range(200):
        accepted = await client.submit(RunRequest(plan=plan))
        records = await client.wait(accepted.run_id, timeout=BOUND_S)
        refused = [r for r in records if r.kind == "plan_rejected"]
        if not refused:
            return accepted.run_id
        assert {i.code for i in refused[0].event.issues} == {"unknown_tool"}, refused
        await asyncio.sleep(0.1)  # the polling interval of a bounded wait (servers start)
    raise AssertionError("MCP tools never joined the catalog")


async def test_an_agent_step_calls_an_mcp_tool(mcp_agent_stack) -> None:
    client, model_server = mcp_agent_stack
    model_server.script(
        "main-model",
        Reply(tool_calls=[ToolCall("demo__add", {"a": 40, "b": 2}, id="call_add")]),
        Reply(content="The sum is 42."),
    )
    run_id = await submit_when_listed(client, adding_plan())
    records = await client.wait(run_id, timeout=BOUND_S)
    assert isinstance(records[-1].event, RunCompleted), records[-1]
    assert records[-1].event.output == "The sum is 42."

    # an ordinary tool call, under the catalog name, answered by the MCP server
    requested = [r.event for r in records if isinstance(r.event, ToolCallRequested)]
    assert [(c.step_id, c.tool, c.input) for c in requested] == [
        ("think/c1-0", "demo.add", {"a": 40, "b": 2})
    ]
    completed = [r.event for r in records if isinstance(r.event, ToolCallCompleted)]
    assert [(c.step_id, c.output) for c in completed] == [("think/c1-0", {"total": 42})]

    # events keep the catalog name; only the wire carries the provider-safe one
    second = [r.event for r in records if isinstance(r.event, ModelCallRequested)][1]
    assert second.appended and second.messages[0].tool_calls[0].name == "demo.add"
    first_body, second_body = model_server.bodies
    assert [t["function"]["name"] for t in first_body["tools"]] == ["demo__add"]
    assert first_body["tools"][0]["function"]["parameters"]["required"] == ["a", "b"]
    # the model saw its call and the tool's result
    said, answered = second_body["messages"][-2:]
    assert said["tool_calls"][0]["function"]["name"] == "demo__add"
    assert answered["role"] == "tool" and answered["tool_call_id"] == "call_add"
    assert json.loads(answered["content"]) == {"total": 42}
