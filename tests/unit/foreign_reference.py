"""``loom_core.foreign`` as it was before startcost made it faster (issue 10): the
reference for ``test_validation_equivalence.py``. A frozen copy.

Plan text that is valid but does not do what its author meant: caught with the native form.

Two mistakes pass every structural check yet run wrongly (issue 16), typically in plans
written for another engine (the plan-execute framework) or by a model trained on one:

- ``"${input.url}"``: not a template here, so the tool gets the literal text
  ``${input.url}``. Refused (``foreign_template``) when what is inside names something a
  native template could (``input``, ``steps``, ``item``, ``index``, ``acc``,
  ``iteration``, ``secrets`` or a step id of the plan), with the native form
  (``{{ input.url }}``). Other ``${...}`` text (a shell snippet's ``${HOME}``) is data.
- ``output: all_weather`` on a foreach, loop or reduce: ``output`` is each element's
  result, a template; a bare name makes every element's result the constant text
  ``"all_weather"``. Refused (``constant_output``), saying how the result is named
  natively (the step's id) and what ``output`` takes.

Pure; walks the plain JSON of a plan iteratively (its depth is bounded before here).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import msgspec

from loom_core.contracts import Plan, PlanIssue
from loom_core.templating import ROOTS, child_path

__all__ = ["foreign_syntax_issues"]

_DOLLAR = re.compile(r"\$\{\s*([A-Za-z_][A-Za-z0-9_-]*)([^{}]*)\}")
_BARE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_COMPOSITES = ("foreach", "loop", "reduce")
_FREE_TEXT = ("description",)  # prose, never rendered


def foreign_syntax_issues(plan: Plan, path: str = "$.plan") -> list[PlanIssue]:
    """``foreign_template`` and ``constant_output`` issues of ``plan``, in document order."""
    doc = msgspec.to_builtins(plan)
    step_ids = set(_step_ids(doc))
    issues: list[PlanIssue] = []
    todo: list[tuple[Any, str]] = [(doc, path)]
    while todo:
        value, where = todo.pop()
        if isinstance(value, str):
            issue = _dollar_issue(value, where, step_ids)
            if issue is not None:
                issues.append(issue)
        elif isinstance(value, dict):
            if value.get("kind") in _COMPOSITES:
                issue = _constant_output(value, where)
                if issue is not None:
                    issues.append(issue)
            todo.extend(
                (v, child_path(where, str(k)))
                for k, v in reversed(value.items())
                if k not in _FREE_TEXT
            )
        elif isinstance(value, list):
            todo.extend((v, child_path(where, i)) for i, v in reversed(list(enumerate(value))))
    return issues


def _step_ids(doc: Any) -> Iterator[str]:
    todo = [doc]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            if isinstance(value.get("kind"), str) and isinstance(value.get("id"), str):
                yield value["id"]
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)


def _dollar_issue(text: str, where: str, step_ids: set[str]) -> PlanIssue | None:
    found = [m for m in _DOLLAR.finditer(text) if m.group(1) in ROOTS or m.group(1) in step_ids]
    if not found:
        return None
    native = _DOLLAR.sub(lambda m: _native(m, step_ids), text)
    first = found[0].group(0)
    return PlanIssue(
        "foreign_template",
        where,
        f"`{first}` is not a template in a loom plan: it would reach the step as the "
        f"literal text {first!r}. Write {native!r} instead (templates are `{{{{ ... }}}}`; "
        "`loom convert` translates whole plans written for the plan-execute framework)",
    )


def _native(m: re.Match[str], step_ids: set[str]) -> str:
    root, rest = m.group(1), m.group(2).strip()
    if root not in ROOTS and root in step_ids:  # `${fetch.body}`: a step's output
        return f"{{{{ steps.{root}.output{rest} }}}}"
    if root in ROOTS or root in step_ids:
        return f"{{{{ {root}{rest} }}}}"
    return m.group(0)


def _constant_output(step: dict[str, Any], where: str) -> PlanIssue | None:
    output = step.get("output")
    if not isinstance(output, str) or not _BARE_NAME.match(output.strip()):
        return None
    sid, kind = step.get("id", "?"), step.get("kind")
    body = step.get("do") or []
    last = body[-1].get("id") if body and isinstance(body[-1], dict) else "LAST"
    per = "iteration's" if kind == "loop" else "element's"
    return PlanIssue(
        "constant_output",
        child_path(where, "output"),
        f"{kind} step {sid!r}: `output: {output}` makes every {per} result the constant "
        f"text {output!r}. `output` is a template for each {per} result, e.g. "
        f'`output: "{{{{ steps.{last}.output }}}}"` (or leave it out: the last step\'s '
        f"output). The whole result is read by the step's id: "
        f"`{{{{ steps.{sid}.output }}}}`; to call it {output!r}, make that the step's id",
    )
