"""A parent and its sub-run seen by every view (issue 17): ``loom describe`` (the real
CLI, as a separate process), ``loom runs --suspended`` (the CLI too), live progress and
the trace's run span agree on each run's status and on what it waits for: a person
(the child's, listed on the parent with the child's run id), a timer, an external
event and the child run. Real nats-server, both stores.

Synchronisation: the run's events are followed (bounded); the tracing read model is
asynchronous, so ``runs`` and the trace are asked again until they show the state
(``eventually``, bounded)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg
from waiting import eventually, having, until  # type: ignore[import-not-found]

from loom_core import codec, ids, subjects
from loom_core.contracts import (
    ApprovalStep,
    EventMatch,
    ParallelStep,
    Plan,
    RunProgress,
    RunRequest,
    SleepStep,
    SubRunStep,
    Wait,
    WaitEventStep,
)
from loom_infra.client import LoomClient
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOOM = str(Path(sys.executable).parent / "loom")
BOUND_S = 15.0

CHILD = Plan(steps=[ApprovalStep(id="ok", label="legal", schema={"type": "boolean"})])
PARENT = Plan(
    steps=[
        ParallelStep(id="all", branches={
            "ask": [SubRunStep(id="sub", plan=CHILD)],
            "nap": [SleepStep(id="nap", seconds=600)],
            "hear": [WaitEventStep(id="hear", events=[EventMatch(name="paid", key="o7")])],
        })
    ]
)  # fmt: skip


def loom(stack: LocalStack, *args: str) -> Any:
    """Run the real ``loom`` CLI against the stack; its JSON output."""
    env = {**os.environ, "LOOM_NATS_URL": stack.url, "LOOM_LOG_LEVEL": "WARNING"}
    seed = stack.seed_file("operator")
    if seed is not None:
        env["LOOM_NKEY_SEED_FILE"] = str(seed)
    done = subprocess.run(
        [LOOM, *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def key(w: Wait | dict[str, Any]) -> tuple[str, str, str, str]:
    """What a wait is, as every view must say it (times are rendered differently)."""
    d = codec.to_builtins(w) if isinstance(w, Wait) else w
    return (d["kind"], d.get("ref", ""), d.get("label", ""), d.get("run_id", ""))


async def test_every_view_agrees_on_a_parent_waiting_on_a_child_that_waits_on_a_person(
    stack: LocalStack, client: LoomClient
) -> None:
    parent = "people-parent"
    progress: list[RunProgress] = []

    async def on_progress(msg: Msg) -> None:
        progress.append(codec.decode(msg.data, RunProgress))

    sub = await client.nc.subscribe(subjects.progress(parent), cb=on_progress)
    await client.nc.flush()
    await client.submit(RunRequest(plan=PARENT, run_id=parent))
    seen = await until(client, parent, having("sub_run_requested"))
    child = next(r.event.child_run_id for r in seen if r.kind == "sub_run_requested")
    await until(client, child, having("step_suspended"))
    await until(client, parent, having("event_wait_started"))

    expected = {
        ("person", "ok#1", "legal", child),
        ("timer", "all/nap/nap:sleep", "", ""),
        ("event", "paid:o7", "", ""),
        ("sub_run", child, "", ""),
    }

    # describe (the CLI): the parent is suspended and lists the child's person
    described = await asyncio.to_thread(loom, stack, "describe", parent, "-o", "json")
    assert described["status"] == "suspended"
    assert {key(w) for w in described["waits"]} == expected
    texts = [p["text"] for p in described["pending_work"]]
    assert any(f"child run {child} (suspended, waiting on 'legal' ({child}: ok#1))" in t
               for t in texts), texts  # fmt: skip
    assert any(t.startswith(f"child run {child}: step ok: a person") for t in texts), texts
    child_described = await asyncio.to_thread(loom, stack, "describe", child, "-o", "json")
    assert child_described["status"] == "suspended"
    assert {key(w) for w in child_described["waits"]} == {("person", "ok#1", "legal", "")}

    # runs (the read model): the same status and waits; --suspended lists both runs
    async def both_suspended() -> dict[str, Any] | None:
        found = {r.run_id: r for r in await client.runs(limit=100, status="suspended")}
        return found if {parent, child} <= set(found) else None

    found = await eventually(both_suspended, "parent and child suspended in `loom runs`")
    assert {key(w) for w in found[parent].waits} == expected
    listed = await asyncio.to_thread(loom, stack, "runs", "--suspended", "-o", "json")
    assert {parent, child} <= {r["run_id"] for r in listed}

    # progress (the executor's memory): the same
    async def suspended_progress() -> RunProgress | None:
        last = progress[-1] if progress else None
        return last if last is not None and last.status == "suspended" else None

    last = await eventually(suspended_progress, "the parent's progress says suspended")
    assert {key(w) for w in last.waits} == expected
    await sub.unsubscribe()

    # the trace's run span: suspended for both (the parent's lifted at query time)
    async def run_span_status(run_id: str) -> str | None:
        spans = await client.trace(run_id)
        root = next(s for s in spans if s.span_id == ids.span_id(run_id, "run"))
        status = root.attributes.get("loom.run.status")
        return status if status == "suspended" else None

    assert await eventually(lambda: run_span_status(child), "child run span suspended")
    assert await eventually(lambda: run_span_status(parent), "parent run span suspended")

    # answered through the parent: no person is waited on any more, so the parent is
    # running (a timer and an event are waits, not reasons to be suspended)
    assert (await client.resume(parent, True, label="legal")).ok
    await until(client, parent, having("step_completed", 2))  # the sub_run step and its branch
    after = await asyncio.to_thread(loom, stack, "describe", parent, "-o", "json")
    assert after["status"] == "running"
    assert {key(w) for w in after["waits"]} == {
        ("timer", "all/nap/nap:sleep", "", ""), ("event", "paid:o7", "", ""),
    }  # fmt: skip

    async def running_in_runs() -> Any:
        found = {r.run_id: r for r in await client.runs(limit=100, status="running")}
        return found.get(parent)

    now = await eventually(running_in_runs, "the parent running again in `loom runs`")
    assert {key(w) for w in now.waits} == {key(w) for w in after["waits"]}
