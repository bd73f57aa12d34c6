"""The ``agent`` step: a model working in turns, decided purely like every other step.

A turn is a request (``model_call_requested``, with the conversation so far and an
idempotency key ``{run}:{step}:turn{n}``) that the planner service answers into the
run's inbox (``ModelResult``, recorded as ``model_call_completed``/``model_call_failed``).
The model's tool calls become ordinary ``tool_call_requested`` events, one instance
path each (``{step}/c{turn}-{k}``), answered by the tool-runner as any tool call; when
every call of a turn has its result, the next turn is requested with the results. A
final answer (no tool calls) ends the step: its text, or, with ``output_schema``, the
JSON it holds.

Model output is untrusted input (docs/design.md decision 11), checked here like a client's:
- a tool call with arguments that are not a JSON object (malformed, too deep, too
  large), for a tool the step does not allow, or beyond the per-turn cap is refused
  (``model_output_refused``) and the refusal is the tool's answer in the next turn;
- a final answer that is not JSON matching ``output_schema`` is refused and told to the
  model, within ``max_turns``;
- an answer over the run's output size limit fails the step (``model_output_too_large``);
- a model that keeps calling tools ends at ``max_turns`` (``max_turns_exceeded``).

Budgets (``Budget`` on the plan and on the step): before each turn the usage so far
(tokens in + out, cost, model calls; the run's and the step's) is compared with the
limits; at or over one, the step suspends with label ``budget`` (payload: which scope
and limit, usage, the limits) and a person resumes it with raised limits (the answer's
fields replace those limits) or cancels the run.

Everything here is pure: no clock (``now`` arrives with the turn), no I/O, no model.
The executor (``loom_core.executor``) calls in at five places: starting the step, a
model result, a tool result for an agent call, an answer to a budget suspension, and
cancelling the step; ``evolve`` folds the agent events through ``fold_event``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from loom_core import agent_delegates, agent_memory, ids, sizes
from loom_core.contracts import (
    AgentStep,
    Budget,
    ErrorInfo,
    ModelCallCompleted,
    ModelCallFailed,
    ModelCallRequested,
    ModelMessage,
    ModelOutputRefused,
    ModelResult,
    ModelToolCall,
    ModelUsage,
    PlanIssue,
    StepResumed,
    SubRunEnded,
    SubRunFinished,
    SubRunRequested,
    ToolCallCancelled,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolResult,
)
from loom_core.limits import DEFAULT_MAX_DEPTH, check_json
from loom_core.schemas import problems

if TYPE_CHECKING:  # the executor imports this module; only its types are needed here
    from loom_core.executor import Inst, RunState, _Turn

MAX_TURNS_CAP = 100  # the largest max_turns a plan may ask for
MAX_TOOL_CALLS_PER_TURN = 16  # calls beyond this in one answer are refused
BUDGET_LABEL = "budget"
BUDGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_cost_usd": {"type": "number", "minimum": 0},
        "max_model_calls": {"type": "integer", "minimum": 1},
    },
    "additionalProperties": False,
}


# --------------------------------------------------------------------------- state


@dataclass
class Usage:
    tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0

    def add(self, usage: ModelUsage) -> None:
        self.tokens += usage.input_tokens + usage.output_tokens
        self.cost_usd = round(self.cost_usd + usage.cost_usd, 10)
        self.calls += usage.calls


@dataclass
class AgentRun:
    """What an agent step holds between turns (folded from its events)."""

    turn: int = 0  # the last turn requested
    messages: list[ModelMessage] = field(default_factory=list)  # as sent in that turn
    awaiting: bool = False  # that turn has no result yet
    request_digest: str | None = None  # of that turn's model_call_requested
    reply: ModelMessage | None = None  # the model's answer to it
    pending: list[str] = field(default_factory=list)  # tool calls in flight (paths)
    # digest of each call's tool_call_requested: a result must name the stored request
    digests: dict[str, str] = field(default_factory=dict)
    answers: dict[str, str] = field(default_factory=dict)  # call path -> tool message
    feedback: list[str] = field(default_factory=list)  # refusals of a final answer
    usage: Usage = field(default_factory=Usage)
    budget: Budget | None = None  # the step's limits once a person raised them
    children: dict[str, str] = field(default_factory=dict)  # delegate call -> child run


def call_path(iid: str, turn: int, k: int) -> str:
    return f"{iid}/c{turn}-{k}"


def owner_of(state: RunState, step_id: str) -> AgentRun | None:
    """The agent a tool call's step id belongs to, if it is an agent's call."""
    head, _, last = step_id.rpartition("/")
    if not head or not last.startswith("c"):
        return None
    return state.agents.get(head)


def turn_key(run_id: str, iid: str, turn: int) -> str:
    return f"{run_id}:{iid}:turn{turn}"


# --------------------------------------------------------------------------- evolve


def fold_event(state: RunState, event: Any) -> bool:
    """Fold an agent's event into ``state``; False when ``event`` is not an agent's."""
    agent: AgentRun | None
    match event:
        case ModelCallRequested(step_id=iid):
            from loom_core.executor import request_digest

            agent = state.agents.setdefault(iid, AgentRun())
            agent.turn, agent.awaiting = event.turn, True
            agent.messages = extend(agent.messages, event)
            agent.request_digest = request_digest(state.run_id, event)
            agent.reply, agent.pending, agent.answers, agent.feedback = None, [], {}, []
            agent.digests = {}
            return True
        case ModelCallCompleted(step_id=iid, usage=usage):
            agent = state.agents[iid]
            agent.awaiting, agent.reply = False, event.message
            agent.usage.add(usage)
            state.model_usage.add(usage)
            return True
        case ModelCallFailed(step_id=iid, usage=usage):
            agent = state.agents[iid]
            agent.awaiting = False
            agent.usage.add(usage)
            state.model_usage.add(usage)
            return True
        case ModelOutputRefused(step_id=iid, call_id=call, error=error):
            agent = state.agents[iid]
            text = _error_text(error)
            if call:
                agent.answers[call] = text
            else:
                agent.feedback.append(text)
            return True
        case ToolCallRequested(step_id=sid):
            agent = owner_of(state, sid)
            if agent is None:
                return False
            from loom_core.executor import request_digest

            agent.pending.append(sid)
            agent.digests[sid] = request_digest(state.run_id, event)
            state.running += 1
            return True
        case SubRunRequested(step_id=sid):
            agent = owner_of(state, sid)
            if agent is None:
                return False
            agent.pending.append(sid)
            agent.children[sid] = event.child_run_id
            return True
        case SubRunEnded(step_id=sid):
            agent = owner_of(state, sid)
            if agent is None:
                return False
            if sid in agent.pending:
                agent.pending.remove(sid)
            if event.status == "completed" and event.error is None:
                agent.answers[sid] = _json_text(event.output)
            else:
                agent.answers[sid] = _error_text(event.error or ErrorInfo(
                    code=f"sub_run_{event.status}", message=f"the child run {event.status}",
                ))  # fmt: skip
            return True
        case (
            ToolCallCompleted(step_id=sid)
            | ToolCallFailed(step_id=sid)
            | ToolCallCancelled(step_id=sid)
        ):
            agent = owner_of(state, sid)
            if agent is None:
                return False
            if sid in agent.pending:
                agent.pending.remove(sid)
                state.running -= 1
            if isinstance(event, ToolCallCompleted):
                agent.answers[sid] = _json_text(event.output)
            elif isinstance(event, ToolCallFailed):
                agent.answers[sid] = _error_text(event.error)
            return True
    return False


def extend(before: list[ModelMessage], event: ModelCallRequested) -> list[ModelMessage]:
    """The conversation ``event`` asks about, given the one its step's previous request
    asked about (``before``): lean requests carry only what is new."""
    return [*before, *event.messages] if event.appended else list(event.messages)


def conversation(requests: list[ModelCallRequested], turn: int) -> list[ModelMessage] | None:
    """The whole conversation of turn ``turn``, folded from one step's requests in turn
    order (a step's history as stored); None when one it needs is missing. A turn 1
    starts the step again (a revised plan may reuse a failed step's id): the last one
    counts."""
    starts = [i for i, r in enumerate(requests) if r.turn == 1]
    messages: list[ModelMessage] = []
    expected = 1
    for request in requests[starts[-1] if starts else 0 :]:
        if request.turn > turn:
            break
        if request.turn != expected and request.appended:
            return None
        messages, expected = extend(messages, request), request.turn + 1
    return messages if expected == turn + 1 else None


def fold_resumed(state: RunState, event: StepResumed) -> None:
    """A person answered a budget suspension: the answer's fields are the new limits of
    the budget that was crossed (the run's or the step's)."""
    susp = state.suspensions.get(event.suspension_id)
    if susp is None or susp.label != BUDGET_LABEL or not isinstance(event.data, dict):
        return
    raised = {k: v for k, v in event.data.items() if k in BUDGET_SCHEMA["properties"]}
    scope = susp.payload.get("scope") if isinstance(susp.payload, dict) else None
    if scope == "run":
        base = state.budget or (state.plan.budget if state.plan else None) or Budget()
        state.budget = msgspec.structs.replace(base, **raised)
    else:
        agent = state.agents.get(event.step_id)
        inst = state.insts.get(event.step_id)
        if agent is not None and inst is not None and isinstance(inst.step, AgentStep):
            base = agent.budget or inst.step.budget or Budget()
            agent.budget = msgspec.structs.replace(base, **raised)


def forget(state: RunState, iid: str) -> None:
    state.agents.pop(iid, None)


# --------------------------------------------------------------------------- decide


def start(t: _Turn, iid: str, step: AgentStep, ctx: Any) -> None:
    """Render the task; recall its memory (turn 0's tool calls) or ask the first turn."""
    from loom_core.contracts import StepStarted

    instructions, task = _rendered(t, iid, step, ctx)
    recall = _memory_calls(t, iid, step, ctx, task)
    t.emit(StepStarted(step_id=iid, attempt=1))  # its fold makes the AgentRun
    if not recall:
        request_turn(t, iid, step, _first_messages(instructions, task, []))
        return
    for k, (tool, args) in enumerate(recall):
        path = call_path(iid, agent_memory.RECALL_TURN, k)
        t.emit(ToolCallRequested(
            step_id=path, attempt=1, tool=tool, input=args,
            idempotency_key=ids.idempotency_key(t.s.run_id, path, 1),
        ))  # fmt: skip


def _rendered(t: _Turn, iid: str, step: AgentStep, ctx: Any) -> tuple[Any, Any]:
    from loom_core.templating import render

    path = f"$.steps.{iid}"
    instructions = t.bounded_input(
        render(step.instructions, ctx, path=f"{path}.instructions"), iid, f"{path}.instructions"
    )
    task = t.bounded_input(render(step.input, ctx, path=f"{path}.input"), iid, f"{path}.input")
    return instructions, task


def _first_messages(
    instructions: Any, task: Any, recalled: list[ModelMessage]
) -> list[ModelMessage]:
    messages = [ModelMessage(role="system", content=_text(instructions)), *recalled]
    if task is not None:
        messages.append(ModelMessage(role="user", content=_text(task)))
    return messages


def _memory_calls(
    t: _Turn, iid: str, step: AgentStep, ctx: Any, task: Any
) -> list[tuple[str, dict[str, Any]]]:
    """The recall calls of turn 0 (none without ``memory``); templates rendered here."""
    if step.memory is None:
        return []
    from loom_core.templating import render

    query = "" if task is None else _text(task)
    recall = step.memory.semantic_recall
    if recall is not None and recall.query is not None:
        query = _text(render(recall.query, ctx, path=f"$.steps.{iid}.memory.semantic_recall.query"))
    return agent_memory.calls(step.memory, _thread(t, iid, step, ctx), query)


def _thread(t: _Turn, iid: str, step: AgentStep, ctx: Any) -> str:
    """The thread the step's memory reads: ``memory.thread_id`` or the run's."""
    from loom_core.templating import render

    given = step.memory.thread_id if step.memory is not None else None
    if given is not None:
        value = render(given, ctx, path=f"$.steps.{iid}.memory.thread_id")
        if not isinstance(value, str) or not value.strip():
            from loom_core.executor import _StepError

            raise _StepError(ErrorInfo(
                code="invalid_input", path=f"$.steps.{iid}.memory.thread_id",
                message=f"memory.thread_id rendered to {_text(value)[:80]}, not a thread id",
            ))  # fmt: skip
        return value
    return t.s.thread_id or t.s.run_id


def _first_turn(t: _Turn, inst: Inst) -> None:
    """Turn 1, with what turn 0 recalled (re-rendered: the same scope, the same text)."""
    from loom_core.executor import _StepError
    from loom_core.predicates import PredicateError
    from loom_core.templating import TemplateError

    step = inst.step
    assert isinstance(step, AgentStep)
    iid = inst.iid
    agent = t.s.agents[iid]
    ctx = t.context(inst.scope)
    try:
        instructions, task = _rendered(t, iid, step, ctx)
        made = _memory_calls(t, iid, step, ctx, task)
    except (TemplateError, PredicateError) as exc:
        t.fail(iid, ErrorInfo(code=exc.code, message=str(exc), path=exc.path))
        return
    except _StepError as exc:
        t.fail(iid, exc.error)
        return
    recalled: list[ModelMessage] = []
    if made:
        answers = [
            agent.answers.get(call_path(iid, agent_memory.RECALL_TURN, k)) for k in range(len(made))
        ]
        recalled = agent_memory.context(made, answers, t.s.run_id)
    request_turn(t, iid, step, _first_messages(instructions, task, recalled))


def request_turn(t: _Turn, iid: str, step: AgentStep, messages: list[ModelMessage]) -> None:
    """Ask the next turn, unless a budget is crossed (suspend) or turns ran out (fail)."""
    agent = t.s.agents[iid]
    crossed = _crossed(t.s, agent, step)
    if crossed is not None:
        t.suspend(iid, BUDGET_LABEL, crossed, BUDGET_SCHEMA, None)
        return
    turn = agent.turn + 1
    if turn > step.max_turns:
        _fail(t, iid, "max_turns_exceeded",
              f"agent step '{iid}' used its {step.max_turns} turns without a final answer; "
              "raise max_turns or make the instructions ask for an answer sooner")  # fmt: skip
        return
    path = f"$.steps.{iid}.messages"
    too_large = sizes.check_input([msgspec.to_builtins(m) for m in messages], t.s.limits, iid, path)
    if too_large is not None:
        _fail(t, iid, "context_too_large",
              f"agent step '{iid}': the conversation for turn {turn} is over the step input "
              f"limit ({too_large.message}); lower max_turns or ask for shorter tool "
              "outputs")  # fmt: skip
        return
    # lean turns: only what is new since the last request (``messages`` extends it)
    appended = t.s.turn_messages == "new" and agent.turn > 0
    t.emit(ModelCallRequested(
        step_id=iid, turn=turn, messages=messages[len(agent.messages):] if appended else messages,
        idempotency_key=turn_key(t.s.run_id, iid, turn), model=step.model,
        tools=agent_memory.tools(step), output_schema=step.output_schema, appended=appended,
        delegates=agent_delegates.specs(step),
    ))  # fmt: skip


def on_model_result(t: _Turn, result: ModelResult) -> None:
    iid = result.step_id
    inst = t.s.insts.get(iid)
    agent = t.s.agents.get(iid)
    if (
        inst is None
        or agent is None
        or inst.status != "running"
        or not isinstance(inst.step, AgentStep)
        or not agent.awaiting
        or result.turn != agent.turn
        or result.idempotency_key != turn_key(t.s.run_id, iid, agent.turn)
    ):
        return  # late, duplicate or for a turn no longer asked: harmless
    step = inst.step
    if result.ok and result.message is not None:
        too_large = sizes.check_output(
            msgspec.to_builtins(result.message), t.s.limits, iid, f"$.steps.{iid}.output"
        )
        if too_large is not None:
            result = msgspec.structs.replace(result, ok=False, message=None, error=ErrorInfo(
                code="model_output_too_large", message=too_large.message, path=too_large.path,
                details=too_large.details,
            ))  # fmt: skip
    if not result.ok or result.message is None:
        error = result.error or ErrorInfo(code="model_error", message="no answer from the model")
        t.emit(ModelCallFailed(
            step_id=iid, turn=result.turn, idempotency_key=result.idempotency_key, error=error,
            started_at=result.started_at, finished_at=result.finished_at,
            attempts=result.attempts, usage=result.usage, throttled_ms=result.throttled_ms,
        ))  # fmt: skip
        t.fail(iid, error)
        return
    message = msgspec.structs.replace(result.message, role="assistant", tool_call_id=None)
    t.emit(ModelCallCompleted(
        step_id=iid, turn=result.turn, idempotency_key=result.idempotency_key, message=message,
        started_at=result.started_at, finished_at=result.finished_at,
        finish_reason=result.finish_reason, model=result.model, provider=result.provider,
        attempts=result.attempts, usage=result.usage, throttled_ms=result.throttled_ms,
    ))  # fmt: skip
    if message.tool_calls:
        _call_tools(t, inst, step, message.tool_calls, result.turn)
    else:
        _final_answer(t, iid, step, message.content or "", result.turn)


def _call_tools(
    t: _Turn, inst: Inst, step: AgentStep, calls: list[ModelToolCall], turn: int
) -> None:
    iid = inst.iid
    if turn >= step.max_turns:  # their results could never be told to the model
        _fail(t, iid, "max_turns_exceeded",
              f"agent step '{iid}': the model still called tools in its last turn "
              f"({step.max_turns}); raise max_turns or make the instructions ask for an "
              "answer sooner")  # fmt: skip
        return
    for k, call in enumerate(calls):
        path = call_path(iid, turn, k)
        error = _call_problem(t, iid, step, call, k)
        if isinstance(error, ErrorInfo):
            t.emit(ModelOutputRefused(step_id=iid, turn=turn, call_id=path, error=error))
            continue
        delegate = step.delegates.get(call.name)
        if delegate is not None:
            refused = agent_delegates.argument_problem(
                delegate,
                error,
                f"$.steps.{iid}.tool_calls[{k}].arguments",
                len(t.s.agents[iid].children),
            )
            if refused is not None:
                t.emit(ModelOutputRefused(step_id=iid, turn=turn, call_id=path, error=refused))
            else:
                t.emit(SubRunRequested(
                    step_id=path, child_run_id=ids.child_run_id(t.s.run_id, path),
                    plan=delegate.plan, input=error,
                ))  # fmt: skip
            continue
        if step.memory is not None and call.name in agent_memory.WORKING_TOOLS:
            thread = _thread(t, iid, step, t.context(inst.scope))
            error = agent_memory.scoped_arguments(step, call.name, error, thread)
        t.emit(ToolCallRequested(
            step_id=path, attempt=1, tool=call.name, input=error,
            idempotency_key=ids.idempotency_key(t.s.run_id, path, 1),
        ))  # fmt: skip
    _maybe_next_turn(t, iid, step)


def _call_problem(
    t: _Turn, iid: str, step: AgentStep, call: ModelToolCall, k: int
) -> ErrorInfo | dict[str, Any]:
    """The call's arguments (a JSON object), or why it is refused."""
    where = f"$.steps.{iid}.tool_calls[{k}]"
    if k >= MAX_TOOL_CALLS_PER_TURN:
        return ErrorInfo(code="too_many_tool_calls", path=where,
                         message=f"at most {MAX_TOOL_CALLS_PER_TURN} tool calls per turn; "
                         "this one was not run, ask again in the next turn")  # fmt: skip
    allowed_tools = agent_memory.tools(step) + sorted(step.delegates)
    if call.name not in allowed_tools:
        allowed = ", ".join(allowed_tools) or "none"
        return ErrorInfo(code="unknown_tool", path=f"{where}.name",
                         message=f"tool {call.name[:80]!r} is not available to this agent; "
                         f"available tools: {allowed}")  # fmt: skip
    if len(call.arguments.encode()) > t.s.limits.step_input_bytes:
        return ErrorInfo(code="input_too_large", path=f"{where}.arguments",
                         message=f"the arguments are over {t.s.limits.step_input_bytes} "
                         "bytes")  # fmt: skip
    try:
        args = json.loads(call.arguments or "{}")
    except (ValueError, RecursionError) as exc:
        return ErrorInfo(code="invalid_tool_arguments", path=f"{where}.arguments",
                         message=f"the arguments are not valid JSON ({exc}); send a JSON "
                         "object matching the tool's input schema")  # fmt: skip
    if check_json(args, max_depth=DEFAULT_MAX_DEPTH) is not None:
        return ErrorInfo(code="invalid_tool_arguments", path=f"{where}.arguments",
                         message=f"the arguments nest deeper than {DEFAULT_MAX_DEPTH} "
                         "levels")  # fmt: skip
    if not isinstance(args, dict):
        return ErrorInfo(code="invalid_tool_arguments", path=f"{where}.arguments",
                         message=f"the arguments must be a JSON object, got "
                         f"{type(args).__name__}")  # fmt: skip
    return args


def _final_answer(t: _Turn, iid: str, step: AgentStep, content: str, turn: int) -> None:
    if step.output_schema is None:
        t.emit_completed(iid, content)
        return
    try:
        value: Any = json.loads(content)
        if check_json(value, max_depth=DEFAULT_MAX_DEPTH) is not None:
            issues = [("$", f"nests deeper than {DEFAULT_MAX_DEPTH} levels")]
        else:
            issues = problems(step.output_schema, value)
    except (ValueError, RecursionError) as exc:
        issues = [("$", f"the answer is not JSON ({exc})")]
    if not issues:
        t.emit_completed(iid, value)
        return
    text = "; ".join(f"{p}: {m}" for p, m in issues[:10])
    error = ErrorInfo(code="invalid_model_output", path=f"$.steps.{iid}.output",
                      message=f"the answer does not match the output schema: {text}. "
                      "Answer with JSON only, matching the schema",
                      details={"problems": [list(p) for p in issues[:10]]})  # fmt: skip
    t.emit(ModelOutputRefused(step_id=iid, turn=turn, error=error))
    if turn >= step.max_turns:
        t.fail(iid, msgspec.structs.replace(
            error, message=f"agent step '{iid}': no valid answer within {step.max_turns} "
            f"turns; the last one: {text}",
        ))  # fmt: skip
        return
    _maybe_next_turn(t, iid, step)


def _waiting_agent(t: _Turn, call_id: str) -> tuple[AgentRun, Inst, AgentStep] | None:
    """The running agent step that waits for the answer to its call ``call_id``, or None
    (a late, repeated or foreign answer: nothing to do)."""
    agent = owner_of(t.s, call_id)
    inst = t.s.insts.get(call_id.rpartition("/")[0])
    if (
        agent is None
        or inst is None
        or inst.status != "running"
        or not isinstance(inst.step, AgentStep)
        or call_id not in agent.pending
    ):
        return None
    return agent, inst, inst.step


def on_tool_result(t: _Turn, result: ToolResult) -> None:
    waiting = _waiting_agent(t, result.step_id)
    if (
        waiting is None
        or result.attempt != 1
        or result.idempotency_key != ids.idempotency_key(t.s.run_id, result.step_id, 1)
    ):
        return
    _, inst, step = waiting
    if result.ok:
        too_large = sizes.check_output(
            [result.output, result.suspend], t.s.limits, result.step_id,
            f"$.steps.{result.step_id}.output",
        )  # fmt: skip
        if result.suspend is not None and too_large is None:
            too_large = ErrorInfo(code="suspend_not_supported",
                                  message="a tool called by an agent cannot ask a person; "
                                  "call it from a tool step")  # fmt: skip
        if too_large is not None:
            result = msgspec.structs.replace(
                result, ok=False, output=None, suspend=None, error=too_large
            )
    if result.ok:
        t.emit(ToolCallCompleted(
            step_id=result.step_id, attempt=1, idempotency_key=result.idempotency_key,
            output=result.output, started_at=result.started_at, finished_at=result.finished_at,
        ))  # fmt: skip
    else:
        t.emit(ToolCallFailed(
            step_id=result.step_id, attempt=1, idempotency_key=result.idempotency_key,
            error=result.error or ErrorInfo(code="tool_error", message="tool failed"),
            started_at=result.started_at, finished_at=result.finished_at,
        ))  # fmt: skip
    _maybe_next_turn(t, inst.iid, step)


def on_sub_run(t: _Turn, done: SubRunFinished) -> None:
    """A delegate's child run ended: its output (or failure) is the call's answer."""
    waiting = _waiting_agent(t, done.step_id)
    if waiting is None or waiting[0].children.get(done.step_id) != done.child_run_id:
        return
    _, inst, step = waiting
    output, error = done.output, done.error
    if done.status == "completed" and error is None:
        error = sizes.check_output(output, t.s.limits, done.step_id,
                                   f"$.steps.{done.step_id}.output")  # fmt: skip
        output = None if error is not None else output
    t.emit(SubRunEnded(step_id=done.step_id, child_run_id=done.child_run_id,
                       status=done.status, output=output, error=error))  # fmt: skip
    _maybe_next_turn(t, inst.iid, step)


def _maybe_next_turn(t: _Turn, iid: str, step: AgentStep) -> None:
    agent = t.s.agents[iid]
    if agent.pending or agent.awaiting:
        return
    if agent.turn == 0:  # the memory calls are answered
        _first_turn(t, t.s.insts[iid])
        return
    messages = list(agent.messages)
    if agent.reply is not None:
        messages.append(agent.reply)
        for k, call in enumerate(agent.reply.tool_calls):
            answer = agent.answers.get(call_path(iid, agent.turn, k), _error_text(None))
            messages.append(ModelMessage(role="tool", content=answer, tool_call_id=call.id))
    messages += [ModelMessage(role="user", content=text) for text in agent.feedback]
    request_turn(t, iid, step, messages)


def resumed(t: _Turn, inst: Inst) -> None:
    """A budget suspension was answered (limits raised, folded): go on with the turn it
    held back; still over a limit, it suspends again."""
    step = inst.step
    assert isinstance(step, AgentStep)
    agent = t.s.agents[inst.iid]
    if agent.turn == 0:
        _first_turn(t, inst)
    else:
        _maybe_next_turn(t, inst.iid, step)


def cancel_calls(t: _Turn, iid: str, reason: str) -> None:
    agent = t.s.agents.get(iid)
    if agent is None:
        return
    for path in list(agent.pending):
        if path in agent.children:  # a delegate's child run goes on; its end is ignored
            continue
        t.emit(ToolCallCancelled(
            step_id=path, attempt=1, idempotency_key=ids.idempotency_key(t.s.run_id, path, 1),
            reason=reason,
        ))  # fmt: skip


# --------------------------------------------------------------------------- budgets


def _crossed(state: RunState, agent: AgentRun, step: AgentStep) -> dict[str, Any] | None:
    """The suspension payload when a budget is used up, else None."""
    for scope, budget, used in (
        ("run", state.budget or (state.plan.budget if state.plan else None), state.model_usage),
        ("step", agent.budget or step.budget, agent.usage),
    ):
        if budget is None:
            continue
        for limit, value in (
            ("max_tokens", used.tokens),
            ("max_cost_usd", used.cost_usd),
            ("max_model_calls", used.calls),
        ):
            cap = getattr(budget, limit)
            if cap is not None and value >= cap:
                return {
                    "scope": scope,
                    "exceeded": limit,
                    "used": {
                        "tokens": used.tokens,
                        "cost_usd": used.cost_usd,
                        "model_calls": used.calls,
                    },  # fmt: skip
                    "budget": {
                        k: v for k, v in msgspec.to_builtins(budget).items() if k != "type"
                    },  # fmt: skip
                    "how": "resume with raised limits, e.g. --data "
                    f"'{{\"{limit}\": {_raise(cap)}}}', or cancel the run",
                }
    return None


def _raise(cap: float) -> float | int:
    return cap * 2 if isinstance(cap, int) else round(cap * 2, 6)


# --------------------------------------------------------------------------- unexpected


def unexpected_model_result(state: RunState, message: ModelResult) -> str | None:
    """What the run expects instead, or None when it waits for exactly this result."""
    inst = state.insts.get(message.step_id)
    agent = state.agents.get(message.step_id)
    if inst is None or agent is None or inst.status != "running" or not agent.awaiting:
        return f"no model result for step '{message.step_id}'"
    key = turn_key(state.run_id, message.step_id, agent.turn)
    if message.turn != agent.turn or message.idempotency_key != key:
        return f"the result of turn {agent.turn} of step '{message.step_id}' ({key})"
    if agent.request_digest is not None and message.request_digest != agent.request_digest:
        return f"the result of the stored request {key} (digest {agent.request_digest})"
    return None


def unexpected_sub_run(state: RunState, message: SubRunFinished) -> str | None:
    agent = owner_of(state, message.step_id)
    if agent is None or message.step_id not in agent.pending:
        return f"no sub-run end for agent call '{message.step_id}'"
    child = agent.children.get(message.step_id)
    if message.child_run_id != child:
        return f"the end of child run '{child}'"
    return None


def unexpected_tool_result(state: RunState, message: ToolResult) -> str | None:
    agent = owner_of(state, message.step_id)
    if agent is None or message.step_id not in agent.pending:
        return f"no tool result for agent call '{message.step_id}'"
    key = ids.idempotency_key(state.run_id, message.step_id, 1)
    if message.attempt != 1 or message.idempotency_key != key:
        return f"the result of agent call '{message.step_id}' ({key})"
    digest = agent.digests.get(message.step_id)
    if digest is not None and message.request_digest != digest:
        return f"the result of the stored request {key} (digest {digest})"
    return None


# --------------------------------------------------------------------------- validation


def step_issues(path: str, step: AgentStep) -> list[PlanIssue]:
    issues = []
    if not 1 <= step.max_turns <= MAX_TURNS_CAP:
        issues.append(PlanIssue(code="invalid_step", path=f"{path}.max_turns",
                                message=f"agent step {step.id!r}: max_turns must be 1 to "
                                f"{MAX_TURNS_CAP} (got {step.max_turns})"))  # fmt: skip
    if not step.instructions.strip():
        issues.append(PlanIssue(code="missing_field", path=f"{path}.instructions",
                                message=f"agent step {step.id!r}: say what the agent must do "
                                "in `instructions`"))  # fmt: skip
    if len(set(step.tools)) != len(step.tools):
        issues.append(
            PlanIssue(
                code="invalid_step",
                path=f"{path}.tools",
                message=f"agent step {step.id!r} lists a tool twice",
            )
        )
    if step.budget is not None:
        issues += budget_issues(f"{path}.budget", step.budget)
    return issues + agent_memory.issues(path, step) + agent_delegates.issues(path, step)


def budget_issues(path: str, budget: Budget) -> list[PlanIssue]:
    issues = []
    for name in ("max_tokens", "max_cost_usd", "max_model_calls"):
        value = getattr(budget, name)
        if value is not None and not value > 0:
            issues.append(PlanIssue(code="invalid_plan", path=f"{path}.{name}",
                                    message=f"{name} must be positive (got {value}); omit "
                                    "it for no limit"))  # fmt: skip
    return issues


# --------------------------------------------------------------------------- helpers


def _fail(t: _Turn, iid: str, code: str, message: str) -> None:
    t.fail(iid, ErrorInfo(code=code, message=message, path=f"$.steps.{iid}"))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _error_text(error: ErrorInfo | None) -> str:
    if error is None:
        return json.dumps({"error": "no_result", "message": "the call has no result"})
    return json.dumps({"error": error.code, "message": error.message}, sort_keys=True)
