"""``loom`` as a new user meets it, the rough edges issue 16 still had after its first
pass: a second line of noise before the error when no stack runs, group help with its
examples run together into one line, a step without ``kind`` hiding its other mistakes,
and no machine-readable answer for a bad run file under ``-o json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loom_cli.common import ExitCode
from loom_cli.examples import EXAMPLES
from loom_core.contracts import Plan
from loom_core.shape import shape_issues

ROOT = Path(__file__).resolve().parents[2]
LOOM = str(Path(sys.executable).parent / "loom")
NO_NATS = "nats://127.0.0.1:9"  # nothing listens there

TYPOS = """\
steps:
  - id: a
    tool: echo
    inptu: {message: hi}
    dependson: []
  - id: b
    kind: tooll
    tool: echo
    input: {message: hi}
    timeout_s: soon
outptu: "{{ steps.b.output }}"
"""


def loom(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    return subprocess.run(
        [LOOM, *args], env={**base, "LOOM_NATS_URL": NO_NATS, "COLUMNS": "200", **env},
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )  # fmt: skip


def test_no_stack_is_exactly_one_line() -> None:
    done = loom("runs")
    assert done.returncode == ExitCode.UNAVAILABLE and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: cannot reach NATS at {NO_NATS} (NoServersError); start the stack with "
        "`loom up` or set LOOM_NATS_URL"
    ]


def test_with_debug_the_library_warning_is_shown_as_a_warning_line() -> None:
    lines = loom("runs", "--debug").stderr.splitlines()
    assert lines[0].startswith("warning: operator: NATS unreachable")
    assert lines[-1].startswith("error: cannot reach NATS") and "Traceback" not in lines


@pytest.mark.parametrize("group", ["blob", "memory", "tools", "creds", "knowledge"])
def test_group_help_shows_each_example_on_its_own_line(group: str) -> None:
    text = loom(group, "--help").stdout
    lines = [line.strip() for line in text.splitlines()]
    for example in EXAMPLES[group]:
        assert example in lines, (example, text)


def test_every_mistake_of_a_run_file_at_once_even_without_kind(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(TYPOS)
    done = loom("run", str(plan))
    assert done.returncode == ExitCode.USAGE and done.stdout == ""
    assert "6 problem(s); nothing was submitted" in done.stderr
    for text in (
        "$.plan.outptu: unknown field 'outptu' in a Plan: did you mean 'output'?",
        "$.plan.steps[0]: missing `kind`: it looks like a `tool` step: add `kind: tool`",
        "$.plan.steps[0].inptu: unknown field 'inptu' in a `tool` step: did you mean 'input'?",
        "$.plan.steps[0].dependson: unknown field 'dependson' in a `tool` step: did you mean "
        "'depends_on'?",
        "$.plan.steps[1].kind: unknown kind 'tooll': did you mean 'tool'?",
        '$.plan.steps[1].timeout_s: expected a number or null, got a string "soon"',
    ):
        assert text in done.stderr, (text, done.stderr)
    assert "Traceback" not in done.stderr


def test_o_json_gives_a_bad_run_file_the_document_of_a_rejected_plan(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(TYPOS)
    done = loom("run", str(plan), "-o", "json")
    assert done.returncode == ExitCode.USAGE
    body = json.loads(done.stdout)
    assert (body["run_id"], body["status"], body["output"]) == (None, "rejected", None)
    assert body["error"]["code"] == "invalid_shape"
    assert [i["path"] for i in body["issues"]][:3] == [
        "$.plan.outptu", "$.plan.steps[0]", "$.plan.steps[0].inptu",
    ]  # fmt: skip
    jsonl = loom("run", str(plan), "-o", "jsonl")
    assert json.loads(jsonl.stdout) == body and len(jsonl.stdout.splitlines()) == 1


def test_a_step_without_kind_is_read_as_the_kind_its_fields_point_to() -> None:
    issues = shape_issues({"steps": [{"id": "a", "tool": "echo", "inptu": {}}]}, Plan)
    assert [(i.code, i.path) for i in issues] == [
        ("invalid_shape", "$.steps[0]"),
        ("unknown_field", "$.steps[0].inptu"),
    ]
    # nothing points anywhere: only `kind` is asked for
    [only] = shape_issues({"steps": [{"id": "a"}]}, Plan)
    assert only.path == "$.steps[0]" and "looks like" not in only.message
