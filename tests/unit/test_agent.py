"""The agent step in the pure core (``loom_core.agent``): turns as events, tool calls as
tool events, model output checked like client input, budgets that suspend, and replay
of the whole conversation from the events. No servers and no model: the "model" here is
a function of the conversation, the "tool-runner" one of the tool call."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from loom_core import agent
from loom_core.contracts import (
    AgentStep,
    Budget,
    ErrorInfo,
    EventRecord,
    FinalStep,
    ModelCallCompleted,
    ModelCallFailed,
    ModelCallRequested,
    ModelMessage,
    ModelOutputRefused,
    ModelResult,
    ModelToolCall,
    ModelUsage,
    Plan,
    PlanProposed,
    ResumeRun,
    RunCompleted,
    RunControl,
    RunEvent,
    RunFailed,
    RunRequest,
    SizeLimits,
    StepFailed,
    StepResumed,
    StepSuspended,
    ToolCallCancelled,
    ToolCallRequested,
    ToolResult,
    ToolSpec,
)
from loom_core.executor import (
    Submission,
    advance,
    decide,
    fold,
    initial_state,
    restore,
    snapshot,
    unexpected,
)
from loom_core.replay import replay
from loom_core.validation import validate_plan

T0 = datetime(2026, 1, 1, tzinfo=UTC)
Model = Callable[[ModelCallRequested], ModelResult | None]


def answer(text: str | None = None, *calls: ModelToolCall, tokens: int = 10,
           cost: float = 0.0) -> Callable[[ModelCallRequested], dict[str, Any]]:  # fmt: skip
    def make(req: ModelCallRequested) -> dict[str, Any]:
        return {
            "ok": True,
            "message": ModelMessage(role="assistant", content=text, tool_calls=list(calls)),
            "usage": ModelUsage(input_tokens=tokens, output_tokens=tokens, cost_usd=cost, calls=1),
            "model": "m",
        }

    return make


def call(name: str, args: Any, cid: str = "") -> ModelToolCall:
    text = args if isinstance(args, str) else json.dumps(args)
    return ModelToolCall(id=cid or f"id-{name}", name=name, arguments=text)


class World:
    """Runs a plan with an agent to the end: ``turns`` answer the model turns in order,
    tools answer with their input (``{"echo": input}``)."""

    def __init__(
        self,
        plan: Plan,
        turns: list[Any],
        limits: SizeLimits | None = None,
        budget: Budget | None = None,
        thread_id: str | None = None,
        turn_messages: str = "new",
    ) -> None:
        self.state = initial_state("r1")
        self.now = T0
        self.records: list[EventRecord] = []
        self.turns = list(turns)
        self.tool_output: Callable[[ToolCallRequested], Any] = lambda c: {"echo": c.input}
        request = RunRequest(plan=plan, input={"q": "what?"}, budget=budget, thread_id=thread_id)
        if limits or turn_messages != "new":
            self.send(Submission(request, limits=limits, turn_messages=turn_messages))  # type: ignore[arg-type]
        else:
            self.send(request)
        self.send(PlanProposed(run_id="r1", plan=plan))

    @property
    def events(self) -> list[RunEvent]:
        return [r.event for r in self.records]

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def send(self, message: Any) -> list[RunEvent]:
        self.now += timedelta(milliseconds=1)
        produced = advance(self.state, message, self.now)
        for e in produced:
            self.records.append(EventRecord(run_id="r1", seq=len(self.records) + 1, at=self.now,
                                            event=e))  # fmt: skip
        return produced

    def said(self, turn: int, step_id: str = "a") -> list[ModelMessage]:
        """The whole conversation sent in ``turn``, folded from the lean requests."""
        asked = [e for e in self.of(ModelCallRequested) if e.step_id == step_id]
        messages = agent.conversation(asked, turn)
        assert messages is not None
        return messages

    def model_result(self, req: ModelCallRequested, **fields: Any) -> ModelResult:
        return ModelResult(
            run_id="r1", step_id=req.step_id, turn=req.turn,
            idempotency_key=req.idempotency_key, started_at=self.now, finished_at=self.now,
            **{"ok": False, **fields},
        )  # fmt: skip

    def run(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            asked = [e for e in self.events if isinstance(e, ModelCallRequested)]
            answered = {(e.step_id, e.turn) for e in self.of(ModelCallCompleted | ModelCallFailed)}
            open_turns = [a for a in asked if (a.step_id, a.turn) not in answered]
            asked_calls = (ToolCallRequested, ModelCallRequested)
            done_calls = {
                e.step_id
                for e in self.events
                if hasattr(e, "idempotency_key") and not isinstance(e, asked_calls)
            }
            open_calls = [c for c in self.of(ToolCallRequested) if c.step_id not in done_calls]
            if open_calls:
                c = open_calls[0]
                self.send(ToolResult(
                    run_id="r1", step_id=c.step_id, attempt=c.attempt,
                    idempotency_key=c.idempotency_key, ok=True, started_at=self.now,
                    finished_at=self.now, output=self.tool_output(c),
                ))  # fmt: skip
            elif open_turns and self.turns and not self.state.terminal:
                make = self.turns.pop(0)
                self.send(self.model_result(open_turns[0], **make(open_turns[0])))
            else:
                return
        raise AssertionError("did not settle")


def plan_with(**fields: Any) -> Plan:
    step = AgentStep(id="a", instructions="do it", input="{{ input.q }}", tools=["echo", "text"],
                     **fields)  # fmt: skip
    return Plan(steps=[step, FinalStep(id="out", output="{{ steps.a.output }}")])


def check_replays(w: World) -> None:
    report, state = replay(w.records)
    assert report.identical, report.divergence
    assert state.version == len(w.records)
    assert fold("r1", w.events).status == w.state.status
    assert w.state.running == 0 or not w.state.terminal


# ----------------------------------------------------------------------------- turns


def test_two_tool_calls_then_an_answer() -> None:
    w = World(plan_with(), [
        answer(None, call("echo", {"message": "hi"}, "c1"), call("text", {"text": "a"}, "c2")),
        answer("all done"),
    ])  # fmt: skip
    w.run()
    assert w.of(RunCompleted)[0].output == "all done"
    requests = w.of(ToolCallRequested)
    assert [(r.step_id, r.tool, r.idempotency_key) for r in requests] == [
        ("a/c1-0", "echo", "r1:a/c1-0:1"), ("a/c1-1", "text", "r1:a/c1-1:1"),
    ]  # fmt: skip
    second = w.of(ModelCallRequested)[1]
    assert second.idempotency_key == "r1:a:turn2"
    # lean: the request holds only what is new; the conversation is their fold
    assert second.appended and [m.role for m in second.messages] == ["assistant", "tool", "tool"]
    assert [(m.role, m.tool_call_id) for m in w.said(2)] == [
        ("system", None), ("user", None), ("assistant", None), ("tool", "c1"), ("tool", "c2"),
    ]  # fmt: skip
    assert json.loads(w.said(2)[3].content or "") == {"echo": {"message": "hi"}}
    assert w.said(2) == w.state.agents.get("a", agent.AgentRun(messages=w.said(2))).messages
    assert w.state.model_usage.calls == 2 and w.state.model_usage.tokens == 40
    assert w.state.agents == {}  # forgotten once the step ended
    check_replays(w)


def test_bad_tool_calls_are_refused_and_told_to_the_model() -> None:
    w = World(plan_with(), [
        answer(None, call("echo", "{nope", "c1"), call("rm", {}, "c2"), call("echo", [1], "c3"),
               call("echo", "[" * 500 + "]" * 500, "c4")),
        answer("ok"),
    ])  # fmt: skip
    w.run()
    refused = [(e.call_id, e.error.code) for e in w.of(ModelOutputRefused)]
    assert refused == [
        ("a/c1-0", "invalid_tool_arguments"), ("a/c1-1", "unknown_tool"),
        ("a/c1-2", "invalid_tool_arguments"), ("a/c1-3", "invalid_tool_arguments"),
    ]  # fmt: skip
    assert not w.of(ToolCallRequested)  # nothing ran
    tools = [m for m in w.said(2) if m.role == "tool"]
    assert [json.loads(m.content or "")["error"] for m in tools] == [
        "invalid_tool_arguments", "unknown_tool", "invalid_tool_arguments",
        "invalid_tool_arguments",
    ]  # fmt: skip
    assert w.of(RunCompleted)[0].output == "ok"
    check_replays(w)


def test_too_many_calls_in_one_turn_run_only_the_cap() -> None:
    many = [call("echo", {"message": str(i)}, f"c{i}") for i in range(20)]
    w = World(plan_with(), [answer(None, *many), answer("ok")])
    w.run()
    assert len(w.of(ToolCallRequested)) == agent.MAX_TOOL_CALLS_PER_TURN
    assert {e.error.code for e in w.of(ModelOutputRefused)} == {"too_many_tool_calls"}
    check_replays(w)


def test_output_schema_violations_are_fed_back_then_the_json_is_the_output() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    w = World(plan_with(output_schema=schema), [answer("not json"), answer('{"n": "x"}'),
                                                answer('{"n": 3}')])  # fmt: skip
    w.run()
    assert [e.error.code for e in w.of(ModelOutputRefused)] == ["invalid_model_output"] * 2
    third = w.said(3)
    assert third[-1].role == "user" and "$.n" in (third[-1].content or "")
    assert w.of(RunCompleted)[0].output == {"n": 3}
    check_replays(w)


def test_a_model_that_never_stops_calling_tools_ends_at_max_turns() -> None:
    again = answer(None, call("echo", {"message": "again"}))
    w = World(plan_with(max_turns=3), [again] * 10)
    w.run()
    assert len(w.of(ModelCallRequested)) == 3
    failed = w.of(StepFailed)[0]
    assert failed.error.code == "max_turns_exceeded" and failed.step_id == "a"
    assert w.of(RunFailed)
    check_replays(w)


def test_a_failed_model_call_fails_the_step_with_its_code() -> None:
    def down(req: ModelCallRequested) -> dict[str, Any]:
        return {"error": ErrorInfo(code="rate_limited", message="429"),
                "usage": ModelUsage(calls=1)}  # fmt: skip

    w = World(plan_with(), [down])
    w.run()
    assert w.of(ModelCallFailed)[0].error.code == "rate_limited"
    assert w.of(StepFailed)[0].error.code == "rate_limited"
    check_replays(w)


def test_an_oversized_answer_fails_the_step_and_is_not_recorded() -> None:
    limits = SizeLimits(step_input_bytes=100_000, step_output_bytes=1_000)
    w = World(plan_with(), [answer("x" * 5_000)], limits=limits)
    w.run()
    failed = w.of(ModelCallFailed)[0]
    assert failed.error.code == "model_output_too_large"
    assert not w.of(ModelCallCompleted)
    check_replays(w)


def test_a_conversation_over_the_input_limit_fails_typed() -> None:
    limits = SizeLimits(step_input_bytes=600, step_output_bytes=100_000)
    w = World(plan_with(), [answer(None, call("echo", {"message": "y" * 400}))], limits=limits)
    w.run()
    assert w.of(StepFailed)[0].error.code == "context_too_large"
    check_replays(w)


# ----------------------------------------------------------------------------- budgets


def test_a_step_budget_suspends_and_a_raised_one_goes_on() -> None:
    w = World(plan_with(budget=Budget(max_tokens=30)), [
        answer(None, call("echo", {"message": "x"}), tokens=20), answer("done"),
    ])  # fmt: skip
    w.run()
    suspended = w.of(StepSuspended)[0]
    assert suspended.label == "budget" and suspended.schema == agent.BUDGET_SCHEMA
    assert suspended.payload["scope"] == "step" and suspended.payload["exceeded"] == "max_tokens"
    assert suspended.payload["used"]["tokens"] == 40
    assert len(w.of(ModelCallRequested)) == 1
    # a bad answer changes nothing; a good one raises the limit and the turn is asked
    assert w.send(ResumeRun(run_id="r1", data={"max_tokens": "lots"}, label="budget")) == []
    w.send(ResumeRun(run_id="r1", data={"max_tokens": 1000}, label="budget", request_id="x"))
    assert len(w.of(ModelCallRequested)) == 2
    w.run()
    assert w.of(RunCompleted)[0].output == "done"
    check_replays(w)


def test_a_run_budget_counts_every_agent_and_suspends_again_while_still_over() -> None:
    plan = plan_with()
    plan = Plan(steps=plan.steps, budget=Budget(max_model_calls=1, max_cost_usd=1.0))
    w = World(plan, [answer(None, call("echo", {"message": "x"}), cost=0.5), answer("ok")])
    w.run()
    first = w.of(StepSuspended)[0]
    assert (first.payload["scope"], first.payload["exceeded"]) == ("run", "max_model_calls")
    w.send(ResumeRun(run_id="r1", data={"max_cost_usd": 5.0}, label="budget", request_id="1"))
    second = w.of(StepSuspended)[1]  # the call limit still holds: asked again
    assert second.suspension_id == "a#2" and second.payload["exceeded"] == "max_model_calls"
    w.send(ResumeRun(run_id="r1", data={"max_model_calls": 3}, label="budget", request_id="2"))
    w.run()
    assert w.of(RunCompleted)[0].output == "ok"
    assert [e.data for e in w.of(StepResumed)] == [{"max_cost_usd": 5.0}, {"max_model_calls": 3}]
    check_replays(w)


# ----------------------------------------------------------------------------- what is believed


def test_late_duplicate_and_forged_results_cause_nothing() -> None:
    w = World(plan_with(), [])
    req = w.of(ModelCallRequested)[0]
    good = w.model_result(req, **answer("fine")(req))
    wrong_turn = msgspec.structs.replace(good, turn=2, idempotency_key="r1:a:turn2")
    assert unexpected(w.state, wrong_turn) is not None
    assert w.send(wrong_turn) == []
    forged = msgspec.structs.replace(good, request_digest="0" * 32)
    error = unexpected(w.state, forged)
    assert error is not None and error.code == "unexpected_message" and error.path == "$.turn"
    genuine = msgspec.structs.replace(good, request_digest=w.state.agents["a"].request_digest)
    assert unexpected(w.state, genuine) is None
    assert w.send(genuine)
    assert w.send(genuine) == []  # a redelivery
    assert unexpected(w.state, genuine) is not None
    # a tool result for an agent call nobody asked for
    stray = ToolResult(run_id="r1", step_id="a/c9-0", attempt=1, idempotency_key="r1:a/c9-0:1",
                       ok=True, started_at=T0, finished_at=T0)  # fmt: skip
    assert unexpected(w.state, stray) is not None
    assert w.send(stray) == []


def test_an_agent_calls_result_must_name_the_stored_request() -> None:
    w = World(plan_with(), [])
    req = w.of(ModelCallRequested)[0]
    w.send(w.model_result(req, **answer(None, call("echo", {"message": "x"}))(req)))
    asked = w.of(ToolCallRequested)[0]
    result = ToolResult(run_id="r1", step_id=asked.step_id, attempt=1,
                        idempotency_key=asked.idempotency_key, ok=True, started_at=T0,
                        finished_at=T0, output={"message": "x"})  # fmt: skip
    forged = msgspec.structs.replace(result, request_digest="f" * 32)
    error = unexpected(w.state, forged)
    assert error is not None and "digest" in error.message
    genuine = msgspec.structs.replace(
        result, request_digest=w.state.agents["a"].digests[asked.step_id]
    )
    assert unexpected(w.state, genuine) is None


def test_cancelling_the_run_cancels_the_agents_calls_in_flight() -> None:
    w = World(plan_with(), [answer(None, call("echo", {"message": "x"}), call("text", {}))])
    req = w.of(ModelCallRequested)[0]
    w.send(w.model_result(req, **w.turns.pop(0)(req)))
    assert w.state.running == 2
    w.send(RunControl(run_id="r1", action="cancel"))
    cancelled = w.of(ToolCallCancelled)
    assert [c.step_id for c in cancelled] == ["a/c1-0", "a/c1-1"]
    assert w.state.running == 0 and w.state.status == "cancelled"
    check_replays(w)


def test_decide_is_pure_and_snapshots_keep_the_conversation() -> None:
    w = World(plan_with(), [])
    req = w.of(ModelCallRequested)[0]
    before = copy.deepcopy(w.state)
    result = w.model_result(req, **answer(None, call("echo", {"message": "x"}))(req))
    decided = decide(w.state, result, w.now)
    assert snapshot(w.state) == snapshot(before)
    w.send(result)
    assert w.events[-len(decided) :] == decided
    restored = restore(snapshot(w.state))
    assert restored.agents["a"].reply == w.state.agents["a"].reply
    assert restored.agents["a"].pending == ["a/c1-0"]
    assert snapshot(restored) == snapshot(w.state)


def test_validation_of_agent_steps_and_budgets() -> None:
    catalog = {
        "echo": ToolSpec(name="echo", description="", input_schema={}, output_schema={}),
    }
    bad = Plan(
        steps=[AgentStep(id="a", instructions=" ", tools=["echo", "echo", "nope"], max_turns=0,
                         budget=Budget(max_tokens=0))],
        budget=Budget(max_cost_usd=-1),
    )  # fmt: skip
    issues = {(i.code, i.path) for i in validate_plan(bad, catalog)}
    assert issues == {
        ("invalid_plan", "$.plan.budget.max_cost_usd"),
        ("invalid_step", "$.plan.steps[0].max_turns"),
        ("missing_field", "$.plan.steps[0].instructions"),
        ("invalid_step", "$.plan.steps[0].tools"),
        ("invalid_plan", "$.plan.steps[0].budget.max_tokens"),
        ("unknown_tool", "$.plan.steps[0].tools[2]"),
    }
    assert validate_plan(plan_with(), {**catalog, "text": catalog["echo"]}) == []


# ----------------------------------------------------------------------------- any model


def _model_turn(draw: Any) -> Any:
    kind = draw(st.sampled_from(["text", "calls", "bad", "fail"]))
    if kind == "text":
        return answer(draw(st.text(max_size=20)))
    if kind == "fail":
        return lambda req: {"error": ErrorInfo(code="model_unavailable", message="down")}
    names = st.sampled_from(["echo", "text", "rm", ""])
    args = st.sampled_from(['{"message": "x"}', "{", "[]", "null", '{"a": {"b": 1}}'])
    calls = draw(st.lists(st.builds(lambda n, a: ModelToolCall(id="i", name=n, arguments=a),
                                    names, args), min_size=1, max_size=4))  # fmt: skip
    return answer(None, *calls)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), max_turns=st.integers(1, 4), schema=st.booleans())
def test_whatever_the_model_says_the_step_ends_typed_and_replays(
    data: Any, max_turns: int, schema: bool
) -> None:
    turns = [_model_turn(data.draw) for _ in range(max_turns + 1)]
    output_schema = {"type": "object"} if schema else None
    w = World(plan_with(max_turns=max_turns, output_schema=output_schema), turns)
    w.run()
    assert w.state.terminal, [type(e).__name__ for e in w.events]
    assert len(w.of(ModelCallRequested)) <= max_turns
    assert w.state.running == 0
    for failed in w.of(StepFailed):
        assert failed.error.code in {
            "max_turns_exceeded", "model_unavailable", "invalid_model_output",
        }  # fmt: skip
    check_replays(w)


# ----------------------------------------------------------------------------- trace


def test_agent_runs_trace_chat_spans_and_calls_without_loose_ends() -> None:
    from pathlib import Path

    from loom_core import codec
    from loom_core.spans import build_spans, span_category

    golden = Path(__file__).resolve().parents[1] / "golden"
    for name, chats in (("agent-research", 2), ("agent-hostile", 3)):
        lines = (golden / f"{name}.jsonl").read_text().splitlines()
        spans = build_spans([codec.decode_event(line.encode()) for line in lines])
        assert all(s.end is not None for s in spans), name
        assert not [s.name for s in spans if s.attributes.get("loom.incomplete")], name
        models = [s for s in spans if span_category(s) == "model"]
        assert len(models) == chats, name
        by_id = {s.span_id: s for s in spans}
        for chat in models:
            assert chat.kind == "client" and chat.name.startswith("chat ")
            assert by_id[chat.parent_span_id or ""].name == "attempt 1"
            assert {"gen_ai.request.model", "gen_ai.usage.input_tokens", "loom.cost_usd"} <= set(
                chat.attributes
            )
    research = [s for s in spans if s.name.startswith("call ")]
    assert research == []  # the hostile agent's calls were all refused
    ok = [s for s in models if s.status == "ok"]
    assert ok[0].attributes["gen_ai.response.finish_reasons"] == ["tool_calls"]
    failed = [s for s in models if s.status == "error"]
    assert failed[0].attributes["error.type"] == "model_unavailable"


def test_the_submitters_budget_wins_over_the_plans() -> None:
    plan = plan_with()
    plan = Plan(steps=plan.steps, budget=Budget(max_model_calls=100))
    w = World(plan, [answer(None, call("echo", {"message": "x"}))],
              budget=Budget(max_model_calls=1))  # fmt: skip
    w.run()
    assert w.state.budget == Budget(max_model_calls=1)
    suspended = w.of(StepSuspended)[0]
    assert suspended.payload["scope"] == "run"
    assert suspended.payload["budget"] == {"max_model_calls": 1}
    check_replays(w)
