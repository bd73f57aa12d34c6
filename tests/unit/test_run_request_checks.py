"""The checks of a client's run request before any plan is looked at
(``loom_core.validation.check_run_request``, moved out of the executor service, issue 16):
a pure function, tested here without servers. The executor's reply to each is tested
end to end in tests/integration/test_hostile.py."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom_core.contracts import Budget, ForkOrigin, ParentLink, Plan, RunRequest, ToolStep
from loom_core.validation import RESERVED_RUN_ID, check_run_id, check_run_request

PLAN = Plan(steps=[ToolStep(id="a", tool="echo")])
TOKEN_CHARS = string.ascii_letters + string.digits + "_-"


def _code_and_path(request: RunRequest) -> tuple[str, str] | None:
    error = check_run_request(request)
    return None if error is None else (error.code, error.path or "")


def test_a_plain_request_passes() -> None:
    assert check_run_request(RunRequest(plan=PLAN)) is None
    assert check_run_request(RunRequest(request="summarise the news")) is None
    assert check_run_request(RunRequest(plan=PLAN, run_id="order-42")) is None


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (RunRequest(plan=PLAN, parent=ParentLink("p", "s")), ("internal_field", "$.parent")),
        (RunRequest(plan=PLAN, fork=ForkOrigin("x", "a")), ("internal_field", "$.fork")),
        (RunRequest(plan=PLAN, run_id="has space"), ("invalid_run_id", "$.run_id")),
        (RunRequest(plan=PLAN, run_id="a.b"), ("invalid_run_id", "$.run_id")),
        (RunRequest(plan=PLAN, run_id="p--child"), ("invalid_run_id", "$.run_id")),
        (RunRequest(plan=PLAN, run_id="x" * 65), ("invalid_run_id", "$.run_id")),
        (RunRequest(plan=PLAN, run_id="run\n"), ("invalid_run_id", "$.run_id")),
        (RunRequest(), ("missing_plan", "$")),
        (RunRequest(request=""), ("missing_plan", "$")),
        (RunRequest(plan=PLAN, request="and this"), ("ambiguous_request", "$.request")),
        (RunRequest(plan=PLAN, budget=Budget(max_tokens=0)),
         ("invalid_budget", "$.budget.max_tokens")),
        (RunRequest(plan=PLAN, budget=Budget(max_cost_usd=-1.0)),
         ("invalid_budget", "$.budget.max_cost_usd")),
    ],
)  # fmt: skip
def test_each_mistake_is_named_with_its_path(
    request_: RunRequest, expected: tuple[str, str]
) -> None:
    assert _code_and_path(request_) == expected


def test_messages_say_what_to_do() -> None:
    fork = check_run_request(RunRequest(plan=PLAN, fork=ForkOrigin("x", "a")))
    assert fork is not None and "loom fork" in fork.message
    parent = check_run_request(RunRequest(plan=PLAN, parent=ParentLink("p", "s")))
    assert parent is not None and "sub_run" in parent.message
    reserved = check_run_id("p--child")
    assert reserved is not None and "reserved" in reserved.message


def test_engine_fields_are_refused_before_anything_else() -> None:
    everything_wrong = RunRequest(parent=ParentLink("p", "s"), run_id="bad id")
    assert _code_and_path(everything_wrong) == ("internal_field", "$.parent")


def test_check_run_id_takes_the_path_it_is_given() -> None:
    error = check_run_id("no good", "$.new_run_id")
    assert error is not None and error.path == "$.new_run_id"


@given(st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=64))
def test_a_token_without_the_reserved_mark_is_a_valid_run_id(run_id: str) -> None:
    assert (check_run_id(run_id) is None) == (RESERVED_RUN_ID not in run_id)


@given(st.text(min_size=1, max_size=80))
def test_any_accepted_run_id_is_a_subject_token(run_id: str) -> None:
    if check_run_id(run_id) is None:
        assert 1 <= len(run_id) <= 64 and set(run_id) <= set(TOKEN_CHARS)
        assert RESERVED_RUN_ID not in run_id
