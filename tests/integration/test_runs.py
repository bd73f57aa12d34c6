"""Runs through the whole stack: real nats-server (JetStream), real SQLite / PostgreSQL,
the five services in this process. Each test runs on both stores."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from nats.js.api import DeliverPolicy
from waiting import eventually  # type: ignore[import-not-found]

from loom_cli.app import load_run_request
from loom_core import codec, routes, subjects
from loom_core.contracts import (
    DeadLetter,
    EventRecord,
    Plan,
    PlanRejected,
    RunCompleted,
    RunFailed,
    RunRequest,
    StepSkipped,
    SubmitAccepted,
    SubmitRejected,
    ToolStep,
)
from loom_infra.client import LoomClient, LoomError
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def dead_letters(
    client: LoomClient, service: str, count: int, subject: str | None = None
) -> list[DeadLetter]:
    sub = await client.js.subscribe(
        subject or subjects.dead_letter(service),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    try:
        return [
            codec.decode((await sub.next_msg(timeout=10)).data, DeadLetter) for _ in range(count)
        ]
    finally:
        await sub.unsubscribe()


async def test_hello_dag_completes_with_output_memory_and_trace(client: LoomClient) -> None:
    request = load_run_request(EXAMPLES / "hello-dag.yaml", [], None)
    accepted = await client.submit(request)
    records = await client.wait(accepted.run_id, timeout=30)
    final = records[-1].event
    assert isinstance(final, RunCompleted)
    assert final.output == {
        "greeting": "Hello, Ada from Lisbon!",
        "words": 4,
        "city_loud": "LISBON",
    }
    # the stored stream is gap-free and equals what was published
    stored = await client.events(accepted.run_id)
    assert [r.seq for r in stored] == list(range(1, len(stored) + 1))
    assert stored == records

    async def thread():
        entries = await client.thread(accepted.run_id)
        return entries if len(entries) == 2 else None

    entries = await eventually(thread, "memory thread")
    assert [e.role for e in entries] == ["user", "assistant"]
    assert entries[1].content == final.output

    async def finished_trace():
        runs = await client.runs()
        done = [r for r in runs if r.run_id == accepted.run_id and r.status == "completed"]
        return await client.trace(accepted.run_id) if done else None

    spans = await eventually(finished_trace, "trace")
    names = [s.name for s in spans]
    assert sum(n.startswith("execute_tool") for n in names) == 4
    assert len({s.trace_id for s in spans}) == 1
    rebuilt = await client.trace(accepted.run_id, rebuild=True)
    assert sorted(msgspec.to_builtins(rebuilt), key=lambda s: s["span_id"]) == sorted(
        msgspec.to_builtins(spans), key=lambda s: s["span_id"]
    )


async def test_invalid_plan_is_rejected_with_every_reason(client: LoomClient) -> None:
    plan = Plan(
        steps=[
            ToolStep(id="a", tool="echo", input={"message": "{{ steps.b.output }}"}),
            ToolStep(id="b", tool="echo", input={"message": 1}, depends_on=["a"]),
            ToolStep(id="b", tool="echo", input={"message": 2}),
            ToolStep(id="c", tool="ecko", input={}),
            ToolStep(id="d", tool="echo", input={"message": "{{ steps.zzz.output }}"}),
        ]
    )
    accepted = await client.submit(RunRequest(plan=plan))
    records = await client.wait(accepted.run_id, timeout=30)
    rejected = records[-1].event
    assert isinstance(rejected, PlanRejected)
    codes = {i.code for i in rejected.issues}
    assert {"dependency_cycle", "duplicate_step_id", "unknown_tool", "missing_step"} <= codes
    cycle = next(i for i in rejected.issues if i.code == "dependency_cycle")
    assert "a → b → a" in cycle.message or "b → a → b" in cycle.message
    unknown = next(i for i in rejected.issues if i.code == "unknown_tool")
    assert unknown.path == "$.plan.steps[3].tool"
    assert "echo" in unknown.message


async def test_natural_language_request_without_model_says_what_to_configure(
    client: LoomClient,
) -> None:
    accepted = await client.submit(RunRequest(request="plan my trip to Lisbon"))
    records = await client.wait(accepted.run_id, timeout=30)
    rejected = records[-1].event
    assert isinstance(rejected, PlanRejected)
    assert rejected.issues[0].code == "no_model_configured"
    assert "LOOM_MODEL" in rejected.issues[0].message


async def test_bad_submissions_get_typed_errors_and_dead_letters(client: LoomClient) -> None:
    malformed = await client.submit_raw(b'{"plan": {"steps": [')
    assert isinstance(malformed, SubmitRejected) and malformed.error.code == "malformed_json"
    wrong = await client.submit_raw(
        json.dumps({"plan": {"steps": [{"kind": "tool", "id": "a", "tool": 5}]}}).encode()
    )
    assert isinstance(wrong, SubmitRejected)
    assert wrong.error.code == "invalid_shape"
    assert wrong.error.path == "$.plan.steps[0].tool"
    huge = await client.submit_raw(b'{"input": {"x": "' + b"x" * 70_000 + b'"}}')
    assert isinstance(huge, SubmitRejected) and huge.error.code == "payload_too_large"
    bad_id = await client.submit_raw(b'{"run_id": "a.b", "request": "x"}')
    assert isinstance(bad_id, SubmitRejected) and bad_id.error.path == "$.run_id"

    # client mistakes are recorded apart from poison (routes.REJECTED), off the submit path
    letters = await dead_letters(client, "executor", 4, routes.REJECTED.subject(service="executor"))
    assert [d.error.code for d in letters] == [
        "malformed_json",
        "invalid_shape",
        "payload_too_large",
        "invalid_run_id",
    ]
    assert letters[0].origin_subject == subjects.submit("operator")
    # the system is still fine: another run completes
    ok = await client.submit(RunRequest(plan=Plan(steps=[ToolStep(id="a", tool="noop")])))
    assert isinstance((await client.wait(ok.run_id, timeout=30))[-1].event, RunCompleted)


async def test_poison_inbox_message_goes_to_dead_letter(
    client: LoomClient, stack: LocalStack
) -> None:
    async with await stack.client("toolrunner") as toolrunner:  # the route's only publisher
        await toolrunner.js.publish(subjects.inbox("nobody", "tool"), b"not json")
    letters = await dead_letters(client, "executor", 1)
    assert letters[0].origin_subject == subjects.inbox("nobody", "tool")
    assert letters[0].payload == "not json"


async def test_submission_is_idempotent_by_run_id(client: LoomClient) -> None:
    request = RunRequest(run_id="same-run", plan=Plan(steps=[ToolStep(id="a", tool="noop")]))
    first, second = await asyncio.gather(client.submit(request), client.submit(request))
    assert {first.existing, second.existing} == {False, True}
    records = await client.wait("same-run", timeout=30)
    assert sum(r.kind == "run_requested" for r in records) == 1


async def test_failing_tool_fails_the_run_with_a_typed_error(client: LoomClient) -> None:
    plan = Plan(
        steps=[
            # loopback is refused by default: a typed error, not a request
            ToolStep(id="fetch", tool="http_get", input={"url": "http://127.0.0.1:9/"}),
            ToolStep(id="after", tool="noop", depends_on=["fetch"]),
        ]
    )
    accepted = await client.submit(RunRequest(plan=plan))
    records = await client.wait(accepted.run_id, timeout=30)
    failed = records[-1].event
    assert isinstance(failed, RunFailed)
    assert failed.error.code == "address_not_allowed"
    assert failed.error.details["step_id"] == "fetch"
    assert any(isinstance(r.event, StepSkipped) and r.event.step_id == "after" for r in records)


async def test_many_concurrent_runs_all_complete(client: LoomClient) -> None:
    plan = Plan(
        steps=[
            ToolStep(id=f"s{i}", tool="noop", depends_on=[f"s{i - 1}"] if i else [])
            for i in range(5)
        ]
    )
    accepted = await asyncio.gather(*(client.submit(RunRequest(plan=plan)) for _ in range(20)))
    results = await asyncio.gather(*(client.wait(a.run_id, timeout=60) for a in accepted))
    assert all(isinstance(r[-1].event, RunCompleted) for r in results)
    assert all(isinstance(a, SubmitAccepted) for a in accepted)


async def test_unknown_submit_fields_are_refused_not_ignored(client: LoomClient) -> None:
    reply = await client.submit_raw(b'{"plan": {"steps": [], "stpes": []}}')
    assert isinstance(reply, SubmitRejected)
    assert "stpes" in reply.error.message
    with pytest.raises(LoomError) as info:
        await client.submit(RunRequest())
    assert info.value.error.code == "missing_plan"


async def test_restart_keeps_runs_and_resumes_consumers(stack: LocalStack) -> None:
    """Stopping every service and starting them again loses nothing."""
    plan = Plan(steps=[ToolStep(id="a", tool="noop")])
    async with await stack.client() as client:
        first = await client.submit(RunRequest(plan=plan))
        await client.wait(first.run_id, timeout=30)
    settings = stack.settings
    assert stack.stack is not None
    await stack.stack.close()
    stack.stack = None
    from loom_services.runtime import Stack
    from loom_services.stack import all_services

    stack.stack = Stack(all_services(settings), settings)
    await stack.stack.start()
    async with await stack.client() as client:
        events = await client.events(first.run_id)
        assert isinstance(events[-1].event, RunCompleted)
        second = await client.submit(RunRequest(plan=plan))
        assert isinstance((await client.wait(second.run_id, timeout=30))[-1].event, RunCompleted)


async def test_poison_events_reach_each_consumers_dead_letters(
    client: LoomClient, stack: LocalStack
) -> None:
    """A malformed event on a subject the tool-runner or planner consumes ends in that
    service's dead-letter subject with the reason; it is never retried in a loop."""
    executor = await stack.client("executor")  # run events' only publisher (its relay)
    await executor.js.publish(subjects.run_event("x", "tool_call_requested"), b"{oops")
    await executor.js.publish(
        subjects.run_event("x", "run_requested"),
        codec.encode(
            EventRecord(
                run_id="x", seq=1, at=datetime(2026, 1, 1, tzinfo=UTC), event=RunCompleted(output=1)
            )
        ),
    )
    await executor.close()
    tool_letter = (await dead_letters(client, "toolrunner", 1))[0]
    assert tool_letter.error.code == "malformed_json"
    assert tool_letter.origin_subject == "loom.run.x.tool_call_requested"
    plan_letter = (await dead_letters(client, "planner", 1))[0]
    assert plan_letter.error.code == "unexpected_event"
    assert "run_completed" in plan_letter.error.message
