"""The faster plan validator (issue 10, startcost) says exactly what the one before it
said: the same issues, codes, paths and messages, in the same order, and the same
dependency graphs, on random plans, valid and broken in many ways at once.

``validation_reference`` and ``foreign_reference`` are frozen copies of the modules as
they were before the change: they pin that rewrite, not the validator's behaviour
(``test_validation.py`` pins that). When validation changes on purpose (a new issue, a
reworded message), delete this test and both copies rather than edit them to follow."""

from __future__ import annotations

import copy
from typing import Any

import foreign_reference
import msgspec
import validation_reference as reference
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from test_validation import RUN_INPUT, TOOLS, _occurrences, _scopes, nested_plans

from loom_core import foreign, validation
from loom_core.contracts import Caps, Plan, ToolStep

_MUTATIONS = [
    "depends_on",
    "template",
    "bad_template",
    "foreign",
    "scope_variable",
    "duplicate_id",
    "unknown_tool",
    "empty_body",
    "fallback",
    "self_reference",
    "drop_step",
    "bad_input",
    "same_input",
]


def _mutate(raw: dict[str, Any], data: st.DataObject) -> None:
    occurrences = _occurrences(raw)
    ids = [s["id"] for _, s in occurrences] + ["no-such-step"]
    _, step = data.draw(st.sampled_from(occurrences))
    what = data.draw(st.sampled_from(_MUTATIONS))
    other = data.draw(st.sampled_from(ids))
    if what == "depends_on":
        step["depends_on"] = [*step.get("depends_on", []), other]
    elif what == "self_reference":
        step["depends_on"] = [*step.get("depends_on", []), step["id"]]
    elif what == "duplicate_id":
        step["id"] = other
    elif what == "unknown_tool":
        if step["kind"] == "tool":
            step["tool"] += "x"
    elif what == "fallback":
        if step["kind"] != "tool":
            return
        step["fallback"] = {"kind": "tool", "id": f"fb-{other}", "tool": "search",
                            "input": {"q": f"{{{{ steps.{other}.output }}}}"},
                            "depends_on": [other]}  # fmt: skip
        step["on_error"] = data.draw(st.sampled_from(["fallback", "fail"]))
    elif what == "bad_input":
        if step["kind"] == "tool":
            wrong = data.draw(st.sampled_from([[], 1.5, "x", None, {"z": 1}]))
            if step["input"] and data.draw(st.booleans()):
                step["input"].pop(next(iter(step["input"])))
            else:
                step["input"][data.draw(st.sampled_from(["a", "q", "extra"]))] = wrong
    elif what == "same_input":  # another tool step's tool and input: checked once
        tools = [s for _, s in occurrences if s["kind"] == "tool"]
        if step["kind"] == "tool" and tools:
            source = data.draw(st.sampled_from(tools))
            step["tool"], step["input"] = source["tool"], copy.deepcopy(source["input"])
    elif what == "empty_body":
        for key in ("do", "then", "else"):
            if key in step:
                step[key] = []
    elif what == "drop_step":
        for _, steps in _scopes(raw):
            if step in steps and len(steps) > 1:
                steps.remove(step)
                break
    else:
        text = {
            "template": f'{{{{ steps["{other}"].output }}}}',
            "bad_template": "{{ steps. }}",
            "foreign": f"${{{other}.body}}",
            "scope_variable": data.draw(st.sampled_from(["{{ item }}", "{{ index.x }}"])),
        }[what]  # fmt: skip
        target = step.get("input") if step["kind"] == "tool" else None
        if isinstance(target, dict) and target:
            target[next(iter(target))] = text
        elif step["kind"] == "foreach":
            step["items"] = text


def _same(got: Any, want: Any) -> None:
    assert msgspec.to_builtins(got) == msgspec.to_builtins(want)


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ValueError as exc:
        return f"ValueError: {exc}"


@settings(max_examples=300, deadline=None)
@given(
    raw=nested_plans(),
    data=st.data(),
    mutations=st.integers(0, 4),
    tools=st.booleans(),
    run_input=st.booleans(),
    foreign_too=st.booleans(),
    caps=st.none()
    | st.builds(
        Caps,
        foreach_items=st.integers(1, 3),
        foreach_concurrency=st.integers(1, 2),
        parallel_branches=st.integers(1, 2),
        loop_iterations=st.integers(1, 5),
    ),
)
def test_the_validator_says_exactly_what_it_said_before(
    raw: dict[str, Any],
    data: st.DataObject,
    mutations: int,
    tools: bool,
    run_input: bool,
    foreign_too: bool,
    caps: Caps | None,
) -> None:
    for _ in range(mutations):
        _mutate(raw, data)
    try:
        plan = msgspec.convert(raw, Plan)
    except msgspec.ValidationError:
        assume(False)
        return
    args = (plan, TOOLS if tools else None, RUN_INPUT if run_input else None)
    kwargs = {"caps": caps, "foreign": foreign_too}
    got = validation.validate_plan(*args, **kwargs)
    _same(got, reference.validate_plan(*args, **kwargs))
    for code in sorted({issue.code for issue in got}) or ["valid"]:
        event(code)  # --hypothesis-show-statistics: which issues the examples reached
    _same(validation.tool_uses(plan), reference.tool_uses(plan))
    _same(foreign.foreign_syntax_issues(plan), foreign_reference.foreign_syntax_issues(plan))
    todo = [plan.steps]
    while todo:  # every list of steps: its graph and order as before
        steps = todo.pop()
        assert validation.dependencies(steps) == reference.dependencies(steps)
        assert _outcome(validation.topological_order, steps) == _outcome(
            reference.topological_order, steps
        )
        for s in steps:
            for part in validation._parts(s):
                if isinstance(part, validation._Body):
                    todo.append(part.steps)
            if isinstance(s, ToolStep) and s.fallback is not None:
                assert validation.dependencies([s]) == reference.dependencies([s])


def test_a_long_chain_and_a_knotted_one_are_reported_as_before() -> None:
    chain = Plan(
        steps=[
            ToolStep(id=f"s{i}", tool="search", input={"q": f"{{{{ steps.s{i - 1}.output }}}}"}
                     if i else {"q": "x"}, depends_on=[f"s{i - 1}"] if i else [])
            for i in range(300)
        ]
    )  # fmt: skip
    assert validation.validate_plan(chain, TOOLS, RUN_INPUT) == []
    knotted = msgspec.structs.replace(
        chain,
        steps=[
            msgspec.structs.replace(chain.steps[0], depends_on=["s299", "s150"]),
            *chain.steps[1:],
        ],
    )
    got = validation.validate_plan(knotted, TOOLS, RUN_INPUT, foreign=True)
    _same(got, reference.validate_plan(knotted, TOOLS, RUN_INPUT, foreign=True))
    assert [i.code for i in got] == ["dependency_cycle"]
