"""Predicates: every operator, type errors with paths, structure checks, and property
tests (negation, well-formed predicates pass ``check``, mutations are caught where made)."""

from __future__ import annotations

from collections import ChainMap
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom_core.predicates import (
    OPERATORS,
    PredicateError,
    check,
    evaluate,
    references,
    same,
)
from loom_core.templating import (
    Reference,
    TemplateError,
    TemplateLookupError,
    TemplateSyntaxError,
    child_path,
)

CONTEXT: dict[str, Any] = {
    "input": {"n": 3, "x": 2.5, "s": "abc", "t": True, "none": None, "tags": ["a", "b", 1]},
    "steps": ChainMap(
        {"inner": {"output": {"count": 0, "obj": {"k": 1}, "empty": [], "text": ""}}},
        {"outer": {"output": {"status": "ok", "n": 3.0}}},
    ),
    "item": {"name": "Ada"},
    "iteration": 2,
}


def ev(predicate: Any) -> bool:
    return evaluate(predicate, CONTEXT, "$.p")


# --------------------------------------------------------------------------- operators


@pytest.mark.parametrize(
    ("predicate", "expected"),
    [
        ({"eq": ["{{ input.n }}", 3]}, True),
        ({"eq": ["{{ input.n }}", 3.0]}, True),  # numbers by value
        ({"eq": ["{{ steps.outer.output.n }}", "{{ input.n }}"]}, True),
        ({"eq": ["{{ input.n }}", "3"]}, False),  # a string is not a number
        ({"eq": ["{{ input.t }}", 1]}, False),  # true is not 1
        ({"eq": ["{{ input.t }}", True]}, True),
        ({"eq": ["{{ input.none }}", None]}, True),
        ({"eq": ["{{ input.tags }}", ["a", "b", 1.0]]}, True),
        ({"eq": ["{{ input.tags }}", ["a", "b", True]]}, False),
        ({"eq": ["{{ steps.inner.output.obj }}", {"k": 1}]}, True),
        ({"eq": ["{{ steps.inner.output.obj }}", {"k": 1, "j": 2}]}, False),
        ({"eq": ["n={{ input.n }}", "n=3"]}, True),  # mixed text renders to a string
        ({"ne": ["{{ steps.outer.output.status }}", "ok"]}, False),
        ({"ne": ["{{ item.name }}", "Bo"]}, True),
        ({"gt": ["{{ input.n }}", 2]}, True),
        ({"gt": ["{{ input.n }}", 3]}, False),
        ({"gte": ["{{ input.n }}", 3]}, True),
        ({"lt": ["{{ input.x }}", 3]}, True),
        ({"lte": ["{{ iteration }}", 1]}, False),
        ({"gt": ["b", "{{ input.s }}"]}, True),  # strings compare lexicographically
        ({"lt": ["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"]}, True),
        ({"in": ["b", "{{ input.tags }}"]}, True),
        ({"in": [1.0, "{{ input.tags }}"]}, True),
        ({"in": [True, "{{ input.tags }}"]}, False),
        ({"in": ["bc", "{{ input.s }}"]}, True),  # substring
        ({"in": ["k", "{{ steps.inner.output.obj }}"]}, True),  # object keys
        ({"in": ["v", "{{ steps.inner.output.obj }}"]}, False),
        ({"contains": ["{{ input.tags }}", "a"]}, True),
        ({"contains": ["{{ input.s }}", "z"]}, False),
        ({"contains": [{"a": 1}, "a"]}, True),
        ({"empty": "{{ steps.inner.output.empty }}"}, True),
        ({"empty": "{{ steps.inner.output.text }}"}, True),
        ({"empty": "{{ input.none }}"}, True),
        ({"empty": {}}, True),
        ({"empty": "{{ steps.inner.output.count }}"}, False),  # 0 is a value
        ({"empty": "{{ input.tags }}"}, False),
        ({"empty": False}, False),
        ({"exists": "{{ steps.outer.output.status }}"}, True),
        ({"exists": "{{ steps.inner.output.count }}"}, True),
        ({"exists": " {{ input.none }} "}, False),  # null counts as absent
        ({"exists": "{{ input.nope }}"}, False),
        ({"exists": "{{ steps.ghost.output }}"}, False),
        ({"exists": "{{ acc }}"}, False),  # not in this scope
        ({"not": {"eq": [1, 1]}}, False),
        ({"and": [{"eq": [1, 1]}, {"gt": ["{{ input.n }}", 1]}]}, True),
        ({"and": [{"eq": [1, 1]}, {"gt": ["{{ input.n }}", 5]}]}, False),
        ({"or": [{"eq": [1, 2]}, {"exists": "{{ item.name }}"}]}, True),
        ({"or": [{"eq": [1, 2]}]}, False),
    ],
)
def test_operators(predicate: dict[str, Any], expected: bool) -> None:
    assert ev(predicate) is expected


def test_and_or_short_circuit_so_exists_can_guard() -> None:
    guarded = {"and": [{"exists": "{{ input.missing }}"}, {"gt": ["{{ input.missing }}", 3]}]}
    assert ev(guarded) is False
    assert ev({"or": [{"eq": [1, 1]}, {"gt": ["{{ input.missing }}", 3]}]}) is True
    with pytest.raises(TemplateLookupError):
        ev({"or": [{"eq": [1, 2]}, {"gt": ["{{ input.missing }}", 3]}]})


def test_same_is_json_equality() -> None:
    assert same(1, 1.0) and same([1, {"a": None}], [1.0, {"a": None}])
    assert not same(True, 1) and not same(0, False) and not same(None, 0)
    assert not same("1", 1) and not same([1], [1, 2]) and not same({"a": 1}, {"b": 1})
    assert not same([], {}) and same({}, {})


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("predicate", "path", "message"),
    [
        (
            {"gt": ["{{ input.n }}", "2"]},
            "$.p.gt",
            '`gt` compares two numbers or two strings; got an integer 3 and a string "2"',
        ),
        (
            {"lte": ["{{ input.t }}", 0]},  # a boolean is not a number
            "$.p.lte",
            "`lte` compares two numbers or two strings; got a boolean true and an integer 0",
        ),
        (
            {"lt": [None, 1]},
            "$.p.lt",
            "`lt` compares two numbers or two strings; got null and an integer 1",
        ),
        (
            {"in": [1, "{{ input.s }}"]},
            "$.p.in",
            "`in` looks for a substring of a string, so the needle must be a string; got an "
            "integer 1",
        ),
        (
            {"contains": ["{{ steps.inner.output.obj }}", 1]},
            "$.p.contains",
            "`contains` looks for a key of an object, so the needle must be a string",
        ),
        (
            {"in": ["a", "{{ input.n }}"]},
            "$.p.in",
            "`in` searches an array, a string or an object's keys; the haystack is an integer 3",
        ),
        (
            {"and": [{"eq": [1, 1]}, {"not": {"gte": [{"a": 1}, 1]}}]},
            "$.p.and[1].not.gte",
            "`gte` compares two numbers or two strings; got an object",
        ),
    ],
)
def test_type_errors_raise_with_the_path(predicate: Any, path: str, message: str) -> None:
    with pytest.raises(PredicateError) as caught:
        ev(predicate)
    error = caught.value
    assert (error.code, error.path) == ("invalid_predicate", path)
    assert error.message.startswith(message)
    assert str(error) == f"{error.message} (at {path})"


def test_a_missing_value_outside_exists_is_a_lookup_error_at_the_operand() -> None:
    with pytest.raises(TemplateLookupError) as caught:
        ev({"not": {"eq": ["{{ steps.outer.output.statu }}", "ok"]}})
    assert caught.value.path == "$.p.not.eq[0]"
    assert "key 'statu' not found" in caught.value.message
    with pytest.raises(TemplateLookupError) as caught:
        ev({"empty": ["{{ input.nope }}"]})
    assert caught.value.path == "$.p.empty[0]"


def test_a_malformed_template_is_a_syntax_error() -> None:
    with pytest.raises(TemplateSyntaxError):
        ev({"eq": ["{{ input.n", 1]})
    with pytest.raises(TemplateSyntaxError):
        ev({"exists": "{{ input.n"})
    assert check({"exists": "{{ input.n"}) == []  # syntax is validation's invalid_template


def test_evaluating_a_malformed_predicate_raises_even_where_it_would_short_circuit() -> None:
    with pytest.raises(PredicateError) as caught:
        ev({"or": [{"eq": [1, 1]}, {"eq": [1]}]})
    assert caught.value.path == "$.p.or[1].eq"
    assert not isinstance(caught.value, TemplateError)


# --------------------------------------------------------------------------- check


@pytest.mark.parametrize(
    ("predicate", "path", "message"),
    [
        ([{"eq": [1, 1]}], "$.c", "a predicate is an object with one operator"),
        ({}, "$.c", "a predicate has exactly one operator key, got 0 []"),
        (
            {"eq": [1, 1], "ne": [1, 2]},
            "$.c",
            "a predicate has exactly one operator key, got 2 ['eq', 'ne']; combine several",
        ),
        ({"equals": [1, 1]}, "$.c", "unknown predicate operator 'equals'; did you mean 'eq'?"),
        ({"eq": [1]}, "$.c.eq", "`eq` takes a list of exactly 2 operands [a, b]"),
        ({"gt": [1, 2, 3]}, "$.c.gt", "`gt` takes a list of exactly 2 operands"),
        ({"in": "abc"}, "$.c.in", "`in` takes a list of exactly 2 operands [needle, haystack]"),
        ({"contains": None}, "$.c.contains", "`contains` takes a list of exactly 2 operands"),
        ({"and": []}, "$.c.and", "`and` takes a non-empty list of predicates"),
        ({"or": {"eq": [1, 1]}}, "$.c.or", "`or` takes a non-empty list of predicates"),
        ({"not": [{"eq": [1, 1]}]}, "$.c.not", "a predicate is an object with one operator"),
        ({"exists": "input.n"}, "$.c.exists", "`exists` takes one string that is exactly one"),
        ({"exists": "a {{ input.n }}"}, "$.c.exists", "`exists` takes one string"),
        ({"exists": ["{{ input.n }}"]}, "$.c.exists", "`exists` takes one string"),
        ({"and": [{"eq": [1, 1]}, {"not": {"nope": 1}}]}, "$.c.and[1].not", "unknown predicate"),
    ],
)
def test_check_reports_structure_at_the_path(predicate: Any, path: str, message: str) -> None:
    [issue] = check(predicate, "$.c")
    assert (issue.code, issue.path) == ("invalid_predicate", path)
    assert issue.message.startswith(message)
    with pytest.raises(PredicateError) as caught:
        evaluate(predicate, CONTEXT, "$.c")
    assert caught.value.path == path


def test_check_reports_every_problem_in_document_order() -> None:
    predicate = {"or": [{"eq": [1]}, {"ok": 1}, {"not": {"and": []}}, {"empty": None}]}
    assert [i.path for i in check(predicate, "$.x")] == [
        "$.x.or[0].eq",
        "$.x.or[1]",
        "$.x.or[2].not.and",
    ]


def test_check_accepts_every_operator() -> None:
    examples = {
        "eq": [1, 2],
        "ne": [1, 2],
        "gt": [1, 2],
        "gte": [1, 2],
        "lt": [1, 2],
        "lte": [1, 2],
        "and": [{"eq": [1, 1]}],
        "or": [{"eq": [1, 1]}],
        "not": {"eq": [1, 1]},
        "exists": "{{ input.n }}",
        "in": [1, [1]],
        "contains": [[1], 1],
        "empty": None,
    }
    assert sorted(examples) == sorted(OPERATORS)
    for op, arg in examples.items():
        assert check({op: arg}) == []


def test_references_in_operands_with_paths() -> None:
    predicate = {
        "and": [
            {"exists": "{{ steps.a.output }}"},
            {"in": ["{{ item }}", ["x", "{{ input.list[0] }}"]]},
            {"eq": ["{{ broken", 1]},
        ]
    }
    assert references(predicate, "$.cond") == [
        Reference("steps.a.output", "steps", ("a", "output"), "$.cond.and[0].exists"),
        Reference("item", "item", (), "$.cond.and[1].in[0]"),
        Reference("input.list[0]", "input", ("list", 0), "$.cond.and[1].in[1][1]"),
    ]


# --------------------------------------------------------------------------- properties

_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(-3, 3, allow_nan=False),
    st.sampled_from(["", "a", "ab", "b"]),
    st.lists(st.sampled_from([1, "a", None]), max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 2), max_size=2),
)
# Typed slots, so most generated comparisons are well typed (and so evaluate), plus
# ``any`` slots holding a value of any type (and so sometimes raising).
_KINDS = {
    "num": st.integers(-3, 3) | st.floats(-3, 3, allow_nan=False),
    "text": st.sampled_from(["", "a", "ab", "b"]),
    "list": st.lists(st.sampled_from([1, "a", None]), max_size=3),
    "any": _VALUES,
}


@st.composite
def _contexts(draw: st.DrawFn) -> dict[str, Any]:
    values = {f"{kind}{i}": draw(strategy) for kind, strategy in _KINDS.items() for i in (0, 1)}
    return {"input": values, "steps": ChainMap({"s": {"output": dict(values)}}, {})}


def _operand(kind: str) -> st.SearchStrategy[Any]:
    names = [f"{kind}{i}" for i in (0, 1)]
    sources = [f"{{{{ input.{n} }}}}" for n in names] + [
        f"{{{{ steps.s.output.{n} }}}}" for n in names
    ]
    return _KINDS[kind] | st.sampled_from(sources)


_operands = st.sampled_from(sorted(_KINDS)).flatmap(_operand)
_SOURCES = [f"{{{{ input.{k}0 }}}}" for k in _KINDS]


def _leaf(op: str) -> st.SearchStrategy[dict[str, Any]]:
    if op == "exists":
        return st.sampled_from([*_SOURCES, "{{ input.missing }}"]).map(lambda s: {op: s})
    if op == "empty":
        return _operands.map(lambda v: {op: v})
    if op in ("gt", "gte", "lt", "lte"):
        kind = st.sampled_from(["num", "num", "text", "any"])
        pair = kind.flatmap(lambda k: st.tuples(_operand(k), _operand(k)))
    elif op in ("in", "contains"):
        pair = st.tuples(_operands, st.sampled_from(["list", "text"]).flatmap(_operand))
        if op == "contains":
            pair = pair.map(lambda p: (p[1], p[0]))
    else:
        pair = st.tuples(_operands, _operands)
    return pair.map(lambda p: {op: list(p)})


_leaves = st.sampled_from([o for o in OPERATORS if o not in ("and", "or", "not")]).flatmap(_leaf)
_predicates = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        inner.map(lambda p: {"not": p}),
        st.lists(inner, min_size=1, max_size=3).map(lambda ps: {"and": ps}),
        st.lists(inner, min_size=1, max_size=3).map(lambda ps: {"or": ps}),
    ),
    max_leaves=8,
)


def _outcome(predicate: Any, context: dict[str, Any]) -> bool | type[Exception]:
    try:
        return evaluate(predicate, context)
    except (PredicateError, TemplateError) as error:
        return type(error)


@settings(max_examples=100, deadline=None)
@given(predicate=_predicates, context=_contexts())
def test_not_negates_and_well_formed_predicates_pass_check(
    predicate: dict[str, Any], context: dict[str, Any]
) -> None:
    assert check(predicate) == []
    result = _outcome(predicate, context)
    negated = _outcome({"not": predicate}, context)
    if isinstance(result, bool):
        assert negated is (not result)
    else:
        assert negated is result  # the same error, raised from the same place


def _nodes(predicate: Any, trail: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Trails (key paths) of every predicate node of a well-formed predicate."""
    [(op, arg)] = predicate.items()
    found = [trail]
    if op in ("and", "or"):
        for i, sub in enumerate(arg):
            found += _nodes(sub, (*trail, op, i))
    elif op == "not":
        found += _nodes(arg, (*trail, op))
    return found


def _replace(value: Any, trail: tuple[Any, ...], new: Any) -> Any:
    if not trail:
        return new
    head, rest = trail[0], trail[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replace(copy[head], rest, new)
    return copy


def _format(trail: tuple[Any, ...], path: str = "$.c") -> str:
    for key in trail:
        path = child_path(path, key)
    return path


# Each mutation: the broken node, and where the issue is (relative to the node).
_MUTATIONS: list[tuple[Any, tuple[str, ...]]] = [
    (42, ()),
    ({"eq": [1, 1], "or": []}, ()),
    ({"eqq": [1, 1]}, ()),
    ({"eq": [1]}, ("eq",)),
    ({"lt": "{{ input.v0 }}"}, ("lt",)),
    ({"and": []}, ("and",)),
    ({"or": {"eq": [1, 1]}}, ("or",)),
    ({"not": [{"eq": [1, 1]}]}, ("not",)),
    ({"not": {"nope": None}}, ("not",)),
    ({"exists": "input.v0"}, ("exists",)),
    ({"contains": [1, 2, 3]}, ("contains",)),
]


@settings(max_examples=100, deadline=None)
@given(predicate=_predicates, data=st.data())
def test_a_mutated_node_is_reported_at_its_path(predicate: Any, data: st.DataObject) -> None:
    trail = data.draw(st.sampled_from(_nodes(predicate)))
    broken, where = data.draw(st.sampled_from(_MUTATIONS))
    mutated = _replace(predicate, trail, broken)
    issues = check(mutated, "$.c")
    assert [(i.code, i.path) for i in issues] == [("invalid_predicate", _format(trail + where))]
    with pytest.raises(PredicateError) as caught:  # even where short-circuiting skips it
        evaluate(mutated, {}, "$.c")
    assert caught.value.path == issues[0].path
