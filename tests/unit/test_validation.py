"""Plan validation: one test per issue code with exact paths, the DAG helpers, and
property tests over random valid plans and invalidating mutations."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from loom_core.contracts import Plan, PlanIssue, ToolSpec, ToolStep
from loom_core.templating import find_references, format_expr
from loom_core.validation import (
    dependencies,
    plan_issue_from_decode_error,
    topological_order,
    validate_plan,
)

# --------------------------------------------------------------------------- tool catalog


class EchoIn(msgspec.Struct, forbid_unknown_fields=True):
    text: str


class EchoOut(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    length: int


class AddIn(msgspec.Struct, forbid_unknown_fields=True):
    a: int
    b: int


class AddOut(msgspec.Struct, forbid_unknown_fields=True):
    sum: int


class FetchIn(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    retries: int = 0
    mode: Literal["fast", "slow"] = "fast"
    headers: dict[str, str] = {}
    tags: list[str] = []
    timeout: float | None = None


class Link(msgspec.Struct, forbid_unknown_fields=True):
    href: str


class Meta(msgspec.Struct):  # open: unknown fields allowed
    lang: str = "en"


class FetchOut(msgspec.Struct, forbid_unknown_fields=True):
    title: str
    links: list[Link]
    meta: Meta
    pair: tuple[int, str] = (0, "")
    best: Link | None = None
    extra: dict[str, Any] = {}


class OpenIn(msgspec.Struct):  # no forbid_unknown_fields: extra input keys are fine
    q: str


def _spec(name: str, inp: type, out: type) -> ToolSpec:
    return ToolSpec(name, f"{name} tool", msgspec.json.schema(inp), msgspec.json.schema(out))


TOOLS = {
    "echo": _spec("echo", EchoIn, EchoOut),
    "add": _spec("add", AddIn, AddOut),
    "fetch": _spec("fetch", FetchIn, FetchOut),
    "search": _spec("search", OpenIn, Any),  # output schema {}: anything
}
RUN_INPUT = {"city": "Paris", "n": 3, "user": {"name": "Ada", "langs": ["py"]}}


def step(sid: str, tool: str = "echo", **kwargs: Any) -> ToolStep:
    kwargs.setdefault("input", {"text": "hi"} if tool == "echo" else {})
    return ToolStep(id=sid, tool=tool, **kwargs)


def codes(issues: list[PlanIssue]) -> list[str]:
    return [i.code for i in issues]


def triples(issues: list[PlanIssue]) -> list[tuple[str, str]]:
    return [(i.code, i.path) for i in issues]


# --------------------------------------------------------------------------- valid plans


def test_a_valid_plan_has_no_issues() -> None:
    plan = Plan(
        steps=[
            step("fetch", "fetch", input={"url": "https://x/{{ input.city }}", "retries": 2}),
            step("sum", "add", input={"a": "{{ input.n }}", "b": 4}),
            step(
                "say",
                input={"text": "{{ steps.fetch.output.links[0].href }} {{ steps.sum.output.sum }}"},
                depends_on=["fetch"],
            ),
            step("find", "search", input={"q": "{{ steps.fetch.output.meta.anything.goes }}"}),
        ],
        output={"title": "{{ steps.fetch.output.title }}", "user": "{{ input.user.langs[0] }}"},
    )
    assert validate_plan(plan, TOOLS, RUN_INPUT) == []
    assert validate_plan(plan) == []


def test_empty_plan_is_invalid() -> None:
    issues = validate_plan(Plan(steps=[]))
    assert triples(issues) == [("invalid_plan", "$.plan.steps")]
    assert "at least one step" in issues[0].message


def test_non_positive_timeout_is_invalid() -> None:
    issues = validate_plan(Plan(steps=[step("a", timeout_s=0)]))
    assert triples(issues) == [("invalid_plan", "$.plan.steps[0].timeout_s")]


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize("bad", ["", "has space", "dot.ted", "x" * 65, "ünï"])
def test_invalid_step_id(bad: str) -> None:
    issues = validate_plan(Plan(steps=[step("ok"), step(bad)]))
    assert triples(issues) == [("invalid_step_id", "$.plan.steps[1].id")]
    assert repr(bad) in issues[0].message


def test_duplicate_step_id_points_at_the_second_and_names_the_first() -> None:
    issues = validate_plan(Plan(steps=[step("a"), step("b"), step("a")]), path="$.request.plan")
    assert triples(issues) == [("duplicate_step_id", "$.request.plan.steps[2].id")]
    assert issues[0].message == (
        "step id 'a' is already used by $.request.plan.steps[0]; give each step a unique id"
    )


# --------------------------------------------------------------------------- missing steps


def test_depends_on_an_unknown_step() -> None:
    plan = Plan(steps=[step("fetch"), step("b", depends_on=["fetch", "fetsh"])])
    issues = validate_plan(plan)
    assert triples(issues) == [("missing_step", "$.plan.steps[1].depends_on[1]")]
    assert issues[0].message == (
        "step 'b' depends on an unknown step: no step has id 'fetsh'; did you mean 'fetch'? "
        "step ids: ['fetch', 'b']"
    )


def test_template_reads_an_unknown_step() -> None:
    plan = Plan(
        steps=[step("a"), step("b", input={"text": "x {{ steps.c.output }}"})],
        output=["{{ steps.zz.output.y }}"],
    )
    issues = validate_plan(plan)
    assert triples(issues) == [
        ("missing_step", "$.plan.steps[1].input.text"),
        ("missing_step", "$.plan.output[0]"),
    ]
    assert issues[0].message.startswith("`steps.c.output` reads an unknown step: no step has id")


# --------------------------------------------------------------------------- cycles


def test_two_step_cycle() -> None:
    plan = Plan(steps=[step("x"), step("a", depends_on=["b"]), step("b", depends_on=["a"])])
    issues = validate_plan(plan)
    assert triples(issues) == [("dependency_cycle", "$.plan.steps[1].depends_on")]
    assert issues[0].message.startswith("dependency cycle: a → b → a;")


def test_self_dependency_is_a_cycle() -> None:
    issues = validate_plan(Plan(steps=[step("a", depends_on=["a"])]))
    assert triples(issues) == [("dependency_cycle", "$.plan.steps[0].depends_on")]
    assert "a → a" in issues[0].message


def test_template_reference_to_itself_is_a_cycle() -> None:
    plan = Plan(steps=[step("a", input={"text": "{{ steps.a.output.text }}"})])
    assert triples(validate_plan(plan)) == [("dependency_cycle", "$.plan.steps[0].depends_on")]


def test_cycle_through_templates_is_found_and_reported_once() -> None:
    # a waits for c (template), c waits for b (depends_on), b waits for a (template).
    plan = Plan(
        steps=[
            step("a", input={"text": "{{ steps.c.output.text }}"}),
            step("b", input={"text": "{{ steps.a.output.text }}"}),
            step("c", depends_on=["b"]),
        ]
    )
    issues = validate_plan(plan)
    assert triples(issues) == [("dependency_cycle", "$.plan.steps[0].depends_on")]
    assert "a → c → b → a" in issues[0].message


def test_each_distinct_cycle_is_reported_once() -> None:
    plan = Plan(
        steps=[
            step("a", depends_on=["b"]),
            step("b", depends_on=["a"]),
            step("c"),
            step("d", depends_on=["e", "c"]),
            step("e", depends_on=["d"]),
            step("f", depends_on=["f", "a"]),
        ]
    )
    issues = validate_plan(plan)
    assert triples(issues) == [
        ("dependency_cycle", "$.plan.steps[0].depends_on"),
        ("dependency_cycle", "$.plan.steps[3].depends_on"),
        ("dependency_cycle", "$.plan.steps[5].depends_on"),
    ]
    assert ["a → b → a" in issues[0].message, "d → e → d" in issues[1].message] == [True, True]
    assert "f → f" in issues[2].message


def test_overlapping_cycles_are_one_knot() -> None:
    plan = Plan(
        steps=[
            step("a", depends_on=["b", "c"]),
            step("b", depends_on=["a"]),
            step("c", depends_on=["a"]),
        ]
    )
    issues = validate_plan(plan)
    assert triples(issues) == [("dependency_cycle", "$.plan.steps[0].depends_on")]
    assert "a → b → a (steps ['c'] are caught in the same knot)" in issues[0].message


def test_long_chain_cycle_does_not_hit_the_recursion_limit() -> None:
    n = 3000
    steps = [step(f"s{i}", depends_on=[f"s{(i + 1) % n}"]) for i in range(n)]
    issues = validate_plan(Plan(steps=steps))
    assert codes(issues) == ["dependency_cycle"]


# --------------------------------------------------------------------------- tools


def test_unknown_tool_lists_tools_and_the_closest_match() -> None:
    issues = validate_plan(Plan(steps=[step("a", "serch", input={"q": "x"})]), TOOLS)
    assert triples(issues) == [("unknown_tool", "$.plan.steps[0].tool")]
    assert issues[0].message == (
        "step 'a' uses unknown tool 'serch'; did you mean 'search'? "
        "available tools: add, echo, fetch, search"
    )


def test_unknown_tool_without_close_match_or_tools() -> None:
    [issue] = validate_plan(Plan(steps=[step("a", "zzz")]), TOOLS)
    assert "did you mean" not in issue.message
    [issue] = validate_plan(Plan(steps=[step("a", "zzz")]), {})
    assert issue.message.endswith("no tools are registered")


def test_tools_are_not_checked_without_a_catalog() -> None:
    assert validate_plan(Plan(steps=[step("a", "zzz", input={"anything": 1})])) == []


# --------------------------------------------------------------------------- inputs


def test_invalid_input_reports_each_field() -> None:
    plan = Plan(
        steps=[
            step("a", "add", input={"a": "3", "c": 1}),
            step("f", "fetch", input={"url": "u", "mode": "fsat", "retries": 1.5}),
            step("g", "fetch", input={"url": 7, "headers": {"x": 1}, "tags": ["a", 2]}),
            step("h", "fetch", input={"url": "u", "timeout": "soon"}),
        ]
    )
    issues = validate_plan(plan, TOOLS)
    assert triples(issues) == [
        ("invalid_input", "$.plan.steps[0].input.b"),
        ("invalid_input", "$.plan.steps[0].input.a"),
        ("invalid_input", "$.plan.steps[0].input.c"),
        ("invalid_input", "$.plan.steps[1].input.mode"),
        ("invalid_input", "$.plan.steps[1].input.retries"),
        ("invalid_input", "$.plan.steps[2].input.url"),
        ("invalid_input", "$.plan.steps[2].input.headers.x"),
        ("invalid_input", "$.plan.steps[2].input.tags[1]"),
        ("invalid_input", "$.plan.steps[3].input.timeout"),
    ]
    messages = [i.message for i in issues]
    assert messages[0] == "tool 'add' requires field 'b' (integer); add it"
    assert messages[1] == "tool 'add' expects integer here, got string \"3\""
    assert messages[2] == "tool 'add' has no field 'c'; accepted fields: ['a', 'b']"
    assert messages[3] == 'tool \'fetch\' expects one of "fast", "slow" here, got string "fsat"'
    assert messages[8] == "tool 'fetch' expects number or null here, got string \"soon\""


def test_templates_and_numbers_are_accepted_where_they_may_fit() -> None:
    plan = Plan(
        steps=[
            step("a", "add", input={"a": "{{ input.n }}", "b": "{{ input.n }} no type check"}),
            step("f", "fetch", input={"url": "u", "timeout": 3, "tags": ["{{ input.city }}"]}),
            step("s", "search", input={"q": "x", "free": {"form": [1]}}),
        ]
    )
    assert validate_plan(plan, TOOLS) == []


def test_misspelt_input_field_suggests_the_right_one() -> None:
    [missing, unknown] = validate_plan(Plan(steps=[step("e", input={"txet": "hi"})]), TOOLS)
    assert (missing.path, unknown.path) == (
        "$.plan.steps[0].input.text",
        "$.plan.steps[0].input.txet",
    )
    assert "did you mean 'text'?" in unknown.message


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    n: int


class Outer(msgspec.Struct, forbid_unknown_fields=True, rename={"inner": "in ner"}):
    inner: Inner
    many: list[Inner] = []


def test_input_schema_with_nested_refs_and_odd_keys() -> None:
    tools = {"t": _spec("t", Outer, Any)}
    plan = Plan(steps=[step("a", "t", input={"in ner": {"n": "x"}, "many": [{"n": 1}, {}]})])
    assert triples(validate_plan(plan, tools)) == [
        ("invalid_input", '$.plan.steps[0].input["in ner"].n'),
        ("invalid_input", "$.plan.steps[0].input.many[1].n"),
    ]


# --------------------------------------------------------------------------- templates


def test_invalid_template_anywhere() -> None:
    plan = Plan(
        steps=[step("a", input={"text": "{{ input.city"}), step("b", input={"text": ["{{ }}"]})],
        output={"x": "{{ nope }}"},
    )
    issues = validate_plan(plan)
    assert triples(issues) == [
        ("invalid_template", "$.plan.steps[0].input.text"),
        ("invalid_template", "$.plan.steps[1].input.text[0]"),
        ("invalid_template", "$.plan.output.x"),
    ]
    assert issues[0].message == "`{{ input.city` has no closing `}}`; write e.g. `{{ input.city }}`"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{{ steps.f.output.titel }}",
            "`steps.f.output.titel`: `steps.f.output` has no field 'titel'; did you mean "
            "'title'? fields: ['best', 'extra', 'links', 'meta', 'pair', 'title'] "
            "(output of tool 'fetch')",
        ),
        (
            "{{ steps.f.output.links[0].url }}",
            "`steps.f.output.links[0].url`: `steps.f.output.links[0]` has no field 'url'; "
            "fields: ['href'] (output of tool 'fetch')",
        ),
        (
            "{{ steps.f.output.links.href }}",
            "`steps.f.output.links.href`: `steps.f.output.links` is an array, it has no "
            "field 'href' (output of tool 'fetch')",
        ),
        (
            "{{ steps.f.output.title[0] }}",
            "`steps.f.output.title[0]`: `steps.f.output.title` is a string, not an array; "
            "it has no index [0] (output of tool 'fetch')",
        ),
        (
            "{{ steps.f.output.pair[2] }}",
            "`steps.f.output.pair[2]`: `steps.f.output.pair` has at most 2 items; index [2] "
            "is out of range (output of tool 'fetch')",
        ),
        (
            "{{ steps.f.output.best.hrf }}",
            "`steps.f.output.best.hrf`: `steps.f.output.best` has no field 'hrf'; did you "
            "mean 'href'? fields: ['href'] (output of tool 'fetch')",
        ),
        (
            "{{ steps.f.output.pair[1].x }}",
            "`steps.f.output.pair[1].x`: `steps.f.output.pair[1]` is a string, it has no "
            "field 'x' (output of tool 'fetch')",
        ),
    ],
)
def test_missing_field_in_a_known_output_schema(template: str, message: str) -> None:
    plan = Plan(
        steps=[step("f", "fetch", input={"url": "u"}), step("e", input={"text": "x"})],
        output={"r": template},
    )
    issues = validate_plan(plan, TOOLS)
    assert [(i.code, i.path, i.message) for i in issues] == [
        ("missing_field", "$.plan.output.r", message)
    ]


@pytest.mark.parametrize(
    "template",
    [
        "{{ steps.f.output.meta.anything }}",  # Meta allows unknown fields
        "{{ steps.f.output.extra.any.depth[3] }}",  # dict[str, Any]
        "{{ steps.f.output.links[99].href }}",  # lists have no static length
        "{{ steps.f.output.pair[0] }}",
        "{{ steps.s.output.whatever[0].x }}",  # output schema {}
        "{{ steps.z.output.whatever }}",  # tool unknown: reported as unknown_tool only
    ],
)
def test_open_schemas_are_not_second_guessed(template: str) -> None:
    plan = Plan(
        steps=[
            step("f", "fetch", input={"url": "u"}),
            step("s", "search", input={"q": "q"}),
            step("z", "nope"),
            step("e", input={"text": template}),
        ]
    )
    assert triples(validate_plan(plan, TOOLS)) == [("unknown_tool", "$.plan.steps[2].tool")]


def test_missing_input() -> None:
    plan = Plan(
        steps=[step("a", input={"text": "{{ input.cty }}"})],
        output=["{{ input.user.langs[1] }}", "{{ input.user.name }}"],
    )
    issues = validate_plan(plan, run_input=RUN_INPUT)
    assert triples(issues) == [
        ("missing_input", "$.plan.steps[0].input.text"),
        ("missing_input", "$.plan.output[0]"),
    ]
    assert issues[0].message == (
        "`input.cty`: key 'cty' not found in object with keys ['city', 'n', 'user']; pass "
        "the value in the run's input (its keys: ['city', 'n', 'user']) or change the template"
    )
    assert "index 1 out of range for array of length 1" in issues[1].message
    assert validate_plan(plan) == []  # no run input given: not checked


def test_every_problem_is_reported_at_once() -> None:
    plan = Plan(
        steps=[
            step("a b", "ech", input={"text": "{{ steps.nope.output }}"}),
            step("c", "add", input={"a": 1}, depends_on=["c"]),
            step("c", input={"text": "{{ input.missing }} {{"}),
        ]
    )
    assert codes(validate_plan(plan, TOOLS, RUN_INPUT)) == [
        "invalid_step_id",
        "duplicate_step_id",
        "invalid_template",
        "missing_step",
        "dependency_cycle",
        "unknown_tool",
        "invalid_input",
    ]


# --------------------------------------------------------------------------- decode errors


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        (
            b'{"steps": [{"kind": "tool", "id": "a"}]}',
            "$.plan.steps[0]",
            "Object missing required field `tool`",
        ),
        (b'{"steps": [{"kind": "tol", "id": "a"}]}', "$.plan.steps[0].kind", "Invalid value 'tol'"),
        (b'{"steps": [], "stepz": 1}', "$.plan", "Object contains unknown field `stepz`"),
        (
            b'{"steps": [{"kind": "tool", "id": "a", "tool": "t", "depend_on": []}]}',
            "$.plan.steps[0]",
            "Object contains unknown field `depend_on`",
        ),
    ],
)
def test_plan_issue_from_validation_error(raw: bytes, path: str, message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(raw, type=Plan)
    assert plan_issue_from_decode_error(caught.value) == PlanIssue("invalid_plan", path, message)


def test_plan_issue_from_decode_error_with_prefix_and_bad_json() -> None:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(b'{"steps": [{"kind": "tool", "id": 1, "tool": "t"}]}', type=Plan)
    issue = plan_issue_from_decode_error(caught.value, "$.request.plan")
    assert (issue.path, issue.message) == (
        "$.request.plan.steps[0].id",
        "Expected `str`, got `int`",
    )
    with pytest.raises(msgspec.DecodeError) as bad:
        msgspec.json.decode(b'{"steps": [', type=Plan)
    issue = plan_issue_from_decode_error(bad.value)
    assert (issue.code, issue.path) == ("invalid_json", "$.plan")
    assert issue.message == "the plan is not valid JSON: Input data was truncated"


# --------------------------------------------------------------------------- DAG helpers


def test_dependencies_merge_depends_on_and_template_references_in_order() -> None:
    plan = Plan(
        steps=[
            step("a"),
            step("b"),
            step(
                "c",
                input={"text": "{{ steps.b.output.text }} {{ steps.a.output.text }}"},
                depends_on=["a", "a"],
            ),
            step("d", input={"text": "{{ input.city }}"}),
        ],
        output="{{ steps.d.output }}",
    )
    assert dependencies(plan) == {"a": (), "b": (), "c": ("a", "b"), "d": ()}


def test_topological_order_breaks_ties_by_plan_order() -> None:
    plan = Plan(
        steps=[
            step("late", depends_on=["mid"]),
            step("z"),
            step("mid", input={"text": "{{ steps.first.output.text }}"}),
            step("first"),
            step("y", depends_on=["z"]),
        ]
    )
    assert topological_order(plan) == ["z", "first", "mid", "late", "y"]


def test_topological_order_refuses_invalid_graphs() -> None:
    with pytest.raises(ValueError, match="cycle"):
        topological_order(Plan(steps=[step("a", depends_on=["b"]), step("b", depends_on=["a"])]))
    with pytest.raises(ValueError, match="unknown step 'x'"):
        topological_order(Plan(steps=[step("a", depends_on=["x"])]))
    with pytest.raises(ValueError, match="duplicate"):
        topological_order(Plan(steps=[step("a"), step("a")]))


# --------------------------------------------------------------------------- properties

# What each tool takes (required fields and their kind) and where its output holds a
# value of each kind, so random templates are always well typed.
_INPUT_FIELDS = {"echo": {"text": "str"}, "add": {"a": "int", "b": "int"}, "fetch": {"url": "str"}}
_OUTPUT_PATHS = {
    "echo": {"str": ["text"], "int": ["length"]},
    "add": {"str": [], "int": ["sum"]},
    "fetch": {"str": ["title", "links[0].href", "meta.lang"], "int": ["pair[0]"]},
}
_INPUT_PATHS = {"str": ["city", "user.name", "user.langs[0]"], "int": ["n"]}
_ids = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)


def _value(draw: st.DrawFn, kind: str, earlier: list[tuple[str, str]]) -> Any:
    sources = [f"input.{p}" for p in _INPUT_PATHS[kind]]
    # ids may start with a digit or '-': format_expr quotes them (steps["1a"].output)
    sources += [
        f"{format_expr('steps', [sid, 'output'])}.{p}"
        for sid, tool in earlier
        for p in _OUTPUT_PATHS[tool][kind]
    ]
    choice = draw(
        st.sampled_from(
            ["literal", "template", "mixed"] if kind == "str" else ["literal", "template"]
        )
    )
    if choice == "literal":
        return draw(
            st.text(max_size=5).filter(lambda s: "{{" not in s) if kind == "str" else st.integers()
        )
    expr = draw(st.sampled_from(sources))
    return f"{{{{ {expr} }}}}" if choice == "template" else f"see {{{{{expr}}}}}!"


@st.composite
def valid_plans(draw: st.DrawFn, min_steps: int = 1) -> Plan:
    ids = draw(st.lists(_ids, min_size=min_steps, max_size=8, unique=True))
    steps: list[ToolStep] = []
    earlier: list[tuple[str, str]] = []
    for sid in ids:
        tool = draw(st.sampled_from(sorted(_INPUT_FIELDS)))
        inputs = {name: _value(draw, kind, earlier) for name, kind in _INPUT_FIELDS[tool].items()}
        depends_on = (
            draw(st.lists(st.sampled_from([s for s, _ in earlier]), max_size=3)) if earlier else []
        )
        steps.append(ToolStep(id=sid, tool=tool, input=inputs, depends_on=depends_on))
        earlier.append((sid, tool))
    last = format_expr("steps", [ids[-1], "output"])
    output = {"last": f"{{{{ {last} }}}}"} if draw(st.booleans()) else None
    return Plan(steps=steps, output=output)


@settings(max_examples=100, deadline=None)
@given(plan=valid_plans())
def test_random_dags_are_valid_and_ordered(plan: Plan) -> None:
    assert validate_plan(plan, TOOLS, RUN_INPUT) == []
    ids = [s.id for s in plan.steps]
    order = topological_order(plan)
    # every dependency points backwards, so ties by plan order give the plan order itself
    assert order == ids
    position = {sid: i for i, sid in enumerate(order)}
    deps = dependencies(plan)
    for s in plan.steps:
        assert set(s.depends_on) <= set(deps[s.id])
        assert {r.step_id for r in find_references(s.input) if r.step_id} <= set(deps[s.id])
        assert all(position[d] < position[s.id] for d in deps[s.id])
    assert dependencies(plan) == deps  # deterministic


def _ancestors(plan: Plan, sid: str) -> set[str]:
    deps, seen, todo = dependencies(plan), set(), [sid]
    while todo:
        for d in deps[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


@settings(max_examples=100, deadline=None)
@given(plan=valid_plans(min_steps=2), data=st.data())
def test_a_back_edge_is_always_a_cycle(plan: Plan, data: st.DataObject) -> None:
    steps = list(plan.steps)
    if not any(dependencies(plan).values()):
        steps[1] = replace(steps[1], depends_on=[steps[0].id])
        plan = replace(plan, steps=steps)
    ids = [s.id for s in steps]
    j = data.draw(st.sampled_from([k for k, s in enumerate(steps) if dependencies(plan)[s.id]]))
    i = data.draw(st.sampled_from(sorted(ids.index(a) for a in _ancestors(plan, ids[j]))))
    steps[i] = replace(steps[i], depends_on=[*steps[i].depends_on, ids[j]])
    issues = validate_plan(replace(plan, steps=steps), TOOLS, RUN_INPUT)
    assert triples(issues) == [("dependency_cycle", f"$.plan.steps[{i}].depends_on")]
    assert f"dependency cycle: {ids[i]} → {ids[j]} → " in issues[0].message


@settings(max_examples=100, deadline=None)
@given(plan=valid_plans(min_steps=2), data=st.data())
def test_a_duplicate_id_is_always_rejected(plan: Plan, data: st.DataObject) -> None:
    steps = list(plan.steps)
    k = data.draw(st.integers(1, len(steps) - 1))
    m = data.draw(st.integers(0, k - 1))
    steps[k] = replace(steps[k], id=steps[m].id)
    issues = validate_plan(replace(plan, steps=steps), TOOLS, RUN_INPUT)
    assert ("duplicate_step_id", f"$.plan.steps[{k}].id") in triples(issues)


@settings(max_examples=100, deadline=None)
@given(plan=valid_plans(), data=st.data())
def test_a_missing_step_is_always_rejected(plan: Plan, data: st.DataObject) -> None:
    steps = list(plan.steps)
    i = data.draw(st.integers(0, len(steps) - 1))
    ghost = "no.such-step"  # '.' never appears in a valid id
    if data.draw(st.booleans()):
        steps[i] = replace(steps[i], depends_on=[*steps[i].depends_on, ghost])
        plan, where = (
            replace(plan, steps=steps),
            f"$.plan.steps[{i}].depends_on[{len(steps[i].depends_on) - 1}]",
        )
    else:
        plan, where = (
            replace(plan, output={"ghost": f'{{{{ steps["{ghost}"].output }}}}'}),
            "$.plan.output.ghost",
        )
    assert triples(validate_plan(plan, TOOLS, RUN_INPUT)) == [("missing_step", where)]


@settings(max_examples=100, deadline=None)
@given(plan=valid_plans(), data=st.data())
def test_a_misspelt_tool_is_always_rejected(plan: Plan, data: st.DataObject) -> None:
    steps = list(plan.steps)
    i = data.draw(st.integers(0, len(steps) - 1))
    tool = steps[i].tool
    cut = data.draw(st.integers(0, len(tool) - 1))
    typo = data.draw(st.sampled_from([tool[:cut] + tool[cut + 1 :], tool + "x", tool.upper()]))
    steps[i] = replace(steps[i], tool=typo)
    issues = validate_plan(replace(plan, steps=steps), TOOLS, RUN_INPUT)
    assert triples(issues) == [("unknown_tool", f"$.plan.steps[{i}].tool")]
    assert "available tools: add, echo, fetch, search" in issues[0].message
