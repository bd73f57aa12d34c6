"""The console's views of a run (``loom_console.views``: pure, from events alone) over
every golden history recorded by the real stack, and the grouping of the timeline as a
property: a foreach element's or a branch's rows are always together, whatever order
their events interleave in."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
from golden_runs import FILES, GOLDEN, read
from hypothesis import given
from hypothesis import strategies as st

from loom_console import views
from loom_console.api import RunView
from loom_core.contracts import (
    EventRecord,
    RunRequested,
    StepCompleted,
    StepScheduled,
    StepSuspended,
)
from loom_core.replay import state_at, state_view

AT = datetime(2026, 1, 1, tzinfo=UTC)


def test_every_golden_history_has_every_view() -> None:
    assert FILES
    for path in FILES:
        records = read(path)
        view = views.run_view(records)
        assert isinstance(view, RunView) and view.events == len(records), path.name
        msgspec.json.encode(view)  # JSON all the way down
        steps = views.timeline(records)
        assert len({s.step_id for s in steps}) == len(steps), path.name
        for call in views.calls(records):
            assert call.kind in ("tool", "model") and call.seq >= 1
        rows = [views.event_row(r) for r in records]
        assert [r.seq for r in rows] == [r.seq for r in records]
        json.dumps(views.clean(state_view(state_at(records, len(records) // 2))))


def test_attempts_retries_and_waits_of_a_step() -> None:
    (call,) = views.timeline(read(GOLDEN / "tool-retry.jsonl"))
    assert [a.attempt for a in call.attempts] == [1, 2, 3]
    assert [bool(a.error) for a in call.attempts] == [True, True, False]
    assert [a.retry_delay_s for a in call.attempts] == [0.05, 0.1, None]
    assert [w.kind for w in call.waits] == ["retry", "retry"]  # each until its timer fired
    assert all(w.ended_at for w in call.waits) and call.status == "succeeded"
    pause = {r.step_id: r for r in views.timeline(read(GOLDEN / "sleep.jsonl"))}["pause"]
    assert [(w.kind, w.label) for w in pause.waits] == [("timer", "sleep")]
    fork = {r.step_id: r.reused for r in views.timeline(read(GOLDEN / "fork.jsonl"))}
    assert fork == {"a": True, "b": False, "c": True}


def test_tokens_and_cost_come_from_the_runs_own_model_calls() -> None:
    view = views.run_view(read(GOLDEN / "agent-research.jsonl"))
    assert view.input_tokens > 0 and view.output_tokens > 0
    assert views.run_view(read(GOLDEN / "approval.jsonl")).input_tokens == 0


def test_an_open_suspension_is_offered_until_answered() -> None:
    records = read(GOLDEN / "approval.jsonl")
    suspended = next(i for i, r in enumerate(records) if isinstance(r.event, StepSuspended))
    (open_,) = views.open_suspensions(records[: suspended + 1])
    assert open_.label and open_.schema
    assert views.open_suspensions(records) == []  # answered, and the run ended


def test_secrets_in_event_data_are_redacted_for_the_page() -> None:
    url = "https://bob:hunter2@example.com/x"
    cleaned = views.clean({"api_key": "sk-live-123", "note": f"see {url}", "n": 1})
    assert cleaned["api_key"] == "[redacted]" and "hunter2" not in cleaned["note"]
    assert cleaned["n"] == 1


def record(seq: int, event: object) -> EventRecord:
    return EventRecord(run_id="r", seq=seq, at=AT, event=event)  # type: ignore[arg-type]


# a foreach with elements and a parallel with branches, each instance with one child
INSTANCES = [f"fe/{i}/t" for i in range(4)] + [f"par/{b}/s" for b in ("x", "y", "z")]


@given(st.permutations(INSTANCES))
def test_timeline_keeps_each_group_together(order: list[str]) -> None:
    events: list[object] = [RunRequested(), StepScheduled(step_id="fe"), StepScheduled("par")]
    for sid in order:  # interleaved as concurrent elements and branches would be
        group = sid.rsplit("/", 1)[0]
        events += [StepScheduled(step_id=group), StepScheduled(step_id=sid)]
    for sid in reversed(order):
        events.append(StepCompleted(step_id=sid, output=None))
    rows = views.timeline([record(n, e) for n, e in enumerate(events, start=1)])
    ids = [r.step_id for r in rows]
    for i, parent in enumerate(ids):  # an instance's rows follow it, all together
        inside = [j for j, sid in enumerate(ids) if sid.startswith(parent + "/")]
        assert inside == list(range(i + 1, i + 1 + len(inside))), ids
    assert {r.step_id: (r.depth, r.group) for r in rows}["fe/2/t"] == (1, "fe/2")
