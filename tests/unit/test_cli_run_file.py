"""``loom run FILE`` on deeply nested or alias-inflated files: a one-line typed error
naming the file, where, the limit and the setting; never a RecursionError traceback
(issue 9: PyYAML's composer recursed once per level and crashed the CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loom_cli.app import app, load_run_request
from loom_core.contracts import RunRequest
from loom_core.limits import DEFAULT_MAX_DEPTH

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def flow(depth: int) -> str:
    return "[" * depth + "]" * depth


def run_file(path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", str(path), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.stderr


def assert_one_line_refusal(stderr: str, *parts: str) -> None:
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert "Traceback" not in stderr and "RecursionError" not in stderr
    for part in parts:
        assert part in stderr, (part, stderr)


def test_a_deep_yaml_file_used_to_crash_the_yaml_loader(tmp_path: Path) -> None:
    text = f"steps:\n  - id: a\n    kind: tool\n    tool: echo\n    input: {{x: {flow(5000)}}}\n"
    with pytest.raises(RecursionError):
        yaml.safe_load(text)  # what `loom run` did with it


@pytest.mark.parametrize("depth", [DEFAULT_MAX_DEPTH + 1, 5000, 100_000])
def test_a_deep_flow_yaml_file_is_a_one_line_error(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(
        f"steps:\n  - id: a\n    kind: tool\n    tool: echo\n    input: {{x: {flow(depth)}}}\n"
    )
    code, stderr = run_file(path)
    assert code == 1
    assert_one_line_refusal(
        stderr, str(path), "$.steps[0].input.x[0]", "(line 5, column ",
        f"nested deeper than {DEFAULT_MAX_DEPTH} levels", "LOOM_MAX_JSON_DEPTH",
    )  # fmt: skip


def test_a_deep_json_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text(
        '{"steps": [{"id": "a", "kind": "tool", "tool": "echo", "input": {"x": '
        + flow(100_000)
        + "}}]}"
    )
    code, stderr = run_file(path)
    assert code == 1
    assert_one_line_refusal(stderr, str(path), "$.steps[0].input.x", "LOOM_MAX_JSON_DEPTH")


def test_a_deep_block_yaml_file_is_a_one_line_error(tmp_path: Path) -> None:
    # indentation nests too: 1,500 levels in a 1 MB file
    lines = ["steps:", "  - id: a", "    kind: tool", "    tool: echo", "    input:"]
    lines += [" " * (6 + i) + f"k{i}:" for i in range(1500)] + [" " * 1506 + "v: 1"]
    path = tmp_path / "block.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecursionError):
        yaml.safe_load(path.read_text())
    code, stderr = run_file(path)
    assert code == 1
    assert_one_line_refusal(stderr, "$.steps[0].input.k0.k1.k2", "(line ", "LOOM_MAX_JSON_DEPTH")


def test_aliases_that_nest_deep_are_caught_on_the_loaded_value(tmp_path: Path) -> None:
    # each level is shallow in the text; an alias puts one deep inside the other
    path = tmp_path / "alias.yaml"
    path.write_text(
        f"a: &a {flow(40)}\n"
        "steps:\n  - id: a\n    kind: tool\n    tool: echo\n"
        f"    input: {{x: {'[' * 30}*a{']' * 30}}}\n"
    )
    code, stderr = run_file(path)
    assert code == 1
    assert_one_line_refusal(stderr, str(path), "$.steps[0].input.x", "LOOM_MAX_JSON_DEPTH")


def test_an_alias_bomb_is_caught_by_size(tmp_path: Path) -> None:
    # nine levels of ten aliases each: 10^9 strings once expanded
    levels = ["l0: &l0 [" + ", ".join(["xxxxxxxxxx"] * 10) + "]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text(
        "\n".join(levels) + "\nsteps:\n  - {id: a, kind: tool, tool: echo, input: {x: *l8}}\n"
    )
    code, stderr = run_file(path)
    assert code == 1
    assert_one_line_refusal(stderr, str(path), "bytes as JSON", "LOOM_MAX_PAYLOAD")


def test_deep_input_json_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("steps:\n  - id: a\n    kind: tool\n    tool: echo\n")
    deep = '{"x": ' + flow(100_000) + "}"
    code, stderr = run_file(path, "--input-json", deep)
    assert code == 1
    assert_one_line_refusal(stderr, "--input-json", "LOOM_MAX_JSON_DEPTH")
    code, stderr = run_file(path, "--input-json", '{"x": ' + flow(100) + "}")
    assert code == 1
    assert_one_line_refusal(stderr, "--input-json", "$.x[0]", "LOOM_MAX_JSON_DEPTH")


def test_the_setting_raises_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "seventy.yaml"
    path.write_text(
        f"steps:\n  - id: a\n    kind: tool\n    tool: echo\n    input: {{x: {flow(70)}}}\n"
    )
    monkeypatch.setenv("LOOM_MAX_JSON_DEPTH", "100")
    request = load_run_request(path, [], None)
    assert isinstance(request, RunRequest)
    monkeypatch.setenv("LOOM_MAX_JSON_DEPTH", "1000")  # the code it protects recurses
    code, stderr = run_file(path)
    assert code == 2  # a setting given wrong is a usage mistake (docs/cli.md)
    assert_one_line_refusal(stderr, "LOOM_MAX_JSON_DEPTH: must be 1-200", "fix it")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_still_loads(path: Path) -> None:
    assert isinstance(load_run_request(path, [], None), RunRequest)
