"""Plan validation: every problem at once, each with the JSON path of what to fix.

Design notes
- Dependencies are ``depends_on`` PLUS every step a step's input templates reference:
  ``{{ steps.fetch.output.title }}`` in step ``summarize`` makes ``summarize`` wait for
  ``fetch`` even when ``depends_on`` does not say so. Cycles are searched over that union
  (so a step reading its own output is the cycle ``a → a``), and ``dependencies`` /
  ``topological_order`` give the executor the same graph. Templates in ``Plan.output``
  are rendered after every step has finished, so they add no edge.
- Messages are written for whoever fixes the plan (often an LLM): each says what is
  wrong, what exists instead (tool names, step ids, fields) and the closest match.
- Schema checks read JSON Schema as ``msgspec.json.schema`` writes it (``$ref`` into
  ``$defs``, ``anyOf`` for unions) and only report what is certainly wrong: whatever a
  schema leaves open is accepted. The tool-runner validates inputs again at call time.
- Deterministic: issues come check by check, in plan order within a check.
"""

from __future__ import annotations

import difflib
import heapq
import re
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from loom_core.contracts import Plan, PlanIssue, Step, ToolSpec
from loom_core.ids import is_token
from loom_core.templating import (
    Reference,
    Segment,
    TemplateLookupError,
    TemplateSyntaxError,
    child_path,
    find_references,
    format_segment,
    lookup,
    scan_templates,
)

JSON = Any
Schema = Mapping[str, Any]

_AT_PATH_RE = re.compile(r"\s*-\s*at\s+`\$(?P<rest>[^`]*)`\s*\Z")


# --------------------------------------------------------------------------- public API


def validate_plan(
    plan: Plan,
    tools: Mapping[str, ToolSpec] | None = None,
    run_input: Mapping[str, JSON] | None = None,
    path: str = "$.plan",
) -> list[PlanIssue]:
    """Every problem of ``plan`` (empty list: valid). Tool checks run only when
    ``tools`` is given, run-input checks only when ``run_input`` is given."""
    facts = _Facts.of(plan, path)
    issues = [
        *_check_not_empty(facts),
        *_check_timeouts(facts),
        *_check_step_ids(facts),
        *_check_template_syntax(facts),
        *_check_depends_on(facts),
        *_check_template_steps(facts),
        *_check_cycles(facts),
    ]
    if tools is not None:
        issues += _check_tools(facts, tools)
        issues += _check_inputs(facts, tools)
        issues += _check_output_fields(facts, tools)
    if run_input is not None:
        issues += _check_run_input(facts, run_input)
    return issues


def dependencies(plan: Plan) -> dict[str, tuple[str, ...]]:
    """Effective dependencies of each step: ``depends_on`` then the steps its input
    templates reference, deduplicated, in that order. Assumes a valid plan."""
    return {
        step.id: _dedup([*step.depends_on, *_step_refs(find_references(step.input))])
        for step in plan.steps
    }


def topological_order(plan: Plan) -> list[str]:
    """Step ids so that every step comes after its dependencies; among steps that are
    ready at the same time, plan order wins. Raises ValueError on an invalid graph."""
    deps = dependencies(plan)
    position = {step.id: i for i, step in enumerate(plan.steps)}
    if len(position) != len(plan.steps):
        raise ValueError("plan has duplicate step ids; run validate_plan first")
    waiting = {sid: len(ds) for sid, ds in deps.items()}
    dependents: dict[str, list[str]] = {sid: [] for sid in deps}
    for sid, ds in deps.items():
        for dep in ds:
            if dep not in dependents:
                raise ValueError(f"step {sid!r} depends on unknown step {dep!r}")
            dependents[dep].append(sid)
    ready = [position[sid] for sid, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        sid = plan.steps[heapq.heappop(ready)].id
        order.append(sid)
        for nxt in dependents[sid]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                heapq.heappush(ready, position[nxt])
    if len(order) != len(plan.steps):
        done = set(order)
        stuck = [s.id for s in plan.steps if s.id not in done]
        raise ValueError(f"plan has a dependency cycle among {stuck}; run validate_plan first")
    return order


def plan_issue_from_decode_error(
    exc: msgspec.ValidationError | msgspec.DecodeError, path_prefix: str = "$.plan"
) -> PlanIssue:
    """A PlanIssue for a plan that failed to decode. msgspec ends messages with
    "- at `$.steps[0].kind`"; ``$`` is replaced by ``path_prefix`` (the place the
    decoded value sits in the request)."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return PlanIssue("invalid_json", path_prefix, f"the plan is not valid JSON: {text}")
    at = _AT_PATH_RE.search(text)
    if at is None:
        return PlanIssue("invalid_plan", path_prefix, text)
    return PlanIssue("invalid_plan", path_prefix + at["rest"], text[: at.start()])


# --------------------------------------------------------------------------- shared facts


@dataclass
class _Facts:
    """What every check needs, computed once per validation."""

    plan: Plan
    path: str
    first_index: dict[str, int]  # step id -> index of its first occurrence
    step_refs: list[list[Reference]]  # per step, references in its input
    output_refs: list[Reference]
    syntax_errors: list[TemplateSyntaxError] = field(default_factory=list)

    @classmethod
    def of(cls, plan: Plan, path: str) -> _Facts:
        first_index: dict[str, int] = {}
        for i, step in enumerate(plan.steps):
            first_index.setdefault(step.id, i)
        facts = cls(plan, path, first_index, [], [])
        for i, step in enumerate(plan.steps):
            refs, errors = scan_templates(step.input, f"{facts.step_path(i)}.input")
            facts.step_refs.append(refs)
            facts.syntax_errors += errors
        facts.output_refs, errors = scan_templates(plan.output, f"{path}.output")
        facts.syntax_errors += errors
        return facts

    def step_path(self, index: int) -> str:
        return f"{self.path}.steps[{index}]"

    def all_refs(self) -> Iterator[Reference]:
        for refs in self.step_refs:
            yield from refs
        yield from self.output_refs

    def edges(self, index: int) -> list[str]:
        """Known steps that step ``index`` waits for (unknown ones are reported apart)."""
        step = self.plan.steps[index]
        deps = [*step.depends_on, *_step_refs(self.step_refs[index])]
        return [d for d in _dedup(deps) if d in self.first_index]


def _issue(code: str, path: str, message: str) -> PlanIssue:
    return PlanIssue(code=code, path=path, message=message)


def _dedup(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _step_refs(refs: Sequence[Reference]) -> list[str]:
    return [r.step_id for r in refs if r.step_id is not None]


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


# --------------------------------------------------------------------------- structure


def _check_not_empty(facts: _Facts) -> list[PlanIssue]:
    if facts.plan.steps:
        return []
    return [_issue("invalid_plan", f"{facts.path}.steps", "a plan needs at least one step")]


def _check_timeouts(facts: _Facts) -> Iterator[PlanIssue]:
    for i, step in enumerate(facts.plan.steps):
        if step.timeout_s is not None and not step.timeout_s > 0:
            yield _issue(
                "invalid_plan",
                f"{facts.step_path(i)}.timeout_s",
                f"step {step.id!r}: timeout_s must be a positive number of seconds "
                f"(got {step.timeout_s}); omit it to use the tool's default",
            )


def _check_step_ids(facts: _Facts) -> Iterator[PlanIssue]:
    for i, step in enumerate(facts.plan.steps):
        where = f"{facts.step_path(i)}.id"
        if not is_token(step.id):
            yield _issue(
                "invalid_step_id",
                where,
                f"step id {step.id!r} is not allowed: use 1 to 64 characters among "
                f"letters, digits, '_' and '-'",
            )
        first = facts.first_index[step.id]
        if first != i:
            yield _issue(
                "duplicate_step_id",
                where,
                f"step id {step.id!r} is already used by {facts.step_path(first)}; "
                f"give each step a unique id",
            )


def _check_template_syntax(facts: _Facts) -> Iterator[PlanIssue]:
    for error in facts.syntax_errors:
        yield _issue("invalid_template", error.path, error.message)


def _unknown_step_message(facts: _Facts, name: str) -> str:
    known = list(facts.first_index)
    return f"no step has id {name!r}; {_did_you_mean(name, known)}step ids: {known}"


def _check_depends_on(facts: _Facts) -> Iterator[PlanIssue]:
    for i, step in enumerate(facts.plan.steps):
        for k, dep in enumerate(step.depends_on):
            if dep not in facts.first_index:
                yield _issue(
                    "missing_step",
                    f"{facts.step_path(i)}.depends_on[{k}]",
                    f"step {step.id!r} depends on an unknown step: "
                    + _unknown_step_message(facts, dep),
                )


def _check_template_steps(facts: _Facts) -> Iterator[PlanIssue]:
    for ref in facts.all_refs():
        if ref.step_id is not None and ref.step_id not in facts.first_index:
            yield _issue(
                "missing_step",
                ref.path,
                f"`{ref.expr}` reads an unknown step: " + _unknown_step_message(facts, ref.step_id),
            )


# --------------------------------------------------------------------------- cycles


def _strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (plans may be deeper than the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(component)
    return components


def _shortest_cycle(graph: dict[str, list[str]], start: str, members: set[str]) -> list[str]:
    """The shortest path start → ... → start inside one strongly connected component."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in graph[node]:
            if nxt == start:
                path = [node]  # walk back to start, then read it forwards
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if nxt in members and nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    raise AssertionError("a strongly connected component always holds a cycle")


def _check_cycles(facts: _Facts) -> Iterator[PlanIssue]:
    # One issue per strongly connected component: overlapping cycles are one knot to
    # untie, and enumerating every elementary cycle can be exponential.
    graph = {sid: facts.edges(i) for sid, i in facts.first_index.items()}
    knots = []
    for component in _strongly_connected(graph):
        start = min(component, key=facts.first_index.__getitem__)
        if len(component) > 1 or start in graph[start]:
            knots.append((facts.first_index[start], start, set(component)))
    for index, start, members in sorted(knots, key=lambda k: k[0]):
        cycle = _shortest_cycle(graph, start, members)
        others = sorted(members - set(cycle), key=facts.first_index.__getitem__)
        tail = f" (steps {others} are caught in the same knot)" if others else ""
        yield _issue(
            "dependency_cycle",
            f"{facts.step_path(index)}.depends_on",
            f"dependency cycle: {' → '.join(cycle)}{tail}; each step waits for the next, "
            f"so none can start. Remove one dependency; a `{{{{ steps.X.output }}}}` "
            f"template in a step's input also makes it depend on X",
        )


# --------------------------------------------------------------------------- tools


def _check_tools(facts: _Facts, tools: Mapping[str, ToolSpec]) -> Iterator[PlanIssue]:
    names = sorted(tools)
    for i, step in enumerate(facts.plan.steps):
        if step.tool in tools:
            continue
        available = f"available tools: {', '.join(names)}" if names else "no tools are registered"
        yield _issue(
            "unknown_tool",
            f"{facts.step_path(i)}.tool",
            f"step {step.id!r} uses unknown tool {step.tool!r}; "
            f"{_did_you_mean(step.tool, names)}{available}",
        )


# --------------------------------------------------------------------------- schemas


def _resolve(schema: Any, defs: Schema) -> Schema:
    """Follow ``$ref`` into ``$defs``; an unresolvable reference allows anything."""
    for _ in range(64):  # a guard against reference loops
        if not isinstance(schema, Mapping):
            return {}
        ref = schema.get("$ref")
        if not isinstance(ref, str):
            return schema
        name = ref.rsplit("/", 1)[-1]
        schema = defs.get(name, {}) if ref.startswith(("#/$defs/", "#/definitions/")) else {}
    return {}


def _defs(schema: Schema) -> Schema:
    return {**schema.get("definitions", {}), **schema.get("$defs", {})}


def _types(schema: Schema) -> set[str] | None:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return set(kind)
    return None


def _alternatives(schema: Schema) -> list[Any] | None:
    alts = schema.get("anyOf", schema.get("oneOf"))
    return alts if isinstance(alts, list) else None


def _json_type(value: JSON) -> str:
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


def _describe(schema: Schema, defs: Schema) -> str:
    """A short human name for what a schema accepts: ``integer``, ``string or null``."""
    alts = _alternatives(schema)
    if alts is not None:
        return " or ".join(_describe(_resolve(a, defs), defs) for a in alts)
    if "enum" in schema:
        return "one of " + ", ".join(msgspec.json.encode(v).decode() for v in schema["enum"])
    types = _types(schema)
    return " or ".join(sorted(types)) if types else "any value"


def _a(description: str) -> str:
    """``integer`` -> ``an integer``, for messages."""
    if description.startswith(("one of", "any ")):
        return description
    return ("an " if description[0] in "aeiou" else "a ") + description


def _accepts_type(value: JSON, schema: Schema, defs: Schema) -> bool:
    """Does ``schema`` accept ``value`` at the level of JSON types (and enums)?"""
    alts = _alternatives(schema)
    if alts is not None:
        return any(_accepts_type(value, _resolve(a, defs), defs) for a in alts)
    if "enum" in schema:
        kind = _json_type(value)
        return any(_json_type(v) == kind and v == value for v in schema["enum"])
    types = _types(schema)
    if types is None:
        return True
    kind = _json_type(value)
    return kind in types or (kind == "integer" and "number" in types)


def _preview(value: JSON, limit: int = 40) -> str:
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_template(value: JSON) -> bool:
    return isinstance(value, str) and "{{" in value


def _value_issues(value: JSON, schema: Any, defs: Schema, path: str, tool: str) -> list[PlanIssue]:
    """Literal ``value`` against ``schema``: type, required and unknown fields, nested."""
    schema = _resolve(schema, defs)
    if _is_template(value):
        return []  # its type is only known once rendered
    alts = _alternatives(schema)
    if alts is not None:
        fitting = [s for s in (_resolve(a, defs) for a in alts) if _accepts_type(value, s, defs)]
        if len(fitting) == 1:
            return _value_issues(value, fitting[0], defs, path, tool)
        if fitting:
            return []  # several shapes fit: be lenient, the tool-runner checks again
    if not _accepts_type(value, schema, defs):
        return [
            _issue(
                "invalid_input",
                path,
                f"tool {tool!r} expects {_describe(schema, defs)} here, got "
                f"{_json_type(value)} {_preview(value)}",
            )
        ]
    if isinstance(value, Mapping):
        return _object_issues(value, schema, defs, path, tool)
    if isinstance(value, list | tuple):
        return _array_issues(value, schema, defs, path, tool)
    return []


def _object_issues(
    value: Mapping[str, JSON], schema: Schema, defs: Schema, path: str, tool: str
) -> list[PlanIssue]:
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    issues = []
    for name in schema.get("required", []):
        if name not in value:
            issues.append(
                _issue(
                    "invalid_input",
                    child_path(path, name),
                    f"tool {tool!r} requires field {name!r} "
                    f"({_describe(_resolve(props.get(name, {}), defs), defs)}); add it",
                )
            )
    for key, item in value.items():
        where = child_path(path, key)
        if key in props:
            issues += _value_issues(item, props[key], defs, where, tool)
        elif extra is False:
            issues.append(
                _issue(
                    "invalid_input",
                    where,
                    f"tool {tool!r} has no field {key!r}; {_did_you_mean(key, sorted(props))}"
                    f"accepted fields: {sorted(props)}",
                )
            )
        elif isinstance(extra, Mapping):
            issues += _value_issues(item, extra, defs, where, tool)
    return issues


def _array_issues(
    value: Sequence[JSON], schema: Schema, defs: Schema, path: str, tool: str
) -> list[PlanIssue]:
    prefix = schema.get("prefixItems", [])
    items = schema.get("items")
    issues = []
    for i, item in enumerate(value):
        item_schema = prefix[i] if i < len(prefix) else items
        if isinstance(item_schema, Mapping):
            issues += _value_issues(item, item_schema, defs, child_path(path, i), tool)
    return issues


def _check_inputs(facts: _Facts, tools: Mapping[str, ToolSpec]) -> Iterator[PlanIssue]:
    for i, step in enumerate(facts.plan.steps):
        spec = tools.get(step.tool)
        if spec is not None:
            schema = spec.input_schema
            where = f"{facts.step_path(i)}.input"
            yield from _value_issues(step.input, schema, _defs(schema), where, step.tool)


# --------------------------------------------------------------------------- output fields


class _Open:
    """Marker: from here on the schema allows anything, so nothing more can be checked."""


_OPEN = _Open()


def _schema_step(schema: Schema, seg: Segment, defs: Schema, at: str) -> Schema | _Open | str:
    """The schema of ``value[seg]``, ``_OPEN``, or a message saying why it cannot exist."""
    alts = _alternatives(schema)
    if alts is not None:
        results = [_schema_step(_resolve(a, defs), seg, defs, at) for a in alts]
        if any(r is _OPEN for r in results):
            return _OPEN
        found = [r for r in results if isinstance(r, Mapping)]
        if len(found) == 1:
            return found[0]
        if found:
            return _OPEN  # several shapes fit: stop being clever
        non_null = [
            r for r, a in zip(results, alts, strict=True) if _resolve(a, defs) != {"type": "null"}
        ]
        return str((non_null or results)[0])
    types = _types(schema)
    if isinstance(seg, str):
        props = schema.get("properties")
        if isinstance(props, Mapping):
            if seg in props:
                return props[seg]
            if schema.get("additionalProperties") is False:
                return (
                    f"`{at}` has no field {seg!r}; {_did_you_mean(seg, sorted(props))}"
                    f"fields: {sorted(props)}"
                )
            return _OPEN
        if types is not None and "object" not in types:
            return f"`{at}` is {_a(_describe(schema, defs))}, it has no field {seg!r}"
        return _OPEN
    if types is not None and "array" not in types:
        return f"`{at}` is {_a(_describe(schema, defs))}, not an array; it has no index [{seg}]"
    prefix = schema.get("prefixItems")
    if isinstance(prefix, list) and seg < len(prefix):
        return prefix[seg]
    max_items = schema.get("maxItems")
    if isinstance(max_items, int) and seg >= max_items:
        return f"`{at}` has at most {max_items} items; index [{seg}] is out of range"
    items = schema.get("items")
    return items if isinstance(items, Mapping) else _OPEN


def _output_field_problem(ref: Reference, spec: ToolSpec) -> str | None:
    defs = _defs(spec.output_schema)
    schema: Any = spec.output_schema
    at = f"steps{format_segment(ref.segments[0])}.output"
    for seg in ref.segments[2:]:
        result = _schema_step(_resolve(schema, defs), seg, defs, at)
        if isinstance(result, _Open):
            return None
        if isinstance(result, str):
            return result
        schema = result
        at += format_segment(seg)
    return None


def _check_output_fields(facts: _Facts, tools: Mapping[str, ToolSpec]) -> Iterator[PlanIssue]:
    for ref in facts.all_refs():
        index = facts.first_index.get(ref.step_id) if ref.step_id is not None else None
        if index is None:
            continue
        step: Step = facts.plan.steps[index]
        spec = tools.get(step.tool)
        problem = _output_field_problem(ref, spec) if spec is not None else None
        if problem is not None:
            yield _issue(
                "missing_field",
                ref.path,
                f"`{ref.expr}`: {problem} (output of tool {step.tool!r})",
            )


# --------------------------------------------------------------------------- run input


def _check_run_input(facts: _Facts, run_input: Mapping[str, JSON]) -> Iterator[PlanIssue]:
    context = {"input": run_input}
    for ref in facts.all_refs():
        if ref.root != "input":
            continue
        try:
            lookup(context, "input", ref.segments, ref.path)
        except TemplateLookupError as miss:
            yield _issue(
                "missing_input",
                ref.path,
                f"{miss.message}; pass the value in the run's input (its keys: "
                f"{sorted(run_input)}) or change the template",
            )
