"""Memory recalled into an agent step's context (``loom_core.agent_memory``), in the pure
core: the recall is turn 0's tool calls, recorded like any; turn 1's request holds what
they answered in front of the task; working memory is the model's to update by
compare-and-set, in the step's scope only. No servers: the "memory service" is a
function of the tool call."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_agent import World, answer, call, check_replays  # type: ignore[import-not-found]

from loom_core import agent_memory
from loom_core.contracts import (
    AgentMemory,
    AgentStep,
    FinalStep,
    ModelCallRequested,
    Plan,
    RunCompleted,
    SemanticRecall,
    StepFailed,
    ToolCallRequested,
)
from loom_core.executor import fold, restore, snapshot
from loom_core.validation import validate_plan

MEMORY = AgentMemory(
    last_messages=4,
    semantic_recall=SemanticRecall(top_k=2, window=1),
    working_memory="thread",
)


def plan_with(memory: AgentMemory | None = MEMORY, **fields: Any) -> Plan:
    step = AgentStep(id="a", instructions="do it", input="{{ input.q }}", tools=["echo"],
                     memory=memory, **fields)  # fmt: skip
    return Plan(steps=[step, FinalStep(id="out", output="{{ steps.a.output }}")])


def msg(seq: int, role: str, text: str, run_id: str = "r0") -> dict[str, Any]:
    return {"thread_id": "t1", "seq": seq, "role": role, "text": text, "run_id": run_id}


def memory_service(c: ToolCallRequested) -> Any:
    match c.tool:
        case "thread_history":
            return {"thread_id": "t1", "total": 3, "messages": [
                msg(1, "user", "my cat is called Miso"), msg(2, "assistant", "noted"),
                msg(3, "user", "what?", run_id="r1"),  # this run's own request: left out
            ]}  # fmt: skip
        case "thread_recall":
            return [{**msg(1, "user", "my cat is called Miso"), "score": 0.9,
                     "window": [msg(1, "user", "my cat is called Miso"), msg(2, "assistant",
                                                                            "noted")]}]  # fmt: skip
        case "working_memory_get":
            return {"version": 3, "doc": {"pets": ["Miso"]}, "schema": None}
        case "working_memory_set":
            return {"version": c.input["expected_version"] + 1, "doc": c.input["doc"]}
    return {"echo": c.input}


def world(plan: Plan, turns: list[Any]) -> World:
    w = World(plan, turns, thread_id="t1")
    w.tool_output = memory_service
    return w


def test_recall_is_turn_zero_and_its_answers_lead_the_first_turn() -> None:
    w = world(plan_with(), [
        answer(None, call("working_memory_set", {"doc": {"pets": ["Miso", "Rex"]},
                                                 "expected_version": 3, "thread_id": "t9"})),
        answer("Miso"),
    ])  # fmt: skip
    w.run()
    assert w.of(RunCompleted)[0].output == "Miso"
    recall = [(c.step_id, c.tool, c.input) for c in w.of(ToolCallRequested)][:3]
    assert recall == [
        ("a/c0-0", "thread_history", {"thread_id": "t1", "last": 4}),
        ("a/c0-1", "thread_recall", {"query": "what?", "top_k": 2, "window": 1,
                                     "thread_id": "t1"}),
        ("a/c0-2", "working_memory_get", {"thread_id": "t1"}),
    ]  # fmt: skip
    first = w.of(ModelCallRequested)[0]
    assert first.turn == 1 and first.tools == ["echo", "working_memory_set"]
    assert [(m.role, m.content) for m in first.messages][2:] == [
        ("user", "my cat is called Miso"),
        ("assistant", "noted"),
        ("user", "what?"),
    ]
    note = first.messages[1].content or ""
    assert first.messages[1].role == "system"
    assert "- user: my cat is called Miso\n- assistant: noted" in note
    assert 'Working memory (version 3): {"pets": ["Miso"]}' in note
    assert "expected_version` 3" in note
    # the model named another thread: the step's scope wins
    update = w.of(ToolCallRequested)[3]
    assert update.tool == "working_memory_set" and update.input["thread_id"] == "t1"
    check_replays(w)


def test_a_failed_recall_is_told_and_the_step_goes_on() -> None:
    w = world(plan_with(AgentMemory(last_messages=2)), [answer("ok")])

    def down(c: ToolCallRequested) -> Any:
        raise AssertionError("unused")

    w.tool_output = down
    # answer the recall call with a typed failure by hand
    from loom_core.contracts import ErrorInfo, ToolResult

    c = w.of(ToolCallRequested)[0]
    w.send(ToolResult(run_id="r1", step_id=c.step_id, attempt=1,
                      idempotency_key=c.idempotency_key, ok=False, started_at=w.now,
                      finished_at=w.now,
                      error=ErrorInfo(code="memory_unavailable", message="down")))  # fmt: skip
    w.run()
    first = w.of(ModelCallRequested)[0]
    assert "Memory (thread_history) was unavailable: memory_unavailable" in (
        first.messages[1].content or ""
    )
    assert w.of(RunCompleted)[0].output == "ok"
    check_replays(w)


def test_the_run_thread_is_the_default_and_a_template_may_name_another() -> None:
    step_memory = AgentMemory(last_messages=1, thread_id="{{ input.q }}-thread")
    w = world(plan_with(step_memory), [answer("ok")])
    w.run()
    assert w.of(ToolCallRequested)[0].input == {"thread_id": "what?-thread", "last": 1}
    w = World(plan_with(AgentMemory(working_memory="user")), [answer("ok")])
    w.tool_output = memory_service
    w.run()
    assert w.of(ToolCallRequested)[0].input == {}  # the user's own document
    w = World(plan_with(AgentMemory(semantic_recall=SemanticRecall(scope="resource"))), [])
    assert w.of(ToolCallRequested)[0].input == {"query": "what?", "top_k": 3, "window": 1}


def test_a_thread_template_that_is_not_text_fails_the_step_typed() -> None:
    w = world(plan_with(AgentMemory(last_messages=1, thread_id="{{ input }}")), [])
    failed = w.of(StepFailed)
    assert failed and failed[0].error.path == "$.steps.a.memory.thread_id"
    assert failed[0].error.code == "invalid_input" and not w.of(ToolCallRequested)


def test_recall_in_flight_survives_a_snapshot_and_a_fold() -> None:
    w = world(plan_with(), [answer("Miso")])
    restored = restore(snapshot(w.state))
    assert restored.agents["a"].pending == ["a/c0-0", "a/c0-1", "a/c0-2"]
    folded = fold("r1", w.events)
    assert folded.agents["a"].pending == w.state.agents["a"].pending
    w.state = folded  # carry on from the history alone
    w.run()
    assert w.of(RunCompleted)[0].output == "Miso"
    check_replays(w)


def test_validation_names_each_bad_memory_option() -> None:
    bad = AgentMemory(
        last_messages=500, semantic_recall=SemanticRecall(top_k=0, window=9, threshold=3.0)
    )
    issues = {(i.code, i.path) for i in validate_plan(plan_with(bad))}
    assert issues == {
        ("invalid_step", "$.plan.steps[0].memory.last_messages"),
        ("invalid_step", "$.plan.steps[0].memory.semantic_recall.top_k"),
        ("invalid_step", "$.plan.steps[0].memory.semantic_recall.window"),
        ("invalid_step", "$.plan.steps[0].memory.semantic_recall.threshold"),
    }  # fmt: skip
    nothing = validate_plan(plan_with(AgentMemory()))
    assert [(i.code, i.path) for i in nothing] == [("invalid_step", "$.plan.steps[0].memory")]
    unknown_ref = validate_plan(
        plan_with(AgentMemory(last_messages=1, thread_id="{{ steps.nope.output }}"))
    )
    assert any("memory.thread_id" in i.path for i in unknown_ref)


JSONS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(answers=st.lists(JSONS, min_size=3, max_size=3), huge=st.booleans())
def test_whatever_memory_answers_the_first_turn_is_asked_bounded_and_replays(
    answers: list[Any], huge: bool
) -> None:
    w = world(plan_with(), [answer("done")])
    if huge:
        answers[0] = {"messages": [msg(i, "user", "x" * 50_000) for i in range(3)]}
    outputs = dict(zip(("thread_history", "thread_recall", "working_memory_get"), answers,
                       strict=True))  # fmt: skip
    w.tool_output = lambda c: outputs.get(c.tool)
    w.run()
    first = w.of(ModelCallRequested)
    if first:
        for m in first[0].messages:
            assert len(m.content or "") <= 3 * agent_memory.RECALLED_TEXT_CHARS + 10_000
        assert w.of(RunCompleted)
    else:  # only a context over the step input limit may stop it, typed
        assert w.of(StepFailed)[0].error.code == "context_too_large"
    json.dumps([str(e) for e in w.events])
    check_replays(w)
