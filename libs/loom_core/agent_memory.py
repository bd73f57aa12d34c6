"""Memory an agent step recalls before its first turn (``AgentStep.memory``), pure.

The recall is not a hidden side channel: before turn 1 the executor asks the memory
tools as ordinary tool calls of the agent (turn 0, instance paths ``{step}/c0-{k}``,
one idempotency key each), so the tool-runner runs each once, the memory service
answers as the run's stored principal, and the answers are ``tool_call_completed``
events. Turn 1's ``model_call_requested`` then holds the recalled context as messages
in front of the task. Replay and fork read both from the history: no memory service
and no model are needed to re-decide the run.

What is recalled, in this order (the calls' ``k``):
- ``thread_history``: the thread's last ``last_messages`` messages, as conversation;
- ``thread_recall``: the ``top_k`` messages like the query with their windows, from
  the thread or all of the user's threads (``scope: resource``), as a system note;
- ``working_memory_get``: the document and its version, as a system note telling the
  model how to update it (``working_memory_set`` with ``expected_version``: a
  compare-and-set; a conflict answer names the current version).

The current run's own messages are left out (whether its request was indexed before
the recall is a race; leaving it out makes the context the same either way). A failed
recall call does not fail the step: the model is told that memory was unavailable.
"""

from __future__ import annotations

import json
from typing import Any

from loom_core.contracts import AgentMemory, AgentStep, ModelMessage, PlanIssue

RECALL_TURN = 0  # the memory calls' turn number in their instance paths
HISTORY_TOOL = "thread_history"
RECALL_TOOL = "thread_recall"
WORKING_GET_TOOL = "working_memory_get"
WORKING_SET_TOOL = "working_memory_set"
WORKING_TOOLS = frozenset({WORKING_GET_TOOL, WORKING_SET_TOOL, "working_memory_history"})
MAX_LAST_MESSAGES = 50
MAX_TOP_K = 20
MAX_WINDOW = 5
RECALLED_TEXT_CHARS = 2000  # one recalled message's text in the context, at most


def calls(memory: AgentMemory, thread_id: str, query: str) -> list[tuple[str, dict[str, Any]]]:
    """The memory tool calls to make before turn 1: (tool, input), in ``k`` order."""
    out: list[tuple[str, dict[str, Any]]] = []
    if memory.last_messages > 0:
        out.append((HISTORY_TOOL, {"thread_id": thread_id, "last": memory.last_messages}))
    recall = memory.semantic_recall
    if recall is not None and query.strip():
        args: dict[str, Any] = {"query": query, "top_k": recall.top_k, "window": recall.window}
        if recall.scope == "thread":
            args["thread_id"] = thread_id
        if recall.threshold is not None:
            args["threshold"] = recall.threshold
        out.append((RECALL_TOOL, args))
    if memory.working_memory is not None:
        out.append((WORKING_GET_TOOL, _working_scope({}, memory, thread_id)))
    return out


def tools(step: AgentStep) -> list[str]:
    """The tools the model may call: the step's, and ``working_memory_set`` when the
    step declares working memory."""
    names = list(step.tools)
    if step.memory is not None and step.memory.working_memory is not None:
        names += [n for n in (WORKING_SET_TOOL,) if n not in names]
    return names


def scoped_arguments(
    step: AgentStep, tool: str, args: dict[str, Any], thread_id: str
) -> dict[str, Any]:
    """A working-memory call's arguments with the step's scope imposed: the model
    cannot reach another thread's document through the argument it writes."""
    memory = step.memory
    if memory is None or memory.working_memory is None or tool not in WORKING_TOOLS:
        return args
    return _working_scope(args, memory, thread_id)


def _working_scope(args: dict[str, Any], memory: AgentMemory, thread_id: str) -> dict[str, Any]:
    scoped = {k: v for k, v in args.items() if k != "thread_id"}
    if memory.working_memory == "thread":
        scoped["thread_id"] = thread_id
    return scoped


def context(
    made: list[tuple[str, dict[str, Any]]],
    answers: list[str | None],
    run_id: str,
) -> list[ModelMessage]:
    """The messages to put between the instructions and the task, from each memory
    call's recorded answer (JSON text: the tool's output, or ``{"error", ...}``)."""
    notes: list[str] = []
    history: list[ModelMessage] = []
    for (tool, _), text in zip(made, answers, strict=True):
        value = _loads(text)
        if isinstance(value, dict) and "error" in value:  # no output of theirs has one
            notes.append(f"Memory ({tool}) was unavailable: {_clip(str(value.get('error')))}.")
            continue
        if tool == HISTORY_TOOL:
            for m in _messages(value.get("messages") if isinstance(value, dict) else None):
                if m.get("run_id") != run_id:
                    text = _clip(_text(m.get("text")))
                    if m.get("role") == "assistant":
                        history.append(ModelMessage(role="assistant", content=text))
                    else:
                        history.append(ModelMessage(role="user", content=text))
        elif tool == RECALL_TOOL:
            lines = _recalled(value, run_id)
            if lines:
                head = "Earlier messages recalled from memory as relevant to this task"
                notes.append(f"{head} (oldest first within each excerpt):\n" + "\n".join(lines))
        elif tool == WORKING_GET_TOOL and isinstance(value, dict):
            version = value.get("version") if isinstance(value.get("version"), int) else 0
            doc = _clip(json.dumps(value.get("doc"), sort_keys=True))
            notes.append(
                f"Working memory (version {version}): {doc}\nTo change it, call "
                f"{WORKING_SET_TOOL} with the whole new document as `doc` and "
                f"`expected_version` {version}; if it answers with a conflict, it names the "
                "current version: read it and try again."
            )
    system = [ModelMessage(role="system", content="\n\n".join(notes))] if notes else []
    return system + history


def _recalled(value: Any, run_id: str) -> list[str]:
    lines: list[str] = []
    seen: set[tuple[Any, Any]] = set()
    for hit in value if isinstance(value, list) else []:
        if not isinstance(hit, dict):
            continue
        excerpt = []
        for m in _messages(hit.get("window")) or _messages([hit]):
            key = (m.get("thread_id"), m.get("seq"))
            if m.get("run_id") == run_id or key in seen:
                continue
            seen.add(key)
            excerpt.append(f"- {_text(m.get('role'))}: {_clip(_text(m.get('text')))}")
        if excerpt:
            lines += excerpt
            lines.append("")
    return lines[:-1] if lines else lines


def _messages(value: Any) -> list[dict[str, Any]]:
    return [m for m in value if isinstance(m, dict)] if isinstance(value, list) else []


def _loads(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else {"error": "no_result"}
    except ValueError:
        return {"error": "unreadable"}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _clip(text: str) -> str:
    if len(text) <= RECALLED_TEXT_CHARS:
        return text
    return text[:RECALLED_TEXT_CHARS] + " [...]"


def issues(path: str, step: AgentStep) -> list[PlanIssue]:
    memory = step.memory
    if memory is None:
        return []
    out = []

    def bad(where: str, message: str) -> None:
        out.append(PlanIssue(code="invalid_step", path=f"{path}.memory.{where}",
                             message=f"agent step {step.id!r}: {message}"))  # fmt: skip

    if not 0 <= memory.last_messages <= MAX_LAST_MESSAGES:
        bad("last_messages", f"last_messages must be 0 to {MAX_LAST_MESSAGES} "
            f"(got {memory.last_messages})")  # fmt: skip
    recall = memory.semantic_recall
    if recall is not None:
        if not 1 <= recall.top_k <= MAX_TOP_K:
            bad("semantic_recall.top_k", f"top_k must be 1 to {MAX_TOP_K} (got {recall.top_k})")
        if not 0 <= recall.window <= MAX_WINDOW:
            bad("semantic_recall.window",
                f"window must be 0 to {MAX_WINDOW} (got {recall.window})")  # fmt: skip
        if recall.threshold is not None and not -1 <= recall.threshold <= 1:
            bad("semantic_recall.threshold", "threshold is a similarity from -1 to 1 "
                f"(got {recall.threshold})")  # fmt: skip
    if memory.last_messages == 0 and recall is None and memory.working_memory is None:
        out.append(PlanIssue(code="invalid_step", path=f"{path}.memory",
                             message=f"agent step {step.id!r}: memory recalls nothing; set "
                             "last_messages, semantic_recall or working_memory, or remove "
                             "memory"))  # fmt: skip
    return out
