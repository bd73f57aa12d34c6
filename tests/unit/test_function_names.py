"""Tool names as a provider accepts them (``^[a-zA-Z0-9_-]{1,64}$``): the mapping is
one to one, valid, and leaves names that already fit unchanged."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from loom_services.models import _history_name, wire_names

VALID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
names = st.text(alphabet=st.sampled_from("ab_-.Z9/ é"), min_size=1, max_size=80)


def test_mcp_names_become_double_underscores() -> None:
    to_wire, from_wire = wire_names(["demo.add", "echo", "time.get_current_time"])
    assert to_wire == {
        "demo.add": "demo__add",
        "echo": "echo",
        "time.get_current_time": "time__get_current_time",
    }
    assert from_wire["demo__add"] == "demo.add"


def test_a_colliding_name_gets_a_suffix_both_ways() -> None:
    to_wire, from_wire = wire_names(["demo.add", "demo__add"])
    assert to_wire["demo__add"] == "demo__add" and to_wire["demo.add"] != "demo__add"
    assert {from_wire[w] for w in to_wire.values()} == {"demo.add", "demo__add"}


@given(st.lists(names, unique=True, max_size=12))
def test_the_mapping_is_valid_and_one_to_one(tools: list[str]) -> None:
    to_wire, from_wire = wire_names(tools)
    assert all(VALID.fullmatch(w) for w in to_wire.values()), to_wire
    assert len(set(to_wire.values())) == len(tools)
    assert all(from_wire[to_wire[t]] == t for t in tools)
    assert all(to_wire[t] == t for t in tools if VALID.fullmatch(t) and "." not in t)


@given(names)
def test_a_name_from_history_not_offered_still_fits(name: str) -> None:
    assert VALID.fullmatch(_history_name(name, {}))
