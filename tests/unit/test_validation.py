"""Plan validation: one test per issue code with exact paths, the DAG helpers, and
property tests over random valid plans and invalidating mutations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from loom_core.contracts import (
    ForeachStep,
    IfStep,
    ParallelStep,
    Plan,
    PlanIssue,
    ToolSpec,
    ToolStep,
)
from loom_core.templating import SCOPE_ROOTS, child_path, find_references, format_expr
from loom_core.validation import (
    dependencies,
    last_step_id,
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
        "step id 'a' is already used by $.request.plan.steps[0]; give each step a unique id "
        "(ids are unique across the whole plan, sub-plans and fallbacks included)"
    )


# --------------------------------------------------------------------------- missing steps


def test_depends_on_an_unknown_step() -> None:
    plan = Plan(steps=[step("fetch"), step("b", depends_on=["fetch", "fetsh"])])
    issues = validate_plan(plan)
    assert triples(issues) == [("missing_step", "$.plan.steps[1].depends_on[1]")]
    assert issues[0].message == (
        "step 'b' depends on an unknown step: no step has id 'fetsh'; did you mean 'fetch'? "
        "step ids in its list: ['fetch', 'b']"
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
    assert messages[0] == "tool 'add': missing required field 'b' (an integer); add it"
    assert messages[1] == "tool 'add': expected an integer, got a string \"3\""
    assert messages[2] == "tool 'add': unknown field 'c'; accepted fields: a, b"
    assert messages[3] == 'tool \'fetch\': expected one of "fast", "slow", got "fsat"'
    assert messages[8] == "tool 'fetch': expected a number or null, got a string \"soon\""


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
        "`input.cty`: key 'cty' not found in an object with keys ['city', 'n', 'user']; pass "
        "the value in the run's input (its keys: ['city', 'n', 'user']) or change the template"
    )
    assert "index 1 is out of range for an array of 1 item" in issues[1].message
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


# --------------------------------------------------------------------------- nested plans


def plan_of(*steps: dict[str, Any], **fields: Any) -> Plan:
    """A plan from JSON-shaped dicts (field names as written: ``while``, ``else``)."""
    return msgspec.convert({"steps": list(steps), **fields}, Plan)


def tool(sid: str, name: str = "echo", text: str = "hi", **fields: Any) -> dict[str, Any]:
    fields.setdefault("input", {"text": text} if name == "echo" else {})
    return {"kind": "tool", "id": sid, "tool": name, **fields}


def foreach(sid: str, do: list[dict[str, Any]], items: Any = "{{ input.user.langs }}", **f: Any):
    return {"kind": "foreach", "id": sid, "items": items, "do": do, **f}


def when(sid: str, then: list[Any], else_: list[Any] | None = None, **f: Any) -> dict[str, Any]:
    f.setdefault("condition", {"eq": ["{{ input.city }}", "Paris"]})
    return {"kind": "if", "id": sid, "then": then, "else": else_ or [], **f}


def loop(sid: str, do: list[dict[str, Any]], **f: Any) -> dict[str, Any]:
    f.setdefault("max_iterations", 3)
    return {"kind": "loop", "id": sid, "do": do, **f}


def test_a_valid_plan_with_every_kind_of_step() -> None:
    plan = plan_of(
        tool("f", "fetch", input={"url": "https://x/{{ input.city }}"}),
        foreach(
            "each",
            [
                tool("say", text="{{ item }} #{{ index }} {{ steps.f.output.title }}"),
                tool("n", "add", input={"a": "{{ index }}", "b": 1}),
            ],
            output={"said": "{{ steps.say.output.text }}", "n": "{{ steps.n.output.sum }}"},
            concurrency=2,
            min_success=0,
        ),
        loop(
            "poll",
            [tool("check", text="try {{ iteration }}")],
            max_iterations=5,
            **{"while": {"lt": ["{{ iteration }}", 4]}},
            until={"eq": ["{{ steps.check.output.text }}", "ok"]},
            output="{{ steps.check.output.length }}",
        ),
        {
            "kind": "parallel",
            "id": "both",
            "branches": {
                "left": [tool("l", text="{{ steps.each.output }}")],
                "right": [tool("r", text="{{ steps.poll.output }}")],
            },
        },
        {
            "kind": "reduce",
            "id": "total",
            "items": [1, 2, 3],
            "initial": "{{ steps.f.output.pair[0] }}",
            "do": [tool("step", "add", input={"a": "{{ acc }}", "b": "{{ item }}"})],
            "output": "{{ steps.step.output.sum }}",
        },
        when(
            "branch",
            [tool("yes", text="{{ steps.both.output.left }}")],
            [tool("no", text="{{ steps.total.output }}")],
            condition={"gt": ["{{ steps.total.output }}", 3]},
        ),
        {"kind": "sleep", "id": "nap", "until": "2030-01-01T09:00:00+02:00"},
        {"kind": "sleep", "id": "wait", "seconds": 0, "depends_on": ["nap"]},
        tool(
            "risky",
            "fetch",
            input={"url": "u"},
            on_error="fallback",
            retry={"max_attempts": 5, "jitter": 0.5, "multiplier": 1},
            step_timeout_s=10,
            fallback=tool("backup", "search", input={"q": "{{ steps.f.output.title }}"}),
        ),
        {"kind": "final", "id": "done", "output": {"x": "{{ steps.branch.output }}"}},
        timeout_s=60,
    )
    assert validate_plan(plan, TOOLS, RUN_INPUT) == []
    assert dependencies(plan) == {
        "f": (),
        "each": ("f",),
        "poll": (),
        "both": ("each", "poll"),
        "total": ("f",),
        "branch": ("total", "both"),
        "nap": (),
        "wait": ("nap",),
        "risky": ("f",),  # through its fallback
        "done": ("branch",),
    }
    assert dependencies(plan.steps[1].do) == {"say": (), "n": ()}
    assert topological_order(plan.steps[1].do) == ["say", "n"]
    assert last_step_id(plan.steps[1].do) == "n"
    assert last_step_id([]) is None
    assert last_step_id(plan) == "done"


def test_v1_checks_apply_in_every_scope_with_json_paths() -> None:
    plan = plan_of(
        foreach("fe", [tool("a", "ech")]),
        {
            "kind": "parallel",
            "id": "p",
            "branches": {"left": [tool("b", "add", input={"a": 1, "b": "x"})]},
        },
        when("i", [tool("c", text="{{ input.nope }}")], [tool("d"), tool("e", text="{{ x }}")]),
        tool("t", on_error="fallback", fallback=tool("fb", "add", input={"a": 1})),
    )
    assert triples(validate_plan(plan, TOOLS, RUN_INPUT)) == [
        ("invalid_template", "$.plan.steps[2].else[1].input.text"),
        ("unknown_tool", "$.plan.steps[0].do[0].tool"),
        ("invalid_input", "$.plan.steps[1].branches.left[0].input.b"),
        ("invalid_input", "$.plan.steps[3].fallback.input.b"),
        ("missing_input", "$.plan.steps[2].then[0].input.text"),
    ]


def test_step_ids_are_unique_across_scopes_and_fallbacks() -> None:
    plan = plan_of(
        tool("a", on_error="fallback", fallback=tool("x")),
        foreach("fe", [tool("a"), tool("x")]),
        when("w", [tool("fe")]),
    )
    issues = validate_plan(plan)
    assert triples(issues) == [
        ("duplicate_step_id", "$.plan.steps[1].do[0].id"),
        ("duplicate_step_id", "$.plan.steps[1].do[1].id"),
        ("duplicate_step_id", "$.plan.steps[2].then[0].id"),
    ]
    assert "already used by $.plan.steps[0].fallback" in issues[1].message


# --------------------------------------------------------------------------- scoping


def test_references_to_enclosing_steps_are_lifted_to_the_composite() -> None:
    plan = plan_of(
        tool("a"),
        tool("b"),
        foreach(
            "outer",
            [
                tool("c"),
                when(
                    "inner",
                    [tool("d", text="{{ steps.b.output.text }} {{ steps.c.output.text }}")],
                    condition={"exists": "{{ steps.c.output }}"},
                ),
            ],
            items=["x"],
            depends_on=["a"],
        ),
    )
    assert validate_plan(plan, TOOLS) == []
    assert dependencies(plan) == {"a": (), "b": (), "outer": ("a", "b")}
    body = plan.steps[2].do
    assert dependencies(body) == {"c": (), "inner": ("c",)}  # b belongs to another scope
    assert dependencies(body[1].then) == {"d": ()}
    assert topological_order(plan) == ["a", "b", "outer"]


def test_a_cycle_through_a_lifted_reference_is_reported_in_its_scope() -> None:
    plan = plan_of(
        tool("a", depends_on=["fe"]),
        foreach("fe", [tool("b", text="{{ steps.a.output.text }}")], items=[1]),
    )
    issues = validate_plan(plan)
    assert triples(issues) == [("dependency_cycle", "$.plan.steps[0].depends_on")]
    assert issues[0].message.startswith("dependency cycle: a → fe → a;")
    with pytest.raises(ValueError, match="cycle"):
        topological_order(plan)


def test_a_cycle_inside_a_body_points_into_the_body() -> None:
    plan = plan_of(
        tool("x"),
        loop(
            "lp", [tool("a"), tool("b", depends_on=["c"]), tool("c", text="{{ steps.b.output }}")]
        ),
    )
    issues = validate_plan(plan)
    assert triples(issues) == [("dependency_cycle", "$.plan.steps[1].do[1].depends_on")]
    assert "b → c → b" in issues[0].message


def test_a_body_reading_its_own_composite_is_a_cycle() -> None:
    plan = plan_of(foreach("fe", [tool("a", text="{{ steps.fe.output }}")], items=[1]))
    issues = validate_plan(plan)
    assert triples(issues) == [("dependency_cycle", "$.plan.steps[0].depends_on")]
    assert "fe → fe ('fe' reads its own output in a template" in issues[0].message


def test_output_and_until_may_read_the_body_but_while_may_not() -> None:
    ok = plan_of(
        loop(
            "lp",
            [tool("a", text="{{ iteration }}")],
            until={"eq": ["{{ steps.a.output.text }}", "3"]},
            output="{{ steps.a.output }}",
        )
    )
    assert validate_plan(ok, TOOLS) == []
    bad = plan_of(loop("lp", [tool("a")], **{"while": {"not": {"exists": "{{ steps.a.output }}"}}}))
    issues = validate_plan(bad)
    assert triples(issues) == [("missing_step", "$.plan.steps[0].while.not.exists")]
    assert "`while` is checked before each iteration" in issues[0].message
    assert "Use `until`" in issues[0].message


@pytest.mark.parametrize(
    ("plan", "path", "message"),
    [
        (  # a sibling's body: suggest the sibling's output
            plan_of(foreach("fe", [tool("a")], items=[1]), tool("b", text="{{ steps.a.output }}")),
            "$.plan.steps[1].input.text",
            "`steps.a.output` reads 'a', which is not visible here: it is in the `do` of "
            "foreach step 'fe' ($.plan.steps[0].do[0]). A step sees the steps of its own list "
            "and of the lists around it, not those nested in other steps' bodies or branches "
            "(they may not have run, or ran once per element); read the output of 'fe' "
            "instead (`{{ steps.fe.output }}`)",
        ),
        (  # nested two levels down in a sibling: suggest the visible container
            plan_of(
                when("w", [foreach("fe", [tool("a")], items=[1])]),
                tool("b", text="{{ steps.a.output }}"),
            ),
            "$.plan.steps[1].input.text",
            "read the output of 'w' instead (`{{ steps.w.output }}`)",
        ),
        (  # another branch of the same parallel step: no output to suggest
            plan_of(
                {
                    "kind": "parallel",
                    "id": "p",
                    "branches": {
                        "left": [tool("a")],
                        "right": [tool("b", text="{{ steps.a.output }}")],
                    },
                }
            ),
            "$.plan.steps[0].branches.right[0].input.text",
            "it is in branch 'left' of parallel step 'p' ($.plan.steps[0].branches.left[0]). "
            "A step sees the steps of its own list and of the lists around it, not those "
            "nested in other steps' bodies or branches (they may not have run, or ran once "
            "per element)",
        ),
        (  # a composite's own items are rendered before its body
            plan_of(foreach("fe", [tool("a")], items="{{ steps.a.output }}")),
            "$.plan.steps[0].items",
            "it is in the `do` of foreach step 'fe'",
        ),
        (  # a fallback has no output of its own
            plan_of(
                tool("t", on_error="fallback", fallback=tool("fb")),
                tool("u", text="{{ steps.fb.output }}"),
            ),
            "$.plan.steps[1].input.text",
            "`steps.fb.output` reads 'fb', a fallback: its output becomes the output of 't', "
            "the step it stands in for; read `steps.t.output` instead",
        ),
        (  # unknown: suggestions come from the steps visible here, innermost first
            plan_of(
                tool("fetch"),
                foreach("fe", [tool("fetch2"), tool("b", text="{{ steps.fetcj.output }}")]),
            ),
            "$.plan.steps[1].do[1].input.text",
            "`steps.fetcj.output` reads an unknown step: no step has id 'fetcj'; did you mean "
            "'fetch'? step ids visible here: ['fetch2', 'b', 'fetch', 'fe']",
        ),
    ],
)
def test_steps_in_other_scopes_are_not_visible(plan: Plan, path: str, message: str) -> None:
    issues = validate_plan(plan)
    assert triples(issues) == [("missing_step", path)]
    assert message in issues[0].message


def test_depends_on_names_steps_of_the_same_list_only() -> None:
    plan = plan_of(
        tool("a", on_error="fallback", fallback=tool("fb")),
        foreach("fe", [tool("b", depends_on=["a"])], items=[1]),
        when("w", [tool("c")]),
        tool("d", depends_on=["c", "fb"]),
        foreach("fe2", [tool("e", depends_on=["c"])], items=[1]),
    )
    issues = validate_plan(plan)
    assert triples(issues) == [
        ("missing_step", "$.plan.steps[1].do[0].depends_on[0]"),
        ("missing_step", "$.plan.steps[3].depends_on[0]"),
        ("missing_step", "$.plan.steps[3].depends_on[1]"),
        ("missing_step", "$.plan.steps[4].do[0].depends_on[0]"),
    ]
    assert issues[0].message == (
        "step 'b' depends on 'a', which is not in its list (the `do` of foreach step 'fe'): "
        "depends_on only orders steps of the same list. To wait for 'a', read it with a "
        "template (which makes 'fe', the enclosing step in its list, wait for it) or add it "
        "to the depends_on of 'fe'"
    )
    assert issues[1].message.endswith(
        "'c' is in the `then` of if step 'w', which this step cannot see; depend on 'w' instead"
    )
    assert issues[2].message.endswith("'fb' is the fallback of 'a'; depend on 'a'")
    assert issues[3].message.endswith(
        "'c' is in the `then` of if step 'w', which this step cannot see"
    )


# --------------------------------------------------------------------------- scope variables


def test_scope_variables_only_where_they_exist() -> None:
    plan = plan_of(
        tool("a", text="{{ item }}"),
        foreach(
            "fe",
            [
                tool("b", text="{{ acc }} {{ iteration }} {{ index.x }}"),
                when("w", [tool("c", text="{{ item.name }} {{ index }}")]),  # inherited
            ],
            items=[1],
            output="{{ item }}",
        ),
        loop(
            "lp",
            [tool("d", text="{{ iteration }}")],
            **{"while": {"lt": ["{{ iteration }}", 2]}},
            output="{{ index }}",
        ),
        {
            "kind": "reduce",
            "id": "r",
            "items": "{{ acc }}",
            "do": [tool("e", text="{{ acc }} {{ item }} {{ index }}")],
        },
        output="{{ iteration }}",
    )
    issues = validate_plan(plan)
    assert triples(issues) == [
        ("invalid_template", "$.plan.steps[0].input.text"),
        ("invalid_template", "$.plan.steps[1].do[0].input.text"),
        ("invalid_template", "$.plan.steps[1].do[0].input.text"),
        ("invalid_template", "$.plan.steps[1].do[0].input.text"),
        ("invalid_template", "$.plan.steps[2].output"),
        ("invalid_template", "$.plan.steps[3].items"),
        ("invalid_template", "$.plan.output"),
    ]
    messages = [i.message for i in issues]
    assert messages[0] == (
        "`{{ item }}`: `item` exists only inside the `do` of a foreach or reduce step (and "
        "in its `output`); this template is not inside one"
    )
    assert "`acc` exists only inside the `do` of a reduce step" in messages[1]
    assert "`iteration` exists only inside the `do` of a loop step" in messages[2]
    assert messages[3] == (
        "`index.x`: `index` is a number (the element's position), it has no `.x`; write "
        "`{{ index }}` or read the element with `item`"
    )


# --------------------------------------------------------------------------- new checks


@pytest.mark.parametrize(("cap", "ok"), [(0, False), (-1, False), (1, True), (100_000, True)])
def test_loop_without_cap(cap: int, ok: bool) -> None:
    plan = plan_of(loop("lp", [tool("a")], max_iterations=cap))
    issues = validate_plan(plan)
    if ok:
        assert issues == []
    else:
        assert triples(issues) == [("loop_without_cap", "$.plan.steps[0].max_iterations")]
        assert "between 1 and 100000" in issues[0].message


def test_loop_cap_above_the_limit() -> None:
    [issue] = validate_plan(plan_of(loop("lp", [tool("a")], max_iterations=100_001)))
    assert (issue.code, issue.path) == ("loop_without_cap", "$.plan.steps[0].max_iterations")
    assert "(got 100001)" in issue.message


def test_invalid_predicates_point_inside_them() -> None:
    plan = plan_of(
        tool("a"),
        when(
            "w",
            [tool("b")],
            condition={"and": [{"exists": "{{ steps.a.output }}"}, {"gt": ["{{ input.n }}"]}]},
        ),
        loop(
            "lp",
            [tool("c")],
            **{"while": {"nope": 1}},
            until={"or": [{"not": ["{{ steps.c.output }}"]}]},
        ),
    )
    issues = validate_plan(plan)
    assert triples(issues) == [
        ("invalid_predicate", "$.plan.steps[1].condition.and[1].gt"),
        ("invalid_predicate", "$.plan.steps[2].while"),
        ("invalid_predicate", "$.plan.steps[2].until.or[0].not"),
    ]
    assert issues[1].message.startswith("unknown predicate operator 'nope'")


def test_constant_predicates_are_reported() -> None:
    plan = plan_of(
        when("w", [tool("a")], condition={"eq": [1, 1]}),
        loop("lp", [tool("b")], **{"while": {"not": {"empty": []}}}, until={"eq": ["x", "y"]}),
        when("ok", [tool("c")], condition={"eq": ["{{ input.city }}", "Paris"]}),
    )
    issues = validate_plan(plan)
    assert triples(issues) == [
        ("predicate_references_nothing", "$.plan.steps[0].condition"),
        ("predicate_references_nothing", "$.plan.steps[1].while"),
        ("predicate_references_nothing", "$.plan.steps[1].until"),
    ]
    assert "holds no template, so it is a constant" in issues[0].message
    assert "the same branch always runs" in issues[0].message


@pytest.mark.parametrize(
    ("items", "codes_"),
    [
        ([], []),
        ([1, "{{ input.city }}"], []),
        ("{{ input.user.langs }}", []),
        ("  {{ input.user.langs }} ", []),
        (3, ["invalid_items"]),
        ({"a": 1}, ["invalid_items"]),
        ("a,b", ["invalid_items"]),
        ("{{ input.city }} and {{ input.n }}", ["invalid_items"]),
        ("{{ input.user.langs", ["invalid_template"]),  # reported once, as a template
    ],
)
def test_foreach_and_reduce_items(items: Any, codes_: list[str]) -> None:
    for kind in ("foreach", "reduce"):
        plan = plan_of({"kind": kind, "id": "x", "items": items, "do": [tool("a")]})
        issues = validate_plan(plan)
        assert codes(issues) == codes_
        assert all(i.path == "$.plan.steps[0].items" for i in issues)


_SLEEP = {"kind": "sleep", "id": "s"}


@pytest.mark.parametrize(
    ("plan", "path", "message"),
    [
        (
            plan_of(foreach("fe", [tool("a")], concurrency=0)),
            "$.plan.steps[0].concurrency",
            "must be at least 1",
        ),
        (
            plan_of(foreach("fe", [tool("a")], items=[1, 2], min_success=3)),
            "$.plan.steps[0].min_success",
            "min_success must be between 0 and the 2 items (got 3)",
        ),
        (
            plan_of(foreach("fe", [tool("a")], min_success=-1)),
            "$.plan.steps[0].min_success",
            "min_success must be 0 or more",
        ),
        (plan_of(foreach("fe", [])), "$.plan.steps[0].do", "has an empty `do`"),
        (plan_of(loop("lp", [])), "$.plan.steps[0].do", "loop step 'lp' has an empty `do`"),
        (
            plan_of({"kind": "reduce", "id": "r", "items": [], "do": []}),
            "$.plan.steps[0].do",
            "has an empty `do`",
        ),
        (
            plan_of({"kind": "parallel", "id": "p", "branches": {}}),
            "$.plan.steps[0].branches",
            "has no branches",
        ),
        (
            plan_of({"kind": "parallel", "id": "p", "branches": {"a": [tool("x")], "b c": []}}),
            '$.plan.steps[0].branches["b c"]',
            "branch 'b c' of parallel step 'p' is empty",
        ),
        (plan_of(when("w", [])), "$.plan.steps[0]", "has neither `then` nor `else` steps"),
        (plan_of(_SLEEP), "$.plan.steps[0]", "has neither `seconds` and `until`"),
        (
            plan_of({**_SLEEP, "seconds": 1, "until": "2030-01-01T00:00:00Z"}),
            "$.plan.steps[0]",
            "has both `seconds` and `until`",
        ),
        (plan_of({**_SLEEP, "seconds": -1}), "$.plan.steps[0].seconds", "0 or more"),
        (
            plan_of({**_SLEEP, "until": "tomorrow"}),
            "$.plan.steps[0].until",
            "'tomorrow' is not an ISO 8601 time",
        ),
        (
            plan_of({**_SLEEP, "until": "2030-01-01T09:00:00"}),
            "$.plan.steps[0].until",
            "has no zone (add Z or an offset like +02:00)",
        ),
        (
            plan_of(tool("a", retry={"max_attempts": 0})),
            "$.plan.steps[0].retry.max_attempts",
            "retry.max_attempts must be at least 1, got 0",
        ),
        (
            plan_of(tool("a", retry={"initial_delay_s": -1})),
            "$.plan.steps[0].retry.initial_delay_s",
            "must be 0 or more",
        ),
        (
            plan_of(tool("a", retry={"max_delay_s": -0.5})),
            "$.plan.steps[0].retry.max_delay_s",
            "must be 0 or more",
        ),
        (
            plan_of(tool("a", retry={"multiplier": 0.5})),
            "$.plan.steps[0].retry.multiplier",
            "must be 1 or more",
        ),
        (
            plan_of(tool("a", retry={"jitter": -0.1})),
            "$.plan.steps[0].retry.jitter",
            "between 0 and 1",
        ),
        (
            plan_of(tool("a", on_error="fallback")),
            "$.plan.steps[0].on_error",
            'has on_error "fallback" but no `fallback` step',
        ),
        (
            plan_of(tool("a", fallback=tool("b"))),
            "$.plan.steps[0].fallback",
            "has a `fallback` that never runs",
        ),
        (
            plan_of(tool("a", on_error="fallback", fallback=tool("b", on_error="fallback"))),
            "$.plan.steps[0].fallback.on_error",
            "step 'b' has on_error",
        ),
        (plan_of(tool("a"), timeout_s=0), "$.plan.timeout_s", "must be a positive number"),
        (
            plan_of(tool("a", step_timeout_s=-1)),
            "$.plan.steps[0].step_timeout_s",
            "must be a positive number of seconds (got -1.0)",
        ),
        (
            plan_of(foreach("fe", [{"kind": "final", "id": "f", "output": 1}])),
            "$.plan.steps[0].do[0]",
            "final step 'f' is inside the `do` of foreach step 'fe'",
        ),
    ],
)
def test_invalid_step(plan: Plan, path: str, message: str) -> None:
    issues = validate_plan(plan)
    assert triples(issues) == [("invalid_step", path)]
    assert message in issues[0].message


def test_sleep_until_may_be_a_template() -> None:
    plan = plan_of({**_SLEEP, "until": "{{ input.city }}T09:00:00Z"})
    assert validate_plan(plan, TOOLS, RUN_INPUT) == []


def test_multiple_final_steps() -> None:
    final = {"kind": "final", "output": "{{ steps.a.output }}"}
    plan = plan_of(tool("a"), {**final, "id": "f1"}, {**final, "id": "f2"}, {**final, "id": "f3"})
    issues = validate_plan(plan)
    assert triples(issues) == [
        ("multiple_final_steps", "$.plan.steps[2]"),
        ("multiple_final_steps", "$.plan.steps[3]"),
    ]
    assert "already has the final step 'f1' ($.plan.steps[1])" in issues[0].message


def test_plan_output_and_a_final_step_conflict() -> None:
    plan = plan_of(tool("a"), {"kind": "final", "id": "f", "output": 1}, output="x")
    issues = validate_plan(plan)
    assert triples(issues) == [("invalid_plan", "$.plan.output")]
    assert "would be ignored" in issues[0].message


def test_output_fields_are_checked_through_scopes_and_fallbacks() -> None:
    plan = plan_of(
        tool("f", "fetch", input={"url": "u"}),
        foreach(
            "fe",
            [tool("a", text="{{ steps.f.output.titel }}"), tool("b", text="{{ item }}")],
            output="{{ steps.b.output.lenght }}",
        ),
        # the output is fetch's or, when fetch failed, echo's: `text` may exist
        tool("g", "fetch", input={"url": "u"}, on_error="fallback", fallback=tool("e")),
        tool("h", text="{{ steps.g.output.text }} {{ steps.g.output.nothing }}"),
    )
    assert triples(validate_plan(plan, TOOLS)) == [
        ("missing_field", "$.plan.steps[1].do[0].input.text"),
        ("missing_field", "$.plan.steps[1].output"),
        ("missing_field", "$.plan.steps[3].input.text"),
    ]


def test_dependencies_and_order_accept_one_scope_list() -> None:
    steps = [tool("x", depends_on=["y"]), tool("y")]
    body = plan_of(*steps).steps
    assert dependencies(body) == {"x": ("y",), "y": ()}
    assert topological_order(body) == ["y", "x"]
    with pytest.raises(ValueError, match="unknown step 'z'"):
        topological_order(plan_of(tool("x", depends_on=["z"])).steps)


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


# --------------------------------------------------------------------------- nested properties
# Random plans with foreach / if / parallel bodies (and fallbacks) whose templates read
# earlier steps of their own list and of the lists around them, plus scope variables.
# Tool steps' ids are `<random>_<n>`, unique by their suffix.


_ID_PREFIXES = st.sampled_from(["a", "fetch", "0", "x-y", "_s", "9-Z"])


@dataclass
class _Gen:
    draw: st.DrawFn
    count: int = 0

    def new_id(self) -> str:
        # Ids starting with a digit or holding '-' need quoting in templates
        # (steps["0_1"].output); a sampled prefix is much cheaper to draw than a regex.
        self.count += 1
        return f"{self.draw(_ID_PREFIXES)}_{self.count}"


def _nested_value(
    g: _Gen, kind: str, pool: list[tuple[str, str | None]], variables: frozenset[str]
) -> Any:
    # Steps with a known tool offer typed fields; composites only their whole output.
    typed = [(sid, t) for sid, t in pool if t is not None]
    value = _value(g.draw, kind, typed)
    if isinstance(value, str) and "{{" in value and g.draw(st.integers(0, 3)) == 0:
        extra = [format_expr("steps", [sid, "output"]) for sid, t in pool if t is None]
        extra += sorted(variables)
        if extra:
            return f"{{{{ {g.draw(st.sampled_from(extra))} }}}}"
    return value


def _nested_tool(
    g: _Gen, sid: str, pool: list[tuple[str, str | None]], variables: frozenset[str], fb: bool
) -> dict[str, Any]:
    name = g.draw(st.sampled_from(sorted(_INPUT_FIELDS)))
    inputs = {f: _nested_value(g, k, pool, variables) for f, k in _INPUT_FIELDS[name].items()}
    raw: dict[str, Any] = {"kind": "tool", "id": sid, "tool": name, "input": inputs}
    if fb and g.draw(st.integers(0, 4)) == 0:
        raw["on_error"] = "fallback"
        raw["fallback"] = _nested_tool(g, g.new_id(), pool, variables, fb=False)
    return raw


def _nested_steps(
    g: _Gen,
    outer: list[tuple[str, str | None]],
    variables: frozenset[str],
    depth: int,
) -> tuple[list[dict[str, Any]], list[tuple[str, str | None]]]:
    """A list of steps and its (id, tool) pairs (tool None for composites)."""
    steps: list[dict[str, Any]] = []
    earlier: list[tuple[str, str | None]] = []
    composites = ["foreach", "if", "parallel"] if depth < 2 else []
    for _ in range(g.draw(st.integers(1, 3 if depth else 5))):
        sid = g.new_id()
        pool = outer + earlier
        # A budget keeps plans small enough for many examples per second.
        kind = g.draw(st.sampled_from(["tool", "tool", *(composites if g.count < 25 else [])]))
        if kind == "tool":
            raw = _nested_tool(g, sid, pool, variables, fb=True)
            earlier_tool: str | None = raw["tool"]
        else:
            earlier_tool = None
            if kind == "foreach":
                inner = variables | {"item", "index"}
                body, made = _nested_steps(g, pool, inner, depth + 1)
                items = g.draw(st.sampled_from(["{{ input.user.langs }}", ["a", "b"]]))
                raw = {"kind": "foreach", "id": sid, "items": items, "do": body}
                if g.draw(st.booleans()):
                    raw["output"] = f"{{{{ {format_expr('steps', [made[-1][0], 'output'])} }}}}"
            elif kind == "if":
                then, _ = _nested_steps(g, pool, variables, depth + 1)
                else_, _ = _nested_steps(g, pool, variables, depth + 1)
                subject = _nested_value(g, "str", pool, variables)
                if "{{" not in str(subject):
                    subject = "{{ input.city }}"
                raw = {
                    "kind": "if",
                    "id": sid,
                    "condition": {"eq": [subject, "x"]},
                    "then": then,
                    "else": else_,
                }
            else:
                names = g.draw(
                    st.lists(st.sampled_from(["a", "b c", "d"]), min_size=1, unique=True)
                )
                branches = {n: _nested_steps(g, pool, variables, depth + 1)[0] for n in names}
                raw = {"kind": "parallel", "id": sid, "branches": branches}
        if earlier:
            raw["depends_on"] = g.draw(
                st.lists(st.sampled_from([s for s, _ in earlier]), max_size=2)
            )
        steps.append(raw)
        earlier.append((sid, earlier_tool))
    return steps, earlier


@st.composite
def nested_plans(draw: st.DrawFn) -> dict[str, Any]:
    """A valid plan as JSON-shaped builtins (mutations edit it, then it is converted)."""
    steps, _ = _nested_steps(_Gen(draw), [], frozenset(), 0)
    return {"steps": steps}


def _scopes(raw: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every list of steps with its JSON path, in document order."""
    found: list[tuple[str, list[dict[str, Any]]]] = []

    def walk(path: str, steps: list[dict[str, Any]]) -> None:
        found.append((path, steps))
        for i, s in enumerate(steps):
            at = f"{path}[{i}]"
            for key in ("do", "then", "else"):
                if key in s:
                    walk(f"{at}.{key}", s[key])
            for name, body in s.get("branches", {}).items():
                walk(child_path(f"{at}.branches", name), body)

    walk("$.plan.steps", raw["steps"])
    return found


def _occurrences(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every step (fallbacks included) with its JSON path, in document order: a step, its
    fallbacks, its bodies, then the next step."""
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(path: str, steps: list[dict[str, Any]]) -> None:
        for i, s in enumerate(steps):
            at = f"{path}[{i}]"
            found.append((at, s))
            fallback, where = s, at
            while "fallback" in fallback:
                fallback, where = fallback["fallback"], f"{where}.fallback"
                found.append((where, fallback))
            for key in ("do", "then", "else"):
                if key in s:
                    walk(f"{at}.{key}", s[key])
            for name, body in s.get("branches", {}).items():
                walk(child_path(f"{at}.branches", name), body)

    walk("$.plan.steps", raw["steps"])
    return found


def _body_lists(plan: Plan) -> list[list[Any]]:
    lists, todo = [], [plan.steps]
    while todo:
        steps = todo.pop()
        lists.append(steps)
        for s in steps:
            if isinstance(s, ForeachStep):
                todo.append(s.do)
            elif isinstance(s, IfStep):
                todo += [s.then, s.else_]
            elif isinstance(s, ParallelStep):
                todo += list(s.branches.values())
    return lists


@settings(max_examples=40, deadline=None)
@given(raw=nested_plans())
def test_random_nested_plans_are_valid_and_each_scope_is_ordered(raw: dict[str, Any]) -> None:
    plan = msgspec.convert(raw, Plan)
    assert validate_plan(plan, TOOLS, RUN_INPUT) == []
    for steps in _body_lists(plan):
        ids = [s.id for s in steps]
        assert topological_order(steps) == ids  # every dependency points backwards
        deps = dependencies(steps)
        assert list(deps) == ids
        for s in steps:
            # Everything a template anywhere inside the step reads, if it is a sibling.
            inside = {r.step_id for r in find_references(msgspec.to_builtins(s)) if r.step_id}
            assert set(deps[s.id]) == (set(s.depends_on) | inside) & set(ids)
            assert deps[s.id][: len(dict.fromkeys(s.depends_on))] == tuple(
                dict.fromkeys(s.depends_on)
            )
        assert last_step_id(steps) == ids[-1]


def _ancestors_in(deps: dict[str, tuple[str, ...]], sid: str) -> set[str]:
    seen, todo = set(), [sid]
    while todo:
        for d in deps[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


@settings(max_examples=40, deadline=None)
@given(raw=nested_plans(), data=st.data())
def test_a_back_edge_in_any_scope_is_a_cycle_there(
    raw: dict[str, Any], data: st.DataObject
) -> None:
    plan = msgspec.convert(raw, Plan)
    candidates = []
    for (path, raw_steps), steps in zip(_scopes(raw), _scopes_of(plan), strict=True):
        deps = dependencies(steps)
        position = {s.id: k for k, s in enumerate(steps)}
        for j, s in enumerate(steps):
            for i in sorted(position[a] for a in _ancestors_in(deps, s.id)):
                candidates.append((path, raw_steps, i, j))
    if not candidates:
        return
    path, raw_steps, i, j = data.draw(st.sampled_from(candidates))
    target = raw_steps[i]
    target["depends_on"] = [*target.get("depends_on", []), raw_steps[j]["id"]]
    issues = validate_plan(msgspec.convert(raw, Plan), TOOLS, RUN_INPUT)
    assert triples(issues) == [("dependency_cycle", f"{path}[{i}].depends_on")]
    assert f"dependency cycle: {raw_steps[i]['id']} → {raw_steps[j]['id']} → " in issues[0].message


def _scopes_of(plan: Plan) -> list[list[Any]]:
    """The same lists as ``_scopes`` (document order), from the decoded plan."""
    found: list[list[Any]] = []

    def walk(steps: list[Any]) -> None:
        found.append(steps)
        for s in steps:
            if isinstance(s, ForeachStep):
                walk(s.do)
            elif isinstance(s, IfStep):
                walk(s.then)
                walk(s.else_)
            elif isinstance(s, ParallelStep):
                for body in s.branches.values():
                    walk(body)

    walk(plan.steps)
    return found


@settings(max_examples=40, deadline=None)
@given(raw=nested_plans(), data=st.data())
def test_a_duplicate_id_anywhere_is_rejected(raw: dict[str, Any], data: st.DataObject) -> None:
    occurrences = _occurrences(raw)
    if len(occurrences) < 2:
        return
    k = data.draw(st.integers(1, len(occurrences) - 1))
    m = data.draw(st.integers(0, k - 1))
    occurrences[k][1]["id"] = occurrences[m][1]["id"]
    issues = validate_plan(msgspec.convert(raw, Plan), TOOLS, RUN_INPUT)
    assert ("duplicate_step_id", f"{occurrences[k][0]}.id") in triples(issues)


def _tools_anywhere(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(p, s) for p, s in _occurrences(raw) if s["kind"] == "tool"]


@settings(max_examples=40, deadline=None)
@given(raw=nested_plans(), data=st.data())
def test_a_misspelt_tool_or_missing_step_anywhere_is_rejected_there(
    raw: dict[str, Any], data: st.DataObject
) -> None:
    tools = _tools_anywhere(raw)
    if not tools:
        return
    path, s = data.draw(st.sampled_from(tools))
    mutation = data.draw(st.sampled_from(["tool", "depends_on", "template"]))
    if mutation == "tool":
        s["tool"] += "x"
        expected = [("unknown_tool", f"{path}.tool")]
    elif mutation == "depends_on" and ".fallback" not in path:
        s["depends_on"] = [*s.get("depends_on", []), "no.such-step"]
        expected = [("missing_step", f"{path}.depends_on[{len(s['depends_on']) - 1}]")]
    else:
        field = next(iter(s["input"]))
        s["input"][field] = '{{ steps["no.such-step"].output }}'
        expected = [("missing_step", child_path(f"{path}.input", field))]
    assert triples(validate_plan(msgspec.convert(raw, Plan), TOOLS, RUN_INPUT)) == expected


@settings(max_examples=40, deadline=None)
@given(raw=nested_plans(), data=st.data())
def test_reading_into_another_scope_or_a_misplaced_variable_is_rejected(
    raw: dict[str, Any], data: st.DataObject
) -> None:
    top = [(f"$.plan.steps[{i}]", s) for i, s in enumerate(raw["steps"]) if s["kind"] == "tool"]
    nested = [(p, s) for p, s in _occurrences(raw) if p.count("[") > 1 and ".fallback" not in p]
    if not top:
        return
    path, s = data.draw(st.sampled_from(top))
    field = next(iter(s["input"]))
    if nested and data.draw(st.booleans()):
        _, hidden = data.draw(st.sampled_from(nested))
        s["input"][field] = f"{{{{ {format_expr('steps', [hidden['id'], 'output'])} }}}}"
        code = "missing_step"
    else:
        s["input"][field] = f"{{{{ {data.draw(st.sampled_from(sorted(SCOPE_ROOTS)))} }}}}"
        code = "invalid_template"
    issues = validate_plan(msgspec.convert(raw, Plan), TOOLS, RUN_INPUT)
    assert triples(issues) == [(code, child_path(f"{path}.input", field))]


def test_exists_on_an_optional_input_key_is_not_a_missing_input() -> None:
    from loom_core.contracts import IfStep

    step = IfStep(
        id="c",
        condition={"and": [{"exists": "{{ input.coupon }}"}, {"eq": ["{{ input.x }}", 1]}]},
        then=[ToolStep(id="t", tool="echo", input={"message": 1})],
    )
    issues = validate_plan(Plan(steps=[step]), None, {})
    assert [(i.code, i.path) for i in issues] == [
        ("missing_input", "$.plan.steps[0].condition.and[1].eq[0]")
    ]
