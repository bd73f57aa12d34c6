"""The run list as people use it: what waits for them, and where forks come from."""

from __future__ import annotations

import pytest
from waiting import eventually  # type: ignore[import-not-found]

from loom_cli.render import lineage_tree
from loom_core.contracts import (
    ApprovalStep,
    ForkRun,
    Plan,
    RunCompleted,
    RunRequest,
    StepSuspended,
    ToolStep,
)
from loom_infra.client import LoomClient

pytestmark = pytest.mark.integration


async def test_suspended_runs_are_listed_with_their_labels_and_forks_with_lineage(
    client: LoomClient,
) -> None:
    plan = Plan(
        steps=[
            ToolStep(id="a", tool="echo", input={"message": 1}),
            ApprovalStep(id="ok", label="manager", schema={"type": "boolean"}, depends_on=["a"]),
        ]
    )
    accepted = await client.submit(RunRequest(plan=plan))
    async for record in client.follow(accepted.run_id, timeout=30):
        if isinstance(record.event, StepSuspended):
            break

    async def listed():
        runs = await client.runs(status="suspended")
        return [r for r in runs if r.run_id == accepted.run_id]

    (waiting,) = await eventually(listed, "the suspended run listed")
    assert waiting.waiting == {"ok#1": "manager"}
    assert (await client.resume(accepted.run_id, True, label="manager", request_id="x")).ok
    original = await client.wait(accepted.run_id, timeout=30)
    assert isinstance(original[-1].event, RunCompleted)

    async def gone():
        runs = await client.runs(status="suspended")
        return all(r.run_id != accepted.run_id for r in runs)

    await eventually(gone, "the resumed run gone from the list")

    fork = ForkRun(run_id=accepted.run_id, from_step="ok", new_run_id="fork-of-approval")
    assert (await client.fork(fork)).run_id == "fork-of-approval"

    async def forked():
        runs = await client.runs(limit=100)
        mine = [r for r in runs if r.run_id == "fork-of-approval"]
        return runs if mine and mine[0].forked_from == accepted.run_id else None

    runs = await eventually(forked, "the fork in the lineage")
    tree = lineage_tree(runs, "fork-of-approval")
    assert tree.label.startswith(accepted.run_id)  # type: ignore[union-attr]
    assert tree.children[0].label.startswith("fork-of-approval")  # type: ignore[union-attr]
