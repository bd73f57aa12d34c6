"""Forks from a step instance inside composite steps (issue 17, item 4) on the real stack
(real nats-server, both stores): a fork from an approval in one parallel branch, with
its answer edited, asks no other question and calls no tool of the sibling branch; a
fork from ``each/2/ok`` re-runs only element 2's downstream and the collected result;
lineage and diff show what was reused; bad paths are refused with typed errors.

What a fork asked and called is read from its own events (``step_suspended``,
``tool_call_requested``): every question and every tool call is one of them."""

from __future__ import annotations

from typing import Any

import pytest
from waiting import eventually, having, until  # type: ignore[import-not-found]

from loom_cli.render import lineage_tree
from loom_core.contracts import (
    ApprovalStep,
    EventRecord,
    ForeachStep,
    ForkRun,
    ParallelStep,
    Plan,
    RunCompleted,
    RunRequest,
    RunSummary,
    StepCompleted,
    StepSuspended,
    ToolCallRequested,
    ToolStep,
)
from loom_core.lineage import diff_runs
from loom_core.replay import replay
from loom_infra.client import LoomClient, LoomError

pytestmark = pytest.mark.integration

BOUND_S = 10.0
OK = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def echo(sid: str, message: Any, deps: tuple[str, ...] = ()) -> ToolStep:
    return ToolStep(id=sid, tool="echo", input={"message": message}, depends_on=list(deps))


def approval(sid: str, label: str, after: str) -> ApprovalStep:
    return ApprovalStep(id=sid, label=label, schema=OK, depends_on=[after])


REVIEWS = Plan(
    steps=[
        echo("quote", 100),
        ParallelStep(id="reviews", depends_on=["quote"], branches={
            "legal": [
                echo("check_l", "{{ steps.quote.output.message }}"),
                approval("legal_ok", "legal", "check_l"),
                echo("file_l", "{{ steps.legal_ok.output.ok }}"),
            ],
            "finance": [
                echo("check_f", "{{ steps.quote.output.message }}"),
                approval("finance_ok", "finance", "check_f"),
                echo("file_f", "{{ steps.finance_ok.output.ok }}"),
            ],
        }),
        echo("notify", "{{ steps.reviews.output }}"),
    ],
    output="{{ steps.notify.output.message }}",
)  # fmt: skip

EACH = Plan(
    steps=[
        ForeachStep(id="each", items=["a", "b", "c", "d"], concurrency=4, do=[
            echo("prep", "{{ item }}"),
            approval("ok", "reviewer", "prep"),
            echo("use", {"item": "{{ item }}", "ok": "{{ steps.ok.output.ok }}"}),
        ]),
        echo("total", "{{ steps.each.output }}"),
    ],
    output="{{ steps.total.output.message }}",
)  # fmt: skip


def of(records: list[EventRecord], kind: type) -> list[Any]:
    return [r.event for r in records if isinstance(r.event, kind)]


def asked(records: list[EventRecord]) -> list[str]:
    return [e.suspension_id for e in of(records, StepSuspended)]


def called(records: list[EventRecord]) -> list[str]:
    return [e.step_id for e in of(records, ToolCallRequested)]


def reused(records: list[EventRecord], origin: str) -> set[str]:
    return {e.step_id for e in of(records, StepCompleted) if e.reused_from == origin}


async def summary_of(client: LoomClient, run_id: str) -> RunSummary:
    """The finished run as ``loom runs`` shows it (the tracing read model, asynchronous)."""

    async def probe() -> RunSummary | None:
        found = {r.run_id: r for r in await client.runs(limit=100)}
        mine = found.get(run_id)
        return mine if mine is not None and mine.status == "completed" else None

    return await eventually(probe, f"run {run_id} completed in `loom runs`")


async def test_fork_from_a_branch_approval_keeps_the_sibling_branch(client: LoomClient) -> None:
    origin = (await client.submit(RunRequest(plan=REVIEWS))).run_id
    await until(client, origin, having("step_suspended", 2))
    for label in ("legal", "finance"):
        assert (await client.resume(origin, {"ok": True}, label=label)).ok
    a = await client.wait(origin, timeout=BOUND_S)
    assert a[-1].event == RunCompleted(output={"legal": {"message": True},
                                               "finance": {"message": True}})  # fmt: skip

    request = ForkRun(
        run_id=origin,
        from_step="reviews/legal/legal_ok",
        set_output={"reviews/legal/legal_ok": {"ok": False}},
    )
    forked = (await client.fork(request)).run_id
    b = await client.wait(forked, timeout=BOUND_S)
    assert b[-1].event == RunCompleted(output={"legal": {"message": False},
                                               "finance": {"message": True}})  # fmt: skip
    # no question asked again, no tool of the finance branch (nor before) called again
    assert asked(b) == []
    assert called(b) == ["reviews/legal/file_l", "notify"]
    assert reused(b, origin) == {
        "quote", "reviews/finance", "reviews/legal/check_l", "reviews/legal/legal_ok"
    }  # fmt: skip
    fork = b[0].event.fork
    assert (fork.from_step, fork.edited) == ("reviews/legal/legal_ok", ["reviews/legal/legal_ok"])
    assert replay(b)[0].identical  # the fork replays from its own events

    changes = {d.step_id: d.changes for d in diff_runs(a, b)}
    assert changes["reviews/finance"]["reused"] == (False, True)
    assert changes["reviews/legal/legal_ok"]["output"] == ({"ok": True}, {"ok": False})
    assert not [s for s in changes if s.startswith("reviews/finance/")]

    # lineage: `loom runs --lineage` names the instance, the edit and what was reused
    mine = await summary_of(client, forked)
    assert (mine.forked_from, mine.fork_from_step, mine.fork_edited, mine.fork_reused) == (
        origin, "reviews/legal/legal_ok", ["reviews/legal/legal_ok"], 4,
    )  # fmt: skip
    tree = lineage_tree([await summary_of(client, origin), mine], forked)
    label = str(tree.children[0].label)
    assert "from reviews/legal/legal_ok, edited reviews/legal/legal_ok; 4 reused" in label


async def test_fork_from_a_foreach_element_reruns_only_that_element(client: LoomClient) -> None:
    origin = (await client.submit(RunRequest(plan=EACH))).run_id
    await until(client, origin, having("step_suspended", 4))
    for i in range(4):
        reply = await client.resume(origin, {"ok": True}, suspension_id=f"each/{i}/ok#1")
        assert reply.ok, reply
    a = await client.wait(origin, timeout=BOUND_S)
    assert isinstance(a[-1].event, RunCompleted)

    forked = (await client.fork(ForkRun(run_id=origin, from_step="each/2/ok#1"))).run_id
    waiting = await until(client, forked, having("step_suspended"))
    assert asked(waiting) == ["each/2/ok#1"]  # only element 2 asks again
    reply = await client.resume(forked, {"ok": False}, label="reviewer")
    assert reply.ok, reply
    b = await client.wait(forked, timeout=BOUND_S)
    assert asked(b) == ["each/2/ok#1"]
    assert called(b) == ["each/2/use", "total"]
    assert reused(b, origin) == {"each/0", "each/1", "each/3", "each/2/prep"}
    result = b[-1].event.output
    assert [e["message"]["ok"] for e in result] == [True, True, False, True]
    assert [e["message"]["ok"] for e in a[-1].event.output] == [True, True, True, True]
    assert replay(b)[0].identical


async def test_bad_fork_paths_are_refused_with_what_exists(client: LoomClient) -> None:
    origin = (await client.submit(RunRequest(plan=EACH))).run_id
    await until(client, origin, having("step_suspended", 4))
    cases = [
        (ForkRun(run_id=origin, from_step="each/2/okk"), "unknown_step", "$.from_step"),
        (ForkRun(run_id=origin, from_step="each/9/ok"), "step_never_ran", "$.from_step"),
        (ForkRun(run_id=origin, from_step="total", set_output={"each/1/ok": {"ok": 1}}),
         "invalid_output", '$.set_output["each/1/ok"].ok'),
    ]  # fmt: skip
    errors = []
    for request, code, path in cases:
        with pytest.raises(LoomError) as refused:
            await client.fork(request)
        error = refused.value.error
        assert (error.code, error.path) == (code, path), error
        errors.append(error)
    assert "each/2/ok" in errors[0].details["close_matches"]
    assert "each/0, each/1, each/2, each/3" in errors[1].message
    assert errors[2].details["problems"] == [['$.set_output["each/1/ok"].ok',
                                              "expected a boolean, got an integer 1"]]  # fmt: skip


async def test_a_fork_too_big_for_one_run_request_is_refused_before_it_starts(
    client: LoomClient,
) -> None:
    # 40 elements of ~2 KB each: reusing 39 of them is more than LOOM_MAX_PAYLOAD (64 KiB
    # in these tests), which a run request may carry
    plan = Plan(steps=[ForeachStep(id="each", items=list(range(40)), do=[
        echo("x", {"i": "{{ item }}", "pad": "{{ input.pad }}"}),
    ])])  # fmt: skip
    origin = (await client.submit(RunRequest(plan=plan, input={"pad": "p" * 2000}))).run_id
    a = await client.wait(origin, timeout=BOUND_S)
    assert isinstance(a[-1].event, RunCompleted)
    with pytest.raises(LoomError) as refused:
        await client.fork(ForkRun(run_id=origin, from_step="each/3/x"))
    error = refused.value.error
    assert (error.code, error.path) == ("fork_too_large", "$.from_step")
    assert error.details["reused"] == 39 and error.details["bytes"] > error.details["limit"]
    # from the top-level step, nothing is reused: the fork starts
    forked = (await client.fork(ForkRun(run_id=origin, from_step="each"))).run_id
    assert isinstance((await client.wait(forked, timeout=BOUND_S))[-1].event, RunCompleted)
