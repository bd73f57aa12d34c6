"""``loom`` as a new user meets it (issue 16), each case as separate OS processes against
a real stack (nats-server, SQLite, the five services in this process) or a real
nats-server: the exit code (docs/cli.md), what goes to stdout and to stderr, and never a
traceback. Plans written for the plan-execute framework run end to end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from waiting import having, until  # type: ignore[import-not-found]

from loom_core import codec, subjects
from loom_core.contracts import SubmitAccepted, SubmitRejected, SubmitReply
from loom_infra.client import LoomClient
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings
from loom_services.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SAMPLES = ROOT / "tests" / "fixtures" / "plan_execute"
LOOM = str(Path(sys.executable).parent / "loom")


@dataclass
class Live:
    stack: LocalStack
    client: LoomClient
    env: dict[str, str]


@pytest.fixture
async def live(sqlite_store_settings) -> AsyncIterator[Live]:  # type: ignore[no-untyped-def]
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=sqlite_store_settings)
    async with LocalStack(settings, nats_port=-1) as stack:
        env = {**os.environ, "LOOM_NATS_URL": stack.url, "LOOM_LOG_LEVEL": "WARNING",
               "LOOM_NKEY_SEED_FILE": str(stack.seed_file("operator"))}  # fmt: skip
        env.pop("COLUMNS", None)
        async with await stack.client() as client:
            yield Live(stack, client, env)


def loom(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LOOM, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


async def aloom(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(loom, env, *args)


def clean(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


def bare_env(tmp_path: Path, url: str) -> dict[str, str]:
    """The CLI against ``url`` with no key (an insecure server, or nothing)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    return {**env, "LOOM_NATS_URL": url, "LOOM_DATA_DIR": str(tmp_path / "empty")}


# --------------------------------------------------------------------------- plan-execute


EXPECTED = {
    "sequential": {"greeting": "Hello, Ada!", "loud": "HELLO, ADA!"},
    "dag": {"words": 4, "loud": "THE QUICK BROWN FOX"},
    "loop": [{"result": "LISBON"}, {"result": "PORTO"}, {"result": "FARO"}, {"result": "BRAGA"}],
    "conditional": {"reply": "thanks for the kind words", "score": 0.75},
    "map_reduce": {"total": 9, "per_page": [4, 2, 3]},
}


async def test_plan_execute_samples_run_end_to_end(live: Live) -> None:
    names = sorted(EXPECTED)
    done = await asyncio.gather(*(
        aloom(live.env, "run", str(SAMPLES / f"{n}.yaml"), "--format", "plan-execute", "-o", "json")
        for n in names
    ))  # fmt: skip
    for name, result in zip(names, done, strict=True):
        clean(result)
        assert result.returncode == 0, (name, result.stderr)
        body = json.loads(result.stdout)
        assert body["status"] == "completed" and body["output"] == EXPECTED[name], name


async def test_the_silent_cases_are_rejected_with_the_native_form(
    live: Live, tmp_path: Path
) -> None:
    plan = tmp_path / "silent.yaml"
    plan.write_text(
        "input: {cities: [Lisbon]}\n"
        "plan:\n  steps:\n"
        "    - {kind: tool, id: greet, tool: echo, input: {message: 'hi ${input.name}'}}\n"
        "    - kind: foreach\n      id: weather\n      items: '{{ input.cities }}'\n"
        "      output: all_weather\n"
        "      do: [{kind: tool, id: w, tool: echo, input: {message: '{{ item }}'}}]\n"
    )
    done = await aloom(live.env, "run", str(plan), "-o", "json")
    clean(done)
    assert done.returncode == 1
    body = json.loads(done.stdout)
    assert body["status"] == "rejected"
    issues = {i["code"]: i for i in body["issues"]}
    assert "{{ input.name }}" in issues["foreign_template"]["message"]
    assert issues["foreign_template"]["path"] == "$.plan.steps[0].input.message"
    assert "{{ steps.w.output }}" in issues["constant_output"]["message"]


# --------------------------------------------------------------------------- one stack, many verbs


async def test_status_words_rejections_threads_and_pipes(live: Live) -> None:
    env = live.env
    rejected = await aloom(env, "run", str(EXAMPLES / "invalid-plan.yaml"), "-o", "json")
    clean(rejected)
    assert rejected.returncode == 1
    body = json.loads(rejected.stdout)
    # the issues, not `"error": null`; the same status word as `loom runs`
    assert body["status"] == "rejected" and body["error"]["code"] == "plan_rejected"
    assert {i["code"] for i in body["issues"]} >= {"dependency_cycle", "unknown_tool"}
    assert "plan rejected" in rejected.stderr  # progress on stderr, data on stdout

    ok = await aloom(env, "run", str(EXAMPLES / "hello-dag.yaml"), "-o", "json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["status"] == "completed"

    listed = await aloom(env, "runs", "--status", "rejected", "-o", "json")
    assert listed.returncode == 0
    assert [r["run_id"] for r in json.loads(listed.stdout)] == [body["run_id"]]
    statuses = {
        r["run_id"]: r["status"]
        for r in json.loads((await aloom(env, "runs", "-o", "json")).stdout)
    }
    assert statuses[body["run_id"]] == "rejected"
    assert statuses[json.loads(ok.stdout)["run_id"]] == "completed"

    bogus = await aloom(env, "runs", "--status", "bogus")
    clean(bogus)
    assert bogus.returncode == 2 and bogus.stdout == ""
    assert "unknown status 'bogus'" in bogus.stderr and "completed" in bogus.stderr

    thread = await aloom(env, "thread", "no-such-thread")
    clean(thread)
    assert thread.returncode == 1 and thread.stdout == ""
    assert "no thread 'no-such-thread'" in thread.stderr

    # piped: whole lines, not cut at 80 columns
    table = await aloom(env, "runs")
    header, *rows = table.stdout.splitlines()
    assert "waiting for" in header
    assert any(body["run_id"] in row and "rejected" in row for row in rows)
    assert max(len(line) for line in table.stdout.splitlines()) > 80

    signal_out = await aloom(env, "signal", "payment", "A-17", "--data", "{}", "-o", "json")
    assert signal_out.returncode == 0
    assert json.loads(signal_out.stdout) == {
        "published": True, "name": "payment", "key": "A-17", "signal_id": "",
    }  # fmt: skip


async def test_a_run_id_names_one_request(live: Live) -> None:
    env, plan = live.env, str(EXAMPLES / "hello-dag.yaml")
    first = await aloom(env, "run", plan, "--run-id", "order-17", "-o", "json")
    assert first.returncode == 0, first.stderr
    again = await aloom(env, "run", plan, "--run-id", "order-17", "-o", "json")
    assert again.returncode == 0 and "exists already: following it" in again.stderr
    assert json.loads(again.stdout)["output"] == json.loads(first.stdout)["output"]

    other = await aloom(env, "run", plan, "--run-id", "order-17", "-i", "name=Bob", "-o", "json")
    clean(other)
    assert other.returncode == 2
    refusal = json.loads(other.stdout)
    assert refusal["status"] == "refused" and refusal["error"]["code"] == "run_id_conflict"
    assert refusal["error"]["details"] == {"run_id": "order-17", "differs": ["input"]}


async def test_the_submit_contract_for_other_languages(live: Live) -> None:
    nc = live.client.nc

    async def submit(body: dict, headers: dict | None = None) -> SubmitReply:
        msg = await nc.request(
            subjects.submit("operator"), json.dumps(body).encode(), timeout=10, headers=headers
        )
        return codec.decode(msg.data, SubmitReply)  # type: ignore[arg-type]

    plan = {"steps": [{"kind": "tool", "id": "a", "tool": "echo", "input": {"message": "x"}}]}
    # Nats-Msg-Id without run_id: the dedupe key
    one = await submit({"plan": plan}, {"Nats-Msg-Id": "client-42"})
    two = await submit({"plan": plan}, {"Nats-Msg-Id": "client-42"})
    fresh = await submit({"plan": plan})
    assert isinstance(one, SubmitAccepted) and isinstance(two, SubmitAccepted)
    assert isinstance(fresh, SubmitAccepted)
    assert one.run_id == two.run_id and not one.existing and two.existing
    assert fresh.run_id != one.run_id
    # the same key with another plan: the client learns the payload differed
    changed = {"steps": [{"kind": "tool", "id": "b", "tool": "echo", "input": {"message": "y"}}]}
    conflict = await submit({"plan": changed}, {"Nats-Msg-Id": "client-42"})
    assert isinstance(conflict, SubmitRejected)
    assert conflict.error.code == "run_id_conflict"
    assert conflict.error.details["differs"] == ["plan"]
    # a refused shape names every problem
    bad = await submit({"plan": {"steps": [{"kind": "tol", "id": "a"},
                                           {"kind": "tool", "id": "b", "tool": "echo",
                                            "inputs": {}}]}, "inptu": {}})  # fmt: skip
    assert isinstance(bad, SubmitRejected) and bad.error.code == "invalid_shape"
    paths = {i["path"] for i in bad.error.details["issues"]}
    # a step of an unknown kind is read as the kind its fields point to: its missing
    # `tool` is reported too
    assert paths == {
        "$.inptu",
        "$.plan.steps[0].kind",
        "$.plan.steps[0].tool",
        "$.plan.steps[1].inputs",
    }
    assert "did you mean 'input'" in json.dumps(bad.error.details)


# --------------------------------------------------------------------------- Ctrl-C, follow


async def test_ctrl_c_leaves_the_run_waiting_and_says_how_to_follow_it(live: Live) -> None:
    proc = subprocess.Popen(
        [LOOM, "run", str(EXAMPLES / "approval.yaml"), "--run-id", "ctrl-c-1"],
        env=live.env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        await until(live.client, "ctrl-c-1", having("step_suspended"), bound_s=30)
        # the CLI prints the wait as soon as it has followed the run that far
        before = await asyncio.to_thread(_read_until, proc, "waits for a person", 30)
        proc.send_signal(signal.SIGINT)
        out, rest = await asyncio.to_thread(_finish, proc, 30)
        err = before + rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "run ctrl-c-1 goes on" in err and "loom follow ctrl-c-1" in err
    assert "loom resume ctrl-c-1 --label manager" in err  # the wait said how to answer

    # the same word for the waiting run in every verb
    described = await aloom(live.env, "describe", "ctrl-c-1", "-o", "json")
    assert json.loads(described.stdout)["status"] == "suspended"
    listed = await aloom(live.env, "runs", "--status", "suspended", "-o", "json")
    assert [r["run_id"] for r in json.loads(listed.stdout)] == ["ctrl-c-1"]

    follower = subprocess.Popen(
        [LOOM, "follow", "ctrl-c-1", "-o", "json"],
        env=live.env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    resumed = await aloom(
        live.env, "resume", "ctrl-c-1", "--label", "manager", "--data", '{"approved": true}',
        "-o", "json",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["ok"] is True
    out, err = await asyncio.to_thread(follower.communicate, None, 30)
    assert follower.returncode == 0, err
    assert json.loads(out)["status"] == "completed"


def _read_until(proc: subprocess.Popen[str], text: str, bound_s: float) -> str:
    """The process's stderr up to the first line holding ``text`` (bounded)."""
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"no {text!r} within {bound_s}s: {seen}")


def _finish(proc: subprocess.Popen[str], bound_s: float) -> tuple[str, str]:
    assert proc.stdout is not None and proc.stderr is not None
    proc.wait(bound_s)
    return proc.stdout.read(), proc.stderr.read()


# --------------------------------------------------------------------------- no stack


async def test_the_executor_does_not_answer(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    env = bare_env(tmp_path, nats_server.url)
    plan = str(EXAMPLES / "hello-dag.yaml")
    nobody = await aloom(env, "run", plan)  # nobody listens on loom.submit
    clean(nobody)
    assert nobody.returncode == 3 and nobody.stdout == ""
    assert "the executor did not answer the submission" in nobody.stderr
    assert "--run-id run-" in nobody.stderr  # how to repeat it safely

    nc = await nats.connect(nats_server.url)
    try:
        await nc.subscribe(subjects.submit("operator"), cb=_ignore)  # hears, never answers
        silent = await aloom(env, "run", plan, "--run-id", "quiet-1")
    finally:
        await nc.close()
    clean(silent)
    assert silent.returncode == 3
    assert "did not answer" in silent.stderr and "--run-id quiet-1" in silent.stderr


async def _ignore(msg: object) -> None:
    return None


async def test_loom_up_on_a_busy_port_says_so_at_once(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    env = bare_env(tmp_path, nats_server.url)
    started = time.monotonic()
    done = await aloom(
        env, "up", "--port", str(nats_server.port), "--data-dir", str(tmp_path / "d")
    )
    took = time.monotonic() - started
    clean(done)
    assert done.returncode == 3
    assert f"port {nats_server.port}" in done.stderr and "already in use" in done.stderr
    assert "did not become ready" not in done.stderr
    assert took < 15  # not the 20 s readiness timeout
