"""``loom_core.limits.check_json``: iterative, so no input can make it recurse; finds
the first offending path in document order; names the limit and the setting."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom_core.limits import (
    DEFAULT_MAX_DEPTH,
    MAX_BYTES_SETTING,
    MAX_DEPTH_SETTING,
    check_json,
    depth_limit,
    json_path,
    too_deep,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["a", "b c", "_x", "1", "é", ""]), inner, max_size=3),
    max_leaves=25,
)  # fmt: skip


# reference implementations: recursive, fine on the small values hypothesis draws


def ref_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((ref_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((ref_depth(v) for v in value), default=0)
    return 0


def ref_first_too_deep(value: Any, limit: int, keys: tuple[Any, ...] = (), depth: int = 0) -> Any:
    """Keys of the first container (document order) deeper than ``limit``, else None."""
    if not isinstance(value, dict | list):
        return None
    if depth + 1 > limit:
        return keys
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        found = ref_first_too_deep(child, limit, (*keys, key), depth + 1)
        if found is not None:
            return found
    return None


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_dicts(depth: int, key: str = "a") -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {key: value}
    return value


# ----------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(0, 8))
def test_depth_verdict_and_first_path_match_the_reference(value: Any, limit: int) -> None:
    error = check_json(value, max_depth=limit)
    if ref_depth(value) <= limit:
        assert error is None
    else:
        assert error is not None and error.code == "too_deep"
        assert error.path == json_path("$", ref_first_too_deep(value, limit))
        assert error.details == {"limit": limit, "setting": MAX_DEPTH_SETTING}
        assert str(limit) in error.message and MAX_DEPTH_SETTING in error.message


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_size_is_exactly_the_compact_json_encoding(value: Any) -> None:
    size = len(msgspec.json.encode(value))
    assert check_json(value, max_depth=100, max_bytes=size) is None
    error = check_json(value, max_depth=100, max_bytes=size - 1, path="$.input")
    assert error is not None and error.code == "input_too_large"
    assert error.path == "$.input"
    assert error.details["limit"] == size - 1 and error.details["size"] > size - 1
    assert error.details["setting"] == MAX_BYTES_SETTING


# ----------------------------------------------------------------------- deep values


@pytest.mark.parametrize("build", [nested_lists, nested_dicts], ids=["lists", "objects"])
def test_a_value_100k_levels_deep_is_a_typed_error_not_a_recursion_error(build: Any) -> None:
    deep = build(100_000)
    with pytest.raises(RecursionError):
        msgspec.json.encode(deep)  # what the rest of the pipeline does with it
    error = check_json(deep, path="$.input")
    assert error is not None and error.code == "too_deep"
    step = "[0]" if build is nested_lists else ".a"
    assert error.path == "$.input" + step * DEFAULT_MAX_DEPTH
    assert f"deeper than {DEFAULT_MAX_DEPTH} levels" in error.message


def test_the_limit_is_inclusive() -> None:
    assert check_json(nested_lists(64), max_depth=64) is None
    assert check_json(nested_lists(65), max_depth=64) is not None
    assert check_json("scalar", max_depth=0) is None
    assert check_json([], max_depth=0) is not None


def test_paths_name_keys_json_path_style() -> None:
    value = {"ok": 1, "a b": [{"x": [[[]]]}]}
    error = check_json(value, max_depth=4)
    assert error is not None and error.path == '$["a b"][0].x[0]'


def test_a_huge_flat_value_stops_at_the_limit() -> None:
    error = check_json(["x" * 100] * 1_000_000, max_bytes=1000)
    assert error is not None and error.code == "input_too_large"
    assert error.details["size"] < 1200  # stopped there, did not count a megabyte


def test_what_json_cannot_carry_is_named() -> None:
    error = check_json({"a": [1, object()]})
    assert error is not None and error.code == "not_json" and error.path == "$.a[1]"


def test_depth_limit_setting() -> None:
    assert depth_limit({}) == DEFAULT_MAX_DEPTH
    assert depth_limit({MAX_DEPTH_SETTING: " 100 "}) == 100
    for bad in ("0", "201", "deep"):
        with pytest.raises(ValueError, match=MAX_DEPTH_SETTING):
            depth_limit({MAX_DEPTH_SETTING: bad})


def test_the_submit_check_the_executor_is_to_make() -> None:
    # A run request whose input nests 500 deep decodes fine (so it used to pass submit
    # and strand the run in the recursive render); checked right after decoding, it is
    # refused with the path. Past ~1,000 levels the decoder itself gives up.
    body = b'{"plan": {"steps": []}, "input": {"x": ' + b"[" * 500 + b"]" * 500 + b"}}"
    error = check_json(msgspec.json.decode(body), max_depth=DEFAULT_MAX_DEPTH)
    assert error is not None and error.code == "too_deep"
    assert error.path == "$.input.x" + "[0]" * (DEFAULT_MAX_DEPTH - 2)
    deeper = b'{"input": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    with pytest.raises(RecursionError):
        msgspec.json.decode(deeper)
    assert too_deep("$", max_depth=64).code == "too_deep"
    assert too_deep("$", max_depth=64).details == {"limit": 64, "setting": MAX_DEPTH_SETTING}


# anything a caller may pass: JSON, and what is not (sets, objects, tuples, subclasses,
# a lone surrogate, keys that are not strings)
class _Text(str):
    pass


_any_leaf = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
    | st.sampled_from(["\ud800", "é", _Text("sub"), object(), {1, 2}, b"x", 10**30])
)  # fmt: skip
_any_values = st.recursive(
    _any_leaf,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(
            st.sampled_from(["a", "é", "\ud800", 1, None, (1,), _Text("k")]), inner, max_size=3
        )
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(value=_any_values | json_values, limit=st.integers(0, 5))
def test_the_quick_look_says_what_the_walk_says(value: Any, limit: int) -> None:
    # with a byte limit no value here reaches, the walk runs in full (issue 10, startcost:
    # without one, a quick level-by-level look answers for the usual document)
    assert _outcome(value, limit, None) == _outcome(value, limit, 2**62)


def _outcome(value: Any, limit: int, max_bytes: int | None) -> Any:
    try:
        return check_json(value, max_depth=limit, max_bytes=max_bytes)
    except Exception as exc:  # (a key with a lone surrogate: both ways alike)
        return repr(exc)
