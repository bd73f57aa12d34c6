"""Every shape mistake of a hand-written document at once, with "did you mean".

msgspec stops at the first mistake it meets ("Object contains unknown field
`dependson`"): right for a wire message, poor for a person fixing a plan file with
three typos (issue 16). ``shape_issues`` walks the plain JSON value against the
contract types (``loom_core.contracts``) and reports each unknown field (with the
closest known name), each missing required field, each unknown step ``kind`` and each
value of the wrong type, with its JSON path. A document with no issue here decodes
(``msgspec.convert``); the plan validator then reports the rest (templates,
dependencies, tools) the same way.

Pure and iterative (an explicit stack): the value is the caller's, already bounded in
depth and size (``loom_core.limits``).
"""

from __future__ import annotations

import difflib
import functools
import types
import typing
from typing import Any

import msgspec

from loom_core.contracts import ErrorInfo, PlanIssue
from loom_core.json_types import a_type, describe, did_you_mean, preview

__all__ = ["MAX_ISSUES", "shape_issues", "with_issues"]

MAX_ISSUES = 100  # a document that is all wrong needs no 10,000-line answer

# a Python type's JSON name in prose, for "expected ..." (values are named by json_types)
_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _members(tp: Any) -> tuple[Any, ...] | None:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.get_args(tp)
    return None


def _key(name: str, path: str) -> str:
    return f"{path}.{name}" if name.isidentifier() else f"{path}[{name!r}]"


def shape_issues(value: Any, tp: Any, path: str = "$") -> list[PlanIssue]:
    """Every place where ``value`` (plain JSON: dicts, lists, scalars) does not fit the
    type ``tp`` (a contract Struct, a union of them, a list ...); ``[]``: it decodes.
    At most ``MAX_ISSUES``."""
    issues: list[PlanIssue] = []
    stack: list[tuple[Any, Any, str]] = [(value, tp, path)]
    while stack and len(issues) < MAX_ISSUES:
        value, tp, path = stack.pop()
        found: list[tuple[Any, Any, str]] = []
        _check(value, tp, path, issues, found)
        stack.extend(reversed(found))  # document order
    return issues[:MAX_ISSUES]


def with_issues(error: ErrorInfo, document: Any, tp: Any) -> ErrorInfo:
    """``error`` (a message that did not decode as ``tp``) with every shape issue of
    ``document`` in ``details.issues`` (code, path, message), when it was JSON."""
    if error.code != "invalid_shape" or document is None:
        return error
    issues = shape_issues(document, tp)
    if not issues:
        return error
    listed = [{"code": i.code, "path": i.path, "message": i.message} for i in issues]
    message = f"{len(issues)} problem(s) in the request; the first: {issues[0].message}"
    return msgspec.structs.replace(
        error, message=message, path=issues[0].path, details={**error.details, "issues": listed}
    )


def _check(
    value: Any, tp: Any, path: str, issues: list[PlanIssue], todo: list[tuple[Any, Any, str]]
) -> None:
    if tp is Any or tp is typing.Any:
        return
    members = _members(tp)
    if members is not None:
        _union(value, members, path, issues, todo)
        return
    if _is_struct(tp):
        _struct(value, tp, path, issues, todo, tagged=False)
        return
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple, set, frozenset) and args and origin is not tuple:
        if not isinstance(value, list):
            issues.append(_wrong(path, value, "an array"))
            return
        todo.extend((item, args[0], f"{path}[{i}]") for i, item in enumerate(value))
        return
    if origin is dict and len(args) == 2:
        if not isinstance(value, dict):
            issues.append(_wrong(path, value, "an object"))
            return
        todo.extend((item, args[1], _key(str(k), path)) for k, item in value.items())
        return
    plain = _PLAIN.get(tp)
    if (
        plain is not None
        and isinstance(value, plain)
        and not (tp is not bool and isinstance(value, bool))
    ):
        return
    try:  # a leaf (str, int, Literal, datetime, ...): msgspec's own rules, one value
        msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        detail = str(exc).split(" - at ")[0]
        issues.append(PlanIssue("invalid_shape", path, f"{detail}: {preview(value)}"))


def _union(
    value: Any,
    members: tuple[Any, ...],
    path: str,
    issues: list[PlanIssue],
    todo: list[tuple[Any, Any, str]],
) -> None:
    structs = [m for m in members if _is_struct(m)]
    others = [m for m in members if not _is_struct(m)]
    if value is None and type(None) in members:
        return
    if isinstance(value, dict) and structs:
        if len(structs) == 1:
            _struct(value, structs[0], path, issues, todo, tagged=False)
            return
        field = structs[0].__struct_config__.tag_field
        by_tag = {str(m.__struct_config__.tag): m for m in structs}
        tag = value.get(field)
        if tag is None:
            guess = _closest_member(value, structs)
            looks = (
                f"it looks like {_a(guess)}: add `{field}: {guess.__struct_config__.tag}`; "
                if guess is not None
                else ""
            )
            issues.append(PlanIssue(
                "invalid_shape", path,
                f"missing `{field}`: {looks}one of {', '.join(by_tag)}",
            ))  # fmt: skip
            if guess is not None:  # the rest of its problems too, read as the guess
                _struct(value, guess, path, issues, todo, tagged=True)
            return
        chosen = by_tag.get(str(tag))
        if chosen is None:
            hint = did_you_mean(str(tag), list(by_tag))
            issues.append(PlanIssue(
                "invalid_shape", _key(field, path),
                f"unknown {field} {tag!r}: {hint}one of {', '.join(by_tag)}",
            ))  # fmt: skip
            close = difflib.get_close_matches(str(tag), list(by_tag), n=1)
            if close:  # the rest of its problems too, read as the kind it was meant to be
                _struct(value, by_tag[close[0]], path, issues, todo, tagged=True)
            return
        _struct(value, chosen, path, issues, todo, tagged=True)
        return
    for member in others:
        if member is type(None):
            continue
        if not shape_issues(value, member, path):
            return
    wanted = [_describe(m) for m in members]
    issues.append(_wrong(path, value, " or ".join(dict.fromkeys(wanted))))


def _closest_member(
    value: dict[Any, Any], structs: list[type[msgspec.Struct]]
) -> type[msgspec.Struct] | None:
    """The one member whose fields name the most keys of ``value`` (an untagged step
    with a ``tool`` field is a tool step); None on a tie."""
    scores = sorted(
        ((sum(str(k) in _fields(m) for k in value), i) for i, m in enumerate(structs)),
        reverse=True,
    )
    if not scores or (len(scores) > 1 and scores[0][0] == scores[1][0]):
        return None
    return structs[scores[0][1]]


def _struct(
    value: Any,
    cls: type[msgspec.Struct],
    path: str,
    issues: list[PlanIssue],
    todo: list[tuple[Any, Any, str]],
    tagged: bool,
) -> None:
    if not isinstance(value, dict):
        issues.append(_wrong(path, value, f"an object ({cls.__name__})"))
        return
    config = cls.__struct_config__
    fields = _fields(cls)
    tag_field = config.tag_field
    known = [*fields, *([tag_field] if tag_field else [])]
    for name, item in value.items():
        if name == tag_field:
            if not tagged and config.tag is not None and item != config.tag:
                issues.append(PlanIssue(
                    "invalid_shape", _key(name, path),
                    f"expected {config.tag!r}, got {preview(item)}",
                ))  # fmt: skip
            continue
        field = fields.get(str(name))
        if field is None:
            if config.forbid_unknown_fields:
                hint = did_you_mean(str(name), list(fields))
                issues.append(PlanIssue(
                    "unknown_field", _key(str(name), path),
                    f"unknown field {name!r} in {_a(cls)}: {hint}"
                    f"known fields: {', '.join(known)}",
                ))  # fmt: skip
            continue
        todo.append((item, field.type, _key(str(name), path)))
    for name, field in fields.items():
        if field.required and name not in value:
            issues.append(PlanIssue(
                "missing_field", _key(name, path),
                f"{_a(cls)} needs `{name}` ({_describe(field.type)})",
            ))  # fmt: skip


@functools.cache
def _fields(cls: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.encode_name: f for f in msgspec.structs.fields(cls)}


# leaves whose check needs no msgspec call (the common case: ids, names, templates)
_PLAIN = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}


def _a(cls: type[msgspec.Struct]) -> str:
    tag = cls.__struct_config__.tag
    field = cls.__struct_config__.tag_field
    if field == "kind":
        return f"a `{tag}` step"
    return f"a {cls.__name__}"


def _describe(tp: Any) -> str:
    members = _members(tp)
    if members is not None:
        return " or ".join(dict.fromkeys(_describe(m) for m in members))
    if _is_struct(tp):
        return f"an object ({tp.__name__})"
    origin = typing.get_origin(tp)
    if origin in (list, tuple, set, frozenset):
        return "an array"
    if origin is dict:
        return "an object"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if tp is Any or tp is typing.Any:
        return "any JSON value"
    name = _TYPE_NAMES.get(tp)
    return a_type(name) if name else getattr(tp, "__name__", str(tp))


def _wrong(path: str, value: Any, wanted: str) -> PlanIssue:
    return PlanIssue("invalid_shape", path, f"expected {wanted}, got {describe(value)}")
