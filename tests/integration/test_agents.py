"""Model planning and agent steps end to end (issue 11), on both stores: the whole stack
in this process, a real nats-server, and a real HTTP model server (``loom_infra.
fakemodel``) that every model call reaches through litellm and a socket.

- a natural-language request planned, its first proposal refused by the validator,
  repaired once, and run;
- an agent step calling two tools, its first model answering 429 and the fallback
  answering; replay and fork afterwards make zero model requests;
- a budget crossed: the step suspends, a person raises the budget, the run completes;
- hostile model output (malformed tool-call JSON, an unknown tool, a model that never
  stops) recorded as typed outcomes while the stack keeps serving other runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from waiting import eventually, having, until  # type: ignore[import-not-found]

from conftest import make_settings  # type: ignore[import-not-found]
from loom_core import codec, subjects
from loom_core.agent import conversation
from loom_core.contracts import (
    AgentStep,
    Budget,
    ForkRun,
    ModelCallCompleted,
    ModelCallRequested,
    ModelChunk,
    ModelOutputRefused,
    Plan,
    PlanAccepted,
    RunCompleted,
    RunFailed,
    RunRequest,
    StepCompleted,
    StepFailed,
    StepSuspended,
    ToolCallCompleted,
    ToolStep,
    UsageQuery,
    UsageReply,
)
from loom_core.replay import replay
from loom_infra import bus
from loom_infra.client import LoomClient, LoomError
from loom_infra.fakemodel import Fail, FakeModelServer, Reply, ToolCall
from loom_infra.settings import SecretSettings, StoreSettings
from loom_services.executor import ExecutorService
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

BOUND_S = 20.0
CANARY = "sk-canary-agent-51c0"  # a secret the stack holds; no model may get at it


@pytest.fixture
def model_server() -> Iterator[FakeModelServer]:
    with FakeModelServer() as server:
        yield server


@contextlib.asynccontextmanager
async def model_stack(
    store_settings: StoreSettings, tmp_path: Path
) -> AsyncIterator[tuple[LocalStack, LoomClient, FakeModelServer]]:
    """A whole stack whose models are served by a fake OpenAI server (through litellm),
    with an operator client: the agent test files' common setup."""
    with FakeModelServer() as server:
        models = write_models(tmp_path / "models.yaml", server.base_url)
        settings = make_settings(store_settings, models_file=models)
        async with LocalStack(settings, nats_port=-1) as stack, await stack.client() as client:
            yield stack, client, server


def write_models(path: Path, base_url: str, stream: bool = False) -> Path:
    path.write_text(
        f"""
stream: {str(stream).lower()}
default: main
planner: main
num_retries: 0
timeout_s: 10
models:
  main:
    model: openai/main-model
    api_base: {base_url}
    fallbacks: [backup]
    input_cost_per_token: 0.000001
    output_cost_per_token: 0.000002
  backup:
    model: openai/backup-model
    api_base: {base_url}
    input_cost_per_token: 0.000001
    output_cost_per_token: 0.000002
"""
    )
    return path


@pytest.fixture
async def agent_client(
    store_settings: StoreSettings, tmp_path: Path, model_server: FakeModelServer
) -> AsyncIterator[LoomClient]:
    models = write_models(tmp_path / "models.yaml", model_server.base_url)
    secrets = SecretSettings(env={"CANARY": CANARY})
    settings = make_settings(store_settings, models_file=models, secrets=secrets)
    async with LocalStack(settings, nats_port=-1) as stack, await stack.client() as client:
        yield client


@pytest.fixture
async def streaming_client(
    store_settings: StoreSettings, tmp_path: Path, model_server: FakeModelServer
) -> AsyncIterator[LoomClient]:
    models = write_models(tmp_path / "models.yaml", model_server.base_url, stream=True)
    settings = make_settings(store_settings, models_file=models)
    async with LocalStack(settings, nats_port=-1) as stack, await stack.client() as client:
        yield client


def of(records: list[Any], kind: type) -> list[Any]:
    return [r.event for r in records if isinstance(r.event, kind)]


def agent_plan(**agent: Any) -> Plan:
    step = AgentStep(
        id="think",
        instructions="Find out and answer in one line.",
        input="{{ input.question }}",
        tools=["echo", "text"],
        **agent,
    )
    say = ToolStep(id="say", tool="echo", input={"message": "{{ steps.think.output }}"})
    return Plan(steps=[step, say], output="{{ steps.say.output.message }}")


async def test_natural_language_request_is_planned_repaired_once_and_run(
    agent_client: LoomClient, model_server: FakeModelServer
) -> None:
    bad = {"steps": [{"kind": "tool", "id": "shout", "tool": "shout", "input": {"t": 1}}]}
    good = {
        "steps": [
            {"kind": "tool", "id": "shout", "tool": "text",
             "input": {"text": "{{ input.city }}", "op": "upper"}},
            {"kind": "final", "id": "answer", "output": "{{ steps.shout.output.result }}"},
        ]
    }  # fmt: skip
    import json

    model_server.script(
        "main-model", Reply(content=json.dumps(bad)), Reply(content=json.dumps(good))
    )
    run = await agent_client.submit(RunRequest(request="shout the city", input={"city": "Lisbon"}))
    records = await agent_client.wait(run.run_id, timeout=BOUND_S)
    assert of(records, RunCompleted)[0].output == "LISBON"
    accepted = of(records, PlanAccepted)[0]
    assert accepted.planner == "model"
    planning = accepted.planning
    assert planning is not None and planning.prompt_id.startswith("plan-v1:")
    assert [[i.code for i in r] for r in planning.repairs] == [["unknown_tool"]]
    assert len(planning.attempts) == 2 and planning.usage.calls == 2
    assert model_server.requests["main-model"] == 2
    # the repair prompt told the model what was wrong, where
    told = model_server.bodies[1]["messages"][-1]["content"]
    assert "unknown_tool" in told and "$.plan.steps[0].tool" in told
    before = model_server.total
    report, _ = replay(records)
    assert report.identical and model_server.total == before


async def test_agent_step_calls_two_tools_after_a_429_fallback_and_replays_offline(
    agent_client: LoomClient, model_server: FakeModelServer
) -> None:
    model_server.script("main-model", Fail(429, "slow down"), Reply(content="It is LISBON"))
    model_server.script("backup-model", Reply(tool_calls=[
        ToolCall("echo", {"message": "Lisbon"}),
        ToolCall("text", {"text": "lisbon", "op": "upper"}),
    ]))  # fmt: skip
    run = await agent_client.submit(
        RunRequest(plan=agent_plan(), input={"question": "capital of Portugal?"})
    )
    records = await agent_client.wait(run.run_id, timeout=BOUND_S)
    assert of(records, RunCompleted)[0].output == "It is LISBON"
    turns = of(records, ModelCallCompleted)
    assert [t.turn for t in turns] == [1, 2]
    first = turns[0]
    assert first.model == "backup"
    assert [(a.model, a.fallback, a.error.code if a.error else None) for a in first.attempts] == [
        ("main", False, "rate_limited"),
        ("backup", True, None),
    ]
    assert first.usage.input_tokens == 10 and first.usage.cost_usd > 0
    calls = of(records, ToolCallCompleted)
    assert sorted((c.step_id, c.output) for c in calls if c.step_id != "say") == [
        ("think/c1-0", {"message": "Lisbon"}), ("think/c1-1", {"result": "LISBON"}),
    ]  # fmt: skip
    # the second turn told the model both results, in order
    second = conversation(of(records, ModelCallRequested), 2)
    assert second is not None
    assert [m.role for m in second] == ["system", "user", "assistant", "tool", "tool"]
    assert '"LISBON"' in (second[-1].content or "")

    # the trace: a chat span per turn under the agent's attempt, GenAI attributes, cost;
    # usage by model counts them (the tracing service's read model, no event to wait on)
    async def chats() -> list[Any]:
        spans = await agent_client.trace(run.run_id)
        done = [s for s in spans if s.name.startswith("chat") and s.end is not None]
        return done if len(done) == 2 else []

    chat = (await eventually(chats, "two chat spans"))[0]
    assert chat.name == "chat main" and chat.kind == "client"
    attrs = chat.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.response.model"] == "backup"
    assert attrs["gen_ai.usage.input_tokens"] == 10
    assert attrs["gen_ai.response.finish_reasons"] == ["tool_calls"]
    assert attrs["loom.cost_usd"] > 0 and attrs["loom.model.fallback"] is True
    assert [e.attributes["error.type"] for e in chat.events] == ["rate_limited"]

    async def by_model() -> list[Any]:
        reply = await bus.request(
            agent_client.nc, subjects.API_TRACES_USAGE, UsageQuery(by="model"), UsageReply, 10.0
        )
        return [r for r in reply.rows if r.key == "main" and r.calls == 2]

    row = (await eventually(by_model, "usage by model"))[0]
    assert row.input_tokens == 20 and row.output_tokens == 10 and row.cost_usd > 0

    seen = model_server.total
    report, _ = replay(records)
    assert report.identical, report.divergence
    # fork downstream of the agent: its recorded answer is reused, no model is asked
    fork = await agent_client.fork(ForkRun(run_id=run.run_id, from_step="say"))
    forked = await agent_client.wait(fork.run_id, timeout=BOUND_S)
    assert of(forked, RunCompleted)[0].output == "It is LISBON"
    assert of(forked, StepCompleted)[0].reused_from == run.run_id
    assert model_server.total == seen


async def test_the_executor_takes_each_verdict_and_model_turn_from_its_publish(
    store_settings: StoreSettings, tmp_path: Path
) -> None:
    """A model-planned run's verdict and its agent's turns reach the run's writer as the
    planner publishes them (``routes.DIRECT_INBOXES``, issue 10), not after LOOM_INBOX
    stored and delivered them; each stream copy, which follows, is settled as that one
    was: recorded once, nothing dead-lettered, nothing left to settle."""
    as_json = msgspec.json.encode(agent_plan()).decode()
    async with model_stack(store_settings, tmp_path) as (stack, client, server):
        server.script(
            "main-model",
            Reply(content=as_json),  # the planner's turn: the plan
            Reply(tool_calls=[ToolCall("echo", {"message": "Lisbon"})]),
            Reply(content="It is Lisbon"),
        )
        run = await client.submit(RunRequest(request="capital?", input={"question": "?"}))
        records = await client.wait(run.run_id, timeout=BOUND_S)
        assert of(records, RunCompleted)[0].output == "It is Lisbon"
        assert len(of(records, ModelCallCompleted)) == 2
        executor = next(s for s in stack.stack.services if isinstance(s, ExecutorService))
        assert executor.answers_from_publish == {"plan": 1, "model": 2}
        await eventually(lambda: not executor.taken, "every stream copy settled")
        dlq = await client.js.stream_info(subjects.DLQ_STREAM)
        assert dlq.state.messages == 0


async def test_a_crossed_budget_suspends_and_a_raised_one_resumes(
    agent_client: LoomClient, model_server: FakeModelServer
) -> None:
    model_server.script(
        "main-model",
        Reply(tool_calls=[ToolCall("echo", {"message": "x"})]),
        Reply(content="done"),
    )
    plan = agent_plan()
    plan = Plan(steps=plan.steps, output=plan.output, budget=Budget(max_model_calls=1))
    run = await agent_client.submit(RunRequest(plan=plan, input={"question": "q"}))
    seen = await until(agent_client, run.run_id, having("step_suspended"), BOUND_S)
    suspended = of(seen, StepSuspended)[0]
    assert suspended.label == "budget"
    assert suspended.payload["scope"] == "run"
    assert suspended.payload["exceeded"] == "max_model_calls"
    assert model_server.total == 1
    too_low = await agent_client.resume(run.run_id, {"max_model_calls": "many"}, label="budget")
    assert not too_low.ok and too_low.error is not None
    reply = await agent_client.resume(run.run_id, {"max_model_calls": 5}, label="budget")
    assert reply.ok, reply.error
    records = await agent_client.wait(run.run_id, timeout=BOUND_S)
    assert of(records, RunCompleted)[0].output == "done"
    assert model_server.total == 2
    report, _ = replay(records)
    assert report.identical, report.divergence


async def test_hostile_model_output_is_refused_typed_and_the_stack_goes_on(
    agent_client: LoomClient, model_server: FakeModelServer
) -> None:
    forever = Reply(tool_calls=[ToolCall("echo", {"message": "again"})])
    model_server.script(
        "main-model",
        Reply(tool_calls=[ToolCall("echo", "{not json"), ToolCall("rm_rf", {"path": "/"}),
                          ToolCall("text", {"text": 5, "op": "explode"}),
                          ToolCall("echo", {"message": "{{ secrets.CANARY }}"})]),
        forever, forever,
    )  # fmt: skip
    run = await agent_client.submit(
        RunRequest(plan=agent_plan(max_turns=3), input={"question": "q"})
    )
    records = await agent_client.wait(run.run_id, timeout=BOUND_S)
    refused = {(e.call_id, e.error.code) for e in of(records, ModelOutputRefused)}
    assert refused == {("think/c1-0", "invalid_tool_arguments"), ("think/c1-1", "unknown_tool")}
    failed = of(records, StepFailed)[0]
    assert failed.step_id == "think" and failed.error.code == "max_turns_exceeded"
    assert of(records, RunFailed)
    # the schema-violating call reached the tool-runner and came back a typed error
    second = conversation(of(records, ModelCallRequested), 2) or []
    answers = [m.content or "" for m in second if m.role == "tool"]
    assert "invalid_tool_arguments" in answers[0] and "unknown_tool" in answers[1]
    assert "invalid_input" in answers[2]
    # a secret reference a model writes is not the plan's: never resolved
    assert CANARY not in answers[3]
    assert CANARY not in msgspec.json.encode(records).decode()
    report, _ = replay(records)
    assert report.identical, report.divergence

    # a submitter's budget is checked like the rest of the request
    with pytest.raises(LoomError) as refused:
        await agent_client.submit(RunRequest(request="go", budget=Budget(max_tokens=-5)))
    assert refused.value.error.code == "invalid_budget"
    assert refused.value.error.path == "$.budget.max_tokens"

    model_server.script("main-model", Reply(content="fine"))
    other = await agent_client.submit(RunRequest(plan=agent_plan(), input={"question": "q"}))
    done = await agent_client.wait(other.run_id, timeout=BOUND_S)
    assert of(done, RunCompleted)[0].output == "fine"


async def test_streamed_turns_reach_the_run_subject_live_and_only_whole_turns_are_stored(
    streaming_client: LoomClient, model_server: FakeModelServer
) -> None:
    client = streaming_client
    answer = "Lisbon is the capital of Portugal, on the Tagus."
    model_server.script(
        "main-model",
        Reply(content="Let me check.", tool_calls=[ToolCall("echo", {"message": "Lisbon"})]),
        Reply(content=answer),
    )
    run_id = "streamed-run"
    chunks: list[ModelChunk] = []
    got_all = asyncio.Event()

    async def on_chunk(msg: Any) -> None:
        chunks.append(codec.decode(msg.data, ModelChunk))
        if "".join(c.text for c in chunks if c.turn == 2) == answer:
            got_all.set()

    sub = await client.nc.subscribe(subjects.model_stream(run_id), cb=on_chunk)
    await client.submit(RunRequest(plan=agent_plan(), input={"question": "q"}, run_id=run_id))
    records = await client.wait(run_id, timeout=BOUND_S)
    assert of(records, RunCompleted)[0].output == answer, records[-1]
    async with asyncio.timeout(BOUND_S):  # plain NATS: the last chunks may trail the events
        await got_all.wait()
    await sub.unsubscribe()
    assert "".join(c.text for c in chunks if c.turn == 1) == "Let me check."
    second = [c for c in chunks if c.turn == 2]
    assert len(second) > 1 and [c.seq for c in second] == list(range(len(second)))
    # the tool call was rebuilt from the stream and ran; only whole turns are events
    turns = of(records, ModelCallCompleted)
    assert turns[0].message.tool_calls[0].name == "echo"
    assert turns[1].message.content == answer and turns[1].usage.output_tokens == 5
    assert of(records, ToolCallCompleted)[0].output == {"message": "Lisbon"}
    assert all(r.kind != "model_chunk" for r in records)
    assert model_server.bodies[0]["stream"] is True
