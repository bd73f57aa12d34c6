"""Memory recalled into agent steps, end to end on both stores: the whole stack in this
process (a real nats-server, the memory service on Qdrant local mode, the tool-runner),
and the fake OpenAI server that every model call reaches through litellm.

A run leaves a message in a thread; an agent step on that thread recalls it (history and
semantic recall) and the model server receives it in the first turn; the model updates
the thread's working memory by compare-and-set; the next run's agent sees the new
version. Replay needs neither the memory service nor the model: zero model requests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_agents import BOUND_S, model_stack, of  # type: ignore[import-not-found]
from waiting import eventually  # type: ignore[import-not-found]

from loom_core import subjects
from loom_core.contracts import (
    AgentMemory,
    AgentStep,
    MemoryReply,
    MemoryRequest,
    Plan,
    Principal,
    RunCompleted,
    RunRequest,
    SemanticRecall,
    ToolCallCompleted,
    ToolCallRequested,
    ToolStep,
)
from loom_core.replay import replay
from loom_infra import bus
from loom_infra.auth import ANONYMOUS_USER
from loom_infra.client import LoomClient
from loom_infra.fakemodel import FakeModelServer, Reply, ToolCall
from loom_infra.settings import StoreSettings

pytestmark = pytest.mark.integration

THREAD = "t-cat"
SAME_USER = Principal(user_id=ANONYMOUS_USER, via="operator", anonymous=True)


@pytest.fixture
async def client(
    store_settings: StoreSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[LoomClient, FakeModelServer]]:
    monkeypatch.setenv("LOOM_EMBEDDER", "hash")  # speed; the real model has its own test
    async with model_stack(store_settings, tmp_path) as (stack, c, server):
        yield c, server


def remembering_plan() -> Plan:
    think = AgentStep(
        id="think",
        instructions="Answer from what you remember.",
        input="{{ input.question }}",
        tools=["echo"],
        memory=AgentMemory(
            last_messages=4,
            semantic_recall=SemanticRecall(top_k=2, window=1),
            working_memory="thread",
        ),
    )
    return Plan(steps=[think], output="{{ steps.think.output }}")


async def history(client: LoomClient) -> list[dict[str, Any]]:
    reply = await bus.request(
        client.nc, subjects.API_MEMORY_OPERATOR,
        MemoryRequest(op="history", args={"thread_id": THREAD}, principal=SAME_USER),
        MemoryReply, 10.0,
    )  # fmt: skip
    assert reply.error is None, reply.error
    return reply.result["messages"]  # type: ignore[index]


async def test_an_agent_recalls_its_thread_and_updates_working_memory_by_cas(
    client: tuple[LoomClient, FakeModelServer],
) -> None:
    c, server = client
    note = Plan(steps=[ToolStep(id="say", tool="echo", input={"message": "{{ input.note }}"})])
    told = await c.submit(
        RunRequest(plan=note, input={"note": "my cat is called Miso"}, thread_id=THREAD)
    )
    await c.wait(told.run_id, timeout=BOUND_S)
    # the memory service indexes a thread from the run events: wait for both messages
    await eventually(lambda: _both(c), "the first run's messages in the thread")

    server.script("main-model",
        Reply(tool_calls=[ToolCall("working_memory_set",
                                   {"doc": {"pet": "Miso"}, "expected_version": 0})]),
        Reply(content="Your cat is Miso."),
    )  # fmt: skip
    asked = await c.submit(RunRequest(plan=remembering_plan(), input={"question": "my pet?"},
                                      thread_id=THREAD))  # fmt: skip
    records = await c.wait(asked.run_id, timeout=BOUND_S)
    assert of(records, RunCompleted)[0].output == "Your cat is Miso."
    recall = [(e.step_id, e.tool) for e in of(records, ToolCallRequested)]
    assert recall[:3] == [("think/c0-0", "thread_history"), ("think/c0-1", "thread_recall"),
                          ("think/c0-2", "working_memory_get")]  # fmt: skip
    # what the model server received in the first turn holds the recalled messages
    first = server.bodies[0]["messages"]
    texts = [m.get("content") or "" for m in first]
    assert any("my cat is called Miso" in t for t in texts[1:-1])  # history, as conversation
    assert "Earlier messages recalled" in texts[1] and "Miso" in texts[1]
    assert "Working memory (version 0): null" in texts[1]
    assert texts[-1] == "my pet?"
    assert any(t["function"]["name"] == "working_memory_set" for t in server.bodies[0]["tools"])
    done = {e.step_id: e.output for e in of(records, ToolCallCompleted)}
    assert done["think/c1-0"]["version"] == 1  # the compare-and-set went through
    seen = server.total
    report, _ = replay(records)
    assert report.identical, report.divergence
    assert server.total == seen  # replay: no model, no memory service

    # the next run's agent sees version 1 in its context; a stale CAS is told a conflict
    server.script("main-model",
        Reply(tool_calls=[ToolCall("working_memory_set",
                                   {"doc": {"pet": "Rex"}, "expected_version": 0})]),
        Reply(content="ok"),
    )  # fmt: skip
    again = await c.submit(RunRequest(plan=remembering_plan(), input={"question": "again?"},
                                      thread_id=THREAD))  # fmt: skip
    records = await c.wait(again.run_id, timeout=BOUND_S)
    assert of(records, RunCompleted)[0].output == "ok"
    context = server.bodies[seen]["messages"][1]["content"]
    assert 'Working memory (version 1): {"pet": "Miso"}' in context
    tool_answer = server.bodies[seen + 1]["messages"][-1]["content"]
    assert "conflict" in tool_answer


async def _both(c: LoomClient) -> bool:
    return len(await history(c)) >= 2
