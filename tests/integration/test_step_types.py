"""Every example in ``examples/`` runs end to end through the whole stack (real
nats-server, both stores): its terminal event and exact output are pinned in EXPECTED,
every stream is checked for invariants, and each step kind gets the checks that show
its semantics from the events alone (retries and their timers, skipped branches,
foreach order and concurrency, timeouts and cancellations)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from loom_cli.app import load_run_request
from loom_core.contracts import (
    TERMINAL_EVENTS,
    BranchTaken,
    EventRecord,
    ForeachStarted,
    LoopIterationStarted,
    RunCompleted,
    RunFailed,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    TimerFired,
    TimerStarted,
    ToolCallCancelled,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
)
from loom_core.stats import run_stats
from loom_infra.client import LoomClient

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# rejected on purpose (test_runs.py), or waiting for a person (approval: test_suspend.py)
NOT_RUNNABLE = {"invalid-plan.yaml", "approval.yaml", "approval-expiry.yaml", "wait-event.yaml"}
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name not in NOT_RUNNABLE)

# example -> (terminal event type, the run's exact output or the run's error code)
EXPECTED: dict[str, tuple[str, Any]] = {
    "sub-run.yaml": ("run_completed", ["LISBON", "PORTO"]),
    "hello-dag.yaml": (
        "run_completed",
        {"greeting": "Hello, Ada from Lisbon!", "words": 4, "city_loud": "LISBON"},
    ),
    "tool-retry.yaml": ("run_completed", {"value": 42, "attempt": 3}),
    "tool-fallback.yaml": (
        "run_completed",
        {"label": "A-17 costs 9.5", "price": {"price": 9.5, "source": "cache"}},
    ),
    "tool-continue.yaml": ("run_completed", {"name": "Ada Lovelace"}),
    "foreach.yaml": ("run_completed", [9, 1, 16, 4]),
    "foreach-collect.yaml": ("run_completed", ["a", "b", "c", None]),
    "map-reduce.yaml": ("run_completed", {"per_page": [4, 2, 3], "total": 9}),
    "parallel.yaml": ("run_completed", {"card": "Ada Lovelace / LONDON", "best": 9}),
    "conditional.yaml": ("run_completed", {"shipping": "free", "total": 120}),
    "loop-until.yaml": ("run_completed", {"n": 5, "square": 25}),
    "loop-while.yaml": ("run_completed", {"rounds": "ROUND 2", "capped": 101}),
    "final.yaml": (
        "run_completed",
        {"message": "Hello, Ada", "name_length": 3, "summary": "Ada has 3 letters"},
    ),
    "sleep.yaml": ("run_completed", ["start: water the plants", "done: water the plants"]),
    "step-timeout.yaml": ("run_failed", "step_timeout"),
    # needs a model (tests/integration/test_agents.py runs agents): without one it says so
    "agent-research.yaml": ("run_failed", "no_model_configured"),
    "agent-intent-routing.yaml": ("run_failed", "no_model_configured"),
    "agent-memory.yaml": ("run_failed", "no_model_configured"),  # after its recall
    # re-planning needs a model too: without one the step's own failure fails the run
    "replan.yaml": ("run_failed", "parse_error"),
    "run-timeout.yaml": ("run_failed", "run_timeout"),
    "nested.yaml": (
        "run_completed",
        [
            {"n": 4, "abs": 4, "doubled": 8},
            {"n": -2, "abs": 2, "doubled": 4},
            {"n": 7, "abs": 7, "doubled": 14},
        ],
    ),
}

ENDS = (StepCompleted, StepFailed, StepSkipped, StepCancelled)
# The timer service fires a timer once less than 1 ms is left (loom_services.timers).
TIMER_EARLY = timedelta(milliseconds=1)
CALL_OUTCOMES = (ToolCallCompleted, ToolCallFailed, ToolCallCancelled)


def of(records: list[EventRecord], kind: type) -> list[Any]:
    return [r.event for r in records if isinstance(r.event, kind)]


def record_of(records: list[EventRecord], kind: type, step_id: str) -> EventRecord:
    """The first record of ``kind`` about ``step_id`` (fails when there is none)."""
    found = [r for r in records if isinstance(r.event, kind) and r.event.step_id == step_id]
    assert found, f"no {kind.__name__} for {step_id!r}"
    return found[0]


def requests(records: list[EventRecord]) -> list[tuple[str, int]]:
    return [(e.step_id, e.attempt) for e in of(records, ToolCallRequested)]


# ----------------------------------------------------------------------------- invariants


def check_stream(records: list[EventRecord]) -> None:
    """What holds for every finished run, whatever its plan."""
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert len({r.run_id for r in records}) == 1
    terminal = [i for i, r in enumerate(records) if isinstance(r.event, TERMINAL_EVENTS)]
    assert terminal == [len(records) - 1], "exactly one terminal event, the last"
    assert all(a.at <= b.at for a, b in zip(records, records[1:], strict=False))

    # every instance ends exactly once; every scheduled one has ended
    ends: dict[str, int] = {}
    for e in of(records, ENDS):
        ends[e.step_id] = ends.get(e.step_id, 0) + 1
    assert {k: n for k, n in ends.items() if n != 1} == {}
    scheduled = [e.step_id for e in of(records, StepScheduled)]
    assert len(scheduled) == len(set(scheduled)), "an instance is scheduled once"
    assert set(scheduled) <= set(ends), f"never ended: {set(scheduled) - set(ends)}"

    # every attempt is requested once and has exactly one outcome
    asked = requests(records)
    assert len(asked) == len(set(asked))
    outcomes = [(e.step_id, e.attempt) for e in of(records, CALL_OUTCOMES)]
    assert sorted(outcomes) == sorted(asked)
    for before, r in zip(records, records[1:], strict=False):
        if isinstance(r.event, ToolCallRequested):
            e = r.event
            assert e.idempotency_key == f"{r.run_id}:{e.step_id}:{e.attempt}"
            # each attempt is announced by its StepStarted, in the same decision (an
            # agent's calls, `{step}/c{turn}-{k}`, are announced by the agent's turn)
            if not re.search(r"/c\d+-\d+$", e.step_id):
                assert before.event == StepStarted(step_id=e.step_id, attempt=e.attempt)
    # attempts of one instance count 1, 2, 3, ... and each retry announces the next one
    by_step: dict[str, list[int]] = {}
    for sid, attempt in asked:
        by_step.setdefault(sid, []).append(attempt)
    assert all(a == list(range(1, len(a) + 1)) for a in by_step.values()), by_step
    retried = sorted((e.step_id, e.attempt) for e in of(records, StepRetryScheduled))
    assert retried == sorted((s, a) for s, a in asked if a > 1)

    # every timer that fired was started; timers start once
    started = [e.timer_id for e in of(records, TimerStarted)]
    assert len(started) == len(set(started))
    assert {e.timer_id for e in of(records, TimerFired)} <= set(started)


def check_stats(records: list[EventRecord], terminal_type: str) -> None:
    """``loom describe``'s numbers, from the same events, add up."""
    stats = run_stats(records)
    status = {"run_completed": "completed", "run_failed": "failed"}[terminal_type]
    assert stats.status == status and stats.terminal
    assert stats.running == stats.pending == 0
    assert stats.succeeded + stats.failed + stats.skipped + stats.cancelled == stats.total
    ended = {e.step_id for e in of(records, ENDS)}
    assert stats.total == len(ended | {e.step_id for e in of(records, StepScheduled)})
    assert stats.attempts == len(of(records, ToolCallRequested))
    assert stats.retries == len(of(records, StepRetryScheduled))
    assert stats.planned == len(records[0].event.plan.steps)
    assert stats.duration_ms == pytest.approx(
        (records[-1].at - records[0].at).total_seconds() * 1000
    )
    assert stats.pending_work == ()


# ----------------------------------------------------------------------------- per step kind


def check_tool_retry(records: list[EventRecord]) -> None:
    assert requests(records) == [("call", 1), ("call", 2), ("call", 3)]
    assert [e.error.code for e in of(records, ToolCallFailed)] == ["flaky", "flaky"]
    retries = of(records, StepRetryScheduled)
    assert [(r.attempt, r.delay_s) for r in retries] == [(2, 0.05), (3, 0.1)]
    timers = [r for r in records if isinstance(r.event, TimerStarted)]
    assert [(t.event.purpose, t.event.step_id) for t in timers] == [("retry", "call")] * 2
    for timer, delay in zip(timers, (0.05, 0.1), strict=True):
        assert timer.event.fire_at == timer.at + timedelta(seconds=delay)
    # each retry is requested only once its timer fired, never before its time
    retry_requests = [r for r in records if isinstance(r.event, ToolCallRequested)][1:]
    for timer, request in zip(timers, retry_requests, strict=True):
        assert request.at >= timer.event.fire_at - TIMER_EARLY
    assert {e.timer_id for e in of(records, TimerFired)} == {t.event.timer_id for t in timers}


def check_tool_fallback(records: list[EventRecord]) -> None:
    assert requests(records) == [("price", 1), ("price", 2), ("price/fallback", 1), ("label", 1)]
    assert [e.error.code for e in of(records, ToolCallFailed)] == ["upstream_down"] * 2
    price = record_of(records, StepCompleted, "price").event
    assert price.output == {"message": {"price": 9.5, "source": "cache"}}
    assert not of(records, StepFailed)


def check_tool_continue(records: list[EventRecord]) -> None:
    failed = record_of(records, StepFailed, "enrich").event
    assert failed.error.code == "enrichment_unavailable"
    skipped = record_of(records, StepSkipped, "use_enriched").event
    assert skipped.reason == "a step it depends on did not succeed"
    assert "use_enriched" not in {sid for sid, _ in requests(records)}
    assert record_of(records, StepCompleted, "basic").event.output == {"result": "Ada Lovelace"}


def element_scopes(records: list[EventRecord], owner: str) -> list[tuple[str, str]]:
    """(``scheduled``/``ended``, element scope id) of a foreach, in stream order."""
    out = []
    for r in records:
        e = r.event
        if not isinstance(e, (StepScheduled, *ENDS)):
            continue
        head, _, index = e.step_id.partition("/")
        if head == owner and index.isdigit():
            out.append(("scheduled" if isinstance(e, StepScheduled) else "ended", e.step_id))
    return out


def max_in_flight(scopes: list[tuple[str, str]]) -> int:
    running = peak = 0
    for what, _ in scopes:
        running += 1 if what == "scheduled" else -1
        peak = max(peak, running)
    return peak


def check_foreach(records: list[EventRecord]) -> None:
    started = of(records, ForeachStarted)
    assert [(s.step_id, s.count) for s in started] == [("squares", 4)]
    scopes = element_scopes(records, "squares")
    assert max_in_flight(scopes) == 2  # concurrency: 2
    finished = [sid for what, sid in scopes if what == "ended"]
    assert sorted(finished) == [f"squares/{i}" for i in range(4)]
    squares = [e for e in of(records, ToolCallRequested) if e.tool == "math"]
    assert sorted((e.step_id, e.input["a"]) for e in squares) == [
        ("squares/0/square", 3),
        ("squares/1/square", 1),
        ("squares/2/square", 4),
        ("squares/3/square", 2),
    ]


def check_foreach_collect(records: list[EventRecord]) -> None:
    attempts = {sid: a for sid, a in requests(records)}  # the last attempt of each
    assert attempts == {"each/0/try": 1, "each/1/try": 2, "each/2/try": 1, "each/3/try": 2}
    assert record_of(records, StepFailed, "each/3/try").event.error.code == "flaky"
    assert record_of(records, StepFailed, "each/3").event.error.code == "flaky"
    failed = {e.step_id for e in of(records, StepFailed)}
    assert failed == {"each/3/try", "each/3"}  # collect: nothing else failed or was cancelled
    assert not of(records, StepCancelled)
    assert record_of(records, StepCompleted, "each").event.output == ["a", "b", "c", None]


def check_map_reduce(records: list[EventRecord]) -> None:
    adds = [e for e in of(records, ToolCallRequested) if e.tool == "math"]
    # the reduce folds in input order, one element at a time
    assert [(e.step_id, e.input["a"], e.input["b"]) for e in adds] == [
        ("total/0/add", 0, 4),
        ("total/1/add", 4, 2),
        ("total/2/add", 6, 3),
    ]
    assert [(s.step_id, s.items) for s in of(records, ForeachStarted)] == [
        ("count", ["the quick brown fox", "jumps over", "the lazy dog"]),
        ("total", [4, 2, 3]),
    ]


def check_parallel(records: list[EventRecord]) -> None:
    kinds = [
        (type(r.event).__name__, r.event.step_id)
        for r in records
        if isinstance(r.event, ToolCallRequested | ToolCallCompleted)
    ]
    first_done = next(i for i, (k, _) in enumerate(kinds) if k == "ToolCallCompleted")
    # the first step of every branch was requested before any call finished
    assert {sid for _, sid in kinds[:first_done]} == {
        "profile/name/clean",
        "profile/city/loud",
        "profile/score/best",
    }
    profile = record_of(records, StepCompleted, "profile").event
    assert profile.output == {
        "name": {"result": "Ada Lovelace"},
        "city": {"result": "LONDON"},
        "score": {"result": 9},
    }


def check_conditional(records: list[EventRecord]) -> None:
    assert [(b.step_id, b.branch) for b in of(records, BranchTaken)] == [("route", "then")]
    skipped = {e.step_id: e.reason for e in of(records, StepSkipped)}
    assert skipped == {
        "route/else/standard": "branch not taken",
        "route/else/upsell": "branch not taken",
    }
    assert [sid for sid, _ in requests(records)] == ["total", "route/then/free_shipping"]


def check_loop_until(records: list[EventRecord]) -> None:
    iterations = [e.iteration for e in of(records, LoopIterationStarted)]
    assert iterations == [0, 1, 2, 3, 4, 5]  # stops after the first square >= 20
    assert [sid for sid, _ in requests(records)] == [f"search/{i}/square" for i in range(6)]


def check_loop_while(records: list[EventRecord]) -> None:
    iterations: dict[str, list[int]] = {}
    for e in of(records, LoopIterationStarted):
        iterations.setdefault(e.step_id, []).append(e.iteration)
    assert iterations == {"rounds": [0, 1, 2], "capped": [0, 1]}


def check_final(records: list[EventRecord]) -> None:
    final = record_of(records, StepCompleted, "result")
    assert final.event.output == records[-1].event.output
    assert not any(isinstance(r.event, ToolCallRequested) and r.event.step_id == "result"
                   for r in records)  # fmt: skip


def check_sleep(records: list[EventRecord]) -> None:
    timer = next(r for r in records if isinstance(r.event, TimerStarted))
    assert (timer.event.purpose, timer.event.step_id) == ("sleep", "pause")
    assert timer.event.fire_at == timer.at + timedelta(seconds=0.2)
    assert timer.at >= record_of(records, StepCompleted, "before").at
    after = record_of(records, ToolCallRequested, "after")
    assert after.at >= timer.event.fire_at - TIMER_EARLY  # the next step waited for it
    assert record_of(records, StepCompleted, "pause").seq < after.seq


def check_step_timeout(records: list[EventRecord]) -> None:
    timer = next(r.event for r in records if isinstance(r.event, TimerStarted))
    assert (timer.purpose, timer.step_id) == ("step_timeout", "slow")
    cancelled = of(records, ToolCallCancelled)
    assert [(c.step_id, c.reason) for c in cancelled] == [("slow", "step timed out")]
    assert record_of(records, StepFailed, "slow").event.error.code == "step_timeout"
    assert record_of(records, StepSkipped, "report")
    failed = records[-1].event
    assert isinstance(failed, RunFailed) and failed.error.details == {"step_id": "slow"}
    # ended by the 0.3 s timeout, not by the 5 s sleep finishing
    assert records[-1].at - records[0].at < timedelta(seconds=3)


def check_agent_without_model(step: str, dependent: str) -> Callable[[list[EventRecord]], None]:
    def check(records: list[EventRecord]) -> None:
        # the turn was asked as an event, the planner answered that no model is
        # configured (naming what to set), the step failed, its dependent was skipped
        failed = record_of(records, StepFailed, step).event
        assert failed.error.code == "no_model_configured"
        assert "LOOM_MODEL" in failed.error.message
        assert record_of(records, StepSkipped, dependent)

    return check


def check_run_timeout(records: list[EventRecord]) -> None:
    timer = next(r.event for r in records if isinstance(r.event, TimerStarted))
    assert (timer.purpose, timer.timer_id) == ("run_timeout", "run:timeout")
    assert record_of(records, StepCompleted, "quick")
    assert [c.step_id for c in of(records, ToolCallCancelled)] == ["slow"]
    cancelled = {e.step_id for e in of(records, StepCancelled)}
    assert cancelled == {"slow", "report"}  # `report` never started: cancelled all the same
    assert records[-1].at - records[0].at < timedelta(seconds=3)


def check_nested(records: list[EventRecord]) -> None:
    taken = {b.step_id: b.branch for b in of(records, BranchTaken)}
    assert taken == {"numbers/0/sign": "then", "numbers/1/sign": "else", "numbers/2/sign": "then"}
    skipped = {e.step_id: e.reason for e in of(records, StepSkipped)}
    assert skipped == {
        "numbers/0/sign/else/negate": "branch not taken",
        "numbers/1/sign/then/keep": "branch not taken",
        "numbers/2/sign/else/negate": "branch not taken",
    }
    doubles = {
        e.step_id: e.input for e in of(records, ToolCallRequested) if e.step_id.endswith("/double")
    }
    assert doubles == {
        "numbers/0/double": {"op": "mul", "a": 4, "b": 2},
        "numbers/1/double": {"op": "mul", "a": 2, "b": 2},
        "numbers/2/double": {"op": "mul", "a": 7, "b": 2},
    }
    assert max_in_flight(element_scopes(records, "numbers")) <= 2


def check_hello_dag(records: list[EventRecord]) -> None:
    assert sorted(sid for sid, _ in requests(records)) == ["count", "greet", "join", "shout"]


def check_sub_run(records: list[EventRecord]) -> None:
    from loom_core.contracts import SubRunEnded, SubRunRequested

    requested = [r.event for r in records if isinstance(r.event, SubRunRequested)]
    ended = [r.event for r in records if isinstance(r.event, SubRunEnded)]
    assert sorted(e.child_run_id for e in requested) == sorted(e.child_run_id for e in ended)
    assert len(requested) == 2 and all(e.status == "completed" for e in ended)
    assert all(e.child_run_id.startswith(records[0].run_id) for e in requested)


def check_agent_memory(records: list[EventRecord]) -> None:
    # the recall ran first (turn 0: history, semantic recall, working memory), then the
    # turn was asked and refused for want of a model
    recall = [e.tool for e in of(records, ToolCallRequested) if e.step_id.startswith("chat/c0-")]
    assert recall == ["thread_history", "thread_recall", "working_memory_get"]
    assert record_of(records, StepFailed, "chat").event.error.code == "no_model_configured"


def check_replan(records: list[EventRecord]) -> None:
    from loom_core.contracts import ReplanRefused, ReplanRequested

    asked = of(records, ReplanRequested)
    assert [(a.step_id, a.kept) for a in asked] == [("parse", ["fetch"])]
    refused = of(records, ReplanRefused)[0]
    assert [i.code for i in refused.issues] == ["no_model_configured"]


CHECKS: dict[str, Callable[[list[EventRecord]], None]] = {
    "sub-run.yaml": check_sub_run,
    "hello-dag.yaml": check_hello_dag,
    "tool-retry.yaml": check_tool_retry,
    "tool-fallback.yaml": check_tool_fallback,
    "tool-continue.yaml": check_tool_continue,
    "foreach.yaml": check_foreach,
    "foreach-collect.yaml": check_foreach_collect,
    "map-reduce.yaml": check_map_reduce,
    "parallel.yaml": check_parallel,
    "conditional.yaml": check_conditional,
    "loop-until.yaml": check_loop_until,
    "loop-while.yaml": check_loop_while,
    "final.yaml": check_final,
    "sleep.yaml": check_sleep,
    "step-timeout.yaml": check_step_timeout,
    "run-timeout.yaml": check_run_timeout,
    "agent-research.yaml": check_agent_without_model("research", "report"),
    "agent-intent-routing.yaml": check_agent_without_model("classify", "route"),
    "nested.yaml": check_nested,
    "agent-memory.yaml": check_agent_memory,
    "replan.yaml": check_replan,
}


def test_every_example_has_an_expectation_and_a_check() -> None:
    assert set(EXAMPLE_FILES) == set(EXPECTED) == set(CHECKS)
    kinds = set()
    for name in EXAMPLE_FILES:
        request = load_run_request(EXAMPLES / name, [], None)
        stack = list(request.plan.steps)
        while stack:
            step = stack.pop()
            kinds.add(type(step).__struct_config__.tag)
            for body in ("do", "then", "else_"):
                stack.extend(getattr(step, body, []))
            stack.extend(s for b in getattr(step, "branches", {}).values() for s in b)
    # every step kind of the plan language has an example
    assert kinds == {
        "tool", "foreach", "loop", "parallel", "reduce", "if", "final", "sleep", "sub_run",
        "agent",
    }  # fmt: skip


@pytest.mark.parametrize("name", EXAMPLE_FILES)
async def test_example_runs_end_to_end(client: LoomClient, name: str) -> None:
    terminal_type, expected = EXPECTED[name]
    accepted = await client.submit(load_run_request(EXAMPLES / name, [], None))
    records = await client.wait(accepted.run_id, timeout=30)
    final = records[-1]
    assert final.kind == terminal_type, final.event
    if isinstance(final.event, RunCompleted):
        assert final.event.output == expected
    else:
        assert isinstance(final.event, RunFailed)
        assert final.event.error.code == expected
    # what was published is what is stored
    assert await client.events(accepted.run_id) == records
    check_stream(records)
    check_stats(records, terminal_type)
    CHECKS[name](records)
    # every example stays quick (the longest waits are 0.3 s)
    assert records[-1].at - records[0].at < timedelta(seconds=5)


async def test_foreach_completions_interleave_but_output_keeps_input_order(
    client: LoomClient,
) -> None:
    accepted = await client.submit(load_run_request(EXAMPLES / "foreach.yaml", [], None))
    records = await client.wait(accepted.run_id, timeout=30)
    assert records[-1].event == RunCompleted(output=[9, 1, 16, 4])
    finished = [sid for what, sid in element_scopes(records, "squares") if what == "ended"]
    # item 0 waits 0.4 s; items 1, 2 and 3 (quick) finish before it
    assert finished == ["squares/1", "squares/2", "squares/3", "squares/0"]
