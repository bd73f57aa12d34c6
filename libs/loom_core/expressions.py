"""A small, safe grammar for conditions written as text, turned into native predicates.

Plans written for the plan-execute framework say ``condition: "${sentiment.score} >
0.5"``. Such text is parsed here, never evaluated: the result is a declarative
predicate (``loom_core.predicates``), e.g. ``{"gt": ["{{ steps.s.output.score }}",
0.5]}``, that the executor checks like any other.

Grammar (lowest precedence first)::

    expr    := or
    or      := and (("or" | "||") and)*
    and     := not (("and" | "&&") not)*
    not     := ("not" | "!") not | compare
    compare := operand (op operand)?      op: == != > >= < <= in "not in" contains
    operand := ref | literal | "(" expr ")" | "[" [operand ("," operand)*] "]"
             | ("exists" | "empty") "(" ref ")"
    ref     := "${" path "}" | "{{" path "}}" | path
    path    := name ("." name | "[" digits "]" | "[" string "]")*
    literal := number | string ('…' or "…", backslash escapes) | true | false | null

A bare operand used as a condition (``${approved}``) means ``== true``. What a path
names is the caller's business: ``resolve`` turns a path into a native template
expression (``input.x``, ``steps.ID.output.y``, ``item``), or raises ``ExpressionError``.

Bounds: at most ``MAX_LENGTH`` characters, ``MAX_DEPTH`` levels of nesting (brackets,
``not``, list literals) and ``MAX_TOKENS`` tokens; over them a typed error
(``expression_too_long``, ``expression_too_deep``), never a RecursionError. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loom_core.errors import LoomError

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "MAX_TOKENS",
    "ExpressionError",
    "Path",
    "parse_condition",
]

MAX_LENGTH = 4096
MAX_DEPTH = 32
MAX_TOKENS = 512

Path = tuple[str | int, ...]  # ("sentiment", "score"), ("items", 0)
Resolver = Callable[[Path, int], str]  # path, position -> native expression (no braces)


class ExpressionError(LoomError, ValueError):
    """``code``: ``invalid_expression``, ``expression_too_long``,
    ``expression_too_deep`` or ``unknown_variable``; ``position``: 0-based offset in the
    text where the problem is."""

    def __init__(self, code: str, message: str, position: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.position = position


@dataclass(frozen=True)
class _Tok:
    kind: str  # name, number, string, ref, op, punct, end
    value: Any
    pos: int


_QUOTED = r"""(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')"""
_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
_TOKEN = re.compile(
    r"""(?P<ws>\s+)
      | (?P<ref>\$\{[^{}]*\}|\{\{[^{}]*\}\})
      | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<op>==|!=|>=|<=|&&|\|\||>|<|!)
      | (?P<punct>[()\[\],])
      | (?P<name>"""
    + rf"{_NAME}(?:\.{_NAME}|\[\d+\]|\[{_QUOTED}\])*)"
    + r"""
    """,
    re.VERBOSE | re.DOTALL,
)
_PATH_PART = re.compile(
    r"""\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_-]*)|\[\s*(?P<index>\d+)\s*\]
      |\[\s*(?P<dq>"(?:[^"\\]|\\.)*")\s*\]|\[\s*(?P<sq>'(?:[^'\\]|\\.)*')\s*\])\s*""",
    re.VERBOSE | re.DOTALL,
)
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)
_WORDS = {"and", "or", "not", "in", "contains", "true", "false", "null", "none", "exists",
          "empty"}  # fmt: skip
_COMPARE = {"==": "eq", "!=": "ne", ">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExpressionError(
                "invalid_expression", f"unexpected {text[pos]!r} at position {pos}", pos
            )
        kind = m.lastgroup or ""
        if kind != "ws":
            value: Any = m.group()
            if kind == "number":
                value = float(value) if any(c in value for c in ".eE") else int(value)
            elif kind == "string":
                value = _UNESCAPE.sub(r"\1", value[1:-1])
            elif kind == "name" and value.lower() in _WORDS:
                kind, value = "word", value.lower()
            out.append(_Tok(kind, value, pos))
            if len(out) > MAX_TOKENS:
                raise ExpressionError(
                    "expression_too_long",
                    f"more than {MAX_TOKENS} tokens; split the condition into steps",
                    pos,
                )
        pos = m.end()
    out.append(_Tok("end", None, len(text)))
    return out


def parse_path(text: str, pos: int = 0) -> Path:
    """``a.b[0]["c d"]`` as ``("a", "b", 0, "c d")``."""
    parts: list[str | int] = []
    i = 0
    text = text.strip()
    while i < len(text):
        if parts and text[i] == ".":
            i += 1
        m = _PATH_PART.match(text, i)
        if m is None or m.end() == i or (not parts and m.group("name") is None):
            raise ExpressionError(
                "invalid_expression", f"{text!r} is not a path like `step.field[0]`", pos
            )
        if m.group("name") is not None:
            parts.append(m.group("name"))
        elif m.group("index") is not None:
            parts.append(int(m.group("index")))
        else:
            quoted = m.group("dq") or m.group("sq")
            parts.append(_UNESCAPE.sub(r"\1", quoted[1:-1]))
        i = m.end()
    if not parts:
        raise ExpressionError("invalid_expression", "an empty reference `${}`", pos)
    return tuple(parts)


class _Parser:
    def __init__(self, text: str, resolve: Resolver) -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0
        self.resolve = resolve

    # -- helpers
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def at(self, kind: str, *values: Any) -> bool:
        tok = self.tok
        return tok.kind == kind and (not values or tok.value in values)

    def expect(self, kind: str, value: Any, what: str) -> None:
        if not self.at(kind, value):
            raise self.error(f"expected {what}")

    def error(self, message: str) -> ExpressionError:
        tok = self.tok
        got = "the end" if tok.kind == "end" else repr(tok.value)
        return ExpressionError(
            "invalid_expression", f"{message} at position {tok.pos}, got {got}", tok.pos
        )

    def deeper(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(
                "expression_too_deep",
                f"nested deeper than {MAX_DEPTH} levels; simplify the condition",
                self.tok.pos,
            )

    # -- grammar
    def condition(self) -> dict[str, Any]:
        pred = self.predicate()
        if not self.at("end"):
            raise self.error("expected `and`, `or` or the end of the condition")
        return pred

    def predicate(self) -> dict[str, Any]:
        return self.or_()

    def or_(self) -> dict[str, Any]:
        items = [self.and_()]
        while self.at("word", "or") or self.at("op", "||"):
            self.take()
            items.append(self.and_())
        return items[0] if len(items) == 1 else {"or": items}

    def and_(self) -> dict[str, Any]:
        items = [self.not_()]
        while self.at("word", "and") or self.at("op", "&&"):
            self.take()
            items.append(self.not_())
        return items[0] if len(items) == 1 else {"and": items}

    def not_(self) -> dict[str, Any]:
        if self.at("word", "not") or self.at("op", "!"):
            self.take()
            self.deeper()
            inner = self.not_()
            self.depth -= 1
            return {"not": inner}
        return self.compare()

    def compare(self) -> dict[str, Any]:
        start = self.tok.pos
        left, is_pred = self.operand()
        if is_pred:
            return left  # a parenthesised predicate or exists()/empty()
        if self.at("op", *_COMPARE):
            op = _COMPARE[self.take().value]
            right, right_pred = self.operand()
            if right_pred:
                raise ExpressionError("invalid_expression", "a condition cannot be compared", start)
            return {op: [left, right]}
        if self.at("word", "in"):
            self.take()
            return {"in": [left, self.value()]}
        if self.at("word", "not") and self.toks[self.i + 1].kind == "word" and \
                self.toks[self.i + 1].value == "in":  # fmt: skip
            self.i += 2
            return {"not": {"in": [left, self.value()]}}
        if self.at("word", "contains"):
            self.take()
            return {"contains": [left, self.value()]}
        if isinstance(left, str) and left.startswith("{{"):
            return {"eq": [left, True]}  # a bare reference: `== true`
        raise ExpressionError(
            "invalid_expression",
            f"a value alone is not a condition (position {start}): compare it, e.g. "
            "`${x.score} > 0.5`",
            start,
        )

    def value(self) -> Any:
        pos = self.tok.pos
        v, is_pred = self.operand()
        if is_pred:
            raise ExpressionError("invalid_expression", "expected a value, not a condition", pos)
        return v

    def operand(self) -> tuple[Any, bool]:
        """(value, whether it is a predicate)."""
        tok = self.tok
        if tok.kind == "punct" and tok.value == "(":
            self.take()
            self.deeper()
            inner = self.predicate()
            self.depth -= 1
            self.expect("punct", ")", "`)`")
            self.take()
            return inner, True
        if tok.kind == "punct" and tok.value == "[":
            self.take()
            self.deeper()
            items: list[Any] = []
            if not self.at("punct", "]"):
                items.append(self.value())
                while self.at("punct", ","):
                    self.take()
                    items.append(self.value())
            self.depth -= 1
            self.expect("punct", "]", "`,` or `]`")
            self.take()
            return items, False
        if tok.kind == "word" and tok.value in ("exists", "empty"):
            self.take()
            self.expect("punct", "(", f"`(` after {tok.value}")
            self.take()
            ref = self.value()
            self.expect("punct", ")", "`)`")
            self.take()
            if tok.value == "exists" and not (isinstance(ref, str) and ref.startswith("{{")):
                raise ExpressionError(
                    "invalid_expression", "exists() takes a reference, e.g. exists(${x})", tok.pos
                )
            return {tok.value: ref}, True
        self.take()
        if tok.kind in ("number", "string"):
            return tok.value, False
        if tok.kind == "word" and tok.value in ("true", "false", "null", "none"):
            return {"true": True, "false": False}.get(tok.value), False
        if tok.kind == "ref":
            inner = tok.value[2:-1] if tok.value.startswith("$") else tok.value[2:-2]
            return self.reference(inner, tok.pos), False
        if tok.kind == "name":
            return self.reference(tok.value, tok.pos), False
        self.i -= 1
        raise self.error("expected a value, a reference or `(`")

    def reference(self, text: str, pos: int) -> str:
        return "{{ " + self.resolve(parse_path(text, pos), pos) + " }}"


def parse_condition(text: str, resolve: Resolver) -> dict[str, Any]:
    """The native predicate for the condition ``text``; raises ``ExpressionError``.
    ``resolve(path, position)`` names what a reference reads, as a native template
    expression (``steps.s.output.score``)."""
    if not isinstance(text, str):
        raise ExpressionError("invalid_expression", f"a condition is text, got {text!r}")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(
            "expression_too_long",
            f"the condition is {len(text)} characters; the limit is {MAX_LENGTH}",
        )
    if not text.strip():
        raise ExpressionError("invalid_expression", "the condition is empty")
    return _Parser(text, resolve).condition()
