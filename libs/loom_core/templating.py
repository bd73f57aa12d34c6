"""Templates inside plan values: ``{{ input.city }}``, ``{{ steps.fetch.output.title }}``.

Design notes
- Grammar: ``{{ expr }}`` (spaces optional). ``expr`` is a root, then segments: ``.name``
  (``[A-Za-z_][A-Za-z0-9_-]*``), ``[0]`` (a list index) or ``["key"]`` / ``['key']`` (any
  key; inside the quotes a backslash escapes the next character). Roots: ``input`` (the
  run's input), ``steps`` (outputs of other steps) and the scope variables of sub-plans:
  ``item`` and ``index`` (foreach/reduce bodies), ``acc`` (reduce bodies), ``iteration``
  (loop bodies). Where a scope variable may be used is checked by ``loom_core.validation``;
  here a root is simply looked up in the context. A ``steps`` root names a step id and then
  ``output``, the only field of a step: ``steps.fetch.output.items[0]["first name"]``.
- Secret references: ``{{ secrets.NAME }}`` (NAME: ``[A-Za-z_][A-Za-z0-9_]{0,63}``) names a
  secret the tool-runner holds. Templating never resolves one and never fails on one: it
  is copied verbatim (as written) into the rendered value, so events, state, the tool
  ledger and traces hold the reference, never the value. Only the tool-runner resolves
  it (``loom_core.secrets``), and only where the plan itself wrote it. A malformed one
  (``{{ secrets }}``, ``{{ secrets.a.b }}``, ``{{ secrets.my-key }}``) is a syntax error.
- Contexts are any ``Mapping`` (``steps`` is often a ``collections.ChainMap`` of the
  outputs of a scope and of the scopes around it).
- There is no escape for a literal ``{{``: in a plan value it always opens a template, and
  an unclosed or malformed one is a syntax error (better than sending it to a tool as text).
- A string that is exactly one template (surrounding whitespace aside) renders to the raw
  value, keeping its JSON type. A string mixing text and templates renders to a string:
  string values are inserted as they are, anything else as compact JSON.
- Only dict *values* and list items are walked; dict keys are never templates.
- Big values are references (``loom_core.blobs``): ``{"$blob": "sha256:…", ...}``. A
  whole-string template hands a reference on whole, and a path into one renders to a
  *projection* (the reference with ``"path"``), which the tool-runner resolves before
  the call; where the engine itself needs the value (``lookup``: predicates, items) or
  a string mixes text with a reference, it is a ``BlobValueError`` (the engine never
  reads a blob), never a silent wrong value.
- Pure and deterministic. Parsing a string is cached (it is a pure function of the
  string), and a value without ``{{`` is returned as is without parsing. ``render`` never
  mutates its inputs; its result may share unchanged sub-values with them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgspec

from loom_core import blobs
from loom_core.errors import LoomError
from loom_core.json_types import keys_of, kind

JSON = Any

ROOTS = ("input", "steps", "item", "index", "acc", "iteration", "secrets")
# ``{{ secrets.NAME }}``: copied verbatim by ``render``, resolved only by the tool-runner.
SECRETS_ROOT = "secrets"
SECRET_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,63}"  # noqa: S105 (a pattern, not a secret)
_SECRET_EXPR_RE = re.compile(rf"secrets\.({SECRET_NAME})\Z")
# Where each scope variable exists, for messages (validation checks the placement).
SCOPE_ROOTS: dict[str, str] = {
    "item": "inside the `do` of a foreach or reduce step (and in its `output`)",
    "index": "inside the `do` of a foreach or reduce step (and in its `output`)",
    "acc": "inside the `do` of a reduce step (and in its `output`)",
    "iteration": "inside the `do` of a loop step (and in its `output`, `while` and `until`)",
}
OPEN, CLOSE = "{{", "}}"

_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
_NAME_RE = re.compile(_NAME)
_FULL_NAME_RE = re.compile(rf"{_NAME}\Z")
# JSON paths use the dot form only for plain identifiers (RFC 9535 shorthand).
_PATH_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SEGMENT_RE = re.compile(
    rf"""\.(?P<name>{_NAME})
      | \[\s*(?P<index>[0-9]+)\s*\]
      | \[\s*"(?P<dq>(?:[^"\\]|\\.)*)"\s*\]
      | \[\s*'(?P<sq>(?:[^'\\]|\\.)*)'\s*\]""",
    re.VERBOSE | re.DOTALL,
)
_UNESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)
_DOT_DIGITS_RE = re.compile(r"\.([0-9]+)")

Segment = str | int


# --------------------------------------------------------------------------- errors


class TemplateError(LoomError):
    """A template problem at ``path`` (JSON path inside the plan) in expression ``expr``."""

    code = "template_error"

    def __init__(self, message: str, *, path: str = "$", expr: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.expr = expr

    def __str__(self) -> str:
        return f"{self.message} (at {self.path})"


class TemplateSyntaxError(TemplateError):
    """The template cannot be parsed; the message says what to write instead."""

    code = "invalid_template"


class TemplateLookupError(TemplateError):
    """The template parsed but names a value that is not there; the message names the
    missing segment and what was found in its place."""

    code = "missing_field"


class BlobValueError(TemplateLookupError):
    """The template needs the content of a value stored by reference (a blob), which
    the engine never reads: in a string mixing text and templates, or where the engine
    decides on the value itself (a condition, a foreach's items)."""

    code = "blob_not_inline"


class _Bad(Exception):
    """Internal parse failure, before the caller attaches the JSON path."""

    def __init__(self, expr: str, message: str) -> None:
        super().__init__(message)
        self.expr = expr
        self.message = message


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Reference:
    """One ``{{ expr }}`` found at ``path``. For ``steps`` roots ``segments`` starts with
    the step id and ``"output"``."""

    expr: str
    root: str
    segments: tuple[Segment, ...]
    path: str

    @property
    def step_id(self) -> str | None:
        return str(self.segments[0]) if self.root == "steps" else None


@dataclass(frozen=True)
class _Expr:
    expr: str
    root: str
    segments: tuple[Segment, ...]
    raw: str = ""  # a secret reference's text as written, copied verbatim by render


def format_segment(segment: Segment) -> str:
    """``.name`` when the grammar allows it, else ``[3]`` or ``["any key"]``."""
    if isinstance(segment, int):
        return f"[{segment}]"
    if _FULL_NAME_RE.match(segment):
        return f".{segment}"
    escaped = segment.replace("\\", "\\\\").replace('"', '\\"')
    return f'["{escaped}"]'


def format_expr(root: str, segments: Sequence[Segment]) -> str:
    """The canonical expression text; parsing it gives back ``root`` and ``segments``."""
    return root + "".join(format_segment(s) for s in segments)


def child_path(path: str, key: str | int) -> str:
    """JSON path of ``key`` under ``path``: ``$.a``, ``$.a[0]``, ``$.a["b c"]``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _PATH_NAME_RE.match(key):
        return f"{path}.{key}"
    return f"{path}[{msgspec.json.encode(key).decode()}]"


# --------------------------------------------------------------------------- parsing


def _find_close(text: str, start: int) -> int:
    """Index of the ``}}`` closing the template whose expression starts at ``start``.
    Quoted keys may contain ``}}``, so quotes are skipped."""
    i, n = start, len(text)
    while i < n:
        char = text[i]
        if char in "\"'":
            j = i + 1
            while j < n and text[j] != char:
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise _Bad(
                    text[start:].strip(),
                    f"the quote {char} opened in `{{{{{text[start : i + 1]}` is never closed; "
                    f"write keys as [\"key\"] or ['key']",
                )
            i = j + 1
        elif text.startswith(CLOSE, i):
            return i
        else:
            i += 1
    expr = text[start:].strip()
    raise _Bad(
        expr, f"`{{{{{text[start:]}` has no closing `}}}}`; write e.g. `{{{{ input.city }}}}`"
    )


def _unexpected(expr: str, pos: int) -> str:
    rest = expr[pos:]
    digits = _DOT_DIGITS_RE.match(rest)
    if digits:
        n = digits.group(1)
        return (
            f"`{expr}`: `.{n}` is not a name (names start with a letter or _); "
            f'use [{int(n)}] for a list index or ["{n}"] for a key'
        )
    return (
        f"`{expr}`: cannot parse `{rest}`; after the root write segments like "
        f'`.name`, `[0]` or `["any key"]`'
    )


def _check_steps_shape(expr: str, segments: list[Segment]) -> None:
    example = "e.g. `steps.fetch.output.title`"
    if not segments:
        raise _Bad(expr, f"`{expr}` must name a step and its output, {example}")
    step = segments[0]
    if not isinstance(step, str):
        raise _Bad(expr, f"`{expr}`: steps are named by id, not position; {example}")
    if len(segments) < 2 or segments[1] != "output":
        fix = format_expr("steps", [step, "output"])
        if len(segments) < 2:
            raise _Bad(expr, f"`{expr}`: add `.output` after the step id, e.g. `{fix}`")
        raise _Bad(
            expr,
            f"`{expr}`: a step's only field is `output`, not "
            f"`{format_segment(segments[1])}`; e.g. `{fix}`",
        )


def _parse_expr(expr: str) -> _Expr:
    if not expr:
        raise _Bad(
            expr,
            "empty template `{{ }}`; write e.g. `{{ input.city }}` or "
            "`{{ steps.fetch.output.title }}`",
        )
    match = _NAME_RE.match(expr)
    root = match.group() if match else ""
    if root not in ROOTS:
        close = difflib.get_close_matches(root, ROOTS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise _Bad(
            expr,
            f"`{expr}` must start with `input` (the run's input) or `steps` "
            f"(other steps' outputs), or inside a sub-plan with `item`, `index`, `acc` or "
            f"`iteration`{hint}",
        )
    if root == SECRETS_ROOT:
        return _secret_expr(expr)
    segments: list[Segment] = []
    pos = len(root)
    while pos < len(expr):
        seg = _SEGMENT_RE.match(expr, pos)
        if seg is None:
            raise _Bad(expr, _unexpected(expr, pos))
        if seg["name"] is not None:
            segments.append(seg["name"])
        elif seg["index"] is not None:
            segments.append(int(seg["index"]))
        else:
            quoted = seg["dq"] if seg["dq"] is not None else seg["sq"]
            segments.append(_UNESCAPE_RE.sub(r"\1", quoted))
        pos = seg.end()
    if root == "steps":
        _check_steps_shape(expr, segments)
    return _Expr(expr, root, tuple(segments))


def _secret_expr(expr: str) -> _Expr:
    match = _SECRET_EXPR_RE.match(expr)
    if match is None:
        raise _Bad(
            expr,
            f"`{expr}` is not a secret reference: write `secrets.NAME` where NAME is 1-64 "
            f"letters, digits or _ and does not start with a digit, e.g. "
            f"`{{{{ secrets.API_TOKEN }}}}`",
        )
    return _Expr(expr, SECRETS_ROOT, (match.group(1),))


@lru_cache(maxsize=4096)
def _parse(text: str) -> tuple[str | _Expr, ...]:
    """Split ``text`` into literal strings and expressions (raises ``_Bad``)."""
    parts: list[str | _Expr] = []
    pos = 0
    while (start := text.find(OPEN, pos)) >= 0:
        end = _find_close(text, start + len(OPEN))
        if start > pos:
            parts.append(text[pos:start])
        expr = _parse_expr(text[start + len(OPEN) : end].strip())
        if expr.root == SECRETS_ROOT:
            expr = _Expr(expr.expr, expr.root, expr.segments, text[start : end + len(CLOSE)])
        parts.append(expr)
        pos = end + len(CLOSE)
    if pos < len(text):
        parts.append(text[pos:])
    return tuple(parts)


def _whole(parts: tuple[str | _Expr, ...]) -> _Expr | None:
    """The single expression when the string is nothing but it (and whitespace)."""
    exprs = [p for p in parts if isinstance(p, _Expr)]
    if len(exprs) != 1:
        return None
    if any(isinstance(p, str) and p.strip() for p in parts):
        return None
    return exprs[0]


def _syntax_error(bad: _Bad, path: str) -> TemplateSyntaxError:
    return TemplateSyntaxError(bad.message, path=path, expr=bad.expr)


# --------------------------------------------------------------------------- walking

Trail = tuple[str | int, ...]


def _format_trail(path: str, trail: Trail) -> str:
    for key in trail:
        path = child_path(path, key)
    return path


def _template_strings(value: JSON, trail: Trail = ()) -> Iterator[tuple[Trail, str]]:
    """Every string holding ``{{`` with its trail of keys; paths are formatted lazily."""
    if isinstance(value, str):
        if OPEN in value:
            yield trail, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _template_strings(item, (*trail, key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _template_strings(item, (*trail, index))


def scan_templates(
    value: JSON, path: str = "$"
) -> tuple[list[Reference], list[TemplateSyntaxError]]:
    """All references of the well-formed strings and one syntax error per bad string;
    never raises. Order: walk order (dict insertion order, list order)."""
    refs: list[Reference] = []
    errors: list[TemplateSyntaxError] = []
    for trail, text in _template_strings(value):
        where = _format_trail(path, trail)
        try:
            parts = _parse(text)
        except _Bad as bad:
            errors.append(_syntax_error(bad, where))
            continue
        refs.extend(
            Reference(p.expr, p.root, p.segments, where) for p in parts if isinstance(p, _Expr)
        )
    return refs, errors


def find_references(value: JSON, path: str = "$") -> list[Reference]:
    """Every template reference in ``value``; raises the first ``TemplateSyntaxError``."""
    refs, errors = scan_templates(value, path)
    if errors:
        raise errors[0]
    return refs


def template_errors(value: JSON, path: str = "$") -> list[TemplateSyntaxError]:
    """Every syntax error in ``value`` (one per malformed string); never raises."""
    return scan_templates(value, path)[1]


def whole_reference(value: JSON, path: str = "$") -> Reference | None:
    """The reference when ``value`` is a string that is exactly one template (surrounding
    whitespace aside), so it renders to the raw value; else None. Raises
    ``TemplateSyntaxError`` when the string holds a malformed template."""
    if not isinstance(value, str) or OPEN not in value:
        return None
    try:
        whole = _whole(_parse(value))
    except _Bad as bad:
        raise _syntax_error(bad, path) from None
    return None if whole is None else Reference(whole.expr, whole.root, whole.segments, path)


# --------------------------------------------------------------------------- lookup


class _Lookup(Exception):
    """Internal lookup failure; ``message`` starts with the expression in backticks."""

    def __init__(self, expr: str, message: str, blob: bool = False) -> None:
        super().__init__(message)
        self.expr = expr
        self.message = message
        self.blob = blob

    def error(self, path: str) -> TemplateLookupError:
        kind = BlobValueError if self.blob else TemplateLookupError
        return kind(self.message, path=path, expr=self.expr)


def _blob_in(expr: str, prefix: str, value: JSON, where: str) -> _Lookup:
    try:
        shown = blobs.describe(blobs.parse_ref(value))
    except blobs.BlobRefError:
        shown = "a malformed blob reference"
    return _Lookup(
        expr,
        f"`{expr}`: `{prefix}` is stored by reference ({shown}) and {where}; the engine "
        "never reads a blob. Pass it whole to a tool (`{{ " + prefix + " }}` as the "
        "whole value, or a field of it the same way) and let the tool compute what you need",
        blob=True,
    )


def _lookup_step(expr: str, steps: JSON, step_id: Segment) -> JSON:
    if isinstance(steps, Mapping) and step_id in steps:
        return steps[step_id]
    known = keys_of(steps) if isinstance(steps, Mapping) else "[]"
    raise _Lookup(
        expr,
        f"`{expr}`: step {step_id!r} has no output (steps with output: {known}); a step "
        f"can only read the steps it depends on",
    )


def _step(expr: str, prefix: str, value: JSON, seg: Segment) -> JSON:
    """``value[seg]`` or a ``_Lookup`` naming the segment and what was there instead."""
    if isinstance(seg, str):
        if isinstance(value, Mapping):
            if seg in value:
                return value[seg]
            raise _Lookup(
                expr, f"`{expr}`: key {seg!r} not found in an object with keys {keys_of(value)}"
            )
        hint = "; use an index like [0]" if isinstance(value, list | tuple) else ""
        raise _Lookup(
            expr, f"`{expr}`: cannot read key {seg!r}: `{prefix}` is {kind(value, keys=True)}{hint}"
        )
    if isinstance(value, list | tuple):
        if seg < len(value):
            return value[seg]
        raise _Lookup(expr, f"`{expr}`: index {seg} is out of range for {kind(value)}")
    hint = f'; use ["{seg}"] for a key' if isinstance(value, Mapping) else ""
    raise _Lookup(
        expr, f"`{expr}`: cannot read index [{seg}]: `{prefix}` is {kind(value, keys=True)}{hint}"
    )


def _resolve(context: Mapping[str, JSON], ref: _Expr, project: bool = False) -> JSON:
    """The value ``ref`` names. Reaching a blob reference with segments left: with
    ``project``, the reference narrowed to them (a projection, resolved by the
    tool-runner); without, a ``_Lookup`` with ``blob`` set."""
    if ref.root not in context:
        where = SCOPE_ROOTS.get(ref.root)
        hint = f"; `{ref.root}` exists only {where}" if where else ""
        raise _Lookup(
            ref.expr, f"`{ref.expr}`: nothing named {ref.root!r} is available to templates{hint}"
        )
    value = context[ref.root]
    segments = ref.segments
    prefix = ref.root
    if ref.root == "steps":
        value = _lookup_step(ref.expr, value, segments[0])
        prefix += format_segment(segments[0])
        segments = segments[1:]
    for i, seg in enumerate(segments):
        if blobs.is_ref(value):
            if not project:
                raise _blob_in(ref.expr, prefix, value, "its fields cannot be read here")
            return _project(ref.expr, prefix, value, segments[i:])
        value = _step(ref.expr, prefix, value, seg)
        prefix += format_segment(seg)
    return value


def _project(expr: str, prefix: str, value: JSON, segments: Sequence[Segment]) -> JSON:
    try:
        found = blobs.parse_ref(value)
    except blobs.BlobRefError as exc:
        raise _Lookup(expr, f"`{expr}`: `{prefix}`: {exc.error.message}") from None
    for seg in segments:
        found = found.project(seg)
    return found.as_json()


def lookup(
    context: Mapping[str, JSON], root: str, segments: Sequence[Segment], path: str = "$"
) -> JSON:
    """The value ``root.segments...`` names in ``context`` (``{"input": ..., "steps":
    {id: {"output": ...}}}``); raises ``TemplateLookupError`` at ``path``."""
    ref = _Expr(format_expr(root, segments), root, tuple(segments))
    try:
        return _resolve(context, ref)
    except _Lookup as miss:
        raise miss.error(path) from None


# --------------------------------------------------------------------------- render


class _RenderFailure(Exception):
    """Internal: a template failed; ``trail`` collects the keys while unwinding, so the
    JSON path costs nothing unless there is an error."""

    def __init__(self, error: TemplateError) -> None:
        super().__init__()
        self.error = error
        self.trail: list[str | int] = []


def _render_string(text: str, context: Mapping[str, JSON]) -> JSON:
    try:
        parts = _parse(text)
    except _Bad as bad:
        raise _RenderFailure(_syntax_error(bad, "$")) from None
    if all(isinstance(p, str) or p.root == SECRETS_ROOT for p in parts):
        return text  # only secret references: they stay as written
    try:
        whole = _whole(parts)
        if whole is not None:
            return _resolve(context, whole, project=True)
        out: list[str] = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
                continue
            if part.root == SECRETS_ROOT:
                out.append(part.raw)
                continue
            value = _resolve(context, part, project=True)
            if blobs.is_ref(value):
                raise _blob_in(part.expr, part.expr, value, "cannot be put into a string")
            out.append(value if isinstance(value, str) else msgspec.json.encode(value).decode())
        return "".join(out)
    except _Lookup as miss:
        raise _RenderFailure(miss.error("$")) from None


def _render_at(value: JSON, context: Mapping[str, JSON], key: str | int) -> JSON:
    try:
        return _render(value, context)
    except _RenderFailure as failure:
        failure.trail.append(key)
        raise


def _render(value: JSON, context: Mapping[str, JSON]) -> JSON:
    if isinstance(value, str):
        return value if OPEN not in value else _render_string(value, context)
    if isinstance(value, Mapping):
        changed = False
        items = []
        for key, item in value.items():
            new = _render_at(item, context, key)
            changed = changed or new is not item
            items.append((key, new))
        return dict(items) if changed else value
    if isinstance(value, list | tuple):
        rendered = [_render_at(item, context, i) for i, item in enumerate(value)]
        if any(new is not old for new, old in zip(rendered, value, strict=True)):
            return rendered
        return value
    return value


def render(value: JSON, context: Mapping[str, JSON], path: str = "$") -> JSON:
    """``value`` with every template replaced from ``context`` (``{"input": {...},
    "steps": {step_id: {"output": ...}}}`` plus, inside sub-plans, ``item``, ``index``,
    ``acc`` or ``iteration``; any ``Mapping`` will do). Raises ``TemplateSyntaxError`` or
    ``TemplateLookupError`` with the JSON path of the offending string."""
    try:
        return _render(value, context)
    except _RenderFailure as failure:
        error = failure.error
        error.path = _format_trail(path, tuple(reversed(failure.trail)))
        raise error from None
