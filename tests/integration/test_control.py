"""Operating a live run through the whole stack (both stores): cancel, pause/unpause,
a durable sleep that outlives every service, and live progress on core NATS.

Synchronisation is always on events (followed with a bound), never on sleeps: the
long-running work in these plans (a 30 s `sleep` tool, a 1 s sleep step) only exists
so that there is something in flight to act on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import waiting  # type: ignore[import-not-found]  # tests/integration on sys.path

from loom_core import codec, subjects
from loom_core.contracts import (
    EventRecord,
    Plan,
    RunCancelled,
    RunCompleted,
    RunPaused,
    RunProgress,
    RunRequest,
    RunUnpaused,
    SleepStep,
    StepCompleted,
    StepScheduled,
    TimerStarted,
    ToolCallCancelled,
    ToolCallRequested,
    ToolStep,
)
from loom_infra.client import LoomClient, LoomError
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

BOUND_S = 10.0  # no wait below may take longer than this


async def wait_for_event(
    client: LoomClient, run_id: str, match: Callable[[EventRecord], bool]
) -> EventRecord:
    """The run's first event that matches (the shared bounded wait)."""
    return await waiting.first(client, run_id, match, BOUND_S)


def is_request(step_id: str) -> Callable[[EventRecord], bool]:
    return lambda r: isinstance(r.event, ToolCallRequested) and r.event.step_id == step_id


def ended_ids(records: list[EventRecord]) -> dict[str, str]:
    return {
        r.event.step_id: r.kind
        for r in records
        if r.kind in ("step_completed", "step_failed", "step_skipped", "step_cancelled")
    }


async def test_cancel_stops_the_call_and_ends_every_step(client: LoomClient) -> None:
    plan = Plan(
        steps=[
            ToolStep(id="nap", tool="sleep", input={"seconds": 30}),
            ToolStep(id="after", tool="echo", input={"message": "x"}, depends_on=["nap"]),
        ]
    )
    accepted = await client.submit(RunRequest(plan=plan))
    await wait_for_event(client, accepted.run_id, is_request("nap"))

    reply = await client.control(accepted.run_id, "cancel", by="tester", reason="test")
    assert (reply.ok, reply.status) == (True, "cancelled")
    records = await client.wait(accepted.run_id, timeout=BOUND_S)
    assert records[-1].event == RunCancelled(by="tester", reason="test")
    cancelled_calls = [r.event for r in records if isinstance(r.event, ToolCallCancelled)]
    assert [(c.step_id, c.attempt, c.idempotency_key) for c in cancelled_calls] == [
        ("nap", 1, f"{accepted.run_id}:nap:1")
    ]
    reason = cancelled_calls[0].reason
    assert "tester" in reason and reason.endswith(": test")  # who and why reach the runner
    # every step ended, `after` too although it never started
    assert ended_ids(records) == {"nap": "step_cancelled", "after": "step_cancelled"}
    scheduled = {r.event.step_id for r in records if isinstance(r.event, StepScheduled)}
    assert scheduled == {"nap"}
    # the 30 s call did not have to finish for the run to end
    assert (records[-1].at - records[0].at).total_seconds() < BOUND_S

    with pytest.raises(LoomError) as again:
        await client.control(accepted.run_id, "cancel", by="tester")
    assert again.value.error.code == "already_finished"
    assert "cancelled" in again.value.error.message
    with pytest.raises(LoomError) as unknown:
        await client.control("no-such-run", "cancel", by="tester")
    assert (unknown.value.error.code, unknown.value.error.path) == ("not_found", "$.run_id")
    # nothing was appended by the refused requests
    assert await client.events(accepted.run_id) == records


async def test_pause_holds_the_next_step_until_unpaused(client: LoomClient) -> None:
    # `a` takes 0.5 s so that the pause surely lands while it runs
    plan = Plan(
        steps=[
            ToolStep(id="a", tool="sleep", input={"seconds": 0.5}),
            ToolStep(id="b", tool="echo", input={"message": "{{ steps.a.output.slept }}"}),
        ]
    )
    accepted = await client.submit(RunRequest(plan=plan))
    run_id = accepted.run_id
    await wait_for_event(client, run_id, is_request("a"))

    reply = await client.control(run_id, "pause", by="tester", reason="look first")
    assert (reply.ok, reply.status) == (True, "paused")
    done = await wait_for_event(
        client, run_id, lambda r: isinstance(r.event, StepCompleted) and r.event.step_id == "a"
    )
    # In-flight work finishes and is recorded. `b` would have been scheduled in the same
    # decision (one commit) as a's completion, so its absence now is conclusive.
    records = await client.events(run_id)
    assert records[-1].seq == done.seq
    assert any(isinstance(r.event, RunPaused) for r in records)
    assert not any(getattr(r.event, "step_id", "").startswith("b") for r in records)

    reply = await client.control(run_id, "unpause", by="tester")
    # `b` (echo, a local call: loom_services.local_tools) may run and end the run in the
    # very decision that unpauses it
    assert reply.ok and reply.status in ("running", "completed")
    records = await client.wait(run_id, timeout=BOUND_S)
    assert records[-1].event == RunCompleted(output={"b": {"message": 0.5}})
    kinds = [r.kind for r in records]
    unpaused = kinds.index("run_unpaused")
    b_request = next(i for i, r in enumerate(records) if is_request("b")(r))
    assert kinds.index("run_paused") < kinds.index("step_completed") < unpaused < b_request
    assert isinstance(records[unpaused].event, RunUnpaused)


async def test_durable_sleep_survives_a_restart_of_every_service(
    stack: LocalStack, client: LoomClient
) -> None:
    plan = Plan(
        steps=[
            SleepStep(id="nap", seconds=1.0),
            ToolStep(id="after", tool="echo", input={"message": "awake"}, depends_on=["nap"]),
        ]
    )
    accepted = await client.submit(RunRequest(plan=plan))
    timer = await wait_for_event(client, accepted.run_id, lambda r: r.kind == "timer_started")
    assert isinstance(timer.event, TimerStarted) and timer.event.purpose == "sleep"

    # stop every service (the NATS server and the store stay), then start them again
    from loom_services.runtime import Stack
    from loom_services.stack import all_services

    assert stack.stack is not None
    await stack.stack.close()
    stack.stack = None
    # every service (the timer service too) stopped before the timer was due: whatever
    # fires it below is the restarted stack, reading the timer back from JetStream
    assert datetime.now(UTC) < timer.event.fire_at
    stack.stack = Stack(all_services(stack.settings), stack.settings)
    await stack.stack.start()

    records = await client.wait(accepted.run_id, timeout=BOUND_S)
    assert records[-1].event == RunCompleted(output={"after": {"message": "awake"}})
    request = next(r for r in records if is_request("after")(r))
    # the step waited for the whole sleep (the timer service fires < 1 ms early at most)
    assert request.at >= timer.event.fire_at - timedelta(milliseconds=1)
    fired = [r.event.timer_id for r in records if r.kind == "timer_fired"]
    assert fired == [timer.event.timer_id]  # once, although the timer service restarted
    assert [r.seq for r in records] == list(range(1, len(records) + 1))


async def test_live_progress_ends_with_every_step_done(client: LoomClient) -> None:
    run_id = "progress-run"
    # `sleep` goes to the tool-runner (a local call such as `noop` may end the whole
    # run in the commit that plans it, leaving no "running" progress to see)
    plan = Plan(
        steps=[
            ToolStep(
                id=f"s{i}",
                tool="sleep",
                input={"seconds": 0},
                depends_on=[f"s{i - 1}"] if i else [],
            )
            for i in range(3)
        ]
    )
    sub = await client.nc.subscribe(subjects.progress(run_id))
    try:
        await client.nc.flush()  # the subscription is live before the run starts
        accepted = await client.submit(RunRequest(plan=plan, run_id=run_id))
        assert accepted.run_id == run_id
        seen: list[RunProgress] = []
        async with asyncio.timeout(BOUND_S):
            while not seen or seen[-1].status != "completed":
                msg = await sub.next_msg(timeout=BOUND_S)
                seen.append(codec.decode(msg.data, RunProgress))
    finally:
        await sub.unsubscribe()
    last = seen[-1]
    assert (last.run_id, last.status) == (run_id, "completed")
    assert last.steps_done == last.steps_total == 3
    assert last.steps_running == 0
    done = [p.steps_done for p in seen]
    assert done == sorted(done), "progress never goes back"
    assert "running" in [p.status for p in seen]
    records = await client.events(run_id)
    assert isinstance(records[-1].event, RunCompleted)
    assert last.at == records[-1].at  # stamped with the commit's event time
