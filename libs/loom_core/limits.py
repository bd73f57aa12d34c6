"""Limits on user data: how deep JSON may nest and how large it may be.

Rendering, predicates, validation and the JSON encoder all recurse on nesting (Python
allows ~1,000 frames; msgspec's encoder gives up at about the same depth), so a value
nested a few hundred levels deep used to raise ``RecursionError`` inside the executor on
every delivery (issue 9). :func:`check_json` checks a value *before* any of them sees
it, and is itself iterative: it never recurses, whatever the input, and stops at the
first offence (so a huge value costs at most ``max_bytes`` of walking).

Pure: no I/O, no clock. The limits are settings (``MAX_DEPTH_SETTING``,
``MAX_BYTES_SETTING``); the errors name the limit, the setting that raises it and the
JSON path of the offending part.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import msgspec

from loom_core.contracts import ErrorInfo

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "MAX_BYTES_SETTING",
    "MAX_DEPTH_SETTING",
    "check_json",
    "depth_limit",
    "json_path",
    "too_deep",
]

# 64 levels: far more than any plan input needs, and far from Python's recursion
# limit even for code that spends several frames per level (render: ~3).
DEFAULT_MAX_DEPTH = 64
MAX_DEPTH_SETTING = "LOOM_MAX_JSON_DEPTH"
MAX_BYTES_SETTING = "LOOM_MAX_INPUT_BYTES"
_DEPTH_CEILING = 200  # a setting above this would let the recursive code fail again

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_encode = msgspec.json.encode


def json_path(base: str, keys: Sequence[str | int]) -> str:
    """``base`` followed by ``keys``: ``$.a[0]["b c"]``."""
    parts = [base]
    for key in keys:
        if isinstance(key, int):
            parts.append(f"[{key}]")
        elif _IDENTIFIER.fullmatch(key):
            parts.append(f".{key}")
        else:
            parts.append(f"[{_encode(key).decode()}]")
    return "".join(parts)


class _Frame:
    """An open container: its children still to visit, how many were seen, and the key
    under which it sits in its parent (None for the value checked itself)."""

    __slots__ = ("children", "seen", "is_map", "key")

    def __init__(
        self, children: Iterator[tuple[Any, Any]], is_map: bool, key: str | int | None
    ) -> None:
        self.children = children
        self.seen = 0
        self.is_map = is_map
        self.key = key


_SURE = frozenset({int, float, bool, type(None)})


def _surely_within(value: Any, max_depth: int) -> bool:
    """True only when ``check_json`` without a byte limit finds nothing: containers at
    most ``max_depth`` deep, every leaf and key of a kind that surely encodes (an ASCII
    str, an int, float, bool or None; dicts and lists of exactly those types). False
    says nothing: the walk then finds the offence, if any, and its path. Level by
    level, with no frame per container (a submitted 200-step plan: 0.45 -> ~0.1 ms)."""
    level: list[Any] = [value]
    depth = 0
    while level:
        below: list[Any] = []
        for item in level:
            kind = type(item)
            if kind is dict or kind is list:
                if depth >= max_depth:
                    return False
                if kind is list:
                    below += item
                    continue
                for key in item:
                    if type(key) is not str or not key.isascii():
                        return False
                below += item.values()
            elif kind is str:
                if not item.isascii():
                    return False
            elif kind not in _SURE:
                return False
        level = below
        depth += 1
    return True


def _children(value: Any) -> tuple[Iterator[tuple[Any, Any]], bool] | None:
    if isinstance(value, dict):
        return iter(value.items()), True
    if isinstance(value, list | tuple):
        return enumerate(value), False
    return None


def check_json(
    value: Any,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_bytes: int | None = None,
    path: str = "$",
    depth_setting: str = MAX_DEPTH_SETTING,
    bytes_setting: str = MAX_BYTES_SETTING,
) -> ErrorInfo | None:
    """None when ``value`` nests at most ``max_depth`` containers deep (a scalar is
    depth 0, ``[]`` is 1, ``[[]]`` is 2) and, with ``max_bytes``, encodes to at most
    that many bytes of compact JSON. Otherwise the first offence in document order:

    - ``too_deep``: ``path`` names the first container past the limit;
    - ``input_too_large``: ``path`` is the value checked (the limit is on the whole),
      ``details.size`` how much was counted when the limit was passed (the walk stops);
    - ``not_json``: a leaf JSON cannot encode (a set, an object).

    Values come from JSON (dicts, lists, str, int, float, bool, None); tuples count as
    lists. The walk keeps one frame per open container, so it uses O(depth) memory."""
    if max_bytes is None and _surely_within(value, max_depth):
        return None  # the usual document: what the walk below would say, in a fifth of the time
    size = 0
    stack: list[_Frame] = []
    pending: list[tuple[str | int | None, Any]] = [(None, value)]
    while pending or stack:
        if pending:
            key, item = pending.pop()
        else:
            frame = stack[-1]
            nxt = next(frame.children, None)
            if nxt is None:
                stack.pop()
                size += 1  # the closing bracket
                if max_bytes is not None and size > max_bytes:
                    return _too_large(path, max_bytes, size, bytes_setting)
                continue
            key, item = nxt
            if frame.seen:
                size += 1  # the comma
            frame.seen += 1
            if frame.is_map:
                try:
                    size += len(_encode(key if isinstance(key, str) else str(key))) + 1
                except (TypeError, ValueError):  # str() of a key that cannot say itself
                    return _not_json(path, stack, key)
        opened = _children(item)
        if opened is not None:
            if len(stack) >= max_depth:
                return _too_deep(path, stack, key, max_depth, depth_setting)
            stack.append(_Frame(opened[0], opened[1], key))
            size += 1  # the opening bracket
        else:
            try:
                size += len(_encode(item))
            except (TypeError, ValueError, OverflowError):
                return _not_json(path, stack, key)
        if max_bytes is not None and size > max_bytes:
            return _too_large(path, max_bytes, size, bytes_setting)
    return None


def _too_large(path: str, limit: int, size: int, setting: str) -> ErrorInfo:
    return ErrorInfo(
        code="input_too_large",
        message=f"{path} is more than {limit} bytes as JSON (the limit, {setting}); make "
        "it smaller, or pass large data by reference",
        path=path,
        details={"limit": limit, "size": size, "setting": setting},
    )


def _keys(stack: list[_Frame], last: str | int | None) -> list[str | int]:
    keys = [f.key for f in stack if f.key is not None]
    if last is not None:
        keys.append(last)
    return keys


def _too_deep(
    base: str, stack: list[_Frame], key: str | int | None, limit: int, setting: str
) -> ErrorInfo:
    return too_deep(json_path(base, _keys(stack, key)), max_depth=limit, setting=setting)


def too_deep(path: str, *, max_depth: int, setting: str = MAX_DEPTH_SETTING) -> ErrorInfo:
    """The ``too_deep`` error for ``path``; also for a decoder that gave up with a
    RecursionError (far past any limit: ``path`` is then the whole value)."""
    return ErrorInfo(
        code="too_deep",
        message=f"{path} is nested deeper than {max_depth} levels (the limit, {setting}); "
        "flatten the data",
        path=path,
        details={"limit": max_depth, "setting": setting},
    )


def _not_json(base: str, stack: list[_Frame], key: str | int | None) -> ErrorInfo:
    where = json_path(base, _keys(stack, key))
    return ErrorInfo(
        code="not_json",
        message=f"{where} cannot be encoded as JSON (strings, numbers that fit 64 bits, "
        "booleans, null, arrays and objects only)",
        path=where,
    )


def depth_limit(env: Mapping[str, str]) -> int:
    """``MAX_DEPTH_SETTING`` from ``env`` (default ``DEFAULT_MAX_DEPTH``). Raises
    ValueError naming the setting when it is not a whole number in 1..200: the code
    that the limit protects recurses, so it cannot be raised without bound."""
    raw = (env.get(MAX_DEPTH_SETTING) or "").strip()
    if not raw:
        return DEFAULT_MAX_DEPTH
    try:
        limit = int(raw)
    except ValueError:
        raise ValueError(f"{MAX_DEPTH_SETTING} must be a whole number, got {raw!r}") from None
    if not 1 <= limit <= _DEPTH_CEILING:
        raise ValueError(f"{MAX_DEPTH_SETTING} must be 1-{_DEPTH_CEILING}, got {limit}")
    return limit
