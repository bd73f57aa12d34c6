"""``loom`` with no stack, as a new user meets it (issue 16): help texts, exit codes
(docs/cli.md), the stdout/stderr split and no traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loom_cli import common
from loom_cli.app import app
from loom_cli.common import ExitCode, Output
from loom_core.contracts import EventRecord, RunCompleted

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
LOOM = str(Path(sys.executable).parent / "loom")
NO_NATS = "nats://127.0.0.1:9"  # nothing listens there


def loom(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    return subprocess.run(
        [LOOM, *args], env={**base, "LOOM_NATS_URL": NO_NATS, **env},
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def test_no_stack_is_one_line_and_exit_3() -> None:
    for args in (["runs"], ["show", "r"], ["describe", "r"], ["run", "examples/hello-dag.yaml"]):
        done = loom(*args)
        assert done.returncode == ExitCode.UNAVAILABLE, (args, done.stderr)
        assert "Traceback" not in done.stderr and done.stdout == ""
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "loom up" in errors[0], done.stderr


@pytest.mark.parametrize("key", ["a b", "a.b", "a*", "", "x" * 65])
def test_signal_keys_must_be_subject_tokens(key: str) -> None:
    result = invoke("signal", "payment", key)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "must be 1-64 of A-Z" in result.stderr and "no space, no dot" in result.stderr
    assert result.stdout == ""


def test_an_unknown_status_is_a_usage_error_naming_the_words() -> None:
    result = invoke("runs", "--status", "faild")
    assert result.exit_code == ExitCode.USAGE and result.stdout == ""
    assert "did you mean 'failed'?" in result.stderr and "suspended" in result.stderr


def _commands() -> list[str]:
    listing = loom("--help", COLUMNS="200").stdout
    return re.findall(r"^│ ([a-z][a-z-]+) ", listing, flags=re.MULTILINE)


def test_help_texts_have_examples_and_no_rst() -> None:
    commands = _commands()
    assert {"run", "runs", "follow", "convert", "diff", "signal", "resume"} <= set(commands)
    for name in commands:
        text = invoke(name, "--help").output
        assert "``" not in text, name
        assert "Examples" in text, name
    listing = loom("--help", COLUMNS="200").stdout
    # each command's summary is one sentence on one line, not cut where the docstring broke
    assert (
        "Re-run the executor's decisions over the recorded events; no tool or model is called."
        in listing
    )


def test_demo_help_shows_no_path_of_this_machine() -> None:
    text = loom("demo", "--help", COLUMNS="200").stdout
    assert str(ROOT) not in text and "examples/hello-dag.yaml" in text


def test_diff_takes_o_json_and_keeps_json_as_a_hidden_alias() -> None:
    a, b = str(GOLDEN / "approval.jsonl"), str(GOLDEN / "approval-many.jsonl")
    new = invoke("diff", a, b, "-o", "json")
    old = invoke("diff", a, b, "--json")
    assert new.exit_code == old.exit_code == 0
    assert json.loads(new.stdout) == json.loads(old.stdout)
    assert "--json" not in invoke("diff", "--help").output
    lines = invoke("diff", a, b, "-o", "jsonl").stdout.splitlines()
    assert [json.loads(line) for line in lines] == json.loads(new.stdout)


def test_replay_and_state_take_o() -> None:
    export = str(GOLDEN / "approval.jsonl")
    replayed = invoke("replay", export, "-o", "json")
    assert replayed.exit_code == 0 and json.loads(replayed.stdout)["identical"] is True
    state = invoke("state", export, "--at", "2", "-o", "jsonl")
    assert state.exit_code == 0 and len(state.stdout.splitlines()) == 1
    assert json.loads(state.stdout)["version"] == 2
    for verb in ("resume", "signal", "fork", "state", "replay"):
        assert "--output" in invoke(verb, "--help").output, verb


class _Follows:
    """A client whose follow() records the timeout it was given."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def follow(
        self, run_id: str, timeout: float | None = 300.0
    ) -> AsyncIterator[EventRecord]:
        self.timeouts.append(timeout)
        yield EventRecord(run_id=run_id, seq=1, at=datetime.now(UTC), event=RunCompleted(output=1))


async def test_following_a_run_never_times_out() -> None:
    # a run may wait days for a person: the CLI follows without a timeout
    fake = _Follows()
    code = await common.follow_and_report(fake, "r", Output.json, quiet=True)  # type: ignore[arg-type]
    assert code == 0 and fake.timeouts == [None]


def test_an_unexpected_error_is_a_bug_exit_and_a_timeout_is_unavailable() -> None:
    from loom_cli.app import explain

    assert explain(TimeoutError())[0] == ExitCode.UNAVAILABLE
    code, text = explain(KeyError("x"))
    assert code == ExitCode.BUG and "--debug" in text


def test_ctrl_c_names_the_run_and_how_to_get_back_to_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    following = common.Following("run-1")
    exit_ = following.interrupted()
    assert exit_.exit_code == ExitCode.INTERRUPTED
    assert "may or may not be stored" in capsys.readouterr().err  # the answer never came
    following.submitted = True
    following.interrupted("loom follow run-1")
    err = capsys.readouterr().err
    assert "run run-1 goes on" in err and "loom follow run-1" in err
    assert "loom cancel run-1" in err
