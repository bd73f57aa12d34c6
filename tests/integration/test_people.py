"""People in the loop across runs (issue 17, items 2 and 3), on a real stack (real
nats-server, both stores): ``describe``, ``runs`` and progress agree on a run that waits
for a person and on a parent whose sub-run does; a sub-run's question is answered
through its parent (by label or suspension id, to any depth), idempotently, and a
refusal names the sub-runs that wait.

Synchronisation is on events (followed, bounded) and on replies; the tracing read model
is asynchronous, so ``runs`` is asked again until it shows the expected state (bounded)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from nats.aio.msg import Msg
from waiting import eventually, having, until  # type: ignore[import-not-found]

from loom_core import codec, subjects
from loom_core.contracts import (
    ApprovalStep,
    ParallelStep,
    Plan,
    RunCompleted,
    RunProgress,
    RunRequest,
    RunSummary,
    StepResumed,
    StepSuspended,
    SubRunRequested,
    SubRunStep,
)
from loom_core.stats import run_stats
from loom_infra.client import LoomClient

pytestmark = pytest.mark.integration

BOUND_S = 10.0
BOOLEAN = {"type": "boolean"}


async def runs_until(
    client: LoomClient, status: str | None, done: Callable[[dict[str, RunSummary]], bool]
) -> dict[str, RunSummary]:
    """``loom runs`` (the tracing read model, updated asynchronously) until ``done``."""

    async def listed() -> dict[str, RunSummary] | None:
        found = {r.run_id: r for r in await client.runs(limit=100, status=status)}
        return found if done(found) else None

    return await eventually(listed, f"runs {status or ''} as expected", BOUND_S, 0.05)


def asking(label: str) -> Plan:
    return Plan(
        steps=[ApprovalStep(id="ok", label=label, schema=BOOLEAN)], output="{{ steps.ok.output }}"
    )


def parent_of(child_plan: Plan) -> Plan:
    return Plan(steps=[SubRunStep(id="sub", plan=child_plan)], output="{{ steps.sub.output }}")


async def child_of(client: LoomClient, run_id: str) -> str:
    seen = await until(client, run_id, having("sub_run_requested"))
    (req,) = [r.event for r in seen if isinstance(r.event, SubRunRequested)]
    return req.child_run_id


async def test_describe_runs_and_progress_see_people_in_parent_and_child(
    client: LoomClient,
) -> None:
    parent = (await client.submit(RunRequest(plan=parent_of(asking("legal"))))).run_id
    # progress of the parent, from the executor's state (subscribed before it changes)
    progress: list[RunProgress] = []
    suspended = asyncio.Event()

    async def on_progress(msg: Msg) -> None:
        progress.append(codec.decode(msg.data, RunProgress))
        if progress[-1].status == "suspended":
            suspended.set()

    sub = await client.nc.subscribe(subjects.progress(parent), cb=on_progress)
    child = await child_of(client, parent)
    await until(client, child, having("step_suspended"))

    # describe: the child waits on a person, named by suspension id and label
    now = datetime.now(UTC)
    stats = run_stats(await client.events(child), as_of=now)
    assert stats.status == "suspended"
    (person,) = [w for w in stats.pending_work if w.kind == "person"]
    assert (person.ref, person.label, person.step_id) == ("ok#1", "legal", "ok")
    assert stats.waiting_ms == pytest.approx(stats.person_wait_ms) and stats.person_wait_ms > 0
    # ... the parent, from its own events, waits on that child (its state is not there)
    pstats = run_stats(await client.events(parent), as_of=now)
    assert pstats.status == "running"
    assert [(w.kind, w.ref) for w in pstats.pending_work] == [("sub_run", child)]
    assert pstats.child_wait_ms > 0

    # runs: the read model holds both, so the parent is suspended on the child's person
    found = await runs_until(client, "suspended", lambda f: parent in f and child in f)
    assert found[child].waiting == {"ok#1": "legal"}
    people = [(w.run_id, w.ref, w.label) for w in found[parent].waits if w.kind == "person"]
    assert people == [(child, "ok#1", "legal")]
    assert ("sub_run", child) in [(w.kind, w.ref) for w in found[parent].waits]
    running = await client.runs(limit=100, status="running")
    assert parent not in {r.run_id for r in running}

    # progress: the parent was published again when its child suspended
    async with asyncio.timeout(BOUND_S):
        await suspended.wait()
    last = [p for p in progress if p.status == "suspended"][-1]
    assert (child, "ok#1") in [(w.run_id, w.ref) for w in last.waits if w.kind == "person"]
    await sub.unsubscribe()

    reply = await client.resume(parent, True, label="legal", request_id="r1")
    assert (reply.ok, reply.run_id, reply.answered_run_id, reply.suspension_id) == (
        True, parent, child, "ok#1",
    )  # fmt: skip
    records = await client.wait(parent, timeout=BOUND_S)
    assert records[-1].event == RunCompleted(output=True)
    done = run_stats(records)
    assert done.status == "completed" and done.pending_work == ()


async def test_a_sub_run_question_is_answered_through_its_parent_idempotently(
    client: LoomClient,
) -> None:
    # parent -> child -> grandchild, the grandchild asks
    parent = (await client.submit(RunRequest(plan=parent_of(parent_of(asking("cfo")))))).run_id
    child = await child_of(client, parent)
    grandchild = await child_of(client, child)
    await until(client, grandchild, having("step_suspended"))

    wrong = await client.resume(parent, True, label="ceo")
    assert wrong.error is not None and wrong.error.code == "unknown_label"
    assert grandchild in wrong.error.message and "cfo (ok#1)" in wrong.error.message
    assert wrong.error.details["waiting"][grandchild] == ["cfo (ok#1)"]
    bad = await client.resume(parent, "yes", label="cfo")
    assert bad.error is not None and bad.error.code == "invalid_resume_data"
    assert bad.answered_run_id == grandchild

    first = await client.resume(parent, True, suspension_id="ok#1", request_id="q1", by="ada")
    assert (first.ok, first.answered_run_id) == (True, grandchild)
    # the same request again, by id or by label, through the parent or not: the same answer
    for again in (
        await client.resume(parent, True, suspension_id="ok#1", request_id="q1", by="ada"),
        await client.resume(parent, True, label="cfo", request_id="q1", by="ada"),
        await client.resume(grandchild, True, label="cfo", request_id="q1", by="ada"),
    ):
        assert (again.ok, again.suspension_id, again.answered_run_id) == (True, "ok#1", grandchild)
    other = await client.resume(parent, False, label="cfo", request_id="q2")
    assert other.error is not None and other.error.code == "already_resumed"
    assert other.already is not None and other.already.request_id == "q1"

    records = await client.wait(parent, timeout=BOUND_S)
    assert records[-1].event == RunCompleted(output=True)
    answers = [r.event for r in await client.events(grandchild) if isinstance(r.event, StepResumed)]
    assert [(a.request_id, a.data) for a in answers] == [("q1", True)]


async def test_two_sub_runs_asking_under_one_label_are_named_not_guessed(
    client: LoomClient,
) -> None:
    plan = Plan(
        steps=[
            ParallelStep(
                id="both",
                branches={
                    "a": [SubRunStep(id="x", plan=asking("ops"))],
                    "b": [SubRunStep(id="y", plan=asking("ops"))],
                },
            )
        ]
    )
    parent = (await client.submit(RunRequest(plan=plan))).run_id
    seen = await until(client, parent, having("sub_run_requested", 2))
    kids = [r.event.child_run_id for r in seen if isinstance(r.event, SubRunRequested)]
    for kid in kids:
        await until(client, kid, having("step_suspended"))
    ambiguous = await client.resume(parent, True, label="ops")
    assert ambiguous.error is not None and ambiguous.error.code == "ambiguous_label"
    for kid in kids:
        assert kid in ambiguous.error.message
    for kid in kids:  # each answered in its own run
        reply = await client.resume(kid, True, label="ops")
        assert (reply.ok, reply.answered_run_id) == (True, kid)
    records = await client.wait(parent, timeout=BOUND_S)
    assert records[-1].kind == "run_completed"
    assert not [r for r in records if isinstance(r.event, StepSuspended)]
