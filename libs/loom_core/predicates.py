"""Declarative predicates: the conditions of ``if`` steps and the ``while``/``until`` of loops.

Design notes
- A predicate is JSON, never code: an object with exactly one key, the operator.
  ``eq ne gt gte lt lte``: ``[a, b]``; ``and``/``or``: a non-empty list of predicates;
  ``not``: one predicate; ``exists``: one string that is exactly one template;
  ``in``: ``[needle, haystack]``; ``contains``: ``[haystack, needle]``; ``empty``: one
  operand (null, ``""``, ``[]`` and ``{}`` are empty; every other value is not).
- Operands are JSON values; strings holding templates are rendered first with
  ``templating.render`` (``"{{ steps.a.output.n }}"`` yields the number itself). A failed
  lookup raises the ``TemplateLookupError`` from ``render`` (the caller fails the step),
  except inside ``exists``, whose whole point is to ask: a failed lookup or null is false.
- JSON typing, not Python's: ``true`` is not the number 1. ``eq``/``ne`` compare JSON
  values deeply (``1 == 1.0``, ``true != 1``, arrays and objects member by member) and
  never fail. Ordering needs two numbers or two strings, anything else is a
  ``PredicateError`` at evaluation (a plan cannot know the types a template yields).
- ``and``/``or`` short-circuit from left to right, so
  ``{"and": [{"exists": "{{ x }}"}, {"gt": ["{{ x }}", 3]}]}`` is a guard.
- ``check`` is structure only. Template syntax inside operands is reported by
  validation (``invalid_template``) and not again here; ``references`` gives the
  well-formed references (what validation needs for scoping and dependency lifting).
- Pure: no I/O, clock or randomness.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from loom_core import blobs
from loom_core.contracts import PlanIssue
from loom_core.errors import LoomError
from loom_core.json_types import describe
from loom_core.templating import (
    BlobValueError,
    Reference,
    TemplateLookupError,
    TemplateSyntaxError,
    child_path,
    lookup,
    render,
    scan_templates,
    whole_reference,
)

JSON = Any

COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte")
OPERATORS = (*COMPARISONS, "and", "or", "not", "exists", "in", "contains", "empty")
_PAIRS = (*COMPARISONS, "in", "contains")
_EXAMPLE = '{"eq": ["{{ steps.check.output.status }}", "ok"]}'
# What authors (people and models) write instead of an operator, for "did you mean".
_ALIASES: dict[str, list[str]] = {
    **dict.fromkeys(["==", "=", "equal", "equals", "is", "eq_"], ["eq"]),
    **dict.fromkeys(["!=", "<>", "not_equal", "not_equals", "neq", "isnot"], ["ne"]),
    **dict.fromkeys([">", "greater", "greater_than"], ["gt"]),
    **dict.fromkeys([">=", "ge", "greater_or_equal"], ["gte"]),
    **dict.fromkeys(["<", "less", "less_than"], ["lt"]),
    **dict.fromkeys(["<=", "le", "less_or_equal"], ["lte"]),
    **dict.fromkeys(["&&", "all"], ["and"]),
    **dict.fromkeys(["||", "any"], ["or"]),
    **dict.fromkeys(["!", "negate"], ["not"]),
    **dict.fromkeys(["has", "includes", "include"], ["contains"]),
    **dict.fromkeys(["is_empty", "isempty", "blank"], ["empty"]),
    **dict.fromkeys(["defined", "present", "has_value"], ["exists"]),
}


class PredicateError(LoomError):
    """A predicate that is malformed, or whose operands have types its operator cannot
    compare. ``path`` is the JSON path of the offending part; ``message`` says how to fix."""

    code = "invalid_predicate"

    def __init__(self, message: str, *, path: str = "$") -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.message} (at {self.path})"


# --------------------------------------------------------------------------- structure


def _shape(node: JSON, path: str) -> tuple[str, JSON]:
    """``(operator, argument)`` of one predicate node; children are not looked at.
    Raises ``PredicateError`` at the most precise path."""
    if not isinstance(node, Mapping):
        raise PredicateError(
            f"a predicate is an object with one operator, e.g. {_EXAMPLE}; "
            f"got {describe(node, 60)}",
            path=path,
        )
    if len(node) != 1:
        keys = sorted(str(k) for k in node)
        fix = (
            'combine several conditions with {"and": [...]} or {"or": [...]}'
            if len(node) > 1
            else f"e.g. {_EXAMPLE}"
        )
        raise PredicateError(
            f"a predicate has exactly one operator key, got {len(node)} {keys}; {fix}",
            path=path,
        )
    [(op, arg)] = node.items()
    if op not in OPERATORS:
        close = _ALIASES.get(str(op).lower()) or difflib.get_close_matches(str(op), OPERATORS, 1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PredicateError(
            f"unknown predicate operator {op!r}; {hint}operators: {', '.join(OPERATORS)}",
            path=path,
        )
    where = child_path(path, op)
    if op in _PAIRS and not (isinstance(arg, list | tuple) and len(arg) == 2):
        order = {"in": "[needle, haystack]", "contains": "[haystack, needle]"}.get(op, "[a, b]")
        raise PredicateError(
            f"`{op}` takes a list of exactly 2 operands {order}, e.g. "
            f'{{"{op}": ["{{{{ steps.a.output.n }}}}", 3]}}; got {describe(arg, 60)}',
            path=where,
        )
    if op in ("and", "or") and not (isinstance(arg, list | tuple) and arg):
        raise PredicateError(
            f"`{op}` takes a non-empty list of predicates, e.g. "
            f'{{"{op}": [{_EXAMPLE}, ...]}}; got {describe(arg, 60)}',
            path=where,
        )
    if op == "exists" and not _names_one_value(arg):
        raise PredicateError(
            '`exists` takes one string that is exactly one template, e.g. {"exists": '
            f'"{{{{ steps.a.output.x }}}}"}}; got {describe(arg, 60)}',
            path=where,
        )
    return str(op), arg


def _names_one_value(arg: JSON) -> bool:
    try:
        return whole_reference(arg) is not None
    except TemplateSyntaxError:
        return True  # a malformed template: reported as invalid_template, not twice


def _children(op: str, arg: JSON, path: str) -> list[tuple[JSON, str]]:
    """The sub-predicates of a node whose shape is known to be right."""
    where = child_path(path, op)
    if op in ("and", "or"):
        return [(sub, child_path(where, i)) for i, sub in enumerate(arg)]
    if op == "not":
        return [(arg, where)]
    return []


def check(predicate: JSON, path: str = "$") -> list[PlanIssue]:
    """Every structural problem of ``predicate`` (code ``invalid_predicate``), each at
    the JSON path of the part to fix; empty when well-formed. Never raises."""
    issues: list[PlanIssue] = []
    todo = [(predicate, path)]
    while todo:  # iterative: a predicate may nest deeper than the recursion limit
        node, where = todo.pop()
        try:
            op, arg = _shape(node, where)
        except PredicateError as bad:
            issues.append(PlanIssue(code=bad.code, path=bad.path, message=bad.message))
            continue
        todo.extend(reversed(_children(op, arg, where)))
    return issues


def references(predicate: JSON, path: str = "$") -> list[Reference]:
    """Every well-formed template reference in the operands of ``predicate``, in
    document order, each at its JSON path. Never raises."""
    return scan_templates(predicate, path)[0]


# --------------------------------------------------------------------------- evaluation


def _is_number(value: JSON) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def same(a: JSON, b: JSON) -> bool:
    """JSON equality: numbers by value (``1 == 1.0``), booleans only equal booleans,
    arrays and objects member by member."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) or _is_number(b):
        return _is_number(a) and _is_number(b) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (
            isinstance(a, Mapping)
            and isinstance(b, Mapping)
            and a.keys() == b.keys()
            and all(same(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return (
            isinstance(a, list | tuple)
            and isinstance(b, list | tuple)
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b, strict=True))
        )
    return a is None and b is None


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def _order(op: str, a: JSON, b: JSON, path: str) -> bool:
    if (_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str)):
        return _ORDER[op](a, b)
    raise PredicateError(
        f"`{op}` compares two numbers or two strings; got {describe(a, 60)} and "
        f"{describe(b, 60)}. Make both operands the same type (a template that is "
        f"the whole string keeps the value's type)",
        path=path,
    )


def _member(op: str, needle: JSON, haystack: JSON, path: str) -> bool:
    if isinstance(haystack, list | tuple):
        return any(same(needle, x) for x in haystack)
    if isinstance(haystack, str | Mapping):
        if not isinstance(needle, str):
            what = "a substring of a string" if isinstance(haystack, str) else "a key of an object"
            raise PredicateError(
                f"`{op}` looks for {what}, so the needle must be a string; got "
                f"{describe(needle, 60)}",
                path=path,
            )
        return needle in haystack
    raise PredicateError(
        f"`{op}` searches an array, a string or an object's keys; the haystack is "
        f"{describe(haystack, 60)}",
        path=path,
    )


def _exists(arg: str, context: Mapping[str, JSON], path: str) -> bool:
    ref = whole_reference(arg, path)
    if ref is None:  # _shape has ruled this out; kept for type checkers
        raise PredicateError("`exists` takes exactly one template", path=path)
    try:
        return lookup(context, ref.root, ref.segments, path) is not None
    except BlobValueError:
        raise  # inside a blob: the engine cannot say, and must not say "no"
    except TemplateLookupError:
        return False


def _inline(value: JSON, path: str) -> JSON:
    """``value``, or ``BlobValueError`` when it holds a value stored by reference: the
    engine never reads a blob, and comparing the reference instead of the value would
    be a silent wrong answer."""
    if b"$blob" in msgspec.json.encode(value):  # cheap screen; references are dicts
        try:
            found: list[tuple[str, blobs.BlobRef | None]] = list(blobs.find_refs(value, path))
        except blobs.BlobRefError as exc:
            found = [(exc.error.path or path, None)]
        if found:
            raise BlobValueError(
                f"a condition at {found[0][0]} compares a value stored by reference (a "
                "blob); the engine never reads a blob. Have a tool compute what the "
                "condition needs (e.g. a status or a count) and compare that output",
                path=path,
            )
    return value


def evaluate(predicate: JSON, context: Mapping[str, JSON], path: str = "$") -> bool:
    """The truth of ``predicate`` in ``context`` (the render context: ``input``,
    ``steps`` and the scope variables). Raises ``PredicateError`` (malformed anywhere,
    even in a part short-circuiting would skip, or operand types the operator cannot
    compare), ``TemplateLookupError`` (a missing value outside ``exists``) or
    ``TemplateSyntaxError``; every error carries the JSON path."""
    problems = check(predicate, path)
    if problems:
        raise PredicateError(problems[0].message, path=problems[0].path)
    return _evaluate(predicate, context, path)


def _evaluate(predicate: JSON, context: Mapping[str, JSON], path: str) -> bool:
    op, arg = _shape(predicate, path)
    where = child_path(path, op)
    if op == "and":
        return all(_evaluate(sub, context, child_path(where, i)) for i, sub in enumerate(arg))
    if op == "or":
        return any(_evaluate(sub, context, child_path(where, i)) for i, sub in enumerate(arg))
    if op == "not":
        return not _evaluate(arg, context, where)
    if op == "exists":
        return _exists(arg, context, where)
    if op == "empty":
        value = _inline(render(arg, context, where), where)
        return value is None or (isinstance(value, str | list | tuple | Mapping) and not value)
    a, b = _inline(render(arg, context, where), where)
    if op == "eq":
        return same(a, b)
    if op == "ne":
        return not same(a, b)
    if op == "in":
        return _member(op, a, b, where)
    if op == "contains":
        return _member(op, b, a, where)
    return _order(op, a, b, where)
