"""The plan validator as it was before startcost made it faster (issue 10): the
reference ``test_validation_equivalence.py`` holds the faster one to, issue for issue,
on random plans. A frozen copy; do not edit it to follow the validator.

Plan validation: every problem at once, each with the JSON path of what to fix.

Design notes
- Scopes. ``Plan.steps`` is the root scope; each sub-plan (the ``do`` of foreach, loop
  and reduce, each branch of parallel, ``then``/``else`` of if) is a nested scope. A
  ``ToolStep.fallback`` belongs to its owner's scope (same visibility, same variables) but
  to no dependency graph: its references count as its owner's. Step ids are unique
  across the whole plan, fallbacks included, so ``steps.X`` never needs qualifying.
- Visibility. From scope S, ``steps.X`` may name a sibling (an implicit dependency, as
  ``depends_on`` is an explicit one) or a step of any enclosing scope. A reference to an
  enclosing step is *lifted*: the composite step of X's scope that contains the
  reference depends on X. So a composite's effective dependencies are its ``depends_on``
  plus every reference, in its own fields or anywhere inside its bodies and fallbacks,
  that names one of its siblings. Each scope is then a plain DAG, scheduled on its own
  (``dependencies``/``topological_order`` take one scope's list). ``depends_on`` only
  orders steps of the same list; to wait for an outer step, the enclosing composite
  depends on it. Steps nested in other bodies or branches are never visible: they may not
  have run, or ran once per element.
- Where fields are rendered. Own fields of a step (``input``, ``items``, ``initial``,
  ``condition``, ``while``, a sleep's ``until``, a final's ``output``) in the step's scope.
  The ``output`` of foreach/loop/reduce and a loop's ``until`` in the body scope after the
  body ran (so they may read the body's steps). A loop's ``while`` runs before each
  iteration: outer scope plus ``iteration``. ``Plan.output`` after every top-level step.
- Scope variables: ``item``/``index`` inside foreach and reduce bodies, ``acc`` inside
  reduce bodies, ``iteration`` inside loop bodies (and ``while``). Nested scopes inherit
  the variables around them; the innermost wins.
- ``unreachable_step`` is not computed: the only certain case, an ``if`` whose condition
  is constant, is already reported as ``predicate_references_nothing``.
- Messages are written for whoever fixes the plan (often an LLM): each says what is
  wrong, what exists instead (tool names, step ids, fields) and the closest match.
- Literal tool inputs are checked against the tool's input schema by the one checker
  (``loom_core.schemas``), template-aware: only what is certainly wrong is reported
  (a template's type is only known once rendered). Output-field references walk the
  output schema with the same readers (``$ref`` into ``$defs``, ``anyOf`` for unions).
  The tool-runner checks inputs again at call time, with the same checker and words.
- The schemas a plan carries (an approval's ``schema``, an agent's ``output_schema``)
  must be valid JSON Schema whose references stay inside them: a broken one would
  refuse every answer. Checked with the tool checks (the planner's), not by the
  executor's re-check, so runs recorded before the check replay exactly.
- Deterministic: issues come check by check, in document order within a check (a step,
  then its fallback, then its bodies, then the next step). Walks are iterative: nesting
  depth is bounded by the decoder, not by Python's recursion limit.
"""

from __future__ import annotations

import heapq
import re
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from foreign_reference import foreign_syntax_issues

from loom_core import agent as agent_step
from loom_core import predicates, replanning, schemas
from loom_core.caps import too_many
from loom_core.contracts import (
    AgentStep,
    ApprovalStep,
    Caps,
    ErrorInfo,
    FinalStep,
    ForeachStep,
    IfStep,
    LoopStep,
    ParallelStep,
    Plan,
    PlanIssue,
    ReduceStep,
    RetryPolicy,
    RunRequest,
    SleepStep,
    Step,
    SubRunStep,
    ToolSpec,
    ToolStep,
    WaitEventStep,
)
from loom_core.ids import is_token
from loom_core.json_types import did_you_mean, preview
from loom_core.schedules import RUN_ID_PREFIX
from loom_core.templating import (
    OPEN,
    SCOPE_ROOTS,
    Reference,
    Segment,
    TemplateLookupError,
    TemplateSyntaxError,
    child_path,
    format_segment,
    lookup,
    scan_templates,
    whole_reference,
)

JSON = Any
Schema = Mapping[str, Any]

MAX_LOOP_ITERATIONS = 100_000

_AT_PATH_RE = re.compile(r"\s*-\s*at\s+`\$(?P<rest>[^`]*)`\s*\Z")
_ITEM = frozenset({"item", "index"})
_ACC = frozenset({"item", "index", "acc"})
_ITERATION = frozenset({"iteration"})
_NUMBER_ROOTS = {"index": "the element's position", "iteration": "the iteration's number"}


# --------------------------------------------------------------------------- public API


def validate_plan(
    plan: Plan,
    tools: Mapping[str, ToolSpec] | None = None,
    run_input: Mapping[str, JSON] | None = None,
    path: str = "$.plan",
    caps: Caps | None = None,
    foreign: bool = False,
) -> list[PlanIssue]:
    """Every problem of ``plan`` (empty list: valid). Tool checks run only when
    ``tools`` is given, run-input checks only when ``run_input`` is given, fan-out
    caps (``loom_core.caps``: the run's recorded ones) only when ``caps`` is given.
    ``foreign``: also refuse valid text that does not do what was meant
    (``loom_core.foreign``). The planner asks for it and its verdict is recorded; the
    executor's re-check does not, so a recorded run whose plan was accepted before that
    rule existed replays exactly."""
    facts = _Facts.of(plan, path)
    issues = [
        *_check_not_empty(facts),
        *_check_plan_fields(facts),
        *_check_structure(facts),
        *_check_predicates(facts),
        *_check_step_ids(facts),
        *_check_template_syntax(facts),
        *_check_scope_variables(facts),
        *_check_depends_on(facts),
        *_check_template_steps(facts),
        *_check_cycles(facts),
    ]
    if foreign:  # valid but not what was meant (`${input.x}`, `output: name`)
        issues += foreign_syntax_issues(plan, path)
    if caps is not None:
        issues += _check_caps(facts, caps)
    if tools is not None:
        issues += _check_carried_schemas(facts)
        issues += _check_tools(facts, tools)
        issues += _check_inputs(facts, tools)
        issues += _check_output_fields(facts, tools)
    if run_input is not None:
        issues += _check_run_input(facts, run_input)
    return issues


# Fields of a RunRequest only the engine sets: a fork's reused outputs are computed by
# the executor from its own store (``loom.fork``), a child's parent link by the sub-run
# step that starts it. From a client they would be claims nobody checked.
INTERNAL_FIELDS = ("parent", "fork")
# The form of the ids the engine derives for child runs (``ids.child_run_id``): a client
# may not take one, or it could stand in for a sub-run that has not started yet.
RESERVED_RUN_ID = "--"
# the form of the ids of runs schedules submit (``loom_core.schedules.run_id_for``)
SCHEDULED_RUN_PREFIX = RUN_ID_PREFIX


def check_run_id(run_id: str, path: str = "$.run_id") -> ErrorInfo | None:
    """A run id a client chose: a subject token, and not of the engine's reserved form."""
    if not is_token(run_id):
        return ErrorInfo(
            code="invalid_run_id",
            message="run_id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-' "
            "(it becomes a NATS subject token)",
            path=path,
        )
    if RESERVED_RUN_ID in run_id:
        return ErrorInfo(
            code="invalid_run_id",
            message=f"run_id {run_id!r} contains {RESERVED_RUN_ID!r}, which is reserved for "
            "the ids of child runs the engine starts (`{parent}--{step}`)",
            path=path,
        )
    if run_id.startswith(SCHEDULED_RUN_PREFIX):
        # a client's run under a firing's id would stand in for that firing
        return ErrorInfo(
            code="invalid_run_id",
            message=f"run_id {run_id!r} starts with {SCHEDULED_RUN_PREFIX!r}, which is "
            "reserved for the runs schedules submit (`loom schedule`)",
            path=path,
        )
    return None


def check_run_request(request: RunRequest) -> ErrorInfo | None:
    """The first thing wrong with a client's run request before any plan is looked at
    (engine-only fields, the run id, plan vs request, the budget), or None. The plan
    itself is ``validate_plan``'s, every problem at once."""
    for name in INTERNAL_FIELDS:
        if getattr(request, name) is not None:
            how = (
                "fork a run with a ForkRun request on loom.fork (loom fork)"
                if name == "fork"
                else "child runs are started by sub_run steps"
            )
            return ErrorInfo(
                code="internal_field",
                message=f"`{name}` is set only by the engine; {how}",
                path=f"$.{name}",
            )
    if request.run_id is not None:
        error = check_run_id(request.run_id)
        if error is not None:
            return error
    if request.plan is None and not request.request:
        return ErrorInfo(
            code="missing_plan",
            message="give either `plan` (explicit steps) or `request` (natural language)",
            path="$",
        )
    if request.plan is not None and request.request:
        return ErrorInfo(
            code="ambiguous_request",
            message="give either `plan` or `request`, not both",
            path="$.request",
        )
    if request.budget is not None:
        for issue in agent_step.budget_issues("$.budget", request.budget):
            return ErrorInfo(code="invalid_budget", message=issue.message, path=issue.path)
    return None


def tool_uses(plan: Plan, path: str = "$.plan") -> list[tuple[str, str]]:
    """``(path of the step's tool field, tool name)`` for every tool step of ``plan``,
    nested bodies and fallbacks included, in document order."""
    facts = _Facts.of(plan, path)
    return [(f"{occ.path}.tool", step.tool) for occ, step in _tool_occs(facts)]


def dependencies(steps: Sequence[Step] | Plan) -> dict[str, tuple[str, ...]]:
    """Effective dependencies of each step of ONE scope (a ``Plan`` means its top-level
    steps): its ``depends_on``, then every step of this list that a template reads in the
    step's own fields, its fallbacks or anywhere inside its bodies (lifted references),
    in document order, deduplicated. Only ids of this list are returned (others belong
    to other scopes or are invalid). Assumes a validated plan."""
    steps = _steps_of(steps)
    siblings = {step.id for step in steps}
    return {step.id: _step_deps(step, siblings) for step in steps}


def topological_order(steps: Sequence[Step] | Plan) -> list[str]:
    """Ids of ONE scope's steps so that every step comes after its dependencies; among
    steps that are ready at the same time, list order wins. Raises ValueError on an
    invalid graph (duplicate ids, ``depends_on`` outside the list, a cycle)."""
    steps = _steps_of(steps)
    position = {step.id: i for i, step in enumerate(steps)}
    if len(position) != len(steps):
        raise ValueError("plan has duplicate step ids; run validate_plan first")
    for step in steps:
        for dep in step.depends_on:
            if dep not in position:
                raise ValueError(f"step {step.id!r} depends on unknown step {dep!r}")
    deps = dependencies(steps)
    waiting = {sid: len(ds) for sid, ds in deps.items()}
    dependents: dict[str, list[str]] = {sid: [] for sid in deps}
    for sid, ds in deps.items():
        for dep in ds:
            dependents[dep].append(sid)
    ready = [position[sid] for sid, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        sid = steps[heapq.heappop(ready)].id
        order.append(sid)
        for nxt in dependents[sid]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                heapq.heappush(ready, position[nxt])
    if len(order) != len(steps):
        done = set(order)
        stuck = [s.id for s in steps if s.id not in done]
        raise ValueError(f"plan has a dependency cycle among {stuck}; run validate_plan first")
    return order


def last_step_id(steps: Sequence[Step] | Plan) -> str | None:
    """The step whose output is a body's result when it has no ``output``: the last one
    of the list (None for an empty list)."""
    steps = _steps_of(steps)
    return steps[-1].id if steps else None


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


# --------------------------------------------------------------------------- step anatomy


@dataclass(frozen=True)
class _Field:
    """A field that may hold templates. ``in_body``: rendered in the step's ``do`` scope
    after the body ran; ``extra``: scope variables it sees beyond its scope's."""

    name: str  # JSON name (``while``, not ``while_``)
    value: JSON
    in_body: bool = False
    extra: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Body:
    """A sub-plan: ``trail`` is its place under the step (``("branches", "left")``)."""

    trail: tuple[str, ...]
    steps: list[Step]
    variables: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Fallback:
    step: ToolStep


_Part = _Field | _Body | _Fallback


def _parts(step: Step) -> list[_Part]:
    """What a step holds, in document (declaration) order."""
    match step:
        case ToolStep():
            parts: list[_Part] = [_Field("input", step.input)]
            if step.fallback is not None:
                parts.append(_Fallback(step.fallback))
            return parts
        case ForeachStep():
            return [
                _Field("items", step.items),
                _Body(("do",), step.do, _ITEM),
                _Field("output", step.output, in_body=True),
            ]
        case LoopStep():
            return [
                _Body(("do",), step.do, _ITERATION),
                _Field("while", step.while_, extra=_ITERATION),
                _Field("until", step.until, in_body=True),
                _Field("output", step.output, in_body=True),
            ]
        case ParallelStep():
            return [_Body(("branches", name), body) for name, body in step.branches.items()]
        case ReduceStep():
            return [
                _Field("items", step.items),
                _Body(("do",), step.do, _ACC),
                _Field("initial", step.initial),
                _Field("output", step.output, in_body=True),
            ]
        case IfStep():
            return [
                _Field("condition", step.condition),
                _Body(("then",), step.then),
                _Body(("else",), step.else_),
            ]
        case FinalStep():
            return [_Field("output", step.output)]
        case SleepStep():
            return [_Field("until", step.until)]
        case ApprovalStep():
            return [_Field("payload", step.payload)]
        case SubRunStep():
            # the child plan's own templates belong to the child run, not to this scope
            return [_Field("input", step.input), _Field("run_id", step.run_id)]
        case WaitEventStep():
            return [_Field("events", [{"key": m.key} for m in step.events])]
        case AgentStep():
            fields: list[_Field | _Body | _Fallback] = [
                _Field("instructions", step.instructions),
                _Field("input", step.input),
            ]
            if step.memory is not None:
                recall = step.memory.semantic_recall
                fields += [
                    _Field("memory.thread_id", step.memory.thread_id),
                    _Field("memory.semantic_recall.query", recall.query if recall else None),
                ]
            return fields
    raise TypeError(f"not a step: {step!r}")


def _kind(step: Step) -> str:
    return str(type(step).__struct_config__.tag)


def _steps_of(steps: Sequence[Step] | Plan) -> Sequence[Step]:
    return steps.steps if isinstance(steps, Plan) else steps


def _dedup(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _referenced_ids(step: Step) -> Iterator[str]:
    """Step ids a step waits for beyond its own ``depends_on``: its fallbacks'
    ``depends_on`` and every ``steps.X`` template in it or anywhere inside it, in
    document order. ``depends_on`` of steps inside bodies order those bodies only."""
    todo: list[Step | _Part] = list(reversed(_parts(step)))
    while todo:
        part = todo.pop()
        if isinstance(part, _Field):
            if part.value is not None:
                refs = scan_templates(part.value)[0]
                yield from (r.step_id for r in refs if r.step_id is not None)
        elif isinstance(part, _Body):
            todo.extend(reversed(part.steps))
        elif isinstance(part, _Fallback):
            yield from part.step.depends_on
            todo.extend(reversed(_parts(part.step)))
        else:  # a step inside a body
            todo.extend(reversed(_parts(part)))


def _step_deps(step: Step, siblings: Collection[str]) -> tuple[str, ...]:
    found = _dedup([*step.depends_on, *_referenced_ids(step)])
    return tuple(d for d in found if d in siblings)


# --------------------------------------------------------------------------- shared facts


@dataclass(eq=False)
class _Scope:
    """One list of steps: the plan's or a sub-plan's."""

    steps: Sequence[Step]
    path: str  # JSON path of the list
    parent: _Scope | None
    owner: _Occ | None  # the composite step whose body this is
    trail: tuple[str, ...]  # place under the owner: ("do",), ("branches", "x"), ...
    variables: frozenset[str]
    ids: dict[str, int] = field(default_factory=dict)  # id -> first index
    occs: list[_Occ] = field(default_factory=list)

    def chain(self) -> Iterator[_Scope]:
        """This scope, then each enclosing one up to the root."""
        scope: _Scope | None = self
        while scope is not None:
            yield scope
            scope = scope.parent

    @property
    def label(self) -> str:
        if self.owner is None:
            return "the plan's top-level steps"
        owner = self.owner.step
        if self.trail[0] == "branches":
            return f"branch {self.trail[1]!r} of parallel step {owner.id!r}"
        return f"the `{self.trail[0]}` of {_kind(owner)} step {owner.id!r}"


@dataclass(eq=False)
class _Occ:
    """One step where it occurs. A fallback shares its owner's scope and index."""

    step: Step
    scope: _Scope
    index: int
    path: str
    fallback_of: _Occ | None = None

    @property
    def holder(self) -> _Occ:
        """The step of the scope's list this occurrence stands for (self unless a
        fallback, whose owner may itself be a fallback)."""
        occ = self
        while occ.fallback_of is not None:
            occ = occ.fallback_of
        return occ


@dataclass(eq=False)
class _Site:
    """A template-bearing field: where ``steps.X`` resolves from (``scope``: the step's
    own scope, or its ``do`` scope for fields rendered after the body), the step it
    belongs to and the scope variables it sees."""

    value: JSON
    path: str
    name: str
    scope: _Scope
    owner: _Occ | None  # the step the field belongs to (None: Plan.output)
    variables: frozenset[str]
    refs: list[Reference] = field(default_factory=list)


@dataclass
class _Facts:
    """What every check needs, computed once per validation."""

    plan: Plan
    path: str
    root: _Scope
    scopes: list[_Scope] = field(default_factory=list)  # document order
    occs: list[_Occ] = field(default_factory=list)  # document order, fallbacks included
    sites: list[_Site] = field(default_factory=list)  # document order
    first: dict[str, _Occ] = field(default_factory=dict)  # id -> first occurrence
    syntax_errors: list[TemplateSyntaxError] = field(default_factory=list)

    @classmethod
    def of(cls, plan: Plan, path: str) -> _Facts:
        root = _Scope(plan.steps, f"{path}.steps", None, None, (), frozenset())
        facts = cls(plan, path, root)
        todo: list[_Scope | _Occ | _Site] = [root]
        while todo:
            item = todo.pop()
            if isinstance(item, _Scope):
                facts.scopes.append(item)
                for i, step in enumerate(item.steps):
                    item.ids.setdefault(step.id, i)
                    item.occs.append(_Occ(step, item, i, f"{item.path}[{i}]"))
                todo.extend(reversed(item.occs))
            elif isinstance(item, _Occ):
                facts.occs.append(item)
                facts.first.setdefault(item.step.id, item)
                todo.extend(reversed(facts._follow(item)))
            else:
                item.refs, errors = scan_templates(item.value, item.path)
                facts.sites.append(item)
                facts.syntax_errors += errors
        if plan.output is not None:
            site = _Site(plan.output, f"{path}.output", "output", root, None, frozenset())
            site.refs, errors = scan_templates(plan.output, site.path)
            facts.sites.append(site)
            facts.syntax_errors += errors
        return facts

    def _follow(self, occ: _Occ) -> list[_Scope | _Occ | _Site]:
        """The scopes, fallback and fields inside one occurrence, in document order."""
        scope = occ.scope
        parts = _parts(occ.step)
        bodies = {
            part.trail: _Scope(
                part.steps,
                _trail_path(occ.path, part.trail),
                scope,
                occ,
                part.trail,
                scope.variables | part.variables,
            )
            for part in parts
            if isinstance(part, _Body)
        }
        out: list[_Scope | _Occ | _Site] = []
        for part in parts:
            if isinstance(part, _Body):
                out.append(bodies[part.trail])
            elif isinstance(part, _Fallback):
                where = child_path(occ.path, "fallback")
                out.append(_Occ(part.step, scope, occ.index, where, fallback_of=occ))
            elif part.value is not None:
                at = bodies[("do",)] if part.in_body else scope
                where = child_path(occ.path, part.name)
                out.append(_Site(part.value, where, part.name, at, occ, at.variables | part.extra))
        return out

    def all_refs(self) -> Iterator[Reference]:
        for site in self.sites:
            yield from site.refs

    def resolved(self) -> Iterator[tuple[Reference, _Occ]]:
        """Each ``steps.X`` reference with the step it reads, when X is visible."""
        for site in self.sites:
            for ref in site.refs:
                target = _visible(site, ref.step_id) if ref.step_id is not None else None
                if target is not None:
                    yield ref, target


def _trail_path(path: str, trail: Sequence[str]) -> str:
    for key in trail:
        path = child_path(path, key)
    return path


def _issue(code: str, path: str, message: str) -> PlanIssue:
    return PlanIssue(code=code, path=path, message=message)


def _is_template(value: JSON) -> bool:
    return isinstance(value, str) and OPEN in value


# --------------------------------------------------------------------------- structure


def _check_not_empty(facts: _Facts) -> list[PlanIssue]:
    if facts.plan.steps:
        return []
    return [_issue("invalid_plan", f"{facts.path}.steps", "a plan needs at least one step")]


def _check_plan_fields(facts: _Facts) -> Iterator[PlanIssue]:
    plan = facts.plan
    if plan.timeout_s is not None and not plan.timeout_s > 0:
        yield _issue(
            "invalid_step",
            f"{facts.path}.timeout_s",
            f"the plan's timeout_s must be a positive number of seconds (got "
            f"{plan.timeout_s}); omit it for no run deadline",
        )
    if plan.budget is not None:
        yield from agent_step.budget_issues(f"{facts.path}.budget", plan.budget)
    yield from replanning.replan_issues(facts.path, plan)
    finals = [s for s in plan.steps if isinstance(s, FinalStep)]
    if plan.output is not None and finals:
        yield _issue(
            "invalid_plan",
            f"{facts.path}.output",
            f"the plan has both `output` and the final step {finals[0].id!r}; the final "
            f"step's output is the run's output, so `output` would be ignored. Keep one",
        )


def _check_structure(facts: _Facts) -> Iterator[PlanIssue]:
    first_final: _Occ | None = None
    for occ in facts.occs:
        step = occ.step
        match step:
            case ToolStep():
                yield from _tool_step_issues(occ, step)
            case ForeachStep():
                yield from _foreach_issues(occ, step)
            case LoopStep():
                yield from _loop_issues(occ, step)
            case ParallelStep():
                yield from _parallel_issues(occ, step)
            case ReduceStep():
                yield from _items_issues(occ, step.items)
                yield from _body_issues(occ, step.do)
            case IfStep() if not step.then and not step.else_:
                yield _issue(
                    "invalid_step",
                    occ.path,
                    f"if step {step.id!r} has neither `then` nor `else` steps, so it does "
                    f"nothing; give at least one branch steps",
                )
            case SleepStep():
                yield from _sleep_issues(occ, step)
            case ApprovalStep():
                yield from _approval_issues(occ, step)
            case WaitEventStep():
                yield from _wait_issues(occ, step)
            case AgentStep():
                yield from agent_step.step_issues(occ.path, step)
            case FinalStep() if occ.scope.parent is not None:
                yield _issue(
                    "invalid_step",
                    occ.path,
                    f"final step {step.id!r} is inside {occ.scope.label}; a final step "
                    f"gives the run's output, so it belongs in the plan's top-level steps. "
                    f"A body's result is its `output` (or its last step's output)",
                )
            case FinalStep() if first_final is not None:
                yield _issue(
                    "multiple_final_steps",
                    occ.path,
                    f"the plan already has the final step {first_final.step.id!r} "
                    f"({first_final.path}); a plan has at most one final step, whose output "
                    f"is the run's output. Merge them into one",
                )
            case FinalStep():
                first_final = occ


def _tool_step_issues(occ: _Occ, step: ToolStep) -> Iterator[PlanIssue]:
    if step.timeout_s is not None and not step.timeout_s > 0:
        yield _issue(
            "invalid_plan",
            f"{occ.path}.timeout_s",
            f"step {step.id!r}: timeout_s must be a positive number of seconds "
            f"(got {step.timeout_s}); omit it to use the tool's default",
        )
    if step.step_timeout_s is not None and not step.step_timeout_s > 0:
        yield _issue(
            "invalid_step",
            f"{occ.path}.step_timeout_s",
            f"step {step.id!r}: step_timeout_s bounds the whole step (every attempt and "
            f"wait) and must be a positive number of seconds (got {step.step_timeout_s}); "
            f"omit it for no bound",
        )
    if step.retry is not None:
        yield from _retry_issues(f"{occ.path}.retry", step.id, step.retry)
    if step.on_error == "fallback" and step.fallback is None:
        yield _issue(
            "invalid_step",
            f"{occ.path}.on_error",
            f'step {step.id!r} has on_error "fallback" but no `fallback` step; add one '
            f'(a tool step run in its place) or choose "fail" or "continue"',
        )
    if step.fallback is not None and step.on_error != "fallback":
        yield _issue(
            "invalid_step",
            f"{occ.path}.fallback",
            f'step {step.id!r} has a `fallback` that never runs: set on_error to "fallback" '
            f"to use it (now {step.on_error!r}), or remove it",
        )


def _retry_issues(path: str, sid: str, retry: RetryPolicy) -> Iterator[PlanIssue]:
    rules = [
        ("max_attempts", retry.max_attempts, retry.max_attempts >= 1, "at least 1"),
        ("initial_delay_s", retry.initial_delay_s, retry.initial_delay_s >= 0, "0 or more"),
        ("multiplier", retry.multiplier, retry.multiplier >= 1, "1 or more"),
        ("max_delay_s", retry.max_delay_s, retry.max_delay_s >= 0, "0 or more"),
        ("jitter", retry.jitter, 0 <= retry.jitter <= 1, "between 0 and 1 (a fraction)"),
    ]
    for name, value, ok, wanted in rules:
        if not ok:
            yield _issue(
                "invalid_step",
                child_path(path, name),
                f"step {sid!r}: retry.{name} must be {wanted}, got {value}",
            )


def _items_issues(occ: _Occ, items: JSON) -> Iterator[PlanIssue]:
    if isinstance(items, list | tuple):
        return
    try:
        if whole_reference(items) is not None:
            return
    except TemplateSyntaxError:
        return  # reported as invalid_template
    step = occ.step
    why = " (text around the template would make it a string)" if _is_template(items) else ""
    yield _issue(
        "invalid_items",
        f"{occ.path}.items",
        f"{_kind(step)} step {step.id!r}: `items` must be an array or a string that is "
        f'exactly one template naming one, e.g. "{{{{ steps.search.output.results }}}}"; '
        f"got {preview(items)}{why}",
    )


def _body_issues(occ: _Occ, body: Sequence[Step], where: str = "do") -> Iterator[PlanIssue]:
    if not body:
        yield _issue(
            "invalid_step",
            f"{occ.path}.{where}",
            f"{_kind(occ.step)} step {occ.step.id!r} has an empty `{where}`; give it the "
            f"steps to run",
        )


def _foreach_issues(occ: _Occ, step: ForeachStep) -> Iterator[PlanIssue]:
    yield from _items_issues(occ, step.items)
    yield from _body_issues(occ, step.do)
    if step.concurrency < 1:
        yield _issue(
            "invalid_step",
            f"{occ.path}.concurrency",
            f"foreach step {step.id!r}: concurrency is how many elements run at once and "
            f"must be at least 1 (got {step.concurrency})",
        )
    if step.min_success is not None:
        count = len(step.items) if isinstance(step.items, list | tuple) else None
        if step.min_success < 0 or (count is not None and step.min_success > count):
            bound = f"between 0 and the {count} items" if count is not None else "0 or more"
            yield _issue(
                "invalid_step",
                f"{occ.path}.min_success",
                f"foreach step {step.id!r}: min_success must be {bound} (got {step.min_success})",
            )


def _loop_issues(occ: _Occ, step: LoopStep) -> Iterator[PlanIssue]:
    yield from _body_issues(occ, step.do)
    if not 1 <= step.max_iterations <= MAX_LOOP_ITERATIONS:
        yield _issue(
            "loop_without_cap",
            f"{occ.path}.max_iterations",
            f"loop step {step.id!r}: max_iterations must be between 1 and "
            f"{MAX_LOOP_ITERATIONS} (got {step.max_iterations}); every loop needs a real "
            f"cap, stop earlier with `while` or `until`",
        )


def _parallel_issues(occ: _Occ, step: ParallelStep) -> Iterator[PlanIssue]:
    if not step.branches:
        yield _issue(
            "invalid_step",
            f"{occ.path}.branches",
            f"parallel step {step.id!r} has no branches; give it named lists of steps, "
            f'e.g. {{"left": [...], "right": [...]}}',
        )
    for name, body in step.branches.items():
        if not body:
            yield _issue(
                "invalid_step",
                child_path(f"{occ.path}.branches", name),
                f"branch {name!r} of parallel step {step.id!r} is empty; give it steps or "
                f"remove it",
            )


def _check_caps(facts: _Facts, caps: Caps) -> Iterator[PlanIssue]:
    """Fan-out over the run's caps: a static ``items`` list (a rendered one is checked
    when the step starts), a foreach's concurrency, a parallel's branches, a loop's
    max_iterations (its 1-MAX_LOOP_ITERATIONS range is checked by _loop_issues)."""
    for occ in facts.occs:
        step, path = occ.step, occ.path
        found: list[ErrorInfo | None] = []
        match step:
            case ForeachStep() | ReduceStep():
                if isinstance(step.items, list | tuple):
                    found.append(too_many("items", caps, step.id, len(step.items),
                                          f"{path}.items"))  # fmt: skip
                if isinstance(step, ForeachStep):
                    found.append(too_many("concurrency", caps, step.id, step.concurrency,
                                          f"{path}.concurrency"))  # fmt: skip
            case ParallelStep():
                found.append(too_many("branches", caps, step.id, len(step.branches),
                                      f"{path}.branches"))  # fmt: skip
            case LoopStep() if step.max_iterations <= MAX_LOOP_ITERATIONS:
                found.append(too_many("iterations", caps, step.id, step.max_iterations,
                                      f"{path}.max_iterations"))  # fmt: skip
        for error in found:
            if error is not None:
                yield _issue(error.code, error.path or path, error.message)


def _wait_issues(occ: _Occ, step: WaitEventStep) -> Iterator[PlanIssue]:
    if not step.events:
        yield _issue(
            "invalid_step", f"{occ.path}.events", f"wait_event step {step.id!r} waits for nothing"
        )
    for i, m in enumerate(step.events):
        if not is_token(m.name):
            yield _issue(
                "invalid_step",
                f"{occ.path}.events[{i}].name",
                f"event name {m.name!r} must be 1-64 of A-Z, a-z, 0-9, '_' or '-'",
            )
        if not _is_template(m.key) and not is_token(m.key):
            yield _issue(
                "invalid_step",
                f"{occ.path}.events[{i}].key",
                f"event key {m.key!r} must be a template or 1-64 of A-Z, a-z, 0-9, '_' or '-'",
            )
    if step.timeout_s is not None and step.timeout_s <= 0:
        yield _issue(
            "invalid_step",
            f"{occ.path}.timeout_s",
            f"wait_event step {step.id!r}: timeout_s must be positive",
        )


def _approval_issues(occ: _Occ, step: ApprovalStep) -> Iterator[PlanIssue]:
    if not step.label.strip():
        yield _issue(
            "invalid_step",
            f"{occ.path}.label",
            f"approval step {step.id!r} needs a label: people resume it by that name",
        )
    if step.expires_in_s is not None and step.expires_in_s <= 0:
        yield _issue(
            "invalid_step",
            f"{occ.path}.expires_in_s",
            f"approval step {step.id!r}: expires_in_s must be positive (got {step.expires_in_s})",
        )
    if step.on_expire == "escalate" and not step.escalate_to:
        yield _issue(
            "invalid_step",
            f"{occ.path}.escalate_to",
            f"approval step {step.id!r} escalates on expiry but names no `escalate_to` label",
        )
    if step.on_expire != "fail" and step.expires_in_s is None:
        yield _issue(
            "invalid_step",
            f"{occ.path}.on_expire",
            f"approval step {step.id!r} has on_expire {step.on_expire!r} but never expires; "
            "set expires_in_s",
        )


def _sleep_issues(occ: _Occ, step: SleepStep) -> Iterator[PlanIssue]:
    if (step.seconds is None) == (step.until is None):
        given = "both" if step.seconds is not None else "neither"
        yield _issue(
            "invalid_step",
            occ.path,
            f"sleep step {step.id!r} has {given} `seconds` and `until`; give exactly one "
            f'(e.g. "seconds": 30 or "until": "2030-01-01T09:00:00Z")',
        )
    if step.seconds is not None and step.seconds < 0:
        yield _issue(
            "invalid_step",
            f"{occ.path}.seconds",
            f"sleep step {step.id!r}: seconds must be 0 or more (got {step.seconds})",
        )
    if step.until is not None and not _is_template(step.until):
        problem = _datetime_problem(step.until)
        if problem is not None:
            yield _issue(
                "invalid_step",
                f"{occ.path}.until",
                f"sleep step {step.id!r}: `until` must be an ISO 8601 time with a zone, "
                f'e.g. "2030-01-01T09:00:00Z", or a template giving one; {problem}',
            )


def _datetime_problem(text: str) -> str | None:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return f"{text!r} is not an ISO 8601 time"
    if when.tzinfo is None:
        return f"{text!r} has no zone (add Z or an offset like +02:00)"
    return None


# --------------------------------------------------------------------------- predicates


def _predicate_fields(step: Step) -> list[tuple[str, JSON]]:
    if isinstance(step, IfStep):
        return [("condition", step.condition)]
    if isinstance(step, LoopStep):
        return [(name, p) for name, p in (("while", step.while_), ("until", step.until)) if p]
    return []


def _check_predicates(facts: _Facts) -> Iterator[PlanIssue]:
    for occ in facts.occs:
        for name, predicate in _predicate_fields(occ.step):
            where = child_path(occ.path, name)
            issues = predicates.check(predicate, where)
            yield from issues
            refs, errors = scan_templates(predicate, where)
            if issues or refs or errors:
                continue
            if name == "condition":
                effect = "the same branch always runs and the other never does"
            else:
                effect = "it never changes from one iteration to the next"
            yield _issue(
                "predicate_references_nothing",
                where,
                f"the `{name}` of {_kind(occ.step)} step {occ.step.id!r} holds no template, "
                f"so it is a constant and {effect}; this is almost certainly a mistake. "
                f'Test a value the run produces, e.g. {{"eq": '
                f'["{{{{ steps.check.output.status }}}}", "ok"]}}',
            )


# --------------------------------------------------------------------------- ids


def _check_step_ids(facts: _Facts) -> Iterator[PlanIssue]:
    for occ in facts.occs:
        sid = occ.step.id
        where = f"{occ.path}.id"
        if not is_token(sid):
            yield _issue(
                "invalid_step_id",
                where,
                f"step id {sid!r} is not allowed: use 1 to 64 characters among "
                f"letters, digits, '_' and '-'",
            )
        first = facts.first[sid]
        if first is not occ:
            yield _issue(
                "duplicate_step_id",
                where,
                f"step id {sid!r} is already used by {first.path}; give each step a unique "
                f"id (ids are unique across the whole plan, sub-plans and fallbacks included)",
            )


# --------------------------------------------------------------------------- templates


def _check_template_syntax(facts: _Facts) -> Iterator[PlanIssue]:
    for error in facts.syntax_errors:
        yield _issue("invalid_template", error.path, error.message)


def _check_scope_variables(facts: _Facts) -> Iterator[PlanIssue]:
    for site in facts.sites:
        for ref in site.refs:
            if ref.root not in SCOPE_ROOTS:
                continue
            if ref.root not in site.variables:
                yield _issue(
                    "invalid_template",
                    ref.path,
                    f"`{{{{ {ref.expr} }}}}`: `{ref.root}` exists only "
                    f"{SCOPE_ROOTS[ref.root]}; this template is not inside one",
                )
            elif ref.root in _NUMBER_ROOTS and ref.segments:
                yield _issue(
                    "invalid_template",
                    ref.path,
                    f"`{ref.expr}`: `{ref.root}` is a number ({_NUMBER_ROOTS[ref.root]}), "
                    f"it has no `{format_segment(ref.segments[0])}`; write `{{{{ {ref.root} "
                    f"}}}}` or read the element with `item`",
                )


# --------------------------------------------------------------------------- steps


def _visible_ids(scopes: Iterator[_Scope]) -> list[str]:
    return [sid for scope in scopes for sid in scope.ids]


def _unknown_step_message(name: str, known: list[str], what: str = "visible here") -> str:
    return f"no step has id {name!r}; {did_you_mean(name, known)}step ids {what}: {known}"


def _check_depends_on(facts: _Facts) -> Iterator[PlanIssue]:
    for occ in facts.occs:
        step, scope = occ.step, occ.scope
        for k, dep in enumerate(step.depends_on):
            if dep in scope.ids:
                continue
            where = f"{occ.path}.depends_on[{k}]"
            target = facts.first.get(dep)
            if target is None:
                message = f"step {step.id!r} depends on an unknown step: " + (
                    _unknown_step_message(dep, list(scope.ids), "in its list")
                )
            else:
                message = (
                    f"step {step.id!r} depends on {dep!r}, which is not in its list "
                    f"({scope.label}): depends_on only orders steps of the same list. "
                    + _outer_dependency_hint(scope, target)
                )
            yield _issue("missing_step", where, message)


def _outer_dependency_hint(scope: _Scope, target: _Occ) -> str:
    name = target.step.id
    holder = target.holder
    if holder is not target:
        return f"{name!r} is the fallback of {holder.step.id!r}; depend on {holder.step.id!r}"
    chain = list(scope.chain())
    for inner, outer in zip(chain, chain[1:], strict=False):
        if outer is holder.scope and inner.owner is not None:
            container = inner.owner.step.id
            return (
                f"To wait for {name!r}, read it with a template (which makes "
                f"{container!r}, the enclosing step in its list, wait for it) or add it to "
                f"the depends_on of {container!r}"
            )
    for body in target.scope.chain():
        if body.owner is not None and body.owner.scope is scope:
            return (
                f"{name!r} is in {target.scope.label}, which this step cannot see; depend "
                f"on {body.owner.step.id!r} instead"
            )
    return f"{name!r} is in {target.scope.label}, which this step cannot see"


def _check_template_steps(facts: _Facts) -> Iterator[PlanIssue]:
    for site in facts.sites:
        for ref in site.refs:
            name = ref.step_id
            if name is not None and _visible(site, name) is None:
                yield _issue("missing_step", ref.path, _invisible_message(facts, site, ref, name))


def _visible(site: _Site, name: str) -> _Occ | None:
    for scope in site.scope.chain():
        index = scope.ids.get(name)
        if index is not None:
            return scope.occs[index]
    return None


def _invisible_message(facts: _Facts, site: _Site, ref: Reference, name: str) -> str:
    target = facts.first.get(name)
    if target is None:
        visible = _visible_ids(site.scope.chain())
        return f"`{ref.expr}` reads an unknown step: " + _unknown_step_message(name, visible)
    if target.fallback_of is not None:
        owner = target.holder.step.id
        return (
            f"`{ref.expr}` reads {name!r}, a fallback: its output becomes the output of "
            f"{owner!r}, the step it stands in for; read `steps.{owner}.output` instead"
        )
    # The composites holding the target, innermost first.
    containers = [s.owner for s in target.scope.chain() if s.owner is not None]
    if site.name == "while" and site.owner is not None and site.owner in containers:
        return (
            f"`{ref.expr}` reads {name!r}, a step of the body of loop "
            f"{site.owner.step.id!r}: `while` is checked before each iteration, when the "
            f"body has not run yet. Use `until`, checked after each iteration, to test "
            f"what the body produced"
        )
    text = (
        f"`{ref.expr}` reads {name!r}, which is not visible here: it is in "
        f"{target.scope.label} ({target.path}). A step sees the steps of its own list and "
        f"of the lists around it, not those nested in other steps' bodies or branches "
        f"(they may not have run, or ran once per element)"
    )
    in_sight = set(site.scope.chain())
    around = {s.owner for s in site.scope.chain() if s.owner is not None} | {site.owner}
    for container in containers:
        if container.scope in in_sight:
            if container not in around:
                text += (
                    f"; read the output of {container.step.id!r} instead "
                    f"(`{{{{ steps.{container.step.id}.output }}}}`)"
                )
            break
    return text


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
    # Per scope, over the effective (lifted) dependencies. One issue per strongly
    # connected component: overlapping cycles are one knot to untie, and enumerating
    # every elementary cycle can be exponential.
    for scope in facts.scopes:
        siblings = scope.ids
        graph = {sid: list(_step_deps(scope.steps[i], siblings)) for sid, i in siblings.items()}
        knots = []
        for component in _strongly_connected(graph):
            start = min(component, key=siblings.__getitem__)
            if len(component) > 1 or start in graph[start]:
                knots.append((siblings[start], start, set(component)))
        for index, start, members in sorted(knots, key=lambda k: k[0]):
            cycle = _shortest_cycle(graph, start, members)
            others = sorted(members - set(cycle), key=siblings.__getitem__)
            tail = f" (steps {others} are caught in the same knot)" if others else ""
            if cycle == [start, start] and start not in scope.steps[index].depends_on:
                tail += (
                    f" ({start!r} reads its own output in a template, but that output exists "
                    f"only once {start!r} is done)"
                )
            yield _issue(
                "dependency_cycle",
                f"{scope.path}[{index}].depends_on",
                f"dependency cycle: {' → '.join(cycle)}{tail}; each step waits for the "
                f"next, so none can start. Remove one dependency; a `{{{{ steps.X.output }}}}` "
                f"template in a step, or anywhere inside a step's bodies, also makes it "
                f"depend on X",
            )


# --------------------------------------------------------------------------- tools


def _tool_occs(facts: _Facts) -> Iterator[tuple[_Occ, ToolStep]]:
    for occ in facts.occs:
        if isinstance(occ.step, ToolStep):
            yield occ, occ.step


def _check_tools(facts: _Facts, tools: Mapping[str, ToolSpec]) -> Iterator[PlanIssue]:
    names = sorted(tools)
    for occ in facts.occs:
        if isinstance(occ.step, AgentStep):
            for i, name in enumerate(occ.step.tools):
                if name not in tools:
                    yield _issue(
                        "unknown_tool",
                        f"{occ.path}.tools[{i}]",
                        f"agent step {occ.step.id!r} offers unknown tool {name!r}; "
                        f"{did_you_mean(name, names)}available tools: {', '.join(names)}",
                    )
    for occ, step in _tool_occs(facts):
        if step.tool in tools:
            continue
        available = f"available tools: {', '.join(names)}" if names else "no tools are registered"
        yield _issue(
            "unknown_tool",
            f"{occ.path}.tool",
            f"step {step.id!r} uses unknown tool {step.tool!r}; "
            f"{did_you_mean(step.tool, names)}{available}",
        )


# --------------------------------------------------------------------------- schemas


def _check_inputs(facts: _Facts, tools: Mapping[str, ToolSpec]) -> Iterator[PlanIssue]:
    """Each step's literal input against its tool's input schema (``loom_core.schemas``,
    the one checker); a template's type is only known once rendered, so what a
    template could still change is not reported."""
    for occ, step in _tool_occs(facts):
        spec = tools.get(step.tool)
        if spec is not None:
            where = f"{occ.path}.input"
            for path, message in schemas.problems(
                spec.input_schema, step.input, where, templated=_is_template
            ):
                yield _issue("invalid_input", path, f"tool {step.tool!r}: {message}")


def _check_carried_schemas(facts: _Facts) -> Iterator[PlanIssue]:
    for occ in facts.occs:
        step = occ.step
        if isinstance(step, ApprovalStep) and step.schema:
            field, schema = "schema", step.schema
        elif isinstance(step, AgentStep) and step.output_schema is not None:
            field, schema = "output_schema", step.output_schema
        else:
            continue
        problem = schemas.schema_problem(schema)
        if problem is not None:
            yield _issue(
                "invalid_step",
                f"{occ.path}.{field}",
                f"{_kind(step)} step {step.id!r}: `{field}` cannot check anything: {problem}",
            )


# --------------------------------------------------------------------------- output fields


class _Open:
    """Marker: from here on the schema allows anything, so nothing more can be checked."""


_OPEN = _Open()


def _schema_step(schema: Schema, seg: Segment, defs: Schema, at: str) -> Schema | _Open | str:
    """The schema of ``value[seg]``, ``_OPEN``, or a message saying why it cannot exist."""
    alts = schemas.alternatives(schema)
    if alts is not None:
        results = [_schema_step(schemas.resolve(a, defs), seg, defs, at) for a in alts]
        if any(r is _OPEN for r in results):
            return _OPEN
        found = [r for r in results if isinstance(r, Mapping)]
        if len(found) == 1:
            return found[0]
        if found:
            return _OPEN  # several shapes fit: stop being clever
        non_null = [
            r
            for r, a in zip(results, alts, strict=True)
            if schemas.resolve(a, defs) != {"type": "null"}
        ]
        return str((non_null or results)[0])
    types = schemas.types_of(schema)
    if isinstance(seg, str):
        props = schema.get("properties")
        if isinstance(props, Mapping):
            if seg in props:
                return props[seg]
            if schema.get("additionalProperties") is False:
                return (
                    f"`{at}` has no field {seg!r}; {did_you_mean(seg, sorted(props))}"
                    f"fields: {sorted(props)}"
                )
            return _OPEN
        if types is not None and "object" not in types:
            return f"`{at}` is {schemas.expected(schema, defs)}, it has no field {seg!r}"
        return _OPEN
    if types is not None and "array" not in types:
        what = schemas.expected(schema, defs)
        return f"`{at}` is {what}, not an array; it has no index [{seg}]"
    prefix = schema.get("prefixItems")
    if isinstance(prefix, list) and seg < len(prefix):
        return prefix[seg]
    max_items = schema.get("maxItems")
    if isinstance(max_items, int) and seg >= max_items:
        return f"`{at}` has at most {max_items} items; index [{seg}] is out of range"
    items = schema.get("items")
    return items if isinstance(items, Mapping) else _OPEN


def _output_field_problem(ref: Reference, spec: ToolSpec) -> str | None:
    defs = schemas.defs_of(spec.output_schema)
    schema: Any = spec.output_schema
    at = f"steps{format_segment(ref.segments[0])}.output"
    for seg in ref.segments[2:]:
        result = _schema_step(schemas.resolve(schema, defs), seg, defs, at)
        if isinstance(result, _Open):
            return None
        if isinstance(result, str):
            return result
        schema = result
        at += format_segment(seg)
    return None


def _check_output_fields(facts: _Facts, tools: Mapping[str, ToolSpec]) -> Iterator[PlanIssue]:
    for ref, target in facts.resolved():
        step = target.step
        # The output is the tool's, or a fallback's when the tool failed: a field is
        # certainly missing only when no tool of the chain can produce it.
        chain: list[ToolStep] = []
        link: Step | None = step
        while isinstance(link, ToolStep):
            chain.append(link)
            link = link.fallback
        specs = [tools.get(s.tool) for s in chain]
        if not chain or None in specs:
            continue
        problems = [_output_field_problem(ref, spec) for spec in specs if spec is not None]
        if all(problems):
            yield _issue(
                "missing_field",
                ref.path,
                f"`{ref.expr}`: {problems[0]} (output of tool {chain[0].tool!r})",
            )


# --------------------------------------------------------------------------- run input


def _check_run_input(facts: _Facts, run_input: Mapping[str, JSON]) -> Iterator[PlanIssue]:
    context = {"input": run_input}
    for ref in facts.all_refs():
        # `exists` asks whether an optional key is there: its absence is the point
        if ref.root != "input" or ref.path.endswith(".exists"):
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
