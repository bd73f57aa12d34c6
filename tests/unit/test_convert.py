"""Plans of the plan-execute framework converted to native plans (``loom_core.convert``),
the silent mistakes such plans make in native form caught with the native form
(``loom_core.foreign``), and every shape mistake of a file at once (``loom_core.shape``)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import yaml
from typer.testing import CliRunner

from loom_cli.app import app
from loom_core.contracts import Plan, RunRequest
from loom_core.convert import ConversionError, looks_like_plan_execute, to_native
from loom_core.foreign import foreign_syntax_issues
from loom_core.shape import shape_issues
from loom_core.validation import validate_plan

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "plan_execute"
SAMPLES = sorted(FIXTURES.glob("*.yaml"))


def load(name: str) -> dict:
    return yaml.safe_load((FIXTURES / name).read_text())


def native(doc: dict) -> Plan:
    return msgspec.convert(to_native(doc), Plan)


def codes(issues: list) -> list[str]:
    return [i.code for i in issues]


def test_the_samples_are_all_there() -> None:
    assert {p.stem for p in SAMPLES} == {"sequential", "dag", "loop", "conditional", "map_reduce"}


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_each_sample_converts_to_a_valid_native_plan(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert looks_like_plan_execute(doc)
    plan = native(doc)
    assert validate_plan(plan, run_input=doc.get("input", {}), foreign=True) == []
    assert not looks_like_plan_execute(msgspec.to_builtins(plan))


def test_sequential_chains_steps_and_dag_does_not() -> None:
    seq = to_native(load("sequential.yaml"))["steps"]
    assert [s.get("depends_on") for s in seq] == [None, ["greet"], ["shout"]]
    dag = to_native(load("dag.yaml"))["steps"]
    assert all("depends_on" not in s for s in dag)


def test_output_variables_become_step_references() -> None:
    steps = to_native(load("dag.yaml"))["steps"]
    assert steps[0]["input"] == {"message": {"body": "{{ input.text }}"}}  # ${input.text}
    assert steps[1]["input"]["text"] == "{{ steps.fetch.output.message.body }}"  # {{page...}}


def test_a_loop_is_a_foreach_whose_output_names_the_step() -> None:
    loop = to_native(load("loop.yaml"))["steps"]
    assert loop[0]["kind"] == "foreach" and loop[0]["id"] == "all_weather"
    assert loop[0]["items"] == "{{ input.cities }}" and loop[0]["concurrency"] == 3
    assert "output" not in loop[0]  # never the constant 'all_weather' per element
    assert loop[0]["do"][0]["input"]["text"] == "{{ item }}"  # `as: city`
    assert loop[1]["output"] == "{{ steps.all_weather.output }}"


def test_a_conditional_is_an_if_on_a_declarative_predicate() -> None:
    cond = to_native(load("conditional.yaml"))["steps"][1]
    assert cond["kind"] == "if"
    assert cond["condition"] == {"and": [
        {"gt": ["{{ steps.score.output.result }}", 0.5]}, {"ne": ["{{ input.review }}", ""]},
    ]}  # fmt: skip
    assert [s["id"] for s in cond["then"]] == ["thank"]
    assert [s["id"] for s in cond["else"]] == ["apologise"]


def test_a_reduce_names_its_accumulator_acc() -> None:
    reduce = to_native(load("map_reduce.yaml"))["steps"][1]
    assert reduce["kind"] == "reduce" and reduce["initial"] == 0
    assert reduce["do"][0]["input"] == {"op": "add", "a": "{{ acc }}", "b": "{{ item }}"}
    assert reduce["output"] == "{{ steps.add.output.result }}"


def test_every_problem_of_a_plan_is_reported_at_once() -> None:
    doc = {
        "execution": "dga",
        "steps": [
            {"id": "a", "tool": "echo", "inputs": {"x": 1}, "output": "page"},
            {"type": "lop", "over": "input.xs"},
            {"type": "conditional", "condition": "${page.n} >", "then": []},
            {"id": "b", "tool": "echo", "input": {"m": "{{ nope.x }}"}},
            {"type": "loop", "step": {"tool": "echo"}},
            {"type": "final"},
        ],
    }
    with pytest.raises(ConversionError) as caught:
        to_native(doc)
    issues = {(i.code, i.path) for i in caught.value.issues}
    assert ("invalid_value", "$.execution") in issues
    assert ("unknown_field", "$.steps[0].inputs") in issues
    assert ("unknown_step_type", "$.steps[1].type") in issues
    assert ("invalid_expression", "$.steps[2].condition") in issues
    assert ("unknown_variable", "$.steps[3].input.m") in issues
    assert ("missing_field", "$.steps[4].over") in issues
    assert ("missing_field", "$.steps[5].output") in issues
    text = " ".join(i.message for i in caught.value.issues)
    assert "did you mean 'dag'" in text and "did you mean 'input'" in text
    assert "did you mean 'loop'" in text


def test_hostile_conditions_are_typed_issues() -> None:
    doc = {"steps": [{"id": "a", "tool": "echo", "output": "x"},
                     {"type": "conditional", "condition": "(" * 10_000 + "${x} > 1",
                      "then": [{"id": "b", "tool": "echo"}]}]}  # fmt: skip
    with pytest.raises(ConversionError) as caught:
        to_native(doc)
    assert codes(caught.value.issues) == ["expression_too_long"]


# --------------------------------------------------------------------------- silent cases


def test_a_dollar_template_is_caught_with_the_native_form() -> None:
    plan = msgspec.convert({"steps": [
        {"kind": "tool", "id": "fetch", "tool": "http_get", "input": {"url": "${input.url}"}},
        {"kind": "tool", "id": "show", "tool": "echo",
         "input": {"message": "got ${fetch.body}", "shell": "echo ${HOME}"}},
    ]}, Plan)  # fmt: skip
    issues = validate_plan(plan, foreign=True)
    assert validate_plan(plan) == []  # the executor's re-check: replay stays exact
    found = [(i.code, i.path) for i in issues if i.code == "foreign_template"]
    assert found == [
        ("foreign_template", "$.plan.steps[0].input.url"),
        ("foreign_template", "$.plan.steps[1].input.message"),
    ]  # `${HOME}` is shell text, not a plan value
    assert "'{{ input.url }}'" in issues[0].message
    assert "'got {{ steps.fetch.output.body }}'" in issues[1].message


def test_a_constant_output_on_a_foreach_is_caught_with_the_native_form() -> None:
    plan = msgspec.convert({"steps": [
        {"kind": "foreach", "id": "cities", "items": "{{ input.cities }}", "output": "all_weather",
         "do": [{"kind": "tool", "id": "w", "tool": "echo", "input": {"message": "{{ item }}"}}]},
    ]}, Plan)  # fmt: skip
    (issue,) = foreign_syntax_issues(plan)
    assert issue.code == "constant_output" and issue.path == "$.plan.steps[0].output"
    assert '"{{ steps.w.output }}"' in issue.message
    assert "{{ steps.cities.output }}" in issue.message
    assert "constant_output" in codes(validate_plan(plan, foreign=True))


def test_templates_and_descriptions_are_left_alone() -> None:
    plan = msgspec.convert({"steps": [
        {"kind": "foreach", "id": "f", "items": [1], "output": "{{ steps.w.output }}",
         "description": "like ${input.x} in the old engine",
         "do": [{"kind": "tool", "id": "w", "tool": "echo", "input": {"message": "{{ item }}"}}]},
    ]}, Plan)  # fmt: skip
    assert foreign_syntax_issues(plan) == []


# --------------------------------------------------------------------------- shape


def test_every_shape_mistake_is_reported_with_did_you_mean() -> None:
    doc = {"plan": {"nmae": "x", "steps": [
        {"kind": "tool", "id": "a", "tool": "echo", "inputs": {}, "dependson": []},
        {"kind": "tol", "id": "b"},
        {"kind": "foreach", "id": "c", "itmes": [1], "do": [{"kind": "tool", "id": "d"}]},
        {"kind": "sleep", "id": "e", "seconds": "soon"},
    ]}, "input": []}  # fmt: skip
    issues = shape_issues(doc, RunRequest)
    got = {(i.code, i.path) for i in issues}
    assert got == {
        ("unknown_field", "$.plan.nmae"),
        ("unknown_field", "$.plan.steps[0].inputs"),
        ("unknown_field", "$.plan.steps[0].dependson"),
        ("invalid_shape", "$.plan.steps[1].kind"),
        ("missing_field", "$.plan.steps[1].tool"),  # read as the `tool` it meant
        ("unknown_field", "$.plan.steps[2].itmes"),
        ("missing_field", "$.plan.steps[2].items"),
        ("missing_field", "$.plan.steps[2].do[0].tool"),
        ("invalid_shape", "$.plan.steps[3].seconds"),
        ("invalid_shape", "$.input"),
    }
    text = " ".join(i.message for i in issues)
    for hint in ("'name'", "'input'", "'depends_on'", "'tool'", "'items'"):
        assert f"did you mean {hint}" in text


def test_a_valid_document_has_no_shape_issue() -> None:
    doc = yaml.safe_load((FIXTURES.parents[2] / "examples" / "hello-dag.yaml").read_text())
    assert shape_issues(doc, RunRequest) == []
    msgspec.convert(doc, RunRequest)


def test_the_cli_lists_every_problem_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "typos.yaml"
    path.write_text(
        "plan:\n  nmae: x\n  steps:\n    - {kind: tool, id: a, tool: echo, inputs: {}}\n"
        "    - {kind: tol, id: b}\n"
    )
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and result.stdout == ""
    assert "4 problem(s); nothing was submitted" in result.stderr  # `tol` read as `tool`
    assert result.stderr.count("✗") == 4 and "Traceback" not in result.stderr


def test_the_cli_points_a_foreign_plan_at_the_converter(tmp_path: Path) -> None:
    path = FIXTURES / "loop.yaml"
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "--format plan-execute" in result.stderr and "loom convert" in result.stderr


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_loom_convert_prints_a_file_loom_run_accepts(path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["convert", str(path), "-o", "json"])
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "native.json"
    out.write_text(result.stdout)
    doc = yaml.safe_load(out.read_text())
    assert shape_issues(doc, RunRequest) == []


def test_loom_convert_of_a_broken_plan_exits_2_with_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("steps:\n  - {type: lop}\n  - {type: final}\n")
    result = CliRunner().invoke(app, ["convert", str(path)])
    assert result.exit_code == 2 and result.stdout == ""
    assert "unknown_step_type" in result.stderr and "missing_field" in result.stderr
