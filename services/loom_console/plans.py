"""A pasted or uploaded plan: parsed without recursing on what it holds, checked for
shape and then by the same validator the executor uses (with the live tool catalog),
every problem at its JSON path. Pure except for the catalog the caller passes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import yaml

from loom_cli.planfile import too_deep_in_yaml
from loom_core import convert
from loom_core.contracts import PlanIssue, RunRequest, ToolSpec
from loom_core.limits import DEFAULT_MAX_DEPTH, check_json
from loom_core.shape import shape_issues
from loom_core.validation import validate_plan
from loom_infra.settings import DEFAULT_MAX_PAYLOAD

MAX_TEXT = 1_000_000  # characters of a pasted plan; a run request must fit one message anyway


def _issue(code: str, path: str, message: str) -> PlanIssue:
    return PlanIssue(code=code, path=path, message=message)


def parse(
    text: str,
    input_override: Mapping[str, Any] | None = None,
    plan_format: str = "native",
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_bytes: int = DEFAULT_MAX_PAYLOAD,
) -> tuple[RunRequest | None, list[PlanIssue]]:
    """The run request ``text`` describes (a run file: ``plan:`` + ``input:``, or a bare
    plan with ``steps:``), or every problem found before validation. ``max_depth`` and
    ``max_bytes``: the console's LOOM_MAX_JSON_DEPTH and LOOM_MAX_PAYLOAD, read at start."""
    if len(text) > MAX_TEXT:
        return None, [
            _issue("too_large", "$", f"the plan is {len(text)} characters; at most {MAX_TEXT}")
        ]
    try:
        deep = too_deep_in_yaml(text, max_depth)
        if deep is not None:
            where, line, column = deep
            return None, [_issue("too_deep", where, f"nested deeper than {max_depth} levels "
                                 f"(line {line}, column {column}); flatten it")]  # fmt: skip
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return None, [_issue("not_yaml", "$", " ".join(str(exc).split()))]
    error = check_json(
        doc, max_depth=max_depth, max_bytes=max_bytes, bytes_setting="LOOM_MAX_PAYLOAD"
    )
    if error is not None:
        return None, [_issue(error.code, error.path or "$", error.message)]
    if not isinstance(doc, dict):
        return None, [_issue("not_a_mapping", "$", "expected a mapping with `plan:` or `steps:`")]
    if plan_format == "plan-execute":
        try:
            doc = {"plan": convert.to_native(doc), "input": doc.get("input") or {}}
        except convert.ConversionError as exc:
            return None, list(exc.issues)
    elif "steps" in doc:
        doc = {"plan": doc}
    if input_override is not None:
        doc["input"] = dict(input_override)
    issues = shape_issues(doc, RunRequest)
    if issues:
        return None, issues
    try:
        request = msgspec.convert(doc, RunRequest)
    except msgspec.ValidationError as exc:
        return None, [_issue("invalid_plan", "$", str(exc))]
    if request.plan is None:
        return None, [
            _issue(
                "missing_field",
                "$.plan",
                "a plan is needed (a request needs a model: use `loom run --request`)",
            )
        ]
    return request, []


def validate(request: RunRequest, catalog: list[ToolSpec]) -> list[PlanIssue]:
    """What the executor would refuse, with the tools the stack has now."""
    assert request.plan is not None
    tools = {spec.name: spec for spec in catalog} if catalog else None
    return validate_plan(request.plan, tools=tools, run_input=request.input)
