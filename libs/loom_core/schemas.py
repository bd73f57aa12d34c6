"""JSON values against JSON Schema (draft 2020-12): one checker, one wording.

Design notes
- One checker for every place a value meets a schema: a person's answer to a
  suspension, an agent's final answer, an edited output in a fork, a working-memory
  document, a plan step's literal tool input (``validation``) and a tool call's input
  at the tool-runner. It used to be a hand-written subset here and a second walker in
  ``validation`` with other words (issue 16).
- ``jsonschema`` decides (the whole draft, not a subset); this module words what it
  finds. Each problem is ``(json path, message)``; the path names the field to fix (a
  missing field's own path, each unknown field's own path), the message says what was
  expected and what came (``expected a boolean, got a string "yes"``). Problems come in
  document order; a node's own problems before its missing fields, then its children.
- ``templated``: a plan's literal input holds templates whose type is only known once
  rendered. With it, whatever a template could still change is not reported (its type,
  its text, a union or enum over a value holding one); what it cannot change (missing
  and unknown fields, counts) is. Of a union, when exactly one alternative fits the
  value's own type, that alternative's problems are reported: they are certain.
- References stay inside the schema (``#/$defs/...``): the checker is given an empty
  registry, so a ``$ref`` to a URL is a problem, never a download. A schema that is not
  valid JSON Schema (or points at a definition it lacks) is a problem at the root, so
  nothing is accepted by a broken schema; ``schema_problem`` says it ahead of time.
- Pure: no I/O, clock or randomness. ``jsonschema`` is imported on first use (it
  costs ~60 ms, which a CLI that never checks a schema should not pay); compiled
  checkers are memoised by the schema's JSON text.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import msgspec

from loom_core.json_types import a_type, describe, did_you_mean, preview
from loom_core.templating import child_path

__all__ = [
    "MAX_PROBLEMS",
    "Problem",
    "alternatives",
    "defs_of",
    "expected",
    "listed",
    "problems",
    "resolve",
    "schema_problem",
    "types_of",
]

JSON = Any
Schema = Mapping[str, Any]
Problem = tuple[str, str]  # (json path, message)
Templated = Callable[[str], bool]

MAX_PROBLEMS = 50  # a value that is all wrong needs no 10,000-line answer
_SCAN = 1_000  # errors read from jsonschema at most before wording the first MAX_PROBLEMS
# Keywords about keys and counts: a template inside the value cannot change their verdict.
_STRUCTURAL = frozenset(
    {
        "required",
        "additionalProperties",
        "minProperties",
        "maxProperties",
        "minItems",
        "maxItems",
        "dependentRequired",
    }
)
_BOUNDS = {
    "minimum": ">=",
    "maximum": "<=",
    "exclusiveMinimum": ">",
    "exclusiveMaximum": "<",
}

# --------------------------------------------------------------------------- reading schemas


def defs_of(schema: Any) -> Schema:
    """The definitions a ``$ref`` of ``schema`` may name (``$defs``, ``definitions``)."""
    if not isinstance(schema, Mapping):
        return {}
    return {**schema.get("definitions", {}), **schema.get("$defs", {})}


def resolve(schema: Any, defs: Schema) -> Schema:
    """Follow ``$ref`` into ``defs``; a reference that resolves to nothing allows
    anything (the checker reports it, readers of a schema need not)."""
    for _ in range(64):  # a guard against reference loops
        if not isinstance(schema, Mapping):
            return {}
        ref = schema.get("$ref")
        if not isinstance(ref, str):
            return schema
        name = ref.rsplit("/", 1)[-1]
        schema = defs.get(name, {}) if ref.startswith(("#/$defs/", "#/definitions/")) else {}
    return {}


def types_of(schema: Schema) -> set[str] | None:
    """The schema's ``type`` as a set; None when it does not say."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    return None


def alternatives(schema: Schema) -> list[Any] | None:
    """The ``anyOf`` (or ``oneOf``) alternatives of a union schema, else None."""
    alts = schema.get("anyOf", schema.get("oneOf"))
    return alts if isinstance(alts, list) else None


def expected(schema: Any, defs: Schema) -> str:
    """What a schema accepts, in prose: ``an integer``, ``a string or null``,
    ``one of "fast", "slow"``, ``any value``."""
    schema = resolve(schema, defs)
    alts = alternatives(schema)
    if alts is not None:
        return " or ".join(dict.fromkeys(expected(a, defs) for a in alts)) or "any value"
    if "const" in schema:
        return preview(schema["const"])
    if isinstance(schema.get("enum"), list):
        return "one of " + ", ".join(preview(v) for v in schema["enum"])
    types = types_of(schema)
    return " or ".join(a_type(t) for t in sorted(types)) if types else "any value"


# --------------------------------------------------------------------------- checking


def problems(
    schema: Any, value: JSON, path: str = "$", *, templated: Templated | None = None
) -> list[Problem]:
    """Every way ``value`` fails ``schema`` (at most ``MAX_PROBLEMS``), each as
    ``(json path, message)``; empty when it fits. An empty schema accepts anything.
    ``templated(text)`` says whether a string is a template (see the module notes)."""
    checker = _checker(schema)
    if isinstance(checker, str):
        return [(path, checker)]
    from referencing.exceptions import Unresolvable

    try:
        errors = list(itertools.islice(checker.iter_errors(value), _SCAN))
    except Unresolvable as exc:
        return [(path, f"the schema refers to {_ref_text(exc)}, which it does not define")]
    except RecursionError:
        return [(path, "the schema or the value nests too deeply to check")]
    found: list[Found] = []
    for error in errors:
        found.extend(_word(error, _Context(schema, path, templated)))
    return [(_path(path, t), m) for t, _, m in _in_document_order(found, value)[:MAX_PROBLEMS]]


def listed(found: list[Problem], limit: int = 5) -> str:
    """Problems as one line for a message: ``$.a: ...; $.b: ...`` (the first ``limit``;
    ``details.problems`` carries them all)."""
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(f"{path}: {message}" for path, message in found[:limit]) + more


def _path(base: str, trail: tuple[str | int, ...]) -> str:
    for key in trail:
        base = child_path(base, key)
    return base


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` is not a usable JSON Schema (draft 2020-12), or None: not valid
    against the metaschema, or a ``$ref`` that leaves the schema or names nothing in it."""
    checker = _checker(schema)
    return checker if isinstance(checker, str) else None


def _ref_problem(schema: Any) -> str | None:
    for ref in _refs(schema):
        if not ref.startswith("#"):
            return f"the schema refers to {ref[:200]!r} outside itself; use #/$defs/..."
        if ref.startswith("#/") and _pointer(schema, ref[1:]) is _MISSING:
            return f"the schema refers to {ref[:200]!r}, which it does not define"
    return None


_MISSING = object()


def _refs(schema: Any) -> Iterator[str]:
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, Mapping):
            for key, item in node.items():
                if key == "$ref" and isinstance(item, str):
                    yield item
                else:
                    todo.append(item)
        elif isinstance(node, list):
            todo.extend(node)


def _pointer(doc: Any, pointer: str) -> Any:
    """The part of ``doc`` a JSON pointer (``/$defs/A``) names, or ``_MISSING``."""
    from urllib.parse import unquote

    if not pointer:
        return doc
    for raw in pointer.lstrip("/").split("/"):
        token = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(doc, Mapping) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            return _MISSING
    return doc


def _ref_text(exc: Exception) -> str:
    ref = getattr(exc, "ref", None) or str(exc).split(": ", 1)[-1]
    return repr(str(ref)[:200])


@functools.lru_cache(maxsize=256)
def _compiled(text: bytes) -> Any:
    from jsonschema.exceptions import SchemaError
    from referencing import Registry

    schema = msgspec.json.decode(text)
    cls = _checker_class()
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.absolute_path) or "the root"
        return f"the schema itself is not valid JSON Schema at {where}: {exc.message[:200]}"
    problem = _ref_problem(schema)
    if problem is not None:
        return problem
    # an empty registry: a $ref to a URL fails instead of being downloaded
    return cls(schema, registry=Registry())


def _checker(schema: Any) -> Any:
    try:
        text = msgspec.json.encode(schema)
    except (TypeError, msgspec.EncodeError):
        return "the schema is not JSON"
    return _compiled(text)


@functools.cache
def _checker_class() -> Any:
    from jsonschema import Draft202012Validator, validators

    return validators.extend(
        Draft202012Validator,
        {"required": _required, "additionalProperties": _additional_properties},
    )


def _required(checker: Any, required: Any, instance: Any, schema: Any) -> Iterator[Any]:
    """As jsonschema's, with each error at the missing field's own path."""
    from jsonschema.exceptions import ValidationError

    if not checker.is_type(instance, "object") or not isinstance(required, list):
        return
    for name in required:
        if name not in instance:
            yield ValidationError(f"{name!r} is a required property", path=[name])


def _additional_properties(checker: Any, extra: Any, instance: Any, schema: Any) -> Iterator[Any]:
    """As jsonschema's, with one error per unknown field at its own path."""
    from jsonschema.exceptions import ValidationError

    if not checker.is_type(instance, "object"):
        return
    for key in _extra_keys(instance, schema):
        if extra is False:
            yield ValidationError(f"{key!r} was unexpected", path=[key])
        elif isinstance(extra, Mapping):
            yield from checker.descend(instance[key], extra, path=key)


def _extra_keys(instance: Mapping[str, Any], schema: Schema) -> list[str]:
    props = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    return [k for k in instance if k not in props and not any(re.search(p, k) for p in patterns)]


# --------------------------------------------------------------------------- wording

Found = tuple[tuple[str | int, ...], int, str]  # (trail, 1 for a missing field, message)


class _Context:
    """What wording needs besides the error: the root schema's definitions, the path
    the value stands at, and how to recognise a template."""

    def __init__(self, root: Any, path: str, templated: Templated | None) -> None:
        self.defs = defs_of(root)
        self.path = path
        self.templated = templated


def _word(error: Any, cx: _Context) -> list[Found]:
    if cx.templated is not None and _uncertain(error, cx.templated):
        return []
    trail = tuple(error.absolute_path)
    rule = error.validator
    value = error.instance
    defs = cx.defs
    if rule in ("anyOf", "oneOf") and error.context:
        return _word_union(error, cx)
    if rule == "required":
        name = trail[-1]
        props = error.schema.get("properties", {}) if isinstance(error.schema, Mapping) else {}
        want = expected(props.get(name, {}), defs)
        return [(trail, 1, f"missing required field {name!r} ({want}); add it")]
    if rule == "additionalProperties":
        key = str(trail[-1])
        props = sorted(error.schema.get("properties", {}))
        accepted = ", ".join(props) if props else "none"
        return [(trail, 0, f"unknown field {key!r}; {did_you_mean(key, props)}"
                           f"accepted fields: {accepted}")]  # fmt: skip
    return [(trail, 0, _message(rule, error.validator_value, value, error, defs))]


def _message(rule: Any, want: Any, value: Any, error: Any, defs: Schema) -> str:
    if rule == "type":
        names = want if isinstance(want, list) else [want]
        return f"expected {' or '.join(a_type(str(n)) for n in names)}, got {describe(value)}"
    if rule == "enum":
        return f"expected {expected({'enum': want}, defs)}, got {preview(value)}"
    if rule == "const":
        return f"expected {preview(want)}, got {preview(value)}"
    if rule in _BOUNDS:
        return f"must be {_BOUNDS[rule]} {want}, got {value}"
    if rule == "multipleOf":
        return f"must be a multiple of {want}, got {value}"
    if rule in ("minLength", "maxLength"):
        least = "at least" if rule == "minLength" else "at most"
        return f"must be {least} {want} characters long, got {len(value)}"
    if rule == "pattern":
        return f"must match the pattern {want!r}, got {preview(value)}"
    if rule in ("minItems", "maxItems"):
        how = "needs at least" if rule == "minItems" else "takes at most"
        return f"{how} {want} items, got {len(value)}"
    if rule in ("minProperties", "maxProperties"):
        how = "needs at least" if rule == "minProperties" else "takes at most"
        return f"{how} {want} fields, got {len(value)}"
    if rule == "uniqueItems":
        return "the items must be unique"
    if rule == "oneOf":
        count = len(want) if isinstance(want, list) else 0
        return f"fits more than one of the {count} alternatives; it must fit exactly one"
    if rule == "not":
        return f"must not be {expected(want, defs)}"
    if rule is None:  # the schema `false`
        return "no value is allowed here"
    text = str(error.message)
    return text if len(text) <= 200 else text[:199] + "…"


def _word_union(error: Any, cx: _Context) -> list[Found]:
    branches: dict[Any, list[Any]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    # a branch "fits" when the value has its type (its problems are then inside)
    fitting = [
        errs
        for errs in branches.values()
        if not any(e.validator == "type" and not e.relative_path for e in errs)
    ]
    if len(fitting) == 1:
        return [w for sub in fitting[0] for w in _word(sub, cx)]
    if cx.templated is not None and _holds_template(error.instance, cx.templated):
        return []
    trail = tuple(error.absolute_path)
    want = expected({"anyOf": error.validator_value}, cx.defs)
    if not fitting:
        return [(trail, 0, f"expected {want}, got {describe(error.instance)}")]
    closest = min(fitting, key=len)  # the fewest problems; the first of equals
    said = [w for sub in closest for w in _word(sub, cx)]
    hint = f"; the closest fails at {_path(cx.path, said[0][0])}: {said[0][2]}" if said else ""
    count = len(error.validator_value)
    return [(trail, 0, f"fits none of the {count} alternatives ({want}){hint}")]


def _uncertain(error: Any, templated: Templated) -> bool:
    """Could a template in the value still change this verdict once rendered?"""
    if error.validator in _STRUCTURAL:
        return False
    if error.validator == "type":  # an object holding templates is still an object
        return isinstance(error.instance, str) and templated(error.instance)
    if error.validator in ("anyOf", "oneOf") and error.context:
        return False  # decided branch by branch (_word_union)
    return _holds_template(error.instance, templated)


def _holds_template(value: Any, templated: Templated) -> bool:
    todo = [value]
    while todo:  # iterative: a value may nest deeper than the recursion limit
        node = todo.pop()
        if isinstance(node, str):
            if templated(node):
                return True
        elif isinstance(node, Mapping):
            todo.extend(node.values())
        elif isinstance(node, list | tuple):
            todo.extend(node)
    return False


def _in_document_order(found: list[Found], value: Any) -> list[Found]:
    """Sorted as the fields stand in ``value`` (a node, then its missing fields, then
    its children); the sort is stable, so one node's problems keep jsonschema's order."""
    if len(found) < 2:
        return found
    order: dict[tuple[str | int, ...], int] = {}
    todo: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while todo:
        trail, node = todo.pop()
        order[trail] = len(order)
        if isinstance(node, Mapping):
            todo.extend(reversed([((*trail, k), v) for k, v in node.items()]))
        elif isinstance(node, list | tuple):
            todo.extend(reversed([((*trail, i), v) for i, v in enumerate(node)]))

    def key(item: Found) -> tuple[int, int]:
        trail, missing, _ = item
        if missing:
            return order.get(trail[:-1], len(order)), 1
        return order.get(trail, len(order)), 0

    return sorted(found, key=key)
