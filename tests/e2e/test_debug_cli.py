"""The debugging commands of the ``loom`` CLI, as separate OS processes against a live
stack (embedded nats-server, the five services in this process): two people resuming
the same suspension at the same moment from two processes, ``replay``, ``state --at``,
``show -o jsonl`` and a replay of that export with nothing running, ``fork
--set-output`` and ``diff --json``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import pytest

from loom_cli.app import load_run_request
from loom_core.contracts import (
    EventRecord,
    Plan,
    RunCompleted,
    RunRequest,
    StepCompleted,
    StepResumed,
    StepRetryScheduled,
    ToolCallRequested,
    ToolStep,
)
from loom_infra.client import LoomClient
from loom_infra.settings import Settings
from loom_services.stack import LocalStack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
LOOM = str(Path(sys.executable).parent / "loom")
BOUND_S = 10.0
# nothing listens there: a command that needed NATS would fail instead of answering
NO_NATS = "nats://127.0.0.1:9"


@dataclass
class Live:
    stack: LocalStack
    client: LoomClient
    env: dict[str, str]
    stopped: bool = False

    async def stop(self) -> None:
        """Stop everything, NATS included (idempotent)."""
        if not self.stopped:
            self.stopped = True
            await self.client.close()
            await self.stack.close()


@pytest.fixture
async def live(request: pytest.FixtureRequest) -> AsyncIterator[Live]:
    kind = getattr(request, "param", "sqlite")
    store = request.getfixturevalue(f"{'sqlite' if kind == 'sqlite' else 'pg'}_store_settings")
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=store)
    async with LocalStack(settings, nats_port=-1) as stack:
        env = {**os.environ, "LOOM_NATS_URL": stack.url, "LOOM_LOG_LEVEL": "WARNING",
               "LOOM_NKEY_SEED_FILE": str(stack.seed_file("operator"))}  # fmt: skip
        live = Live(stack, await stack.client(), env)
        try:
            yield live
        finally:
            await live.stop()


def loom(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LOOM, *args], env=env, capture_output=True, text=True, timeout=30, cwd=ROOT
    )


async def aloom(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(loom, env, *args)


async def wait_for(client: LoomClient, run_id: str, kind: str) -> list[EventRecord]:
    seen: list[EventRecord] = []
    async with asyncio.timeout(BOUND_S):
        async with aclosing(client.follow(run_id, timeout=BOUND_S)) as stream:
            async for record in stream:
                seen.append(record)
                if record.kind == kind:
                    return seen
    raise AssertionError(f"run {run_id} ended without {kind}: {[r.kind for r in seen]}")


def resumers(env: dict[str, str], run_id: str, who: list[tuple[str, str, str]]) -> list:
    """Start one ``loom resume`` process per (person, request id, data), all at once."""
    procs = []
    for person, request_id, data in who:
        # getpass reads LOGNAME first: each process answers as another person
        penv = {**env, "LOGNAME": person, "USER": person}
        args = ["resume", run_id, "--label", "manager", "--data", data, "--request-id", request_id]
        procs.append(
            subprocess.Popen(
                [LOOM, *args],
                env=penv,
                cwd=ROOT,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    return procs


def flat(text: str) -> str:
    """Text as one line: rich wraps long lines at 80 columns when not on a terminal."""
    return " ".join(text.split())


async def finish(procs: list) -> list[tuple[int, str, str]]:
    outs = await asyncio.gather(*(asyncio.to_thread(p.communicate, None, 60) for p in procs))
    return [(p.returncode, flat(out), flat(err)) for p, (out, err) in zip(procs, outs, strict=True)]


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("live", ["sqlite", "postgres"], indirect=True)
async def test_two_processes_resume_one_suspension_at_once_and_exactly_one_wins(
    live: Live,
) -> None:
    client = live.client
    contested = await client.submit(load_run_request(EXAMPLES / "approval.yaml", [], None))
    repeated = await client.submit(load_run_request(EXAMPLES / "approval.yaml", [], None))
    for run in (contested, repeated):
        await wait_for(client, run.run_id, "step_suspended")

    answers = {
        "ada": '{"approved": true, "note": "ada says yes"}',
        "bob": '{"approved": false, "note": "bob says no"}',
    }
    procs = resumers(live.env, contested.run_id, [
        ("ada", "ada-1", answers["ada"]), ("bob", "bob-1", answers["bob"]),
    ])  # fmt: skip
    # the same request sent twice (a retry, or a double click): both succeed, once
    twice = resumers(live.env, repeated.run_id, [
        ("cy", "same-1", '{"approved": true}'), ("cy", "same-1", '{"approved": true}'),
    ])  # fmt: skip
    results = await finish(procs)
    repeats = await finish(twice)

    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    winner = "ada" if results[0][0] == 0 else "bob"
    _, out, _ = results[0 if winner == "ada" else 1]
    _, _, err = results[1 if winner == "ada" else 0]
    assert f"{contested.run_id}: resumed approve#1" in out
    assert "already_resumed" in err and "already resumed by" in err
    assert f"by {winner}@" in err  # by whom...
    assert f"{winner} says" in err  # ...and with what

    records = await client.wait(contested.run_id, timeout=BOUND_S)
    resumed = [r.event for r in records if isinstance(r.event, StepResumed)]
    assert len(resumed) == 1
    assert resumed[0].by.startswith(f"{winner}@")
    assert resumed[0].data == json.loads(answers[winner])
    assert resumed[0].request_id == f"{winner}-1"
    result = "paid 120 EUR to ACME" if winner == "ada" else "not paid: ACME was refused"
    assert records[-1].event == RunCompleted(
        output={"answer": json.loads(answers[winner]), "result": result}
    )

    assert [code for code, _, _ in repeats] == [0, 0], repeats
    records = await client.wait(repeated.run_id, timeout=BOUND_S)
    resumed = [r.event for r in records if isinstance(r.event, StepResumed)]
    assert [(e.request_id, e.data) for e in resumed] == [("same-1", {"approved": True})]


# ----------------------------------------------------------------------------- replay etc.


async def test_replay_state_show_and_a_replay_with_nothing_running(
    live: Live, tmp_path: Path
) -> None:
    client, env = live.client, live.env
    names = ["tool-retry", "foreach-collect", "parallel", "approval-expiry", "step-timeout"]
    run_ids = [
        (await client.submit(load_run_request(EXAMPLES / f"{n}.yaml", [], None))).run_id
        for n in names
    ]
    runs = await asyncio.gather(*(client.wait(r, timeout=BOUND_S) for r in run_ids))

    replays = await asyncio.gather(*(aloom(env, "replay", r) for r in run_ids))
    for name, records, done in zip(names, runs, replays, strict=True):
        assert done.returncode == 0, (name, done.stdout, done.stderr)
        assert done.stdout.strip() == f"identical: {len(records)} events re-decided", name

    retry_run, retried = run_ids[0], runs[0]
    retry = next(r for r in retried if isinstance(r.event, StepRetryScheduled))
    at, end, shown = await asyncio.gather(
        aloom(env, "state", retry_run, "--at", str(retry.seq)),
        aloom(env, "state", retry_run),
        aloom(env, "show", retry_run, "-o", "jsonl"),
    )
    assert at.returncode == 0, at.stderr
    view = json.loads(at.stdout)
    assert (view["run_id"], view["version"], view["status"]) == (retry_run, retry.seq, "running")
    assert view["steps"]["call"] == {"status": "retry_wait", "attempt": 1}
    assert list(view["timers"]) == []  # the retry's timer starts with the next event
    final = json.loads(end.stdout)
    assert (final["version"], final["status"]) == (len(retried), "completed")
    assert final["output"] == {"value": 42, "attempt": 3}
    assert shown.returncode == 0, shown.stderr
    export = tmp_path / "run.jsonl"
    export.write_text(shown.stdout)  # `loom show RUN -o jsonl > run.jsonl`
    assert len(shown.stdout.splitlines()) == len(retried)

    # nothing runs any more: no services, no NATS
    await live.stop()
    offline = {**env, "LOOM_NATS_URL": NO_NATS}
    again, state_then = await asyncio.gather(
        aloom(offline, "replay", str(export)),
        aloom(offline, "state", str(export), "--at", str(retry.seq + 1)),
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"identical: {len(retried)} events re-decided"
    view = json.loads(state_then.stdout)
    assert (view["version"], view["status"]) == (retry.seq + 1, "running")
    assert view["timers"] == {"call:retry:2": {"purpose": "retry", "step_id": "call"}}

    # an export whose recorded decision differs from what the code decides: the report
    # names the event, what the stream holds and what the code would do
    lines = export.read_text().splitlines()
    tampered = json.loads(lines[retry.seq - 1])
    tampered["event"]["delay_s"] = 7.0
    lines[retry.seq - 1] = json.dumps(tampered)
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(lines) + "\n")
    diverged = await aloom(offline, "replay", str(changed))
    assert diverged.returncode == 1, diverged.stderr
    report = json.loads(diverged.stdout)
    assert (report["identical"], report["seq"]) == (False, retry.seq)
    assert report["recorded"]["delay_s"] == 7.0
    assert report["decided"]["delay_s"] == retry.event.delay_s == 0.05


# ----------------------------------------------------------------------------- fork + diff

FORK_PLAN = Plan(
    steps=[
        ToolStep(id="a", tool="math", input={"op": "add", "a": 1, "b": 1}),
        ToolStep(
            id="b",
            tool="math",
            depends_on=["a"],
            input={"op": "mul", "a": "{{ steps.a.output.result }}", "b": 10},
        ),
        ToolStep(id="c", tool="text", input={"text": "{{ input.name }}", "op": "upper"}),
    ],
    output="{{ steps.b.output.result }}",
)


async def test_fork_with_an_edited_output_and_diff_from_the_cli(live: Live, tmp_path: Path) -> None:
    client, env = live.client, live.env
    origin = (await client.submit(RunRequest(plan=FORK_PLAN, input={"name": "ada"}))).run_id
    first = await client.wait(origin, timeout=BOUND_S)
    assert first[-1].event == RunCompleted(output=20)

    forked = await aloom(
        env,
        "fork",
        origin,
        "--from-step",
        "b",
        "--set-output",
        'a={"result": 5}',
        "--run-id",
        "forked-1",
    )
    assert forked.returncode == 0, forked.stderr
    assert json.loads(forked.stdout) == 50  # a different final result
    assert f"fork of {origin} from b: forked-1" in forked.stderr

    records = await client.events("forked-1")
    assert records[0].event.fork is not None and records[0].event.fork.run_id == origin
    done = {r.event.step_id: r.event for r in records if isinstance(r.event, StepCompleted)}
    assert done["a"].reused_from == origin and done["a"].output == {"result": 5}
    assert done["c"].reused_from == origin
    assert done["b"].reused_from is None and done["b"].output == {"result": 50}
    calls = [r.event for r in records if isinstance(r.event, ToolCallRequested)]
    assert [c.step_id for c in calls] == ["b"]  # only what depends on the edit ran again

    diff = await aloom(env, "diff", origin, "forked-1", "--json")
    assert diff.returncode == 0, diff.stderr
    changes = {d["step_id"]: d["changes"] for d in json.loads(diff.stdout)}
    assert changes["b"]["output"] == [{"result": 20}, {"result": 50}]
    assert changes["b"]["inputs"] == [
        [{"op": "mul", "a": 2, "b": 10}],
        [{"op": "mul", "a": 5, "b": 10}],
    ]
    assert changes["a"]["output"] == [{"result": 2}, {"result": 5}]
    assert "output" not in changes["c"]

    # the same diff from two exports, with nothing running
    for run_id, name in ((origin, "a.jsonl"), ("forked-1", "b.jsonl")):
        shown = await aloom(env, "show", run_id, "-o", "jsonl")
        (tmp_path / name).write_text(shown.stdout)
    await live.stop()
    offline = await aloom(
        {**env, "LOOM_NATS_URL": NO_NATS},
        "diff",
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "b.jsonl"),
    )
    assert offline.returncode == 0, offline.stderr
    assert '{"result": 20} → {"result": 50}' in flat(offline.stdout)
