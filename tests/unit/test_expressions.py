"""The condition grammar of plan-execute plans (``loom_core.expressions``): text parsed
into native predicates, never evaluated; hostile text gets a typed error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom_core import expressions
from loom_core.expressions import ExpressionError, Path, parse_condition
from loom_core.predicates import evaluate
from loom_core.templating import format_expr


def as_step(path: Path, _pos: int) -> str:
    head, *rest = path
    return format_expr("steps", [str(head), "output", *rest])


def parse(text: str) -> dict:
    return parse_condition(text, as_step)


@pytest.mark.parametrize(
    ("text", "predicate"),
    [
        ("${sentiment.score} > 0.5", {"gt": ["{{ steps.sentiment.output.score }}", 0.5]}),
        ("{{a}} == 'x'", {"eq": ["{{ steps.a.output }}", "x"]}),
        ("a.b != null", {"ne": ["{{ steps.a.output.b }}", None]}),
        ("a >= 1 && b <= 2", {"and": [{"gte": ["{{ steps.a.output }}", 1]},
                                      {"lte": ["{{ steps.b.output }}", 2]}]}),
        ("a < 1 or not (b == true)", {"or": [{"lt": ["{{ steps.a.output }}", 1]},
                                             {"not": {"eq": ["{{ steps.b.output }}", True]}}]}),
        ("x in ['a', \"b\"]", {"in": ["{{ steps.x.output }}", ["a", "b"]]}),
        ("x not in [1, 2]", {"not": {"in": ["{{ steps.x.output }}", [1, 2]]}}),
        ("x contains 'y'", {"contains": ["{{ steps.x.output }}", "y"]}),
        ("exists(${x.y}) and !empty(x)", {"and": [{"exists": "{{ steps.x.output.y }}"},
                                                 {"not": {"empty": "{{ steps.x.output }}"}}]}),
        ("${ok}", {"eq": ["{{ steps.ok.output }}", True]}),
        ("x.items[0]['a b'] > -1.5e1", {"gt": ['{{ steps.x.output.items[0]["a b"] }}', -15.0]}),
    ],
)  # fmt: skip
def test_conditions_become_native_predicates(text: str, predicate: dict) -> None:
    assert parse(text) == predicate


def test_and_binds_tighter_than_or() -> None:
    assert parse("a == 1 or b == 2 and c == 3") == {
        "or": [
            {"eq": ["{{ steps.a.output }}", 1]},
            {"and": [{"eq": ["{{ steps.b.output }}", 2]}, {"eq": ["{{ steps.c.output }}", 3]}]},
        ]
    }


def test_a_converted_condition_evaluates_as_written() -> None:
    pred = parse("${s.score} > 0.5 and ${s.lang} in ['en', 'pt']")
    assert evaluate(pred, {"steps": {"s": {"output": {"score": 0.75, "lang": "pt"}}}})
    assert not evaluate(pred, {"steps": {"s": {"output": {"score": 0.25, "lang": "pt"}}}})


@pytest.mark.parametrize(
    ("text", "where"),
    [("a >", 3), ("(a > 1", 6), ("a > 1 b", 6), ("a ? b", 2), ("", 0), ("'x' > ", 6),
     ("a == (b > 1)", 0), ("exists('x')", 0), ("${}", 0)],
)  # fmt: skip
def test_malformed_conditions_are_typed_errors_with_a_position(text: str, where: int) -> None:
    with pytest.raises(ExpressionError) as caught:
        parse(text)
    assert caught.value.code == "invalid_expression"
    assert caught.value.position == where


def test_nothing_is_evaluated() -> None:
    # text that would do something if it were evaluated is only ever a path or an error
    for text in ("__import__('os').system('true')", "exec('1')", "a.__class__ > 1"):
        try:
            result = parse(text)
        except ExpressionError as exc:
            assert exc.code == "invalid_expression"
        else:
            assert "{{ steps." in str(result)


@pytest.mark.parametrize("depth", [expressions.MAX_DEPTH + 1, 1000, 100_000])
def test_deep_nesting_is_a_typed_error_not_a_recursion_error(depth: int) -> None:
    for text in ("(" * depth + "a > 1" + ")" * depth, "not " * depth + "a",
                 "a in " + "[" * depth + "]" * depth):  # fmt: skip
        with pytest.raises(ExpressionError) as caught:
            parse(text)
        assert caught.value.code in ("expression_too_deep", "expression_too_long")


def test_huge_expressions_are_typed_errors() -> None:
    with pytest.raises(ExpressionError) as caught:
        parse("a == 1 or " * 10_000 + "a == 2")
    assert caught.value.code == "expression_too_long"
    with pytest.raises(ExpressionError) as caught:
        parse(" or ".join(["a==1"] * 300))  # under the length limit, over the token limit
    assert caught.value.code == "expression_too_long"


def test_the_resolver_decides_what_a_name_means() -> None:
    def strict(path: Path, pos: int) -> str:
        raise ExpressionError("unknown_variable", f"no {path[0]!r}", pos)

    with pytest.raises(ExpressionError) as caught:
        parse_condition("x > 1 and nope == 2", lambda p, pos: strict(p, pos) if p[0] == "nope"
                        else "input.x")  # fmt: skip
    assert caught.value.code == "unknown_variable" and caught.value.position == 10


_ops = st.sampled_from(["==", "!=", ">", ">=", "<", "<="])
_names = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda n: n not in {"and", "or", "not", "in", "contains", "true", "false", "null", "none",
                        "exists", "empty"})  # fmt: skip
_values = st.one_of(st.integers(-1000, 1000), st.booleans(), st.none(),
                    st.text("abc xyz", max_size=5))  # fmt: skip


def _literal(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return "'" + v + "'"
    return str(v)


@st.composite
def conditions(draw: st.DrawFn, depth: int = 0) -> str:
    if depth > 3 or draw(st.booleans()):
        return f"${{{draw(_names)}}} {draw(_ops)} {_literal(draw(_values))}"
    left, right = draw(conditions(depth + 1)), draw(conditions(depth + 1))
    join = draw(st.sampled_from(["and", "or", "&&", "||"]))
    text = f"({left}) {join} ({right})"
    return f"not ({text})" if draw(st.booleans()) else text


@settings(max_examples=200, deadline=None)
@given(conditions())
def test_generated_conditions_parse_to_checked_predicates(text: str) -> None:
    from loom_core.predicates import check

    pred = parse(text)
    assert check(pred, "$.condition") == []


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_parses_or_fails_typed(text: str) -> None:
    try:
        parse(text)
    except ExpressionError as exc:
        assert exc.code in ("invalid_expression", "expression_too_long", "expression_too_deep")
        assert 0 <= exc.position <= len(text)
