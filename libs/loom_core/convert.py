"""Plans written for the plan-execute framework, converted to native plans.

Their users write::

    execution: dag                      # or sequential (the default): each step after the last
    steps:
      - {id: fetch, tool: http_get, input: {url: "${input.url}"}, output: page}
      - {id: words, tool: text, input: {text: "{{page.body}}", op: word_count}, output: n}
      - type: loop                      # once per element, `concurrency` at a time
        over: input.cities
        as: city
        concurrency: 3
        step: {id: weather, tool: get_weather, input: {city: "{{city}}"}}
        output: all_weather
      - type: conditional
        condition: "${n.result} > 100 and ${input.lang} == 'en'"
        then: [ ... ]
        otherwise: [ ... ]
      - {type: reduce, over: all_weather, as: w, accumulator: acc, initial: 0, step: {...}}
      - {type: final, output: {weather: "{{all_weather}}"}}

The mapping (docs/convert.md): a step's ``output`` names a *variable*; a reference to it
(``{{page.body}}`` or ``${page.body}``) becomes ``{{ steps.fetch.output.body }}``. A
loop is a ``foreach`` (its ``as`` variable is ``item``), a conditional an ``if`` (the
condition parsed by ``loom_core.expressions`` into a declarative predicate, never
evaluated), a reduce a ``reduce`` (its accumulator is ``acc``), a final a ``final``.
``sequential`` chains each list's steps with ``depends_on``; ``dag`` leaves the order
to what the steps reference, as native plans do.

``to_native`` is pure and reports every problem at once (``ConversionError.issues``,
each with its JSON path); what it produces is then validated as any native plan.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from loom_core.contracts import PlanIssue
from loom_core.errors import LoomError
from loom_core.expressions import ExpressionError, Path, parse_condition, parse_path
from loom_core.templating import child_path, format_expr

__all__ = ["STEP_TYPES", "ConversionError", "looks_like_plan_execute", "to_native"]

STEP_TYPES = ("tool", "loop", "conditional", "reduce", "final")
EXECUTION_MODES = ("sequential", "dag")
_PLAN_FIELDS = ("execution", "steps", "name", "description", "output", "input", "version")
_FIELDS: dict[str, tuple[str, ...]] = {
    "tool": ("id", "type", "tool", "input", "output", "depends_on", "description",
             "timeout_s", "retry"),
    "loop": ("id", "type", "over", "as", "concurrency", "step", "steps", "result",
             "output", "depends_on", "description"),
    "conditional": ("id", "type", "condition", "then", "otherwise", "else", "output",
                    "depends_on", "description"),
    "reduce": ("id", "type", "over", "as", "accumulator", "initial", "step", "steps",
               "result", "output", "depends_on", "description"),
    "final": ("id", "type", "output", "depends_on", "description"),
}  # fmt: skip
_NATIVE_ROOTS = ("input", "steps", "secrets")
_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_TEMPLATE = re.compile(r"\$\{([^{}]*)\}|\{\{([^{}]*)\}\}")


class ConversionError(LoomError, ValueError):
    """Every problem found, as plan issues with JSON paths in the source document."""

    code = "invalid_plan"

    def __init__(self, issues: list[PlanIssue]) -> None:
        super().__init__(f"{len(issues)} problem(s): " + "; ".join(i.message for i in issues[:3]))
        self.issues = issues
        self.details = {"issues": msgspec.to_builtins(issues)}


def looks_like_plan_execute(doc: Any) -> bool:
    """Whether a plan document is written for the plan-execute framework (an
    ``execution`` mode, ``type:`` steps, or tool steps without ``kind``)."""
    if not isinstance(doc, Mapping):
        return False
    if "execution" in doc:
        return True
    steps = doc.get("steps")
    if not isinstance(steps, list):
        return False
    return any(
        isinstance(s, Mapping) and "kind" not in s and ("type" in s or "tool" in s) for s in steps
    )


def to_native(doc: Any) -> dict[str, Any]:
    """The native plan (plain JSON) for the plan-execute plan ``doc``; raises
    ``ConversionError`` with every problem."""
    return _Converter().plan(doc)


# --------------------------------------------------------------------------- internals


@dataclass
class _Scope:
    """Variables one list of steps sees: name -> (native root, segments)."""

    names: dict[str, tuple[str, tuple[str | int, ...]]] = field(default_factory=dict)
    parent: _Scope | None = None

    def find(self, name: str) -> tuple[str, tuple[str | int, ...]] | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        return None

    def known(self) -> list[str]:
        out: list[str] = []
        scope: _Scope | None = self
        while scope is not None:
            out += [n for n in scope.names if n not in out]
            scope = scope.parent
        return out


class _Converter:
    def __init__(self) -> None:
        self.issues: list[PlanIssue] = []
        self.ids: set[str] = set()
        self.sequential = True
        self.counts: dict[str, int] = {}

    def issue(self, code: str, path: str, message: str) -> None:
        self.issues.append(PlanIssue(code, path, message))

    # -- the document
    def plan(self, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, Mapping):
            raise ConversionError(
                [PlanIssue("invalid_plan", "$", "a plan is a mapping with `steps`")]
            )
        self.unknown_fields(doc, _PLAN_FIELDS, "$", "a plan")
        mode = doc.get("execution", "sequential")
        if mode not in EXECUTION_MODES:
            self.issue("invalid_value", "$.execution",
                       f"execution {mode!r}: {_hint(str(mode), EXECUTION_MODES)}one of "
                       f"{', '.join(EXECUTION_MODES)}")  # fmt: skip
        self.sequential = mode != "dag"
        steps = doc.get("steps")
        out: dict[str, Any] = {}
        if isinstance(doc.get("name"), str):
            out["name"] = doc["name"]
        if not isinstance(steps, list) or not steps:
            self.issue("missing_field", "$.steps", "a plan needs `steps`, a non-empty list")
            steps = []
        root = _Scope({"input": ("input", ())})
        out["steps"] = self.steps(steps, "$.steps", root)
        if "output" in doc:
            out["output"] = self.value(doc["output"], root, "$.output")
        if self.issues:
            raise ConversionError(self.issues)
        return out

    def steps(
        self, steps: list[Any], path: str, outer: _Scope, scope: _Scope | None = None
    ) -> list[dict[str, Any]]:
        """One list: ids and variables first (a step may read one defined below it, in
        a DAG), then each step. ``scope``: where the list's variables go (a new one)."""
        scope = scope if scope is not None else _Scope(parent=outer)
        kinds: list[str | None] = []
        ids: list[str] = []
        for i, step in enumerate(steps):
            where = f"{path}[{i}]"
            kind = self.kind(step, where)
            kinds.append(kind)
            sid = self.step_id(step, kind or "step", where)
            ids.append(sid)
            var = step.get("output") if isinstance(step, Mapping) and kind != "final" else None
            if var is None:
                continue
            if not isinstance(var, str) or not _VAR.match(var):
                self.issue("invalid_value", f"{where}.output",
                           f"`output` names the variable that holds this step's result: a "
                           f"name like `page`, got {var!r}")  # fmt: skip
            elif var in scope.names or var in ("input", "steps", "secrets"):
                self.issue("duplicate_variable", f"{where}.output",
                           f"variable {var!r} is already defined in this list; give each "
                           "step's output its own name")  # fmt: skip
            else:
                scope.names[var] = ("steps", (sid, "output"))
        out = []
        for i, (step, kind, sid) in enumerate(zip(steps, kinds, ids, strict=True)):
            if kind is None:
                continue
            native = self.step(step, kind, sid, f"{path}[{i}]", scope)
            if self.sequential and i > 0 and kinds[i - 1] is not None:
                deps = native.setdefault("depends_on", [])
                if ids[i - 1] not in deps:
                    deps.insert(0, ids[i - 1])
            out.append(native)
        return out

    def kind(self, step: Any, where: str) -> str | None:
        if not isinstance(step, Mapping):
            self.issue("invalid_step", where, f"a step is a mapping, got {step!r}")
            return None
        kind = step.get("type", "tool" if "tool" in step else None)
        if kind is None:
            self.issue("missing_field", f"{where}.type",
                       f"a step needs `tool` (a tool step) or `type`: one of "
                       f"{', '.join(STEP_TYPES)}")  # fmt: skip
            return None
        if kind not in STEP_TYPES:
            self.issue("unknown_step_type", f"{where}.type",
                       f"unknown step type {kind!r}: {_hint(str(kind), STEP_TYPES)}one of "
                       f"{', '.join(STEP_TYPES)}")  # fmt: skip
            return None
        self.unknown_fields(step, _FIELDS[kind], where, f"a {kind} step")
        return str(kind)

    def step_id(self, step: Any, kind: str, where: str) -> str:
        given = step.get("id") if isinstance(step, Mapping) else None
        if given is not None:
            if not isinstance(given, str) or not _ID.match(given):
                what = f"a step id is 1-64 letters, digits, `_` or `-`, got {given!r}"
                self.issue("invalid_value", f"{where}.id", what)
            sid = str(given)
        else:
            var = step.get("output") if isinstance(step, Mapping) else None
            sid = var if isinstance(var, str) and _VAR.match(var) and kind != "final" else kind
        if given is None:  # derived ids are made unique; given ones are the author's
            base, n = sid, 1
            while sid in self.ids:
                n += 1
                sid = f"{base}_{n}"
        self.ids.add(sid)
        return sid

    def step(
        self, step: Mapping[str, Any], kind: str, sid: str, where: str, scope: _Scope
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": kind, "id": sid}
        deps = step.get("depends_on")
        if deps is not None:
            deps = [deps] if isinstance(deps, str) else deps
            if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
                self.issue("invalid_value", f"{where}.depends_on", "a list of step ids")
            else:
                out["depends_on"] = list(deps)
        if isinstance(step.get("description"), str):
            out["description"] = step["description"]
        if kind == "tool":
            out["tool"] = step.get("tool")
            if not isinstance(out["tool"], str):
                self.issue("missing_field", f"{where}.tool", "a tool step needs `tool`, its name")
            tool_input = step.get("input", {})
            if not isinstance(tool_input, Mapping):
                self.issue("invalid_value", f"{where}.input", "`input` is a mapping")
                tool_input = {}
            out["input"] = self.value(dict(tool_input), scope, f"{where}.input")
            for name in ("timeout_s", "retry"):
                if name in step:
                    out[name] = step[name]
        elif kind in ("loop", "reduce"):
            out["kind"] = "foreach" if kind == "loop" else "reduce"
            out["items"] = self.items(step, scope, where)
            inner = _Scope(parent=scope)
            name = step.get("as", "item")
            if not isinstance(name, str) or not _VAR.match(name):
                self.issue("invalid_value", f"{where}.as", f"`as` is a variable name, got {name!r}")
            else:
                inner.names[name] = ("item", ())
            inner.names.setdefault("index", ("index", ()))
            if kind == "reduce":
                acc = step.get("accumulator", "acc")
                if not isinstance(acc, str) or not _VAR.match(acc):
                    self.issue("invalid_value", f"{where}.accumulator",
                               f"`accumulator` is a variable name, got {acc!r}")  # fmt: skip
                else:
                    inner.names[acc] = ("acc", ())
                out["initial"] = self.value(step.get("initial"), scope, f"{where}.initial")
            elif "concurrency" in step:
                out["concurrency"] = step["concurrency"]
            out["do"], body_scope = self.body(step, where, inner)
            if "result" in step:  # each element's result (native `output`), in the body
                out["output"] = self.value(step["result"], body_scope, f"{where}.result")
        elif kind == "conditional":
            cond = step.get("condition")
            out["kind"] = "if"
            out["condition"] = self.condition(cond, scope, f"{where}.condition")
            for theirs, ours in (("then", "then"), ("otherwise", "else"), ("else", "else")):
                if theirs in step:
                    branch = step[theirs]
                    if not isinstance(branch, list):
                        self.issue("invalid_value", f"{where}.{theirs}", "a list of steps")
                        continue
                    out[ours] = self.steps(branch, f"{where}.{theirs}", scope)
            if not out.get("then") and not out.get("else"):
                self.issue("missing_field", f"{where}.then",
                           "a conditional needs `then` (and may have `otherwise`)")  # fmt: skip
        elif kind == "final":
            if "output" not in step:
                self.issue("missing_field", f"{where}.output",
                           "a final step needs `output`: what the run returns")  # fmt: skip
            out["output"] = self.value(step.get("output"), scope, f"{where}.output")
        return out

    def items(self, step: Mapping[str, Any], scope: _Scope, where: str) -> Any:
        over = step.get("over")
        if over is None:
            self.issue("missing_field", f"{where}.over",
                       "a loop or reduce needs `over`: a list, or a reference to one "
                       "(`input.cities`)")  # fmt: skip
            return []
        if isinstance(over, list):
            return self.value(over, scope, f"{where}.over")
        if not isinstance(over, str):
            self.issue("invalid_value", f"{where}.over", f"a list or a reference, got {over!r}")
            return []
        text = over.strip()
        m = _TEMPLATE.fullmatch(text)
        inner = (m.group(1) if m.group(1) is not None else m.group(2)) if m else text
        return self.ref(inner, scope, f"{where}.over")

    def body(
        self, step: Mapping[str, Any], where: str, scope: _Scope
    ) -> tuple[list[dict[str, Any]], _Scope]:
        """The native ``do`` and the scope its steps' variables live in."""
        if "step" in step and "steps" in step:
            self.issue("invalid_step", where, "give `step` (one) or `steps` (a list), not both")
        if "steps" in step:
            body, at = step["steps"], f"{where}.steps"
        else:
            body, at = [step.get("step")], f"{where}.step"
            if step.get("step") is None:
                self.issue("missing_field", at, "a loop or reduce needs `step` (or `steps`)")
                return [], scope
        if not isinstance(body, list) or not body:
            self.issue("invalid_value", at, "a non-empty list of steps")
            return [], scope
        inner = _Scope(parent=scope)
        if "steps" in step:
            return self.steps(body, at, scope, inner), inner
        kind = self.kind(body[0], at)  # one step: its path is `step`, not `step[0]`
        if kind is None:
            return [], inner
        sid = self.step_id(body[0], kind, at)
        var = body[0].get("output") if kind != "final" else None
        if isinstance(var, str) and _VAR.match(var):
            inner.names[var] = ("steps", (sid, "output"))
        return [self.step(body[0], kind, sid, at, inner)], inner

    # -- values, references, conditions
    def value(self, value: Any, scope: _Scope, where: str) -> Any:
        if isinstance(value, str):
            return self.text(value, scope, where)
        if isinstance(value, Mapping):
            return {k: self.value(v, scope, child_path(where, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, scope, child_path(where, i)) for i, v in enumerate(value)]
        return value

    def text(self, text: str, scope: _Scope, where: str) -> str:
        def native(m: re.Match[str]) -> str:
            inner = m.group(1) if m.group(1) is not None else m.group(2)
            return self.ref(inner, scope, where)

        return _TEMPLATE.sub(native, text)

    def ref(self, text: str, scope: _Scope, where: str) -> str:
        try:
            return "{{ " + self.resolve(parse_path(text), scope) + " }}"
        except ExpressionError as exc:
            self.issue(exc.code, where, f"`{text.strip()}`: {exc.message}")
            return "{{ input }}"

    def resolve(self, path: Path, scope: _Scope) -> str:
        root, rest = path[0], path[1:]
        assert isinstance(root, str)  # parse_path starts with a name
        found = scope.find(root)
        if found is not None:
            base, segments = found
            return format_expr(base, (*segments, *rest))
        if root in _NATIVE_ROOTS:
            return format_expr(root, rest)
        known = scope.known()
        raise ExpressionError(
            "unknown_variable",
            f"no variable {root!r} here: {_hint(root, known)}a reference names the run's "
            f"`input`, or a step's `output` variable ({', '.join(known) or 'none yet'})",
        )

    def condition(self, text: Any, scope: _Scope, where: str) -> dict[str, Any]:
        if text is None:
            self.issue("missing_field", where, "a conditional needs `condition`, e.g. "
                       "\"${score.value} > 0.5\"")  # fmt: skip
            return {}
        if isinstance(text, Mapping):  # already a native predicate: translate its refs
            return dict(self.value(dict(text), scope, where))
        try:
            return parse_condition(text, lambda path, _pos: self.resolve(path, scope))
        except ExpressionError as exc:
            self.issue(exc.code, where, f"{text!r}: {exc.message}"
                       if isinstance(text, str) and len(text) <= 200 else exc.message)  # fmt: skip
            return {}

    def unknown_fields(
        self, doc: Mapping[str, Any], known: tuple[str, ...], where: str, what: str
    ) -> None:
        for name in doc:
            if name not in known:
                self.issue("unknown_field", child_path(where, str(name)),
                           f"unknown field {name!r} in {what}: {_hint(str(name), known)}"
                           f"known fields: {', '.join(known)}")  # fmt: skip


def _hint(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""
