"""``loom describe / cancel / pause / unpause``: argument handling, what goes to stdout
and stderr, exit codes. The client is a fake (no servers); the lead's end-to-end test
runs the same commands against a real stack."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import typer
from nats.errors import NoRespondersError
from typer.testing import CliRunner

from loom_cli import control
from loom_core import ids
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    ForeachStep,
    Plan,
    PlanAccepted,
    RunCompleted,
    RunControlReply,
    RunEvent,
    RunFailed,
    RunPaused,
    RunRequested,
    StepCompleted,
    StepFailed,
    StepScheduled,
    StepStarted,
    ToolCallCompleted,
    ToolCallRequested,
    ToolStep,
)
from loom_core.stats import run_stats
from loom_infra.client import LoomError

T0 = datetime(2026, 11, 2, 9, 0, 0, tzinfo=UTC)
RUN = "run-1"


def ms(n: float) -> datetime:
    return T0 + timedelta(milliseconds=n)


class Script:
    """A run's EventRecords with explicit times (ms after T0)."""

    def __init__(self) -> None:
        self.records: list[EventRecord] = []

    def add(self, t: float, event: RunEvent) -> None:
        seq = len(self.records) + 1
        self.records.append(EventRecord(run_id=RUN, seq=seq, at=ms(t), event=event))

    def call(self, t: float, sid: str, tool: str) -> None:
        key = ids.idempotency_key(RUN, sid, 1)
        self.add(t, StepScheduled(step_id=sid))
        self.add(t, StepStarted(step_id=sid, attempt=1))
        self.add(
            t, ToolCallRequested(step_id=sid, attempt=1, tool=tool, input={}, idempotency_key=key)
        )

    def done(self, t: float, sid: str, started: float, finished: float) -> None:
        key = ids.idempotency_key(RUN, sid, 1)
        self.add(
            t,
            ToolCallCompleted(
                step_id=sid,
                attempt=1,
                idempotency_key=key,
                output=1,
                started_at=ms(started),
                finished_at=ms(finished),
            ),
        )
        self.add(t, StepCompleted(step_id=sid, output=1))


def finished_run() -> list[EventRecord]:
    s = Script()
    plan = Plan(steps=[ToolStep(id="fetch", tool="t_fetch"), ToolStep(id="sum", tool="t_sum")])
    s.add(0, RunRequested(plan=plan))
    s.add(0, PlanAccepted(plan=Plan(steps=plan.steps, name="demo")))
    s.call(2, "fetch", "t_fetch")
    s.done(10, "fetch", 3, 9)
    s.call(10, "sum", "t_sum")
    s.done(20, "sum", 12, 19)
    s.add(21, RunCompleted(output=2))
    return s.records


class FakeClient:
    """Stands in for LoomClient: answers from fixed data and records the calls."""

    def __init__(
        self,
        records: list[EventRecord] | None = None,
        reply: RunControlReply | None = None,
        error: Exception | None = None,
    ) -> None:
        self.records = records or []
        self.reply = reply
        self.error = error
        self.calls: list[tuple[Any, ...]] = []
        self.closed = False

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.closed = True

    async def events(self, run_id: str) -> list[EventRecord]:
        self.calls.append(("events", run_id))
        if self.error is not None:
            raise self.error
        return [r for r in self.records if r.run_id == run_id]

    async def control(
        self, run_id: str, action: str, by: str = "operator", reason: str = ""
    ) -> RunControlReply:
        self.calls.append(("control", run_id, action, by, reason))
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    control.register(app)
    return app


def use(monkeypatch: pytest.MonkeyPatch, client: FakeClient) -> list[str | None]:
    """Make the commands connect to ``client``; returns the URLs they asked for."""
    urls: list[str | None] = []

    async def connect(url: str | None) -> FakeClient:
        urls.append(url)
        return client

    monkeypatch.setattr(control, "_connect", connect)
    return urls


def invoke(app: typer.Typer, *args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def live_run() -> list[EventRecord]:
    s = Script()
    plan = Plan(
        steps=[
            ToolStep(id="fetch", tool="http_get"),
            ForeachStep(id="fe", items=[1, 2], do=[ToolStep(id="work", tool="crunch")]),
        ],
        name="nightly",
    )
    s.add(0, RunRequested(plan=plan))
    s.add(0, PlanAccepted(plan=plan))
    s.call(1, "fetch", "http_get")
    s.done(9, "fetch", 2, 8)
    s.add(9, StepScheduled(step_id="fe"))
    s.call(9, "fe/0/work", "crunch")
    s.call(9, "fe/1/work", "crunch")
    s.add(20, RunPaused(by="alice@box", reason="checking"))
    return s.records


# --------------------------------------------------------------------------- describe


def test_describe_prints_a_readable_summary(
    monkeypatch: pytest.MonkeyPatch, cli: typer.Typer
) -> None:
    client = FakeClient(records=live_run())
    urls = use(monkeypatch, client)
    result = invoke(cli, "describe", RUN, "--nats", "nats://elsewhere:4222")
    assert result.exit_code == 0, result.output
    assert urls == ["nats://elsewhere:4222"]
    assert client.calls == [("events", RUN)]
    assert client.closed
    out = result.stdout
    assert f"run {RUN} (nightly)  paused" in out
    assert "running 6.0 ms" in out  # the fetch call's tool-runner time
    assert "waiting on" in out
    assert "paused by alice@box: checking" in out
    assert "step fe/0/work: tool crunch" in out
    assert "2 running" in out  # the foreach's children
    for step in ("fetch", "fe"):
        assert step in out
    assert result.stderr == ""


def test_describe_json_is_the_stats(monkeypatch: pytest.MonkeyPatch, cli: typer.Typer) -> None:
    use(monkeypatch, FakeClient(records=finished_run()))
    result = invoke(cli, "describe", RUN, "-o", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "completed"
    assert (data["succeeded"], data["total"], data["attempts"]) == (2, 2, 2)
    assert data["duration_ms"] == 21.0
    assert [s["id"] for s in data["per_step"]] == ["fetch", "sum"]
    assert data["pending_work"] == []

    result = invoke(cli, "describe", RUN, "--output", "jsonl")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == data


def test_describe_live_run_measures_open_waits_to_now(
    monkeypatch: pytest.MonkeyPatch, cli: typer.Typer
) -> None:
    use(monkeypatch, FakeClient(records=live_run()))
    data = json.loads(invoke(cli, "describe", RUN, "-o", "json").stdout)
    # the records are from 2026-11-02 09:00; the pause is still open, so it lasts to now
    assert data["status"] == "paused" and data["duration_ms"] is None
    assert data["paused_ms"] > 1000.0
    assert [w["kind"] for w in data["pending_work"]] == ["paused", "tool_call", "tool_call"]


def test_describe_unknown_run_exits_1(monkeypatch: pytest.MonkeyPatch, cli: typer.Typer) -> None:
    use(monkeypatch, FakeClient(records=[]))
    result = invoke(cli, "describe", "nope")
    assert result.exit_code == 1
    assert "no run 'nope'" in result.stderr
    assert result.stdout == ""

    error = LoomError(ErrorInfo(code="run_not_found", message="no run 'nope'"))
    use(monkeypatch, FakeClient(error=error))
    result = invoke(cli, "describe", "nope")
    assert result.exit_code == 1
    assert "run_not_found: no run 'nope'" in result.stderr


def test_describe_without_a_stack_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, cli: typer.Typer
) -> None:
    use(monkeypatch, FakeClient(error=NoRespondersError()))
    result = invoke(cli, "describe", RUN)
    assert result.exit_code == 3  # unavailable (docs/cli.md)
    assert "loom up" in result.stderr


def test_describe_needs_a_run_id(cli: typer.Typer) -> None:
    result = invoke(cli, "describe")
    assert result.exit_code == 2
    assert "Missing argument 'RUN'" in result.output


def test_render_describe_of_a_finished_run() -> None:
    from rich.console import Console

    console = Console(width=160, record=True)
    stats = run_stats(finished_run())
    console.print(control.render_describe(stats))
    text = console.export_text()
    assert f"run {RUN} (demo)  completed" in text
    assert "took 21.0 ms" in text
    assert "waiting on" not in text
    assert "tool t_fetch" in text  # kind and tool from the plan


def test_durations_read_well() -> None:
    assert control.fmt_ms(None) == "…"
    assert control.fmt_ms(12.345) == "12.3 ms"
    assert control.fmt_ms(12_345) == "12.35 s"
    assert control.fmt_ms(125_000) == "2m 05s"
    assert control.fmt_ms(3_725_000) == "1h 02m 05s"


# --------------------------------------------------------------------------- control


@pytest.fixture
def me(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(control.getpass, "getuser", lambda: "alice")
    monkeypatch.setattr(control.socket, "gethostname", lambda: "box")
    return "alice@box"


@pytest.mark.parametrize(
    ("args", "action", "reason"),
    [
        (["cancel", RUN, "--reason", "wrong input"], "cancel", "wrong input"),
        (["cancel", RUN], "cancel", ""),
        (["pause", RUN, "-r", "lunch"], "pause", "lunch"),
        (["unpause", RUN], "unpause", ""),
    ],
)
def test_control_commands_send_the_action_as_this_user(
    monkeypatch: pytest.MonkeyPatch,
    cli: typer.Typer,
    me: str,
    args: list[str],
    action: str,
    reason: str,
) -> None:
    status = {"cancel": "cancelled", "pause": "paused", "unpause": "running"}[action]
    client = FakeClient(reply=RunControlReply(run_id=RUN, ok=True, status=status))
    use(monkeypatch, client)
    result = invoke(cli, *args)
    assert result.exit_code == 0, result.output
    assert client.calls == [("control", RUN, action, me, reason)]
    assert result.stdout.strip() == f"{RUN}: {status}"
    assert result.stderr == ""


def test_control_json_output_is_the_reply(
    monkeypatch: pytest.MonkeyPatch, cli: typer.Typer, me: str
) -> None:
    use(monkeypatch, FakeClient(reply=RunControlReply(run_id=RUN, ok=True, status="paused")))
    result = invoke(cli, "pause", RUN, "-o", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {
        "type": "run_control_reply",
        "run_id": RUN,
        "ok": True,
        "status": "paused",
    }


def test_refused_control_exits_non_zero_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, cli: typer.Typer, me: str
) -> None:
    error = ErrorInfo(code="run_finished", message="run-1 already completed; nothing to cancel")
    use(monkeypatch, FakeClient(error=LoomError(error)))
    result = invoke(cli, "cancel", RUN)
    assert result.exit_code == 1
    assert "cannot cancel run 'run-1'" in result.stderr
    assert "run_finished: run-1 already completed" in result.stderr
    assert result.stdout == ""

    # a refusal without a typed error still fails
    use(monkeypatch, FakeClient(reply=RunControlReply(run_id=RUN, ok=False, status="completed")))
    result = invoke(cli, "pause", RUN)
    assert result.exit_code == 1
    assert "cannot pause run 'run-1': completed" in result.stderr


def test_unpause_takes_no_reason(cli: typer.Typer) -> None:
    result = invoke(cli, "unpause", RUN, "--reason", "x")
    assert result.exit_code == 2


def test_operator_falls_back_when_there_is_no_login_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_user() -> str:
        raise OSError("no passwd entry for uid 1234")

    monkeypatch.setattr(control.getpass, "getuser", no_user)
    monkeypatch.setattr(control.socket, "gethostname", lambda: "pod-7")
    assert control.operator() == "unknown@pod-7"


def test_register_adds_exactly_the_four_commands() -> None:
    app = typer.Typer()
    control.register(app)
    names = [c.callback.__name__ for c in app.registered_commands if c.callback]
    assert names == ["describe", "cancel", "pause", "unpause"]


def test_completed_run_has_no_pending_work_in_text(
    monkeypatch: pytest.MonkeyPatch, cli: typer.Typer
) -> None:
    s = Script()
    s.add(0, RunRequested(request="x"))
    s.add(5, RunCompleted(output=None))
    use(monkeypatch, FakeClient(records=s.records))
    result = invoke(cli, "describe", RUN)
    assert result.exit_code == 0
    assert "completed" in result.stdout and "waiting on" not in result.stdout


def test_user_text_with_brackets_is_shown_verbatim(
    monkeypatch: pytest.MonkeyPatch, cli: typer.Typer
) -> None:
    s = Script()
    plan = Plan(steps=[ToolStep(id="a", tool="t")], name="[bold]odd[/]")
    s.add(0, RunRequested(plan=plan))
    s.add(0, PlanAccepted(plan=plan))
    s.call(1, "a", "t")
    s.add(2, StepFailed(step_id="a", error=ErrorInfo(code="bad", message="want [1, 2] [/]")))
    s.add(3, RunFailed(error=ErrorInfo(code="bad", message="step 'a' failed")))
    use(monkeypatch, FakeClient(records=s.records))
    result = invoke(cli, "describe", RUN)
    assert result.exit_code == 0, result.output
    assert "([bold]odd[/])" in result.stdout
    assert "bad: want [1, 2] [/]" in result.stdout

    error = LoomError(ErrorInfo(code="run_not_found", message="no run '[x]'"))
    use(monkeypatch, FakeClient(error=error))
    result = invoke(cli, "cancel", "x")
    assert "no run '[x]'" in result.stderr
