"""Replay, time travel, fork and diff over runs recorded by the whole stack (real
nats-server, both stores), and a run whose replay diverges after a "deploy" being parked
instead of retried in a loop.

A "deploy" of changed decision code is simulated in-process by monkeypatching
``loom_core.executor.retry_delay`` (the services run in this process): the changed code
would wait differently before a retry, so replaying any run that retried diverges at
its first ``step_retry_scheduled``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import DeliverPolicy
from waiting import until  # type: ignore[import-not-found]

import loom_core.executor as executor
from loom_cli.app import load_run_request
from loom_core import codec, subjects
from loom_core.contracts import (
    ApprovalStep,
    EventRecord,
    ForkRun,
    Plan,
    RetryPolicy,
    RunCompleted,
    RunDiverged,
    RunProgress,
    RunRequest,
    StepCompleted,
    StepRetryScheduled,
    ToolCallRequested,
    ToolStep,
)
from loom_core.lineage import diff_runs
from loom_core.replay import replay, state_at, state_view
from loom_infra.client import LoomClient
from loom_services.runtime import Stack
from loom_services.stack import LocalStack, all_services

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BOUND_S = 10.0
QUIET_S = 0.5  # how long a parked run must stay silent to count as "not looping"
# completed runs of several kinds: retries, fallback, foreach, nested if, map/reduce,
# a loop, a durable sleep, a timeout (failed run) and an expired approval
KINDS = [
    "tool-retry.yaml", "tool-fallback.yaml", "foreach-collect.yaml", "nested.yaml",
    "map-reduce.yaml", "loop-until.yaml", "sleep.yaml", "step-timeout.yaml",
    "approval-expiry.yaml",
]  # fmt: skip


def request_of(name: str) -> RunRequest:
    return load_run_request(EXAMPLES / name, [], None)


def first_retry(records: list[EventRecord]) -> EventRecord:
    return next(r for r in records if isinstance(r.event, StepRetryScheduled))


# ----------------------------------------------------------------------------- replay


async def test_recorded_runs_of_several_kinds_replay_identically(client: LoomClient) -> None:
    run_ids = [(await client.submit(request_of(name))).run_id for name in KINDS]
    await asyncio.gather(*(client.wait(r, timeout=BOUND_S) for r in run_ids))
    for name, run_id in zip(KINDS, run_ids, strict=True):
        records = await client.events(run_id)
        report, state = replay(records)
        assert report.identical, (name, report.divergence)
        assert report.events == len(records), name
        assert state.terminal and state.version == len(records), name
        # replay's end state is the fold of the stream (time travel to the last event)
        assert state_view(state) == state_view(state_at(records, len(records))), name


async def test_state_at_any_event_is_the_run_as_it_was_then(client: LoomClient) -> None:
    run_id = (await client.submit(request_of("tool-retry.yaml"))).run_id
    records = await client.wait(run_id, timeout=BOUND_S)
    retry = first_retry(records)
    before = state_view(state_at(records, retry.seq - 1))
    at_retry = state_view(state_at(records, retry.seq))
    assert (before["version"], at_retry["version"]) == (retry.seq - 1, retry.seq)
    assert before["steps"]["call"] == {"status": "running", "attempt": 1}
    assert at_retry["steps"]["call"] == {"status": "retry_wait", "attempt": 1}
    assert at_retry["status"] == "running" and at_retry["output"] is None
    assert state_view(state_at(records, 0))["status"] == "new"
    end = state_view(state_at(records, len(records)))
    assert (end["status"], end["output"]) == ("completed", {"value": 42, "attempt": 3})
    assert end["steps"]["call"]["output"] == {"value": 42, "attempt": 3}


async def test_a_changed_decision_is_caught_at_the_right_event(
    client: LoomClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = (await client.submit(request_of("tool-retry.yaml"))).run_id
    records = await client.wait(run_id, timeout=BOUND_S)
    assert replay(records)[0].identical
    monkeypatch.setattr(executor, "retry_delay", lambda policy, attempt, key: 99.0)
    report, state = replay(records)
    retry = first_retry(records)
    assert report.divergence is not None
    assert report.divergence.seq == retry.seq
    assert report.divergence.recorded == codec.to_builtins(retry.event)
    assert report.divergence.recorded["delay_s"] == 0.05
    assert report.divergence.decided["delay_s"] == 99.0
    assert report.divergence.message == (
        f"event {retry.seq}: the current code decides differently (delay_s)"
    )
    assert report.events == retry.seq - 1  # everything before it was re-decided identically
    assert state.version < len(records)


# ----------------------------------------------------------------------------- fork + diff

FORK_PLAN = Plan(
    steps=[
        ToolStep(id="a", tool="math", input={"op": "add", "a": 1, "b": 1}),
        ToolStep(
            id="b",
            tool="math",
            depends_on=["a"],
            input={"op": "mul", "a": "{{ steps.a.output.result }}", "b": 10},
        ),
        ToolStep(id="c", tool="text", input={"text": "{{ input.name }}", "op": "upper"}),
    ],
    output={"b": "{{ steps.b.output.result }}", "c": "{{ steps.c.output.result }}"},
)


async def test_fork_with_an_edited_output_changes_the_result_and_diff_shows_it(
    client: LoomClient,
) -> None:
    origin = (await client.submit(RunRequest(plan=FORK_PLAN, input={"name": "ada"}))).run_id
    a = await client.wait(origin, timeout=BOUND_S)
    assert a[-1].event == RunCompleted(output={"b": 20, "c": "ADA"})

    request = ForkRun(run_id=origin, from_step="b", set_output={"a": {"result": 5}})
    forked = (await client.fork(request)).run_id
    b = await client.wait(forked, timeout=BOUND_S)
    assert b[-1].event == RunCompleted(output={"b": 50, "c": "ADA"})
    # the fork records where it comes from, and reuses what it did not re-execute
    fork = b[0].event.fork
    assert (fork.run_id, fork.from_step, fork.edited) == (origin, "b", ["a"])
    reused = {e.step_id: e for e in (r.event for r in b) if isinstance(e, StepCompleted)}
    assert reused["a"] == StepCompleted(step_id="a", output={"result": 5}, reused_from=origin)
    assert reused["c"] == StepCompleted(step_id="c", output={"result": "ADA"}, reused_from=origin)
    assert reused["b"].reused_from is None
    calls = [r.event for r in b if isinstance(r.event, ToolCallRequested)]
    assert [(c.step_id, c.input) for c in calls] == [("b", {"op": "mul", "a": 5, "b": 10})]
    assert replay(b)[0].identical  # a fork replays like any run

    changes = {d.step_id: d.changes for d in diff_runs(a, b)}
    assert set(changes) == {"a", "b", "c"}
    assert changes["b"]["output"] == ({"result": 20}, {"result": 50})
    assert changes["b"]["inputs"] == (
        [{"op": "mul", "a": 2, "b": 10}], [{"op": "mul", "a": 5, "b": 10}]
    )  # fmt: skip
    assert "status" not in changes["b"] and "tool" not in changes["b"]
    assert changes["a"]["output"] == ({"result": 2}, {"result": 5})
    assert changes["a"]["reused"] == (False, True)
    assert "output" not in changes["c"] and changes["c"]["reused"] == (False, True)
    assert diff_runs(a, a) == []


# ----------------------------------------------------------------------------- parking


async def test_a_run_whose_replay_diverges_after_a_deploy_is_parked(
    stack: LocalStack, client: LoomClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = Plan(
        steps=[
            ToolStep(id="flaky", tool="flaky", input={"fail_times": 1, "value": 7},
                     retry=RetryPolicy(max_attempts=2, initial_delay_s=0.05)),
            ApprovalStep(id="approve", label="manager", depends_on=["flaky"],
                         schema={"type": "boolean"}),
        ]
    )  # fmt: skip
    run_id = (await client.submit(RunRequest(plan=plan))).run_id
    waiting = await until(client, run_id, lambda s: s[-1].kind == "step_suspended")
    retry = first_retry(waiting)

    # a deploy of changed decision code: every service stops and starts with it
    assert stack.stack is not None
    await stack.stack.close()
    monkeypatch.setattr(executor, "retry_delay", lambda policy, attempt, key: 99.0)
    stack.stack = Stack(all_services(stack.settings), stack.settings)
    await stack.stack.start()

    progress = await client.nc.subscribe(subjects.progress(run_id))
    try:
        await client.nc.flush()
        refused = await client.resume(run_id, True, label="manager", by="ada")
        msg = await progress.next_msg(timeout=BOUND_S)
        assert codec.decode(msg.data, RunProgress).status == "diverged"
        again = await client.resume(run_id, True, label="manager", by="ada")
    finally:
        await progress.unsubscribe()
    # the answer is not taken (the reply says `not_applied` today; `run_diverged` would say why)
    assert not refused.ok and not again.ok, (refused, again)

    records = await client.events(run_id)
    assert records[: len(waiting)] == waiting
    diverged = records[len(waiting) :]
    assert [r.kind for r in diverged] == ["run_diverged"]  # once, and nothing else
    event: RunDiverged = diverged[0].event
    assert event.seq == retry.seq
    assert event.recorded == codec.to_builtins(retry.event)
    assert (event.recorded["delay_s"], event.decided["delay_s"]) == (0.05, 99.0)
    assert event.message.startswith(f"event {retry.seq}:")
    assert state_at(records, len(records)).status == "diverged"
    # nothing loops: the stream stays as it is
    assert await quiet(client, run_id, len(records))
    # a parked run replays up to where it was parked (a person can look at it)
    assert replay(records)[0].identical is False  # the patched code still differs
    monkeypatch.undo()
    report, state = replay(records)
    assert report.identical and state.status == "running"


async def quiet(client: LoomClient, run_id: str, known: int) -> bool:
    """True when the run's stream holds exactly ``known`` events and no other arrives
    within QUIET_S (a bounded wait for something that must not happen)."""
    sub = await client.js.subscribe(
        subjects.run_events_of(run_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        for _ in range(known):
            await sub.next_msg(timeout=BOUND_S)
        try:
            extra: Any = await sub.next_msg(timeout=QUIET_S)
        except TimeoutError:
            return True
        raise AssertionError(f"the stream grew: {codec.decode_event(extra.data)}")
    finally:
        await sub.unsubscribe()
