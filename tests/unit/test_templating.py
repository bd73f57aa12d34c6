"""Templating: grammar, rendering, error paths and messages, plus property tests."""

from __future__ import annotations

import copy
from collections import ChainMap
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom_core.templating import (
    Reference,
    TemplateError,
    TemplateLookupError,
    TemplateSyntaxError,
    child_path,
    find_references,
    format_expr,
    lookup,
    render,
    scan_templates,
    template_errors,
    whole_reference,
)

CONTEXT: dict[str, Any] = {
    "input": {"city": "Paris", "n": 3, "ratio": 0.5, "ok": True, "none": None, "first-name": "Ada"},
    "steps": {
        "fetch": {"output": {"title": "Hello", "status": 200, "body": "<p>"}},
        "list": {
            "output": {
                "items": [{"first name": "Bo", "tags": ["x", "y"]}, {"first name": "Cy"}],
                "weird}}key": 1,
                'quo"te': 2,
            }
        },
    },
}


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ input.city }}", "Paris"),
        ("{{input.n}}", 3),
        ("  {{ input.ratio }}\n", 0.5),
        ("{{ input.ok }}", True),
        ("{{ input.none }}", None),
        ("{{ input.first-name }}", "Ada"),
        ("{{ steps.fetch.output }}", {"title": "Hello", "status": 200, "body": "<p>"}),
        ("{{ steps.fetch.output.status }}", 200),
        ('{{ steps.list.output.items[0]["first name"] }}', "Bo"),
        ("{{ steps.list.output.items[1]['first name'] }}", "Cy"),
        ("{{ steps.list.output.items[0].tags[1] }}", "y"),
        ('{{ steps.list.output["weird}}key"] }}', 1),
        ('{{ steps.list.output["quo\\"te"] }}', 2),
        ("{{ steps.list.output['quo\"te'] }}", 2),
        ('{{ steps["fetch"].output.title }}', "Hello"),
    ],
)
def test_whole_string_template_keeps_the_json_type(template: str, expected: Any) -> None:
    result = render(template, CONTEXT)
    assert result == expected
    assert type(result) is type(expected)


def test_whole_string_template_returns_the_stored_object_itself() -> None:
    assert (
        render("{{ steps.list.output.items }}", CONTEXT)
        is CONTEXT["steps"]["list"]["output"]["items"]
    )


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("Weather in {{ input.city }}", "Weather in Paris"),
        ("{{ input.city }}{{ input.city }}", "ParisParis"),
        ("n={{ input.n }}, r={{input.ratio}}", "n=3, r=0.5"),
        ("{{ input.ok }} / {{ input.none }}", "true / null"),
        ("tags: {{ steps.list.output.items[0].tags }}", 'tags: ["x","y"]'),
        ("obj: {{ steps.list.output.items[1] }}", 'obj: {"first name":"Cy"}'),
        ("only braces }} stay", "only braces }} stay"),
    ],
)
def test_mixed_string_renders_to_text_with_compact_json(template: str, expected: str) -> None:
    assert render(template, CONTEXT) == expected


def test_render_walks_dict_values_and_lists_but_not_keys() -> None:
    value = {
        "{{ input.city }}": "{{ input.n }}",
        "nested": [{"x": "{{ input.city }}"}, 7, None, ["{{ input.ok }}"]],
    }
    assert render(value, CONTEXT) == {
        "{{ input.city }}": 3,
        "nested": [{"x": "Paris"}, 7, None, [True]],
    }


def test_render_does_not_mutate_inputs() -> None:
    value = {"a": ["{{ steps.list.output.items }}", {"b": "{{ input.city }}"}], "c": "plain"}
    before_value, before_context = copy.deepcopy(value), copy.deepcopy(CONTEXT)
    result = render(value, CONTEXT)
    assert value == before_value
    assert before_context == CONTEXT
    # Containers holding a rendered template are new; editing them leaves the plan alone.
    result["a"][1]["b"] = "x"
    result["a"].append("more")
    assert value == before_value


def test_values_without_templates_come_back_as_the_same_objects() -> None:
    value = {"a": [1, "two", {"three": 3.0}], "b": "no template } { here"}
    assert render(value, {}) is value
    mixed = {"same": {"x": 1}, "changed": "{{ input.n }}"}
    result = render(mixed, CONTEXT)
    assert result is not mixed
    assert result["same"] is mixed["same"]


def test_scalars_render_to_themselves() -> None:
    for value in (None, True, 0, 1.5, ""):
        assert render(value, {}) is value


# --------------------------------------------------------------------------- lookup errors


def test_missing_key_error_names_the_segment_and_what_was_there() -> None:
    with pytest.raises(TemplateLookupError) as caught:
        render({"steps": [{}, {"input": {"text": "{{ steps.fetch.output.titl }}"}}]}, CONTEXT)
    error = caught.value
    assert error.code == "missing_field"
    assert error.path == "$.steps[1].input.text"
    assert error.expr == "steps.fetch.output.titl"
    assert error.message == (
        "`steps.fetch.output.titl`: key 'titl' not found in an object with keys "
        "['body', 'status', 'title']"
    )
    assert str(error) == f"{error.message} (at $.steps[1].input.text)"
    assert isinstance(error, TemplateError)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{{ steps.list.output.items[5] }}",
            "`steps.list.output.items[5]`: index 5 is out of range for an array of 2 items",
        ),
        (
            "{{ steps.fetch.output.title.x }}",
            "`steps.fetch.output.title.x`: cannot read key 'x': "
            "`steps.fetch.output.title` is a string",
        ),
        (
            "{{ steps.list.output.items.first }}",
            "`steps.list.output.items.first`: cannot read key 'first': "
            "`steps.list.output.items` is an array of 2 items; use an index like [0]",
        ),
        (
            "{{ input[0] }}",
            "`input[0]`: cannot read index [0]: `input` is an object with keys "
            "['city', 'first-name', 'n', 'none', 'ok', 'ratio']; use [\"0\"] for a key",
        ),
        ("{{ input.n[1] }}", "`input.n[1]`: cannot read index [1]: `input.n` is an integer"),
        (
            "{{ steps.other.output }}",
            "`steps.other.output`: step 'other' has no output (steps with output: "
            "['fetch', 'list']); a step can only read the steps it depends on",
        ),
    ],
)
def test_lookup_error_messages(template: str, message: str) -> None:
    with pytest.raises(TemplateLookupError) as caught:
        render({"x": f"text {template}"}, CONTEXT, path="$.plan.output")
    assert caught.value.message == message
    assert caught.value.path == "$.plan.output.x"


def test_missing_root_in_context() -> None:
    with pytest.raises(TemplateLookupError, match="nothing named 'steps'"):
        render("{{ steps.a.output }}", {"input": {}})
    with pytest.raises(TemplateLookupError) as caught:
        render({"x": "{{ acc }}"}, {"input": {}})
    assert caught.value.message == (
        "`acc`: nothing named 'acc' is available to templates; `acc` exists only inside "
        "the `do` of a reduce step (and in its `output`)"
    )
    assert caught.value.path == "$.x"


def test_scope_variables_render_like_input() -> None:
    context = {
        "input": {},
        "item": {"name": "Ada", "tags": ["x"]},
        "index": 2,
        "acc": [1],
        "iteration": 0,
    }
    assert render("{{ item.name }}", context) == "Ada"
    assert render("{{ item.tags[0] }}#{{ index }}", context) == "x#2"
    assert render({"a": "{{ acc }}", "i": "{{ iteration }}"}, context) == {"a": [1], "i": 0}
    [ref] = find_references("{{ item['name'] }}")
    assert (ref.root, ref.segments, ref.step_id) == ("item", ("name",), None)
    with pytest.raises(TemplateLookupError, match="`index.x`: cannot read key 'x'"):
        render("{{ index.x }}", context)


def test_steps_may_be_any_mapping_such_as_a_chain_map() -> None:
    inner = {"b": {"output": {"n": 1}}}
    outer = {"a": {"output": {"n": 0}}, "b": {"output": {"n": -1}}}
    context = {"input": {}, "steps": ChainMap(inner, outer)}
    assert render(["{{ steps.a.output.n }}", "{{ steps.b.output.n }}"], context) == [0, 1]
    with pytest.raises(TemplateLookupError) as caught:
        render("{{ steps.c.output }}", context)
    assert "steps with output: ['a', 'b']" in caught.value.message


def test_whole_reference() -> None:
    assert whole_reference(" {{ steps.a.output.list }}\n", "$.items") == Reference(
        "steps.a.output.list", "steps", ("a", "output", "list"), "$.items"
    )
    assert whole_reference("{{ item }}") == Reference("item", "item", (), "$")
    for value in ("x {{ item }}", "{{ item }}{{ index }}", "plain", 3, None, ["{{ item }}"]):
        assert whole_reference(value) is None
    with pytest.raises(TemplateSyntaxError) as caught:
        whole_reference("{{ item", "$.p")
    assert caught.value.path == "$.p"


def test_lookup_helper_and_format_expr() -> None:
    segments = ("list", "output", "items", 0, "first name")
    assert format_expr("steps", segments) == 'steps.list.output.items[0]["first name"]'
    assert lookup(CONTEXT, "steps", segments) == "Bo"
    with pytest.raises(TemplateLookupError) as caught:
        lookup(CONTEXT, "input", ["nope"], path="$.x")
    assert caught.value.path == "$.x"
    assert caught.value.expr == "input.nope"


def test_long_key_lists_are_truncated() -> None:
    context = {"input": {f"k{i:02}": i for i in range(30)}}
    with pytest.raises(TemplateLookupError) as caught:
        render("{{ input.missing }}", context)
    assert caught.value.message.endswith("'k19', ... 10 more]")


# --------------------------------------------------------------------------- syntax errors


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{{ input.city", "`{{ input.city` has no closing `}}`; write e.g. `{{ input.city }}`"),
        (
            "Hi {{ }}",
            "empty template `{{ }}`; write e.g. `{{ input.city }}` or "
            "`{{ steps.fetch.output.title }}`",
        ),
        (
            "{{ inputs.city }}",
            "`inputs.city` must start with `input` (the run's input) or `steps` "
            "(other steps' outputs), or inside a sub-plan with `item`, `index`, `acc` or "
            "`iteration` (did you mean `input`?)",
        ),
        (
            "{{ 3 }}",
            "`3` must start with `input` (the run's input) or `steps` (other steps' outputs), "
            "or inside a sub-plan with `item`, `index`, `acc` or `iteration`",
        ),
        (
            "{{ input.a b }}",
            "`input.a b`: cannot parse ` b`; after the root write segments like "
            '`.name`, `[0]` or `["any key"]`',
        ),
        (
            "{{ input.items.0 }}",
            "`input.items.0`: `.0` is not a name (names start with a letter or _); "
            'use [0] for a list index or ["0"] for a key',
        ),
        (
            "{{ input[-1] }}",
            "`input[-1]`: cannot parse `[-1]`; after the root write segments "
            'like `.name`, `[0]` or `["any key"]`',
        ),
        ("{{ steps }}", "`steps` must name a step and its output, e.g. `steps.fetch.output.title`"),
        (
            "{{ steps.fetch }}",
            "`steps.fetch`: add `.output` after the step id, e.g. `steps.fetch.output`",
        ),
        (
            "{{ steps.fetch.result.title }}",
            "`steps.fetch.result.title`: a step's only field is `output`, not `.result`; "
            "e.g. `steps.fetch.output`",
        ),
        (
            "{{ steps[0].output }}",
            "`steps[0].output`: steps are named by id, not position; "
            "e.g. `steps.fetch.output.title`",
        ),
        (
            '{{ input["city }}',
            'the quote " opened in `{{ input["` is never closed; write keys as ["key"] or '
            "['key']",
        ),
    ],
)
def test_syntax_errors(text: str, message: str) -> None:
    value = {"steps": [{"input": {"q": ["ok", text]}}]}
    errors = template_errors(value)
    assert [(e.code, e.path, e.message) for e in errors] == [
        ("invalid_template", "$.steps[0].input.q[1]", message)
    ]
    with pytest.raises(TemplateSyntaxError) as caught:
        find_references(value)
    assert caught.value.path == "$.steps[0].input.q[1]"
    with pytest.raises(TemplateSyntaxError):
        render(value, CONTEXT)


def test_template_errors_reports_every_bad_string_and_find_references_the_first() -> None:
    value = {"a": "{{ nope }}", "b": "{{ input.x }}", "c": ["{{ input.y"]}
    errors = template_errors(value, "$.plan.output")
    assert [e.path for e in errors] == ["$.plan.output.a", "$.plan.output.c[0]"]
    assert [e.expr for e in errors] == ["nope", "input.y"]
    with pytest.raises(TemplateSyntaxError) as caught:
        find_references(value, "$.plan.output")
    assert caught.value.path == "$.plan.output.a"
    refs, errs = scan_templates(value, "$.plan.output")
    assert [r.expr for r in refs] == ["input.x"]
    assert errs[0].message == errors[0].message


# --------------------------------------------------------------------------- references


def test_find_references_with_paths_and_step_ids() -> None:
    value = {
        "text": "{{ input.city }} and {{ steps.fetch.output.title }}",
        "list": [1, {"deep key": "{{ steps.list.output.items[0]['first name'] }}"}],
        "{{ steps.ignored.output }}": "keys are not templates",
    }
    refs = find_references(value, "$.plan.steps[2].input")
    assert refs == [
        Reference("input.city", "input", ("city",), "$.plan.steps[2].input.text"),
        Reference(
            "steps.fetch.output.title",
            "steps",
            ("fetch", "output", "title"),
            "$.plan.steps[2].input.text",
        ),
        Reference(
            "steps.list.output.items[0]['first name']",
            "steps",
            ("list", "output", "items", 0, "first name"),
            '$.plan.steps[2].input.list[1]["deep key"]',
        ),
    ]
    assert [r.step_id for r in refs] == [None, "fetch", "list"]


def test_find_references_on_plain_values() -> None:
    assert find_references({"a": [1, 2.0, None, "x } {"]}) == []
    assert find_references("{{input}}") == [Reference("input", "input", (), "$")]


def test_child_path() -> None:
    assert child_path("$", "a_1") == "$.a_1"
    assert child_path("$", 3) == "$[3]"
    assert child_path("$.x", "first-name") == '$.x["first-name"]'
    assert child_path("$", 'a "b"') == '$["a \\"b\\""]'


# --------------------------------------------------------------------------- properties

_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_json = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
_step_ids = st.from_regex(r"[A-Za-z0-9_-]{1,10}", fullmatch=True)


@st.composite
def _context_and_path(draw: st.DrawFn) -> tuple[dict[str, Any], str, tuple[Any, ...], Any]:
    """A context, a root, segments into it and the value stored there."""
    inputs = draw(st.dictionaries(st.text(max_size=8), _json, max_size=4))
    outputs = draw(st.dictionaries(_step_ids, _json, min_size=1, max_size=3))
    context = {"input": inputs, "steps": {sid: {"output": out} for sid, out in outputs.items()}}
    root = draw(st.sampled_from(["input", "steps"]))
    if root == "steps":
        sid = draw(st.sampled_from(sorted(outputs)))
        segments: list[Any] = [sid, "output"]
        value = outputs[sid]
    else:
        segments, value = [], inputs
    while isinstance(value, dict | list) and value and draw(st.booleans()):
        if isinstance(value, dict):
            key = draw(st.sampled_from(list(value)))
        else:
            key = draw(st.integers(0, len(value) - 1))
        segments.append(key)
        value = value[key]
    return context, root, tuple(segments), value


@settings(max_examples=100, deadline=None)
@given(
    case=_context_and_path(),
    before=st.sampled_from(["", " ", "  "]),
    after=st.sampled_from(["", " ", "\n"]),
    outer=st.sampled_from(["", " ", "\t "]),
)
def test_whole_template_renders_the_value_at_its_path(
    case: tuple[dict[str, Any], str, tuple[Any, ...], Any], before: str, after: str, outer: str
) -> None:
    context, root, segments, expected = case
    template = f"{outer}{{{{{before}{format_expr(root, segments)}{after}}}}}{outer}"
    value = {"k": [None, template]}
    [ref] = find_references(value)
    assert (ref.root, ref.segments, ref.path) == (root, segments, "$.k[1]")
    assert lookup(context, ref.root, ref.segments) is expected
    rendered = render(value, context)
    assert rendered["k"][1] is expected
    assert value == {"k": [None, template]}


_plain_text = st.text(alphabet=st.characters(blacklist_characters="{}"), max_size=10)


@settings(max_examples=100, deadline=None)
@given(case=_context_and_path(), prefix=_plain_text, suffix=_plain_text)
def test_mixed_template_inserts_strings_raw_and_the_rest_as_json(
    case: tuple[dict[str, Any], str, tuple[Any, ...], Any], prefix: str, suffix: str
) -> None:
    context, root, segments, expected = case
    text = f"{prefix}x{{{{ {format_expr(root, segments)} }}}}{suffix}"
    inserted = expected if isinstance(expected, str) else msgspec.json.encode(expected).decode()
    assert render(text, context) == f"{prefix}x{inserted}{suffix}"
