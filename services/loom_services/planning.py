"""Planning a natural-language request with a model (the planner service's side).

The model gets the plan language (a compact summary of docs/plan-language.md), the tool
catalog (names, descriptions, input schemas) and the run's input; it answers a plan as
JSON. The answer is decoded and validated by the same validator as an explicit plan
(``loom_core.validation.validate_plan``); the problems are told back to the model for at
most ``MAX_REPAIRS`` repairs. What the run records (``PlanningRecord``): the model, the
prompt's identity (``PROMPT_VERSION`` and a digest of the prompt and catalog; not the
text), every attempt, the problems of each refused proposal, and the usage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from loom_core import replanning
from loom_core.contracts import (
    ModelMessage,
    ModelUsage,
    Plan,
    PlanIssue,
    PlanningRecord,
    ReplanRequested,
    RunRequested,
    ToolSpec,
)
from loom_core.tool_access import check_tool_access
from loom_core.validation import plan_issue_from_decode_error, validate_plan
from loom_services.models import ModelLayer

PROMPT_VERSION = "plan-v1"
MAX_REPAIRS = 2  # proposals after the first one; then the request is refused
MAX_ISSUES_TOLD = 20

PLAN_LANGUAGE = """\
You write plans for agentloom. Answer with ONE JSON object, a plan, and nothing else.

A plan: {"steps": [STEP, ...], "output": TEMPLATE (optional), "name": "short-name"}.
Steps run when the steps they reference (or list in "depends_on") have succeeded.
Every step has a unique "id" (letters, digits, _ or -) and a "kind":
- {"kind": "tool", "id": ID, "tool": TOOL_NAME, "input": {...}}  call one tool of the
  catalog; "input" must match the tool's input schema.
- {"kind": "foreach", "id": ID, "items": ARRAY_OR_TEMPLATE, "do": [STEP, ...]}  run the
  body once per element; inside, "{{ item }}" and "{{ index }}".
- {"kind": "if", "id": ID, "condition": PREDICATE, "then": [STEP...], "else": [STEP...]}
- {"kind": "parallel", "id": ID, "branches": {"name": [STEP, ...], ...}}
- {"kind": "final", "id": ID, "output": TEMPLATE}  the run's output.
Templates are strings: "{{ input.city }}" (the run input), "{{ steps.ID.output }}" or
"{{ steps.ID.output.field }}" (an earlier step's output); a string that is only one
template keeps the value's type. Predicates are JSON, never code:
{"eq": [a, b]}, {"gt": [a, b]}, {"and": [p, ...]}, {"not": p}, {"exists": TEMPLATE}.
Use only the tools listed below, with inputs their schemas allow.
"""

EXAMPLE = {
    "steps": [
        {"kind": "tool", "id": "shout", "tool": "text",
         "input": {"text": "{{ input.city }}", "op": "upper"}},
        {"kind": "final", "id": "answer", "output": "{{ steps.shout.output.result }}"},
    ],
}  # fmt: skip


def system_prompt(catalog: Mapping[str, ToolSpec]) -> str:
    tools = [
        {"name": s.name, "description": s.description, "input_schema": s.input_schema}
        for s in sorted(catalog.values(), key=lambda s: s.name)
    ]
    return (
        PLAN_LANGUAGE
        + "\nExample plan:\n"
        + json.dumps(EXAMPLE)
        + "\n\nTools:\n"
        + json.dumps(tools, sort_keys=True)
    )


def prompt_id(system: str, version: str = PROMPT_VERSION) -> str:
    return f"{version}:{hashlib.sha256(system.encode()).hexdigest()[:16]}"


def user_prompt(event: RunRequested) -> str:
    return json.dumps({"request": event.request, "input": event.input}, sort_keys=True)


def repair_prompt(issues: list[PlanIssue]) -> str:
    told = [
        {"code": i.code, "path": i.path, "message": i.message} for i in issues[:MAX_ISSUES_TOLD]
    ]
    return (
        "That plan is not valid. Problems (path, code, message):\n"
        + json.dumps(told)
        + "\nAnswer the corrected plan as one JSON object, nothing else."
    )


def decode(content: str | None) -> Plan | PlanIssue:
    text = (content or "").strip()
    if text.startswith("```"):  # a fenced answer: take what is inside
        text = text.strip("`")
        text = text[text.find("{") :] if "{" in text else text
    try:
        return msgspec.json.decode(text.encode(), type=Plan)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return plan_issue_from_decode_error(exc)


async def plan_with_model(
    layer: ModelLayer,
    model: str | None,
    event: RunRequested,
    catalog: Mapping[str, ToolSpec],
) -> tuple[Plan | None, list[PlanIssue], PlanningRecord]:
    """A valid plan (issues empty) or the last problems, and what to record."""

    def check(plan: Plan) -> tuple[Plan, list[PlanIssue]]:
        return plan, validate_plan(plan, catalog, event.input, caps=event.caps)

    system = system_prompt(catalog)
    return await _propose(layer, model, system, user_prompt(event), check, PROMPT_VERSION)


REPLAN_VERSION = "replan-v1"
REPLAN_TASK = (
    "A step of this run's plan failed. Write a JSON plan with ONLY the steps that remain "
    "to do, avoiding what failed. The steps that succeeded are kept with their outputs: "
    "your steps may reference them ({{ steps.ID.output }}) and list them in depends_on, "
    "but do not repeat them or reuse their ids, nor the ids in ids_not_to_reuse. Give "
    "\"output\" if the run's output should be another than the sink steps' outputs."
)


def replan_prompt(failed: ReplanRequested, first: RunRequested | None) -> str:
    told = {
        "task": REPLAN_TASK,
        "request": first.request if first else None,
        "input": first.input if first else {},
        "plan": msgspec.to_builtins(failed.plan),
        "succeeded": failed.outputs,
        "ids_not_to_reuse": failed.retired,
        "failed": {"step": failed.step_id, "error": {"code": failed.error.code,
                                                      "message": failed.error.message}},
    }  # fmt: skip
    return json.dumps(told, sort_keys=True, default=str)


async def replan_with_model(
    layer: ModelLayer,
    model: str | None,
    failed: ReplanRequested,
    first: RunRequested | None,
    catalog: Mapping[str, ToolSpec],
) -> tuple[Plan | None, list[PlanIssue], PlanningRecord]:
    """The whole revised plan (kept steps, then the model's) or the last problems. The
    problems' paths count the kept steps first, as in the plan the run would get."""
    run_input = first.input if first else {}
    caps = first.caps if first else None
    principal = first.principal if first else None

    def check(tail: Plan) -> tuple[Plan, list[PlanIssue]]:
        revised = replanning.revise(failed, tail)
        issues = validate_plan(revised, catalog, run_input, caps=caps)
        issues = issues or replanning.kept_issues(failed, revised)
        return revised, issues or check_tool_access(revised, catalog, principal)

    system = system_prompt(catalog)
    return await _propose(layer, model, system, replan_prompt(failed, first), check, REPLAN_VERSION)


async def _propose(
    layer: ModelLayer,
    model: str | None,
    system: str,
    user: str,
    check: Callable[[Plan], tuple[Plan, list[PlanIssue]]],
    version: str,
) -> tuple[Plan | None, list[PlanIssue], PlanningRecord]:
    """Ask, decode, check; tell the model the problems, at most ``MAX_REPAIRS`` times."""
    messages = [
        ModelMessage(role="system", content=system),
        ModelMessage(role="user", content=user),
    ]
    attempts: list[Any] = []
    repairs: list[list[PlanIssue]] = []
    usage = ModelUsage()
    used_model = model or ""
    issues: list[PlanIssue] = []
    for _ in range(1 + MAX_REPAIRS):
        answer = await layer.complete(model, messages, json_mode=True)
        attempts += answer.attempts
        usage = ModelUsage(
            input_tokens=usage.input_tokens + answer.usage.input_tokens,
            output_tokens=usage.output_tokens + answer.usage.output_tokens,
            cost_usd=round(usage.cost_usd + answer.usage.cost_usd, 10),
            calls=usage.calls + answer.usage.calls,
        )
        used_model = answer.model or used_model
        if answer.message is None:
            error = answer.error
            issues = [PlanIssue(
                code=error.code if error else "model_error",
                path="$.request",
                message=f"the model could not plan this request: "
                f"{error.message if error else 'no answer'}",
            )]  # fmt: skip
            break
        decoded = decode(answer.message.content)
        if isinstance(decoded, PlanIssue):
            issues = [decoded]
        else:
            checked, issues = check(decoded)
            if not issues:
                record = PlanningRecord(
                    model=used_model, prompt_id=prompt_id(system, version), attempts=attempts,
                    repairs=repairs, usage=usage,
                )  # fmt: skip
                return checked, [], record
        repairs.append(issues[:MAX_ISSUES_TOLD])
        messages += [
            ModelMessage(role="assistant", content=answer.message.content),
            ModelMessage(role="user", content=repair_prompt(issues)),
        ]
    record = PlanningRecord(model=used_model, prompt_id=prompt_id(system, version),
                            attempts=attempts, repairs=repairs, usage=usage)  # fmt: skip
    return None, issues, record
