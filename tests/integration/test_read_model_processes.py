"""The embedded stack with its read models (tracing, memory) in child processes
(``LOOM_READ_MODELS=process``, what ``loom up`` runs): real processes, a real
nats-server, SQLite. The children serve the trace and the memory of a run; none outlives
the stack, whether it closes or is killed with SIGKILL; a child killed while the stack
runs is back within a bound."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from waiting import BOUND_S, eventually  # type: ignore[import-not-found]  # tests/integration on sys.path

from loom_core.contracts import Plan, RunCompleted, RunRequest, ToolStep
from loom_infra.client import LoomClient
from loom_infra.cpu_priority import may_leave_idle
from loom_infra.settings import EmbedderSettings, Settings, SettingsError, StoreSettings
from loom_services.readmodels import READ_MODELS, ReadModelFailed
from loom_services.stack import LocalStack

START_S = 60.0  # a child's start: Python, its imports, NATS (2 shared cores)


def split_settings(data_dir: Path) -> Settings:
    # the hash embedder: the memory child needs no model (MiniLM has its own tests)
    return Settings(
        nats_url="nats://127.0.0.1:4222",
        store=StoreSettings(kind="sqlite", data_dir=data_dir),
        embedder=EmbedderSettings(spec="hash"),
        read_models="process",
    )


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed stack's children are
    reparented; whoever adopts them may reap them late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def all_gone(pids: list[int], what: str) -> None:
    await eventually(lambda: not any(alive(p) for p in pids) or None, what, bound_s=BOUND_S)


@pytest.fixture
async def split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[LocalStack, LoomClient]]:
    caplog.set_level(logging.INFO)  # the children's records of their start
    async with (
        LocalStack(split_settings(tmp_path / "data"), nats_port=-1) as stack,
        await stack.client() as client,
    ):
        yield stack, client


async def run_one(client: LoomClient) -> str:
    plan = Plan(steps=[ToolStep(id="hi", tool="echo", input={"message": "hello"})])
    accepted = await client.submit(RunRequest(plan=plan, input={"topic": "split"}))
    records = await client.wait(accepted.run_id, timeout=BOUND_S)
    assert isinstance(records[-1].event, RunCompleted)
    return accepted.run_id


async def instance_pid(client: LoomClient, service: str) -> int:
    return int((await client.ping(service, timeout=2.0)).instance.rsplit(":", 1)[1])


async def test_the_children_serve_a_runs_trace_and_memory(
    split: tuple[LocalStack, LoomClient], caplog: pytest.LogCaptureFixture
) -> None:
    stack, client = split
    assert stack.stack is not None
    assert {s.name for s in stack.stack.services} == {"executor", "planner", "toolrunner"}
    assert set(stack.children) == set(READ_MODELS)
    for name, child in stack.children.items():
        assert child.pid not in (None, os.getpid())
        assert await instance_pid(client, name) == child.pid  # the child answers, not us
    assert await instance_pid(client, "executor") == os.getpid()

    run_id = await run_one(client)

    async def trace_done() -> list | None:
        spans = await client.trace(run_id)
        return spans if any(s.name == "execute_tool echo" and s.end for s in spans) else None

    spans = await eventually(trace_done, "the tracing child's spans of the run")
    assert spans[0].trace_id
    entries = await eventually(lambda: client.thread(run_id), "the memory child's thread")
    assert entries[0].run_id == run_id
    # the children's log records reach this process's log, named by child and pid
    tracing_pid = stack.children["tracing"].pid
    assert any(
        f"[tracing pid {tracing_pid}]" in r.getMessage() and r.levelno == logging.INFO
        for r in caplog.get_records("setup")
    ), [r.getMessage() for r in caplog.get_records("setup")][-20:]


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


async def test_the_children_run_below_the_stacks_cpu_priority(tmp_path: Path) -> None:
    """LOOM_READ_MODELS_NICE: each child this many steps below the stack (default 10),
    and level with it at 0; the stack's own services keep the stack's priority. Each
    child is in the stack's session (with autogroups, one scheduling group per session:
    its nice and policy weigh against the stack's processes only there) and in a process
    group of its own (a terminal's Ctrl-C is not sent to it). Tracing runs under
    SCHED_IDLE while it keeps up, where it may leave it (loom_infra.cpu_priority; this
    machine's privileges decide), never at nice 0; memory answers recalls on a step's
    path and keeps the normal policy."""
    own = niceness(os.getpid())
    assert split_settings(tmp_path).read_models_nice == 10  # the default
    for nice in (10, 0):
        settings = dataclasses.replace(
            split_settings(tmp_path / f"data{nice}"), read_models_nice=nice
        )
        async with LocalStack(settings, nats_port=-1) as stack:
            for child in stack.children.values():
                assert child.pid is not None
                assert niceness(child.pid) == min(19, own + nice), child.name
                assert os.getsid(child.pid) == os.getsid(0), child.name
                assert os.getpgid(child.pid) == child.pid, child.name
            idle = nice > 0 and may_leave_idle(min(19, own + nice))
            tracing, memory = stack.children["tracing"], stack.children["memory"]
            assert tracing.pid is not None and memory.pid is not None
            assert tracing.idle is idle
            expected = os.SCHED_IDLE if idle else os.SCHED_OTHER
            assert os.sched_getscheduler(tracing.pid) == expected
            assert os.sched_getscheduler(memory.pid) == os.SCHED_OTHER
            assert niceness(os.getpid()) == own
            assert os.sched_getscheduler(0) == os.SCHED_OTHER


async def test_closing_the_stack_leaves_no_child(tmp_path: Path) -> None:
    stack = LocalStack(split_settings(tmp_path / "data"), nats_port=-1)
    async with stack:
        pids = [child.pid for child in stack.children.values()]
        assert len(pids) == 2 and all(p is not None and alive(p) for p in pids)
    # close waited for them: gone at once, no bounded wait needed
    assert not any(alive(p) for p in pids if p is not None)
    assert stack.children == {}


async def test_a_killed_child_is_restarted_and_serves_again(
    split: tuple[LocalStack, LoomClient], caplog: pytest.LogCaptureFixture
) -> None:
    stack, client = split
    tracing = stack.children["tracing"]
    killed = tracing.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)

    async def back() -> int | None:
        try:
            pid = await instance_pid(client, "tracing")
        except Exception:  # no responder while it restarts
            return None
        return pid if pid != killed else None

    new = await eventually(back, "a new tracing process answering its health subject")
    assert new == tracing.pid and tracing.restarts == 1
    assert any(
        r.levelno == logging.ERROR
        and "tracing read model's process" in r.getMessage()
        and "SIGKILL" in r.getMessage()
        for r in caplog.records
    )
    run_id = await run_one(client)  # the restarted child folds new runs
    await eventually(lambda: client.trace(run_id), "the restarted child's spans")


STACK_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from loom_infra.settings import EmbedderSettings, Settings, StoreSettings
from loom_services.stack import LocalStack

async def main():
    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=StoreSettings(kind="sqlite", data_dir=Path(sys.argv[1])),
        embedder=EmbedderSettings(spec="hash"),
        read_models="process",
    )
    async with LocalStack(settings, nats_port=-1) as stack:
        pids = [child.pid for child in stack.children.values()]
        print(json.dumps({"children": pids, "nats": stack.nats.process.pid}), flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killing_the_stack_kills_its_children(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", STACK_SCRIPT, str(tmp_path / "data"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_S)  # type: ignore[union-attr]
        assert line, "the stack's process ended before it was up"
        started = json.loads(line)
        pids = [*started["children"], started["nats"]]
        assert len(started["children"]) == 2 and all(alive(p) for p in pids)
    finally:
        proc.kill()  # SIGKILL: no close, no cleanup in the stack's process
        await proc.wait()
    await all_gone(pids, "the killed stack's children (and nats-server) to exit")


async def test_a_child_that_cannot_start_fails_the_start_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # read by the tracing service alone, when it starts: the child exits 2 with one line
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    stack = LocalStack(split_settings(tmp_path / "data"), nats_port=-1)
    with pytest.raises(ReadModelFailed) as raised:
        async with stack:
            pytest.fail("the stack started without its tracing process")
    assert raised.value.info.code == "read_model_failed"
    message = raised.value.info.message
    assert "tracing read model's process exited (exit code 2)" in message
    assert "OTEL_EXPORTER_OTLP_PROTOCOL" in message and "LOOM_READ_MODELS=inline" in message
    assert stack.children == {}
    assert not any("restarting" in r.getMessage() for r in caplog.records)  # it failed
    assert stack.lock is not None and not stack.lock.held  # the data dir is free again


async def test_a_bad_read_models_value_is_a_typed_error_naming_the_setting(
    tmp_path: Path,
) -> None:
    settings = split_settings(tmp_path / "data")
    with pytest.raises(SettingsError) as raised:
        LocalStack(settings, nats_port=-1, read_models="threads")
    assert raised.value.variable == "LOOM_READ_MODELS"
    assert "'process'" in str(raised.value) and "'threads'" in str(raised.value)
    with pytest.raises(ValueError, match="no such service"):
        LocalStack(settings, nats_port=-1, without=("tracer",))


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below ``pid``."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        todo.extend(tree.get(child, []))
        try:
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


async def test_loom_up_runs_them_apart_and_ctrl_c_stops_them_quietly(tmp_path: Path) -> None:
    """What a user runs: ``loom up`` (split by default), then Ctrl-C (SIGINT to the
    stack's process only: the children are in process groups of their own, stopped by
    it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env["LOOM_EMBEDDER"] = "hash"
    loom = Path(sys.executable).with_name("loom")
    proc = await asyncio.create_subprocess_exec(
        str(loom), "up", "--port", "-1", "--no-console", "--data-dir", str(tmp_path / "d"),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    said: list[str] = []
    try:
        async with asyncio.timeout(START_S):
            while not any("agentloom is up" in line for line in said):
                line = (await proc.stderr.readline()).decode()
                assert line, "loom up ended before it was up:\n" + "".join(said)
                said.append(line)
        children = {
            pid: cmd for pid, cmd in descendants(proc.pid).items()
            if "loom_services.tracing" in cmd or "loom_services.memory" in cmd
        }  # fmt: skip
        assert len(children) == 2, descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(START_S):
            rest = (await proc.stderr.read()).decode()
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = "".join(said) + rest
    assert code == 0, output
    assert "Traceback" not in output and "restarting" not in output, output
    assert not any(alive(pid) for pid in children)
