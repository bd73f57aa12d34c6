"""How a JSON value (and a mistyped name) is said in messages: one namer, one wording.

Messages about a value's type were written four times with three wordings ("a number"
for 3, "integer", "an array of length 2", "an array of 2"; issue 16). Every message now
says it this way:

- ``json_type``: the JSON Schema name of the value's type (``null``, ``boolean``,
  ``integer``, ``number``, ``string``, ``array``, ``object``), for comparing with a
  schema's ``type``. JSON typing, not Python's: ``true`` is a boolean, never an integer;
  ``3.0`` is spelt as a number.
- ``a_type``: a type name with its article, for prose: ``an integer``, ``null``.
- ``kind``: the value's type in prose, with its size for arrays (``an array of 2
  items``) and, with ``keys=True``, the keys of an object (``an object with keys ['a']``)
  for messages that help someone pick the right key.
- ``preview``: the value as compact JSON, cut at ``limit`` characters.
- ``describe``: ``kind`` and ``preview`` together (``a string "yes"``), what a message
  shows of a value that was not what was wanted.
- ``did_you_mean``: the closest known name to a mistyped one, as the start of a hint.

Pure: no I/O.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

__all__ = ["a_type", "describe", "did_you_mean", "json_type", "keys_of", "kind", "preview"]

JSON = Any

_ARTICLES = {"null": "null", "integer": "an integer", "array": "an array", "object": "an object"}


def json_type(value: JSON) -> str:
    """``null``, ``boolean``, ``integer``, ``number``, ``string``, ``array`` or
    ``object``; a value that is none of them (not JSON) gets its Python type name."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def a_type(name: str) -> str:
    """A JSON Schema type name with its article: ``a string``, ``an integer``, ``null``."""
    return _ARTICLES.get(name) or ("an " if name[:1] in "aeiou" else "a ") + name


def keys_of(obj: Mapping[Any, Any], limit: int = 20) -> str:
    """An object's keys, sorted, as a list literal; more than ``limit`` are counted."""
    keys = sorted(str(k) for k in obj)
    shown = repr(keys[:limit])
    return shown if len(keys) <= limit else f"{shown[:-1]}, ... {len(keys) - limit} more]"


def kind(value: JSON, *, keys: bool = False) -> str:
    """The value's type in prose: ``a string``, ``an array of 2 items``, ``an object``
    (``an object with keys ['a', 'b']`` with ``keys``)."""
    name = json_type(value)
    if name == "array":
        count = len(value)
        return f"an array of {count} item{'' if count == 1 else 's'}"
    if name == "object" and keys:
        return f"an object with keys {keys_of(value)}"
    return a_type(name)


def preview(value: JSON, limit: int = 40) -> str:
    """``value`` as compact JSON (its repr if it is not JSON), cut to ``limit``
    characters with an ellipsis."""
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(value: JSON, limit: int = 40) -> str:
    """What a message shows of an unexpected value: ``a string "yes"``, ``an integer 3``,
    ``an array of 2 items [1,2]``, ``null``."""
    if value is None:
        return "null"
    return f"{kind(value)} {preview(value, limit)}"


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"did you mean 'text'? "`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""
