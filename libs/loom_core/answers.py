"""Checking a person's answer against a suspension's JSON Schema (pure).

A deliberately small subset of JSON Schema (draft 2020-12): type, enum, const,
properties, required, additionalProperties, items, min/max (and exclusive), minLength,
maxLength, pattern, minItems, maxItems, anyOf, oneOf, allOf, $ref into $defs. Enough for
approval forms; every problem comes back with the JSON path of the field, so a resume
that does not fit is refused with a message naming what to fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

JSON = Any

_TYPES = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: (
        isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, float) and v.is_integer())
    ),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, Mapping),
}


def problems(schema: Mapping[str, JSON], value: JSON, path: str = "$") -> list[tuple[str, str]]:
    """Every way ``value`` fails ``schema``, as (json path, message); empty when it fits.
    An empty schema accepts anything."""
    out: list[tuple[str, str]] = []
    _check(schema, value, path, schema.get("$defs", {}) if isinstance(schema, Mapping) else {}, out)
    return out


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f'{path}["{key}"]'


def _check(
    schema: JSON, value: JSON, path: str, defs: Mapping[str, JSON], out: list[tuple[str, str]]
) -> None:
    if schema is True or not isinstance(schema, Mapping):
        return
    if schema is False:
        out.append((path, "no value is allowed here"))
        return
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        _check(defs.get(ref.split("/")[-1], {}), value, path, defs, out)
    expected = schema.get("type")
    if expected is not None:
        names = expected if isinstance(expected, list) else [expected]
        if not any(_TYPES.get(n, lambda v: True)(value) for n in names):
            out.append((path, f"expected {' or '.join(names)}, got {_describe(value)}"))
            return
    if "enum" in schema and value not in schema["enum"]:
        out.append((path, f"must be one of {schema['enum']!r}, got {value!r}"))
    if "const" in schema and value != schema["const"]:
        out.append((path, f"must be {schema['const']!r}, got {value!r}"))
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            fits = sum(
                not problems({**o, "$defs": defs}, value) for o in options if isinstance(o, Mapping)
            )
            if fits == 0 or (key == "oneOf" and fits > 1):
                how = "exactly one" if key == "oneOf" else "one"
                out.append((path, f"must match {how} of {len(options)} alternatives"))
    for sub in schema.get("allOf", []) or []:
        _check(sub, value, path, defs, out)
    if isinstance(value, Mapping):
        _object(schema, value, path, defs, out)
    elif isinstance(value, list):
        _array(schema, value, path, defs, out)
    elif isinstance(value, str):
        _string(schema, value, path, out)
    elif _TYPES["number"](value):
        _number(schema, value, path, out)


def _object(
    schema: Mapping[str, JSON],
    value: Mapping[str, JSON],
    path: str,
    defs: Mapping[str, JSON],
    out: list[tuple[str, str]],
) -> None:
    props = schema.get("properties", {}) or {}
    for name in schema.get("required", []) or []:
        if name not in value:
            out.append((_child(path, name), "is required"))
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in props:
            _check(props[key], item, _child(path, key), defs, out)
        elif extra is False:
            allowed = ", ".join(sorted(props)) or "none"
            out.append((_child(path, key), f"is not an accepted field (accepted: {allowed})"))
        elif isinstance(extra, Mapping):
            _check(extra, item, _child(path, key), defs, out)


def _array(
    schema: Mapping[str, JSON],
    value: list[JSON],
    path: str,
    defs: Mapping[str, JSON],
    out: list[tuple[str, str]],
) -> None:
    if "minItems" in schema and len(value) < schema["minItems"]:
        out.append((path, f"needs at least {schema['minItems']} items, got {len(value)}"))
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        out.append((path, f"takes at most {schema['maxItems']} items, got {len(value)}"))
    items = schema.get("items")
    if isinstance(items, Mapping):
        for i, item in enumerate(value):
            _check(items, item, _child(path, i), defs, out)


def _string(schema: Mapping[str, JSON], value: str, path: str, out: list[tuple[str, str]]) -> None:
    if "minLength" in schema and len(value) < schema["minLength"]:
        out.append((path, f"must be at least {schema['minLength']} characters"))
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        out.append((path, f"must be at most {schema['maxLength']} characters"))
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and re.search(pattern, value) is None:
        out.append((path, f"must match the pattern {pattern!r}"))


def _number(
    schema: Mapping[str, JSON], value: float, path: str, out: list[tuple[str, str]]
) -> None:
    bounds = (
        ("minimum", lambda b: value >= b, ">="),
        ("maximum", lambda b: value <= b, "<="),
        ("exclusiveMinimum", lambda b: value > b, ">"),
        ("exclusiveMaximum", lambda b: value < b, "<"),
    )
    for key, ok, sign in bounds:
        if key in schema and not ok(schema[key]):
            out.append((path, f"must be {sign} {schema[key]}, got {value}"))


def _describe(value: JSON) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _TYPES[name](value) and not (name == "integer" and isinstance(value, float)):
            return name
    return type(value).__name__
