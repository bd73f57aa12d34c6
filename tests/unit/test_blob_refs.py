"""Big values by reference, the pure parts (``loom_core.blobs``) and how templating,
predicates and the executor treat a reference: passed on whole, projected into, never
read. No servers."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom_core import blobs, templating
from loom_core.blobs import BlobRef, BlobRefError
from loom_core.contracts import (
    BlobReference,
    EventRecord,
    ForeachStep,
    IfStep,
    Plan,
    PlanProposed,
    RunCompleted,
    RunFailed,
    RunRequest,
    StepFailed,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_core.executor import advance, initial_state
from loom_core.predicates import evaluate
from loom_core.replay import replay

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
REF = blobs.ref_for(blobs.canonical({"text": "x" * 100, "rows": [1, 2, 3]}))


# ----------------------------------------------------------------------------- references


@given(json_values)
def test_canonical_bytes_do_not_depend_on_key_order(value: Any) -> None:
    data = blobs.canonical(value)
    assert msgspec.json.decode(data) == value
    if isinstance(value, dict):
        assert blobs.canonical(dict(reversed(list(value.items())))) == data
    ref = blobs.ref_for(data)
    assert ref.digest == "sha256:" + hashlib.sha256(data).hexdigest() and ref.bytes == len(data)


@given(st.binary(max_size=64), st.lists(st.text(max_size=5) | st.integers(0, 9), max_size=3))
def test_a_reference_round_trips_through_json_and_its_schema(data: bytes, path: list[Any]) -> None:
    ref = blobs.ref_for(data)
    for seg in path:
        ref = ref.project(seg)
    as_json = ref.as_json()
    assert blobs.is_ref(as_json)
    assert blobs.parse_ref(as_json) == ref
    encoded = msgspec.json.encode(as_json)
    assert msgspec.json.decode(encoded, type=BlobReference).blob == ref.digest  # proto/ shape
    assert ref.whole().as_json() == blobs.ref_for(data).as_json()


@pytest.mark.parametrize(
    ("claim", "why"),
    [
        ({"$blob": "sha256:abc", "bytes": 1}, "64 lowercase hex"),
        ({"$blob": "md5:" + "a" * 64, "bytes": 1}, "64 lowercase hex"),
        ({"$blob": "sha256:" + "A" * 64, "bytes": 1}, "64 lowercase hex"),
        ({"$blob": "sha256:" + "a" * 64}, '"bytes"'),
        ({"$blob": "sha256:" + "a" * 64, "bytes": -1}, '"bytes"'),
        ({"$blob": "sha256:" + "a" * 64, "bytes": True}, '"bytes"'),
        ({"$blob": "sha256:" + "a" * 64, "bytes": 1, "size": 2}, "unexpected keys ['size']"),
        ({"$blob": "sha256:" + "a" * 64, "bytes": 1, "path": "a"}, '"path"'),
        ({"$blob": "sha256:" + "a" * 64, "bytes": 1, "path": [-1]}, '"path"'),
        ({"$blob": "sha256:" + "a" * 64, "bytes": 1, "media_type": ""}, '"media_type"'),
        (
            {"$blob": "sha256:" + "a" * 64, "bytes": 1, "media_type": "text/plain", "path": ["a"]},
            "selects into JSON",
        ),  # fmt: skip
        ({"$blob": "sha256:" + "a" * 64, "bytes": 1, "type": "other"}, '"type"'),
    ],
)
def test_a_malformed_reference_is_a_typed_error_naming_its_path(claim: Any, why: str) -> None:
    with pytest.raises(BlobRefError) as caught:
        blobs.find_refs({"doc": [0, claim]}, "$.input")
    assert caught.value.error.code == "bad_blob_reference"
    assert caught.value.error.path == "$.input.doc[1]"
    assert why in caught.value.error.message


def test_references_are_found_in_document_order_and_not_searched_inside() -> None:
    projected = REF.project("text").as_json()
    value = {"a": [1, REF.as_json()], "b": {"c": projected}, "d": "plain"}
    found = blobs.find_refs(value)
    assert [(p, r.path) for p, r in found] == [("$.a[1]", ()), ("$.b.c", ("text",))]
    replaced = blobs.replace_refs(value, {p: f"<{p}>" for p, _ in found})
    assert replaced == {"a": [1, "<$.a[1]>"], "b": {"c": "<$.b.c>"}, "d": "plain"}
    assert value["a"][1] == REF.as_json()  # the input is not changed
    assert replaced["d"] is value["d"]
    assert blobs.replace_refs(REF.as_json(), {"$": 5}) == 5


def test_walkers_do_not_recurse_on_deep_values() -> None:
    deep: Any = REF.as_json()
    for _ in range(20_000):
        deep = [deep]
    found = blobs.find_refs(deep)
    assert len(found) == 1 and found[0][0].endswith("[0]")
    assert blobs.replace_refs(deep, {found[0][0]: "v"}) is not deep


def test_select_follows_a_projection_or_names_what_is_missing() -> None:
    value = {"text": "x" * 100, "rows": [1, 2, 3]}
    assert blobs.select(value, REF.project("rows").project(2), "$.input.n") == 3
    assert blobs.select(value, REF, "$") is value
    with pytest.raises(BlobRefError) as caught:
        blobs.select(value, REF.project("rows").project(7), "$.input.n")
    assert caught.value.error.code == "missing_field"
    assert caught.value.error.path == "$.input.n"
    assert "output.rows[7]" in caught.value.error.message


def test_people_read_a_reference_as_a_short_line() -> None:
    big = BlobRef("sha256:" + "ab" * 32, 10_485_760)
    assert blobs.describe(big) == "<blob sha256:abababab… 10.5 MB application/json>"
    assert blobs.describe(big.project("items").project(0)).endswith("json.items[0]>")
    assert blobs.readable({"out": big.as_json()}) == {"out": blobs.describe(big)}
    bad = {"$blob": "nope"}
    assert blobs.readable({"out": bad}) == {"out": bad}


# ----------------------------------------------------------------------------- templating


CTX = {"input": {}, "steps": {"a": {"output": REF.as_json()}}}


def test_a_whole_template_hands_the_reference_on_and_a_path_projects_into_it() -> None:
    rendered = templating.render(
        {"whole": "{{ steps.a.output }}", "part": "{{ steps.a.output.rows[1] }}"}, CTX
    )
    assert rendered["whole"] == REF.as_json()
    assert rendered["part"] == REF.project("rows").project(1).as_json()
    # a projection of a projection goes on from where the first stopped
    ctx = {"input": {"p": REF.project("rows").as_json()}, "steps": {}}
    assert templating.render("{{ input.p[0] }}", ctx)["path"] == ["rows", 0]


def test_a_blob_in_a_string_or_read_by_the_engine_is_a_typed_error() -> None:
    with pytest.raises(templating.BlobValueError) as caught:
        templating.render({"m": "total: {{ steps.a.output.rows }}"}, CTX, "$.steps.b.input")
    assert caught.value.code == "blob_not_inline"
    assert caught.value.path == "$.steps.b.input.m"
    assert "Pass it whole to a tool" in str(caught.value)
    with pytest.raises(templating.BlobValueError):
        templating.lookup(CTX, "steps", ["a", "output", "text"])
    # a condition never compares a reference in place of the value
    for predicate in (
        {"eq": ["{{ steps.a.output.text }}", "x"]},
        {"eq": ["{{ steps.a.output }}", {}]},
        {"empty": "{{ steps.a.output.rows }}"},
        {"exists": "{{ steps.a.output.text }}"},
    ):
        with pytest.raises(templating.BlobValueError):
            evaluate(predicate, CTX)
    assert evaluate({"exists": "{{ steps.a.output }}"}, CTX)  # the reference itself is there


# ----------------------------------------------------------------------------- executor


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _drive(plan: Plan, answers: dict[str, Any], run_input: dict[str, Any] | None = None) -> list:
    """Run the pure executor; ``answers[step_id]`` is the output its tool returns."""
    state = initial_state("r1")
    events = advance(state, RunRequest(plan=plan, input=run_input or {}), T0)
    events += advance(state, PlanProposed(run_id="r1", plan=plan), T0)
    pending = [e for e in events if isinstance(e, ToolCallRequested)]
    while pending:
        req = pending.pop(0)
        produced = advance(state, ToolResult(
            run_id="r1", step_id=req.step_id, attempt=req.attempt,
            idempotency_key=req.idempotency_key, ok=True, started_at=T0, finished_at=T0,
            output=answers[req.step_id.split("/")[0]],
        ), T0)  # fmt: skip
        events += produced
        pending += [e for e in produced if isinstance(e, ToolCallRequested)]
    return events


def test_the_engine_passes_references_through_and_replays_without_their_content() -> None:
    plan = Plan(
        steps=[
            ToolStep(id="a", tool="fetch", input={"url": "{{ input.url }}"}),
            ToolStep(id="b", tool="upper", input={"text": "{{ steps.a.output.text }}"}),
            ToolStep(id="c", tool="echo", input={"message": "{{ steps.b.output }}"}),
        ],
        output="{{ steps.c.output }}",
    )
    b_out = blobs.ref_for(b'{"text":"X"}').as_json()
    events = _drive(plan, {"a": REF.as_json(), "b": b_out, "c": b_out}, {"url": "u"})
    requests = [e for e in events if isinstance(e, ToolCallRequested)]
    assert requests[1].input == {"text": REF.project("text").as_json()}
    assert requests[2].input == {"message": b_out}
    assert events[-1] == RunCompleted(output=b_out)
    records = [EventRecord(run_id="r1", seq=i + 1, at=T0, event=e) for i, e in enumerate(events)]
    report, _ = replay(records)
    assert report.identical


def test_a_condition_or_items_from_a_blob_fail_the_step_typed() -> None:
    cond = Plan(steps=[
        ToolStep(id="a", tool="fetch", input={}),
        IfStep(id="check", depends_on=["a"],
               condition={"eq": ["{{ steps.a.output.status }}", "ok"]},
               then=[ToolStep(id="t", tool="echo", input={})]),
    ])  # fmt: skip
    events = _drive(cond, {"a": REF.as_json()})
    failed = next(e for e in events if isinstance(e, StepFailed))
    assert failed.error.code == "blob_not_inline" and isinstance(events[-1], RunFailed)
    items = Plan(steps=[
        ToolStep(id="a", tool="fetch", input={}),
        ForeachStep(id="each", items="{{ steps.a.output }}",
                    do=[ToolStep(id="t", tool="echo", input={"m": "{{ item }}"})]),
    ])  # fmt: skip
    events = _drive(items, {"a": REF.as_json()})
    failed = next(e for e in events if isinstance(e, StepFailed))
    assert failed.error.code == "blob_not_inline"
    assert failed.error.path == "$.steps.each.items"
