"""A burst of submissions shares the writer's commits (issue 10, startcost): each
submission is handled in a task of its own, so N clients at once are not answered one
commit after another. Repeats and conflicts of one run id in the same burst are still
told apart. Real nats-server, both stores."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from loom_core.contracts import (
    EventRecord,
    Plan,
    RunRequest,
    RunRequested,
    SubmitAccepted,
    ToolStep,
)
from loom_infra.client import LoomClient, LoomError
from loom_services.executor import ExecutorService
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

BURST = 30


def _plan(text: str) -> Plan:
    return Plan(steps=[ToolStep(id="say", tool="noop", description=text)])


async def test_a_burst_of_submissions_shares_commits(stack: LocalStack, client: LoomClient) -> None:
    executor = next(s for s in stack.stack.services if isinstance(s, ExecutorService))
    created: list[int] = []  # runs created per commit that created any

    def count(_ids: list[int], records: list[EventRecord]) -> None:
        runs = sum(isinstance(r.event, RunRequested) for r in records)
        if runs:
            created.append(runs)

    executor.host.listeners.append(count)
    same = RunRequest(plan=_plan("same"), run_id="burst-same")
    requests = [RunRequest(plan=_plan(f"n{i}"), run_id=f"burst-{i}") for i in range(BURST)]
    other = RunRequest(plan=_plan("another plan"), run_id="burst-same")

    async def submit(request: RunRequest) -> Any:
        try:
            return await client.submit(request)
        except LoomError as exc:
            return exc

    replies = await asyncio.gather(*(submit(r) for r in [*requests, same, same, other]))

    accepted = replies[:BURST]
    assert all(isinstance(r, SubmitAccepted) and not r.existing for r in accepted), accepted
    assert {r.run_id for r in accepted} == {f"burst-{i}" for i in range(BURST)}
    # one id, three submissions: the first the writer takes creates the run; a repeat of
    # the same request is told it exists; the other plan is refused (or, had it come
    # first, both repeats are)
    first, again, another = replies[BURST:]
    if isinstance(another, LoomError):
        assert isinstance(first, SubmitAccepted) and isinstance(again, SubmitAccepted)
        assert sorted([first.existing, again.existing]) == [False, True]
        assert another.info.code == "run_id_conflict"
    else:
        assert isinstance(another, SubmitAccepted) and not another.existing
        assert isinstance(first, LoomError) and isinstance(again, LoomError)
        assert first.info.code == again.info.code == "run_id_conflict"
    assert sum(created) == BURST + 1
    # one commit per submission was the serialized way; together they share batches
    assert len(created) <= BURST // 2, created
    for request in requests[:3]:
        records = await client.wait(request.run_id or "", timeout=30)
        assert records[-1].kind == "run_completed"
