"""The console's JSON API on a real stack (nats-server, SQLite, five services) over real
HTTP, without a browser: every view of a run, every action, and what a careless or
hostile caller sends (bad parameters, bodies, hosts, origins, missing CSRF tokens)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from console_support import (  # noqa: F401
    APPROVAL,
    EXAMPLES,
    Console,
    console_fixture,
    fork_request,
    serving,
)
from waiting import eventually, having, until  # type: ignore[import-not-found]

from loom_cli.app import load_run_request
from loom_infra.settings import StoreSettings

pytestmark = pytest.mark.integration


async def submit_example(c: Console, name: str) -> str:
    return (await c.client.submit(load_run_request(EXAMPLES / name, [], None))).run_id


async def test_a_finished_run_reads_through_every_view(console: Console) -> None:
    run_id = await submit_example(console, "foreach.yaml")
    records = await console.client.wait(run_id, timeout=10)
    http = console.http

    view = (await http.get(f"/api/runs/{run_id}")).json()
    assert (view["status"], view["name"], view["events"]) == ("completed", "foreach", len(records))
    assert view["output"] == [9, 1, 16, 4] and view["top_steps"] == ["squares"]

    # the event list pages: 10 at a time, with where to go on
    page = (await http.get(f"/api/runs/{run_id}/events", params={"limit": 10})).json()
    assert [e["seq"] for e in page["events"]] == list(range(1, 11))
    assert page["total"] == len(records) and page["next_after"] == 10
    assert page["events"][0]["kind"] == "run_requested" and "type" not in page["events"][0]["data"]
    last = (await http.get(f"/api/runs/{run_id}/events", params={"after": len(records) - 2})).json()
    assert [e["seq"] for e in last["events"]] == [len(records) - 1, len(records)]
    assert last["next_after"] is None

    # the timeline groups foreach elements under their step
    steps = {
        s["step_id"]: s for s in (await http.get(f"/api/runs/{run_id}/timeline")).json()["steps"]
    }
    square = steps["squares/2/square"]
    assert (square["group"], square["depth"], square["status"], square["tool"]) == (
        "squares/2",
        1,
        "succeeded",
        "math",
    )
    assert square["attempts"][0]["duration_ms"] is not None

    calls = (await http.get(f"/api/runs/{run_id}/calls", params={"limit": 100})).json()
    assert calls["total"] == 8 and {c["name"] for c in calls["calls"]} == {"sleep", "math"}
    mul = next(c for c in calls["calls"] if c["step_id"] == "squares/2/square")
    assert mul["input"] == {"op": "mul", "a": 4, "b": 4} and mul["output"] == {"result": 16}

    # the state at any event: before the first step ended, and at the end
    early = (await http.get(f"/api/runs/{run_id}/state", params={"at": 3})).json()
    assert early["at"] == 3 and early["state"]["output"] is None
    end = (await http.get(f"/api/runs/{run_id}/state")).json()
    assert end["at"] == len(records) and end["state"]["output"] == [9, 1, 16, 4]

    trace = (await http.get(f"/api/runs/{run_id}/trace")).json()
    assert trace["spans"][0]["depth"] == 0 and trace["spans"][0]["parent_span_id"] is None
    assert trace["spans"][0]["attributes"]["loom.run.id"] == run_id
    assert all(s["offset_ms"] >= 0 for s in trace["spans"]) and trace["total_ms"] > 0

    replayed = (await console.post(f"/api/runs/{run_id}/replay", {})).json()
    assert replayed == {**replayed, "identical": True, "events": len(records)}


async def test_the_run_list_filters_and_shows_people_first(console: Console) -> None:
    waiting = await submit_example(console, "approval.yaml")
    await until(console.client, waiting, having("step_suspended"))
    done = (await console.client.submit(fork_request())).run_id
    await console.client.wait(done, timeout=10)
    http = console.http

    async def listed() -> dict[str, dict] | None:
        # the run list is tracing's read model: it follows the events (folding several
        # steps per fetch), so it is waited for, not assumed current
        rows = {r["run_id"]: r for r in (await http.get("/api/runs")).json()["runs"]}
        seen = rows.get(waiting, {}).get("status") == "suspended" and done in rows
        return rows if seen else None

    rows = await eventually(listed, "the run list to show the waiting run suspended")
    assert rows[waiting]["status"] == "suspended"
    assert rows[waiting]["waiting"] == ["person: manager"]
    assert rows[done]["labels"] == {"team": "blue"} and rows[done]["name"] == "forkable"

    suspended = (await http.get("/api/runs", params={"status": "suspended"})).json()["runs"]
    assert [r["run_id"] for r in suspended] == [waiting]
    labelled = (await http.get("/api/runs", params={"label": "team=blue"})).json()["runs"]
    assert [r["run_id"] for r in labelled] == [done]
    by_tool = (await http.get("/api/runs", params={"tool": "math", "since": "1h"})).json()["runs"]
    assert [r["run_id"] for r in by_tool] == [done]


async def test_resume_through_the_api_names_every_wrong_field(console: Console) -> None:
    run_id = await submit_example(console, "approval.yaml")
    await until(console.client, run_id, having("step_suspended"))
    view = (await console.http.get(f"/api/runs/{run_id}")).json()
    (suspension,) = view["suspensions"]
    assert suspension["label"] == "manager" and suspension["schema"]["required"] == ["approved"]
    sid = suspension["suspension_id"]

    wrong = await console.post(
        f"/api/runs/{run_id}/resume",
        {"suspension_id": sid, "data": {"approved": "yes", "note": "x" * 300, "extra": 1}},
    )
    assert wrong.status_code == 422
    paths = {i["path"] for i in wrong.json()["issues"]}
    assert paths == {"$.approved", "$.note", "$.extra"}  # every field at once

    ok = await console.post(
        f"/api/runs/{run_id}/resume", {"suspension_id": sid, "data": {"approved": True}}
    )
    assert ok.status_code == 200 and ok.json()["ok"]
    records = await console.client.wait(run_id, timeout=10)
    assert records[-1].kind == "run_completed"
    again = await console.post(
        f"/api/runs/{run_id}/resume", {"suspension_id": sid, "data": {"approved": False}}
    )
    assert again.status_code == 409 and again.json()["error"]["code"]


async def test_pause_unpause_and_cancel(console: Console) -> None:
    run_id = await submit_example(console, "approval.yaml")
    await until(console.client, run_id, having("step_suspended"))
    paused = await console.post(f"/api/runs/{run_id}/control", {"action": "pause"})
    assert paused.status_code == 200 and paused.json()["ok"]
    assert (await console.http.get(f"/api/runs/{run_id}")).json()["paused"] is True
    assert (await console.post(f"/api/runs/{run_id}/control", {"action": "unpause"})).json()["ok"]
    bad = await console.post(f"/api/runs/{run_id}/control", {"action": "explode"})
    assert bad.status_code == 400 and bad.json()["error"]["path"] == "$.action"
    cancelled = await console.post(f"/api/runs/{run_id}/control", {"action": "cancel"})
    assert cancelled.json()["ok"]
    records = await console.client.wait(run_id, timeout=10)
    assert records[-1].kind == "run_cancelled"
    assert records[-1].event.by == "console"  # who did it, as the console was told


async def test_fork_with_an_edit_then_diff(console: Console) -> None:
    await fork_edit_and_diff(console)


async def test_on_postgresql_too(pg_store_settings: StoreSettings) -> None:
    """The console only reads through the routes: the store behind them is the
    executor's business, and the same flow works on PostgreSQL."""
    async with serving(pg_store_settings) as console:
        await fork_edit_and_diff(console)

        async def both() -> list[dict] | None:
            # tracing's read model follows the events: waited for, not assumed current
            got = (await console.http.get("/api/runs", params={"label": "team=blue"})).json()
            return got["runs"] if len(got["runs"]) >= 2 else None

        runs = await eventually(both, "the run and its fork in the run list")
        assert len(runs) == 2  # the run and its fork, which keeps its labels


async def fork_edit_and_diff(console: Console) -> None:
    origin = (await console.client.submit(fork_request())).run_id
    await console.client.wait(origin, timeout=10)
    reply = await console.post(
        f"/api/runs/{origin}/fork", {"from_step": "b", "set_output": {"a": {"result": 5}}}
    )
    assert reply.status_code == 200, reply.text
    forked = reply.json()["run_id"]
    records = await console.client.wait(forked, timeout=10)
    assert records[-1].event.output == {"b": 50, "c": "ADA"}

    view = (await console.http.get(f"/api/runs/{forked}")).json()
    assert (view["forked_from"], view["fork_from_step"]) == (origin, "b")
    diff = (await console.http.get("/api/diff", params={"a": origin, "b": forked})).json()
    changes = {
        s["step_id"]: {c["field"]: (c["a"], c["b"]) for c in s["changes"]} for s in diff["steps"]
    }
    assert changes["b"]["output"] == ({"result": 20}, {"result": 50})
    assert changes["a"]["output"] == ({"result": 2}, {"result": 5})

    unknown = await console.post(f"/api/runs/{origin}/fork", {"from_step": "nope"})
    assert unknown.status_code == 409 and "nope" in unknown.json()["error"]["message"]


async def test_validate_shows_every_problem_at_its_path_and_run_submits(console: Console) -> None:
    invalid = (EXAMPLES / "invalid-plan.yaml").read_text()
    checked = (await console.post("/api/plans/validate", {"text": invalid})).json()
    assert not checked["ok"] and len(checked["issues"]) >= 3
    assert all(i["path"].startswith("$") and i["code"] and i["message"] for i in checked["issues"])
    refused = await console.post("/api/plans/run", {"text": invalid})
    assert refused.status_code == 422 and refused.json()["issues"] == checked["issues"]

    unknown_tool = yaml.safe_load(APPROVAL)
    unknown_tool["plan"]["steps"][0]["tool"] = "no_such_tool"
    found = (await console.post("/api/plans/validate", {"text": json.dumps(unknown_tool)})).json()
    assert [i["code"] for i in found["issues"]] == ["unknown_tool"]
    assert found["issues"][0]["path"] == "$.plan.steps[0].tool"

    ok = (await console.post("/api/plans/validate", {"text": APPROVAL})).json()
    assert ok == {"ok": True, "issues": [], "name": "approval", "steps": 3}
    started = await console.post(
        "/api/plans/run", {"text": APPROVAL, "input": {"vendor": "X", "amount": 3}}
    )
    run_id = started.json()["run_id"]
    records = await until(console.client, run_id, having("step_suspended"))
    assert records[0].event.input == {"vendor": "X", "amount": 3}


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("steps: [", "not_yaml"),
        ("- a\n- b", "not_a_mapping"),
        ("steps: " + "[" * 200 + "]" * 200, "too_deep"),
        ("plan: {steps: [{kind: tool, id: a, tool: echo, colour: red}]}", "unknown_field"),
        ("request: do things", "missing_field"),
    ],
)
async def test_hostile_plans_get_a_typed_problem(console: Console, text: str, code: str) -> None:
    reply = (await console.post("/api/plans/validate", {"text": text})).json()
    assert not reply["ok"] and reply["issues"][0]["code"] == code, reply


async def test_guards_refuse_what_a_browser_attack_would_send(console: Console) -> None:
    http = console.http
    page = await http.get("/")
    assert (
        page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    )
    assert '<script src="/static/console.js"' in page.text  # the app's own file, no CDN
    assert (await http.get("/static/console.js")).status_code == 200

    body = {"action": "cancel"}
    no_token = await http.post("/api/runs/x/control", json=body)
    assert no_token.status_code == 403 and no_token.json()["error"]["code"] == "bad_csrf"
    wrong = await http.post("/api/runs/x/control", json=body, headers={"X-Loom-CSRF": "guess"})
    assert wrong.json()["error"]["code"] == "bad_csrf"
    other_site = await http.post(
        "/api/runs/x/control", json=body, headers={**console.csrf, "Origin": "https://evil.example"}
    )
    assert other_site.status_code == 403 and other_site.json()["error"]["code"] == "bad_origin"
    form_post = await http.post(
        "/api/runs/x/control",
        content=b"action=cancel",
        headers={**console.csrf, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form_post.json()["error"]["code"] == "bad_content_type"
    rebinding = await http.get("/api/session", headers={"Host": "attacker.example"})
    assert rebinding.status_code == 403 and rebinding.json()["error"]["code"] == "bad_host"


async def test_bad_parameters_and_bodies_get_typed_errors(console: Console) -> None:
    http = console.http
    cases = [
        (await http.get("/api/runs", params={"limit": "lots"}), 400, "bad_parameter", "limit"),
        (await http.get("/api/runs", params={"limit": "100000"}), 400, "bad_parameter", "limit"),
        (await http.get("/api/runs", params={"status": "sleepy"}), 400, "bad_parameter", "status"),
        (
            await http.get("/api/runs", params={"since": "last tuesday"}),
            400,
            "bad_parameter",
            "since",
        ),
        (await http.get("/api/runs", params={"label": "no-equals"}), 400, "bad_parameter", "label"),
        (await http.get("/api/runs/no-such-run"), 404, "not_found", "run_id"),
        (await http.get("/api/runs/no-such-run/events"), 404, "not_found", "run_id"),
        (await http.get("/api/runs/" + "x" * 300), 400, "bad_run_id", "run_id"),
        (
            await console.post("/api/runs/x/fork", {"from_step": "a", "colour": 1}),
            400,
            "invalid_request",
            "$.colour",
        ),
        (await console.post("/api/runs/x/resume", {"data": 1}), 400, "invalid_request", None),
    ]
    for reply, status, code, path in cases:
        error = reply.json()["error"]
        assert (reply.status_code, error["code"]) == (status, code), reply.text
        assert error["message"]
        if path is not None:
            assert error.get("path") == path, error
    not_json = await http.post(
        "/api/plans/validate",
        content=b"{",
        headers={**console.csrf, "Content-Type": "application/json"},
    )
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"


async def test_live_events_stream_until_the_run_ends(console: Console) -> None:
    run_id = await submit_example(console, "approval.yaml")
    await until(console.client, run_id, having("step_suspended"))
    seen: list[dict[str, object]] = []
    async with console.http.stream("GET", f"/api/runs/{run_id}/live", params={"after": 2}) as live:
        assert live.headers["content-type"].startswith("text/event-stream")
        kind = ""
        resumed = False
        async for line in live.aiter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "run_event":
                seen.append(json.loads(line[5:]))
                if seen[-1]["kind"] == "step_suspended" and not resumed:
                    resumed = True  # everything stored so far came; now the run goes on
                    view = (await console.http.get(f"/api/runs/{run_id}")).json()
                    sid = view["suspensions"][0]["suspension_id"]
                    await console.post(
                        f"/api/runs/{run_id}/resume",
                        {"suspension_id": sid, "data": {"approved": False}},
                    )
            elif kind == "end":
                break
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(3, seqs[-1] + 1))  # from after=2, none missing, none twice
    assert seen[-1]["kind"] == "run_completed"


async def test_unreachable_stack_is_a_503_that_says_what_to_do(console: Console) -> None:
    await console.server.console.client.close()
    reply = await console.http.get("/api/runs")
    assert reply.status_code == 503
    assert "loom up" in reply.json()["error"]["message"]


# ----------------------------------------------------------------------------- the CLI verb

LOOM = str(Path(sys.executable).parent / "loom")


def cli_env(c: Console) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    seed = c.stack.seed_file("operator")
    assert seed is not None
    return {**env, "LOOM_NATS_URL": c.stack.url, "LOOM_NKEY_SEED_FILE": str(seed)}


async def test_loom_console_serves_until_ctrl_c(console: Console) -> None:
    proc = await asyncio.create_subprocess_exec(
        LOOM, "console", "--port", "0", env=cli_env(console),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):  # the CLI's start, bounded
            line = (await proc.stderr.readline()).decode()
        url = line.split("console: ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=url) as http:
            reply = await http.get("/api/runs")
            assert reply.status_code == 200 and reply.json()["runs"] == []
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            _, err = await proc.communicate()
        assert proc.returncode == 0 and b"Traceback" not in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_loom_console_on_a_busy_port_says_so(console: Console) -> None:
    busy = str(console.server.port)
    done = await asyncio.to_thread(
        subprocess.run, [LOOM, "console", "--port", busy], env=cli_env(console),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert f"port {busy}" in done.stderr and "Traceback" not in done.stderr
