"""The one checker of JSON values against JSON Schema (``loom_core.schemas``) and the one
namer of JSON values (``loom_core.json_types``), issue 16: every problem names the field
(its JSON path), what was expected and what came."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom_core import json_types
from loom_core.schemas import MAX_PROBLEMS, expected, problems, schema_problem


def templated(text: str) -> bool:
    return "{{" in text


FORM = {
    "type": "object",
    "properties": {
        "approved": {"type": "boolean"},
        "note": {"type": "string", "minLength": 2, "maxLength": 5, "pattern": "^[a-z]+$"},
        "mode": {"enum": ["fast", "slow"]},
        "kind": {"const": "form"},
        "amount": {"type": "number", "minimum": 0, "exclusiveMaximum": 100, "multipleOf": 5},
        "when": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
        "ids": {"type": "array", "uniqueItems": True},
    },
    "required": ["approved", "mode"],
    "additionalProperties": False,
}


# ----------------------------------------------------------------------------- wording


@pytest.mark.parametrize(
    ("value", "path", "message"),
    [
        ({"approved": "yes"}, "$.approved", 'expected a boolean, got a string "yes"'),
        ({}, "$.approved", "missing required field 'approved' (a boolean); add it"),
        ({"aproved": 1}, "$.aproved", "unknown field 'aproved'; did you mean 'approved'? "
         "accepted fields: amount, approved, ids, kind, mode, note, tags, when"),
        ({"mode": "fsat"}, "$.mode", 'expected one of "fast", "slow", got "fsat"'),
        ({"kind": "other"}, "$.kind", 'expected "form", got "other"'),
        ({"note": "a"}, "$.note", "must be at least 2 characters long, got 1"),
        ({"note": "abcdef"}, "$.note", "must be at most 5 characters long, got 6"),
        ({"note": "AB"}, "$.note", "must match the pattern '^[a-z]+$', got \"AB\""),
        ({"amount": -5}, "$.amount", "must be >= 0, got -5"),
        ({"amount": 100}, "$.amount", "must be < 100, got 100"),
        ({"amount": 7}, "$.amount", "must be a multiple of 5, got 7"),
        ({"when": "soon"}, "$.when", 'expected a number or null, got a string "soon"'),
        ({"tags": []}, "$.tags", "needs at least 1 items, got 0"),
        ({"tags": ["a", "b", "c"]}, "$.tags", "takes at most 2 items, got 3"),
        ({"tags": ["a", 2]}, "$.tags[1]", "expected a string, got an integer 2"),
        ({"ids": [1, 1]}, "$.ids", "the items must be unique"),
    ],
)  # fmt: skip
def test_each_problem_names_the_field_what_was_expected_and_what_came(
    value: dict[str, Any], path: str, message: str
) -> None:
    base = {"approved": True, "mode": "fast"}
    found = problems(FORM, {**base, **value} if path != "$.approved" else value)
    assert (path, message) in found, found


def test_the_path_starts_where_the_caller_says() -> None:
    assert problems(FORM, {"approved": 1, "mode": "fast"}, "$.data") == [
        ("$.data.approved", "expected a boolean, got an integer 1")
    ]
    assert problems({"required": ["a b"]}, {}, "$.d") == [
        ('$.d["a b"]', "missing required field 'a b' (any value); add it")
    ]


def test_every_problem_at_once_in_document_order() -> None:
    value = {"zz": 1, "approved": "no", "tags": [1, 2]}
    assert [p for p, _ in problems(FORM, value)] == [
        "$.mode",  # the object's missing fields first, then its fields as they stand
        "$.zz",
        "$.approved",
        "$.tags[0]",
        "$.tags[1]",
    ]


def test_schema_false_and_true_and_empty() -> None:
    assert problems(False, 1) == [("$", "no value is allowed here")]
    assert problems(True, 1) == problems({}, {"any": ["thing"]}) == []


def test_a_keyword_without_own_wording_keeps_jsonschemas_words() -> None:
    [(path, message)] = problems({"type": "object", "dependentRequired": {"a": ["b"]}}, {"a": 1})
    assert path == "$" and "'b' is a dependency of 'a'" in message


def test_json_typing_not_pythons() -> None:
    assert problems({"type": "integer"}, 3.0) == []  # draft 2020-12: 3.0 is an integer
    assert problems({"type": "integer"}, True) == [("$", "expected an integer, got a boolean true")]
    assert problems({"type": "number"}, False) == [("$", "expected a number, got a boolean false")]


# ----------------------------------------------------------------------------- unions

UNION = {
    "$defs": {
        "A": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
              "additionalProperties": False},
        "B": {"type": "object", "properties": {"y": {"type": "string"}}, "required": ["y"],
              "additionalProperties": False},
    },
    "anyOf": [{"$ref": "#/$defs/A"}, {"type": "array"}, {"type": "null"}],
}  # fmt: skip


def test_a_union_with_one_alternative_of_the_values_type_reports_inside_it() -> None:
    assert problems(UNION, {"x": "1"}) == [("$.x", 'expected an integer, got a string "1"')]


def test_a_union_no_alternative_of_which_has_the_type() -> None:
    assert problems(UNION, "s") == [
        ("$", 'expected an object or an array or null, got a string "s"')
    ]


def test_a_union_of_several_objects_names_the_closest() -> None:
    schema = {"$defs": UNION["$defs"], "anyOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}]}
    [(path, message)] = problems(schema, {"x": "1"}, "$.data")
    assert path == "$.data"
    assert message == (
        "fits none of the 2 alternatives (an object); the closest fails at $.data.x: "
        'expected an integer, got a string "1"'
    )


def test_one_of_that_fits_twice() -> None:
    schema = {"oneOf": [{"type": "integer"}, {"type": "number"}]}
    assert problems(schema, 3) == [
        ("$", "fits more than one of the 2 alternatives; it must fit exactly one")
    ]


# ----------------------------------------------------------------------------- templates


def test_templates_hide_what_they_could_change_and_nothing_else() -> None:
    value = {
        "approved": "{{ input.ok }}",  # type: known once rendered
        "note": "{{ input.note }}",  # pattern, length
        "mode": "{{ input.mode }}",  # enum
        "when": "{{ input.when }}",  # union
        "tags": ["{{ input.tag }}", 3],  # an array holding a template: 3 is still wrong
        "zz": 1,  # unknown: no template changes that
    }
    assert problems(FORM, value, templated=templated) == [
        ("$.tags[1]", "expected a string, got an integer 3"),
        ("$.zz", "unknown field 'zz'; accepted fields: amount, approved, ids, kind, mode, "
         "note, tags, when"),
    ]  # fmt: skip
    assert problems(FORM, {"note": "{{ x }}"}, templated=templated) == [
        ("$.approved", "missing required field 'approved' (a boolean); add it"),
        ("$.mode", 'missing required field \'mode\' (one of "fast", "slow"); add it'),
    ]


def test_an_object_holding_a_template_is_still_an_object() -> None:
    assert problems({"type": "string"}, {"a": "{{ x }}"}, templated=templated) == [
        ("$", 'expected a string, got an object {"a":"{{ x }}"}')
    ]


def test_a_union_over_a_value_holding_a_template_is_not_judged() -> None:
    schema = {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "array",
              "items": {"type": "boolean"}}]}  # fmt: skip
    assert problems(schema, ["{{ n }}"], templated=templated) == []
    assert problems(schema, ["{{ n }}"]) != []


# ----------------------------------------------------------------------------- schemas


def test_a_reference_outside_the_schema_is_a_problem_never_a_download() -> None:
    remote = {"$ref": "http://169.254.169.254/latest/meta-data"}
    assert schema_problem(remote) == (
        "the schema refers to 'http://169.254.169.254/latest/meta-data' outside itself; "
        "use #/$defs/..."
    )
    assert problems(remote, 1) == [("$", schema_problem(remote))]


def test_a_reference_to_nothing_and_an_invalid_schema() -> None:
    missing = {"properties": {"a": {"$ref": "#/$defs/Nope"}}}
    assert (
        schema_problem(missing) == "the schema refers to '#/$defs/Nope', which it does not define"
    )
    assert problems(missing, {"a": 1}, "$.data") == [("$.data", schema_problem(missing))]
    bad = {"type": "strin"}
    message = schema_problem(bad)
    assert message is not None and message.startswith(
        "the schema itself is not valid JSON Schema at ['type']"
    )
    assert problems(bad, "x") == [("$", message)]  # a broken schema accepts nothing
    assert schema_problem({"type": "object", "properties": {"a": {"$ref": "#"}}}) is None
    assert schema_problem(UNION) is None


def test_expected_says_what_a_schema_accepts() -> None:
    defs = UNION["$defs"]
    assert expected({"$ref": "#/$defs/A"}, defs) == "an object"
    assert expected({"type": ["string", "null"]}, {}) == "null or a string"
    assert expected({"enum": [1, "a"]}, {}) == 'one of 1, "a"'
    assert expected({}, {}) == "any value"


def test_problems_are_bounded() -> None:
    found = problems({"type": "array", "items": {"type": "string"}}, list(range(500)))
    assert len(found) == MAX_PROBLEMS
    assert found[0] == ("$[0]", "expected a string, got an integer 0")


def test_jsonschema_is_imported_only_when_a_value_is_checked() -> None:
    code = "import sys, loom_core.validation; print('jsonschema' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- properties

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)  # fmt: skip
SCHEMAS = st.recursive(
    st.sampled_from([
        {}, {"type": "string"}, {"type": "integer"}, {"type": "number", "minimum": 0},
        {"type": "boolean"}, {"type": "null"}, {"enum": [1, "a", None]}, {"const": True},
        {"type": "string", "maxLength": 2},
    ]),
    lambda inner: st.one_of(
        st.builds(lambda i: {"type": "array", "items": i}, inner),
        st.builds(lambda p, r: {"type": "object", "properties": p, "required": r,
                                "additionalProperties": False},
                  st.dictionaries(st.sampled_from("abc"), inner, max_size=3),
                  st.lists(st.sampled_from("abc"), max_size=2, unique=True)),
        st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner),
    ),
    max_leaves=6,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(SCHEMAS, JSON_VALUES)
def test_any_schema_and_value_give_problems_with_paths_never_an_exception(
    schema: dict[str, Any], value: Any
) -> None:
    found = problems(schema, value, "$.v")
    assert found == problems(schema, value, "$.v")  # deterministic
    for path, message in found:
        assert path.startswith("$.v") and message
    assert problems(schema, value, "$.v", templated=templated) == [
        p for p in found if p in problems(schema, value, "$.v", templated=templated)
    ]


@given(JSON_VALUES)
def test_a_value_fits_its_own_type(value: Any) -> None:
    assert problems({"type": json_types.json_type(value)}, value) == []
    assert problems({}, value) == []


# ----------------------------------------------------------------------------- the namer


@pytest.mark.parametrize(
    ("value", "json_type", "kind", "described"),
    [
        (None, "null", "null", "null"),
        (True, "boolean", "a boolean", "a boolean true"),
        (3, "integer", "an integer", "an integer 3"),
        (3.5, "number", "a number", "a number 3.5"),
        ("x", "string", "a string", 'a string "x"'),
        ([1], "array", "an array of 1 item", "an array of 1 item [1]"),
        ([1, 2], "array", "an array of 2 items", "an array of 2 items [1,2]"),
        ({"b": 1, "a": 2}, "object", "an object", 'an object {"b":1,"a":2}'),
    ],
)
def test_one_namer_one_wording(value: Any, json_type: str, kind: str, described: str) -> None:
    assert json_types.json_type(value) == json_type
    assert json_types.kind(value) == kind
    assert json_types.describe(value) == described


def test_the_namer_details() -> None:
    assert json_types.kind({"b": 1, "a": 2}, keys=True) == "an object with keys ['a', 'b']"
    assert json_types.preview("x" * 100, 10) == '"xxxxxxxx…'
    assert json_types.a_type("array") == "an array" and json_types.a_type("null") == "null"
    assert json_types.did_you_mean("txet", ["text", "tags"]) == "did you mean 'text'? "
    assert json_types.did_you_mean("zzz", ["text"]) == ""


# ----------------------------------------------------------------------------- in plans


def test_a_plan_carrying_a_broken_schema_is_refused_by_the_planners_check() -> None:
    from loom_core.contracts import AgentStep, ApprovalStep, Plan
    from loom_core.validation import validate_plan

    plan = Plan(steps=[
        ApprovalStep(id="ok", label="manager", schema={"type": "strin"}),
        AgentStep(id="think", instructions="answer",
                  output_schema={"$ref": "https://example.com/schema.json"}),
        ApprovalStep(id="fine", label="boss", schema={"type": "object"}),
    ])  # fmt: skip
    issues = validate_plan(plan, tools={})
    assert [(i.code, i.path) for i in issues] == [
        ("invalid_step", "$.plan.steps[0].schema"),
        ("invalid_step", "$.plan.steps[1].output_schema"),
    ]
    assert issues[0].message.startswith(
        "approval step 'ok': `schema` cannot check anything: the schema itself is not valid"
    )
    assert "outside itself" in issues[1].message
    # the executor's re-check (no catalog) leaves it to the planner: recorded runs replay
    assert validate_plan(plan) == []


def test_listed_puts_problems_on_one_line() -> None:
    from loom_core.schemas import listed

    found = [("$.a", "x"), ("$.b", "y"), ("$.c", "z")]
    assert listed(found) == "$.a: x; $.b: y; $.c: z"
    assert listed(found, limit=1) == "$.a: x; and 2 more"


# ----------------------------------------------------------------------------- replay


def test_a_history_worded_by_the_old_checker_still_replays() -> None:
    # agent-hostile was recorded when an agent's invalid answer was refused with the
    # subset's words ("expected number, got string") and told back to the model in
    # those words; today's checker words it otherwise. Replay folds the recorded
    # refusal (same decision, other prose), so the next model request still matches.
    from pathlib import Path

    import msgspec

    from loom_core.contracts import EventRecord, ModelOutputRefused
    from loom_core.replay import replay

    path = Path(__file__).resolve().parents[1] / "golden" / "agent-hostile.jsonl"
    decoder = msgspec.json.Decoder(EventRecord)
    records = [decoder.decode(line) for line in path.read_text().splitlines() if line]
    refused = [
        r.event for r in records
        if isinstance(r.event, ModelOutputRefused) and r.event.error.code == "invalid_model_output"
    ]  # fmt: skip
    assert refused[0].error.details["problems"] == [["$.total", "expected number, got string"]]
    assert problems({"type": "number"}, "many", "$.total") != [
        ("$.total", "expected number, got string")
    ]
    report, _ = replay(records)
    assert report.identical, report.divergence
