"""End to end on the real stack (nats-server, SQLite, the five services in this
process): plans calling MCP tools (the demo server and the published mcp-server-time,
both over stdio), validated against the tools' input schemas; and a circuit breaker
opening and closing under a failing MCP tool, visible in the run's trace."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.integration.conftest import make_settings
from tests.integration.waiting import eventually, until
from tests.mcp_servers.fixtures import demo_stdio, time_stdio
from typer.testing import CliRunner

from loom_cli.app import app
from loom_core import codec, subjects
from loom_core.contracts import (
    Plan,
    RetryPolicy,
    RunCompleted,
    RunRequest,
    ToolCallFailed,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_infra.client import LoomClient
from loom_infra.settings import StoreSettings
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration


@pytest.fixture(params=[True], ids=["secure"])
async def mcp_stack(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    sqlite_store_settings: StoreSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[LoomClient, Path, LocalStack]]:
    flag = tmp_path / "fragile-fails"
    config = {
        "mcp_servers": {
            "demo": demo_stdio(
                env={"DEMO_FAIL_FILE": str(flag), "DEMO_COUNTER_FILE": str(flag) + ".bumps"},
                tools={"boom": {"requires_auth": True}, "has_token": {"admin_only": True}},
            ),
            "time": time_stdio(),
        },
        "breakers": {"threshold": 2, "cooldown_s": 0.6},
    }
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("LOOM_TOOLS_CONFIG", str(path))
    settings = make_settings(sqlite_store_settings)
    secure = request.param  # insecure only where a test forges messages on purpose
    async with (
        LocalStack(settings, nats_port=-1, secure=secure) as stack,
        await stack.client() as client,
    ):
        yield client, flag, stack


async def submit_when_listed(client: LoomClient, plan: Plan) -> str:
    """MCP servers connect in the background: a plan naming their tools validates once
    the catalog lists them (a refusal before that is `unknown_tool`)."""
    for _ in range(200):
        accepted = await client.submit(RunRequest(plan=plan))
        records = await client.wait(accepted.run_id, timeout=30)
        refused = [r for r in records if r.kind == "plan_rejected"]
        if not refused:
            return accepted.run_id
        assert {i.code for i in refused[0].event.issues} == {"unknown_tool"}, refused
        await asyncio.sleep(0.1)  # the polling interval of a bounded wait (servers start)
    raise AssertionError("MCP tools never joined the catalog")


async def test_a_plan_calls_mcp_tools(mcp_stack) -> None:
    client, _, _ = mcp_stack
    plan = Plan(
        steps=[
            ToolStep(id="now", tool="time.get_current_time", input={"timezone": "UTC"}),
            ToolStep(id="sum", tool="demo.add", input={"a": 40, "b": 2}),
        ],
        output={"tz": "{{ steps.now.output.timezone }}", "sum": "{{ steps.sum.output.total }}"},
    )
    run_id = await submit_when_listed(client, plan)
    records = await client.wait(run_id, timeout=30)
    assert isinstance(records[-1].event, RunCompleted), records[-1]
    assert records[-1].event.output == {"tz": "UTC", "sum": 42}

    # a plan is validated against the MCP tool's input schema
    bad = Plan(steps=[ToolStep(id="sum", tool="demo.add", input={"a": "forty", "b": 2})])
    accepted = await client.submit(RunRequest(plan=bad))
    records = await client.wait(accepted.run_id, timeout=30)
    issues = next(r for r in records if r.kind == "plan_rejected").event.issues
    assert [(i.code, i.path) for i in issues][0][1].endswith(".input.a"), issues


async def test_breaker_opens_and_closes_visible_in_the_trace(mcp_stack) -> None:
    client, flag, _ = mcp_stack
    # wait for the catalog with a harmless plan first
    await submit_when_listed(client, Plan(steps=[ToolStep(id="x", tool="demo.fragile", input={})]))
    flag.touch()
    plan = Plan(
        steps=[
            ToolStep(
                id="call",
                tool="demo.fragile",
                input={},
                retry=RetryPolicy(
                    max_attempts=12, initial_delay_s=0.15, multiplier=1.3, max_delay_s=0.4
                ),
            )
        ]
    )
    accepted = await client.submit(RunRequest(plan=plan))

    def refused_by_breaker(seen) -> bool:
        return any(
            isinstance(r.event, ToolCallFailed) and r.event.error.code == "circuit_open"
            for r in seen
        )

    await until(client, accepted.run_id, refused_by_breaker, 30)
    flag.unlink()  # the dependency recovers: the next trial after the cool-down closes it
    records = await client.wait(accepted.run_id, timeout=30)
    assert isinstance(records[-1].event, RunCompleted), records[-1]
    codes = [r.event.error.code for r in records if isinstance(r.event, ToolCallFailed)]
    assert codes[:2] == ["tool_error", "tool_error"] and "circuit_open" in codes
    completed = [r for r in records if r.kind == "tool_call_completed"][-1]
    assert [t["to"] for t in completed.event.breaker] == ["half_open", "closed"]

    spans = await client.trace(accepted.run_id, rebuild=True)
    events = [(e.name, e.attributes["loom.breaker.name"]) for s in spans for e in s.events]
    breaker_events = [e for e in events if e[0].startswith("breaker.")]
    assert {name for _, name in breaker_events} == {"tool:demo.fragile"}
    states = [e[0].removeprefix("breaker.") for e in breaker_events]
    # open, then trials (half_open) that reopen it while the tool still fails (the flag
    # may outlive a cool-down), and finally one that closes it
    assert states[0] == "open" and states[-2:] == ["half_open", "closed"], states
    for before, after in zip(states, states[1:], strict=False):
        assert (before, after) in {
            ("open", "half_open"),
            ("half_open", "open"),
            ("half_open", "closed"),
        }, states


async def test_access_rules_are_enforced_against_the_principal(mcp_stack) -> None:
    client, _, _ = mcp_stack
    await submit_when_listed(client, Plan(steps=[ToolStep(id="x", tool="demo.add", input={
        "a": 1, "b": 2})]))  # fmt: skip
    # the operator's client submits without a token: an anonymous principal
    plan = Plan(steps=[ToolStep(id="b", tool="demo.boom", input={"reason": "x"})])
    accepted = await client.submit(RunRequest(plan=plan))
    records = await client.wait(accepted.run_id, timeout=30)
    issues = next(r for r in records if r.kind == "plan_rejected").event.issues
    assert [(i.code, i.path) for i in issues] == [("tool_forbidden", "$.plan.steps[0].tool")]
    assert "authenticated" in issues[0].message
    # admin_only: the operator's identity may (it controls the stack anyway)
    plan = Plan(steps=[ToolStep(id="t", tool="demo.has_token", input={})])
    accepted = await client.submit(RunRequest(plan=plan))
    records = await client.wait(accepted.run_id, timeout=30)
    assert isinstance(records[-1].event, RunCompleted), records[-1]


async def test_loom_tools_shows_sources_state_and_schemas(
    mcp_stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _, stack = mcp_stack
    await submit_when_listed(client, Plan(steps=[ToolStep(id="x", tool="time.get_current_time",
        input={"timezone": "UTC"})]))  # fmt: skip
    runner = CliRunner()
    env = {"LOOM_NATS_URL": stack.url, "LOOM_NKEY_SEED_FILE": str(stack.seed_file("operator"))}

    async def both_servers_listed() -> dict[str, dict] | None:
        # each MCP server joins the catalog on its own, and its tools one key at a time:
        # wait for every tool read below
        listing = await asyncio.to_thread(runner.invoke, app, ["tools", "-o", "json"], env=env)
        assert listing.exit_code == 0, listing.output
        specs = {s["name"]: s for s in json.loads(listing.output)}
        wanted = ("demo.boom", "demo.bump", "demo.fragile", "time.get_current_time")
        return specs if all(name in specs for name in wanted) else None

    specs = await eventually(both_servers_listed, "both MCP servers' tools in `loom tools`")
    assert specs["time.get_current_time"]["source"] == "mcp:time"
    assert specs["echo"]["source"] == "builtin"
    assert specs["demo.boom"]["requires_auth"] and not specs["demo.bump"]["idempotent"]
    assert all(s.get("available", True) for n, s in specs.items() if n.startswith("time."))
    text = await asyncio.to_thread(runner.invoke, app, ["tools"], env={**env, "COLUMNS": "200"})
    assert text.exit_code == 0 and "mcp:time" in text.output and "demo.fragile" in text.output
    shown = await asyncio.to_thread(
        runner.invoke, app, ["tools", "show", "time.get_current_time"], env=env
    )
    assert shown.exit_code == 0, shown.output
    assert "input schema" in shown.output and '"timezone"' in shown.output
    missing = await asyncio.to_thread(runner.invoke, app, ["tools", "show", "time.nope"], env=env)
    assert missing.exit_code == 1 and "did you mean" in missing.output


@pytest.mark.parametrize("mcp_stack", [False], ids=["insecure"], indirect=True)
async def test_a_non_idempotent_mcp_tool_runs_once_per_key(mcp_stack) -> None:
    """The tool-runner's ledger rules hold for MCP tools: `demo.bump` has no idempotent
    hint, so a redelivered request (copies republished under new message ids) is
    answered from the ledger and the server sees one call."""
    client, flag, _ = mcp_stack
    counter = Path(str(flag) + ".bumps")
    await submit_when_listed(client, Plan(steps=[ToolStep(id="x", tool="demo.add",
        input={"a": 1, "b": 2})]))  # fmt: skip
    plan = Plan(steps=[ToolStep(id="b", tool="demo.bump", input={"label": "once"})])
    accepted = await client.submit(RunRequest(plan=plan))
    records = await client.wait(accepted.run_id, timeout=30)
    assert isinstance(records[-1].event, RunCompleted), records[-1]
    assert counter.read_text() == "once\n"
    request = next(r for r in records if isinstance(r.event, ToolCallRequested))
    answers = await client.nc.subscribe(subjects.inbox(accepted.run_id, "tool"))
    for i in range(3):
        await client.js.publish(
            subjects.run_event(accepted.run_id, "tool_call_requested"),
            codec.encode(request),
            headers={subjects.MSG_ID: f"dup-{i}"},
        )
    for _ in range(3):  # every copy is answered, from the ledger
        got = codec.decode((await answers.next_msg(timeout=10)).data, ToolResult)
        assert got.ok and got.idempotency_key == request.event.idempotency_key
    await answers.unsubscribe()
    assert counter.read_text() == "once\n"
