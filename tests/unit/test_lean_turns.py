"""Lean agent turns in the pure core: a run's ``model_call_requested`` events hold only
what is new since the previous turn (``appended``) and the conversation is their fold;
runs stored before (``turn_messages: whole``) keep whole requests when re-decided, so
their histories replay as recorded."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_agent import World, answer, call, check_replays, plan_with  # type: ignore[import-not-found]

from loom_core import agent
from loom_core.contracts import ModelCallRequested, RunRequested
from loom_core.executor import fold, restore, snapshot

TURN = st.one_of(
    st.builds(lambda t: answer(t), st.text(max_size=20)),
    st.builds(lambda m: answer(None, call("echo", {"message": m})), st.text(max_size=20)),
    st.builds(lambda: answer(None, call("nope", {}), call("echo", "{bad"))),
)


def conversations(w: World) -> list[list[Any]]:
    asked = w.of(ModelCallRequested)
    return [w.said(r.turn) for r in asked]


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(TURN, min_size=1, max_size=8))
def test_lean_and_whole_runs_send_the_same_conversations(turns: list[Any]) -> None:
    lean = World(plan_with(max_turns=8), list(turns))
    whole = World(plan_with(max_turns=8), list(turns), turn_messages="whole")
    lean.run()
    whole.run()
    assert [type(e) for e in lean.events] == [type(e) for e in whole.events]
    assert conversations(lean) == [r.messages for r in whole.of(ModelCallRequested)]
    assert not any(r.appended for r in whole.of(ModelCallRequested))
    assert whole.of(RunRequested)[0].turn_messages == "whole"
    assert lean.of(RunRequested)[0].turn_messages == "new"
    check_replays(lean)
    check_replays(whole)


def test_each_lean_request_holds_only_what_is_new() -> None:
    w = World(
        plan_with(),
        [
            answer(None, call("echo", {"message": "x"}, "c1")),
            answer(None, call("echo", {"message": "y"}, "c2")),
            answer("ok"),
        ],
    )
    w.run()
    asked = w.of(ModelCallRequested)
    assert [len(r.messages) for r in asked] == [2, 2, 2]  # system+user; then reply+result
    assert [r.appended for r in asked] == [False, True, True]
    assert len(w.said(3)) == 6


def test_a_conversation_with_a_missing_turn_is_not_made_up() -> None:
    w = World(plan_with(), [answer(None, call("echo", {"message": "x"})), answer("ok")])
    w.run()
    asked = w.of(ModelCallRequested)
    assert agent.conversation(asked[1:], 2) is None  # turn 1 missing
    assert agent.conversation(asked, 3) is None  # never asked
    assert agent.conversation(asked, 2) == w.said(2)


def test_the_folded_state_and_a_snapshot_hold_the_whole_conversation() -> None:
    w = World(
        plan_with(),
        [
            answer(None, call("echo", {"message": "x"})),
            answer(None, call("echo", {"message": "y"})),
            answer("ok"),
        ],
    )
    w.turns = w.turns[:2]
    w.run()
    state = fold("r1", w.events)  # turn 3 asked, not answered
    assert state.agents["a"].turn == 3 and state.agents["a"].messages == w.said(3)
    assert restore(snapshot(state)).agents["a"].messages == w.said(3)


def test_a_step_id_asked_again_from_turn_one_folds_its_last_conversation() -> None:
    first = World(plan_with(), [answer(None, call("echo", {"message": "old"})), answer("a")])
    second = World(plan_with(), [answer(None, call("echo", {"message": "new"})), answer("b")])
    first.run()
    second.run()
    both = first.of(ModelCallRequested) + second.of(ModelCallRequested)
    assert agent.conversation(both, 2) == second.said(2)
    assert agent.conversation(both, 1) == second.said(1)
