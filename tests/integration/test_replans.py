"""Re-planning after a failed step, end to end on both stores: the whole stack in this
process and the fake OpenAI server reached through litellm. A plan with ``replan``
whose step fails asks the planner's model for the rest (told the failure and what
succeeded); the model's first tail is refused by the validator and repaired once; the
run completes on the revised plan without running the kept step again; replay asks no
model. A model that never gives a valid tail fails the run with the step's failure."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_agents import BOUND_S, model_stack, of  # type: ignore[import-not-found]

from loom_core.contracts import (
    Plan,
    PlanRevised,
    Replan,
    ReplanRefused,
    ReplanRequested,
    RunCompleted,
    RunFailed,
    RunRequest,
    ToolCallRequested,
    ToolStep,
)
from loom_core.replay import replay
from loom_infra.client import LoomClient
from loom_infra.fakemodel import FakeModelServer, Reply
from loom_infra.settings import StoreSettings

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(
    store_settings: StoreSettings, tmp_path: Path
) -> AsyncIterator[tuple[LoomClient, FakeModelServer]]:
    async with model_stack(store_settings, tmp_path) as (stack, c, server):
        yield c, server


PLAN = Plan(
    steps=[
        ToolStep(id="fetch", tool="echo", input={"message": "{{ input.city }}"}),
        ToolStep(
            id="parse",
            tool="flaky",
            input={"fail_times": 3, "code": "parse_error"},
            depends_on=["fetch"],
        ),  # fmt: skip
        ToolStep(id="report", tool="echo", input={"message": "{{ steps.parse.output }}"}),
    ],
    replan=Replan(max=1),
)
BAD_TAIL = {"steps": [{"kind": "tool", "id": "shout", "tool": "shout", "input": {}}]}
GOOD_TAIL = {
    "steps": [{"kind": "tool", "id": "shout", "tool": "text",
               "input": {"text": "{{ steps.fetch.output.message }}", "op": "upper"}}],
    "output": "{{ steps.shout.output.result }}",
}  # fmt: skip


async def test_a_failed_step_is_replanned_repaired_once_and_the_run_completes(
    client: tuple[LoomClient, FakeModelServer],
) -> None:
    c, server = client
    server.script("main-model", Reply(content=json.dumps(BAD_TAIL)),
                  Reply(content=json.dumps(GOOD_TAIL)))  # fmt: skip
    run = await c.submit(RunRequest(plan=PLAN, input={"city": "Lisbon"}))
    records = await c.wait(run.run_id, timeout=BOUND_S)
    assert of(records, RunCompleted)[0].output == "LISBON"
    asked = of(records, ReplanRequested)[0]
    assert (asked.step_id, asked.error.code, asked.kept) == ("parse", "parse_error", ["fetch"])
    revised = of(records, PlanRevised)[0]
    assert [s.id for s in revised.plan.steps] == ["fetch", "shout"]
    planning = revised.planning
    assert planning is not None and planning.prompt_id.startswith("replan-v1:")
    assert [[i.code for i in r] for r in planning.repairs] == [["unknown_tool"]]
    # the model was told what failed and what succeeded (with its output)
    told = json.loads(server.bodies[0]["messages"][1]["content"])
    assert told["failed"]["error"]["code"] == "parse_error"
    assert told["succeeded"] == {"fetch": {"message": "Lisbon"}}
    assert [e.step_id for e in of(records, ToolCallRequested)].count("fetch") == 1
    seen = server.total
    report, _ = replay(records)
    assert report.identical, report.divergence
    assert server.total == seen


async def test_a_model_without_a_valid_tail_fails_the_run_with_the_step_failure(
    client: tuple[LoomClient, FakeModelServer],
) -> None:
    c, server = client
    hostile: list[Any] = [
        Reply(content="not json at all"),
        Reply(
            content=json.dumps(
                {
                    "steps": [
                        {
                            "kind": "tool",
                            "id": "fetch",
                            "tool": "echo",
                            "input": {"message": "again"},
                        }
                    ]
                }
            )
        ),  # fmt: skip
        Reply(content="x" * 5000),
    ]
    server.script("main-model", *hostile)
    run = await c.submit(RunRequest(plan=PLAN, input={"city": "Oslo"}))
    records = await c.wait(run.run_id, timeout=BOUND_S)
    refused = of(records, ReplanRefused)[0]
    assert refused.planning is not None and len(refused.planning.repairs) == 3
    codes = [[i.code for i in r] for r in refused.planning.repairs]
    # malformed; a tail that reuses a kept step's id; oversized garbage
    assert "duplicate_step_id" in codes[1], codes
    failed = of(records, RunFailed)[0].error
    assert failed.code == "parse_error" and failed.details["step_id"] == "parse"
    report, _ = replay(records)
    assert report.identical, report.divergence
