"""proto/ is generated from contracts.py and subjects.py: it must be current, valid and
enough for a client that reads nothing else."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import yaml

from loom_core import contracts, subjects
from loom_infra import proto_gen

PROTO = Path(__file__).resolve().parents[2] / "proto"
EXAMPLE = PROTO / "examples" / "run_request.json"


def _schema(stem: str) -> dict[str, Any]:
    return json.loads((PROTO / "schemas" / f"{stem}.json").read_text(encoding="utf-8"))


def _validator(stem: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_schema(stem))


def _walk(node: Any):
    """Every dict inside a JSON/YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _pointer(doc: Any, ref: str) -> Any:
    node = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _asyncapi() -> dict[str, Any]:
    return yaml.safe_load((PROTO / proto_gen.ASYNCAPI_FILE).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- freshness


def test_proto_is_current(tmp_path: Path) -> None:
    assert proto_gen.main([str(tmp_path)]) == 0
    fresh = {
        p.relative_to(tmp_path).as_posix(): p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file()
    }
    committed = {
        p.relative_to(PROTO).as_posix(): p.read_bytes()
        for p in [
            PROTO / proto_gen.ASYNCAPI_FILE,
            PROTO / proto_gen.ERRORS_FILE,
            PROTO / proto_gen.LIMITS_FILE,
            *(PROTO / "schemas").glob("*.json"),
        ]
        if p.is_file()
    }
    stale = sorted(rel for rel, data in fresh.items() if committed.get(rel) != data)
    extra = sorted(set(committed) - set(fresh))
    assert not stale and not extra, (
        f"proto/ is stale (differs: {stale}; no longer generated: {extra}); run: make proto"
    )


def test_generation_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    first = proto_gen.generate()
    assert proto_gen.generate() == first
    assert all(text.endswith("\n") for text in first.values())
    assert proto_gen.write(tmp_path, first) == sorted(first)
    assert proto_gen.write(tmp_path, first) == []  # nothing rewritten the second time


def test_write_removes_schemas_no_longer_generated_and_keeps_hand_written_files(
    tmp_path: Path,
) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "renamed_away.json").write_text("{}\n")
    (tmp_path / "README.md").write_text("hand written\n")
    changed = proto_gen.write(tmp_path, proto_gen.generate())
    assert "schemas/renamed_away.json" in changed
    assert not (tmp_path / "schemas" / "renamed_away.json").exists()
    assert (tmp_path / "README.md").read_text() == "hand written\n"


def test_main_without_an_output_dir_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert proto_gen.main([]) == 2
    assert "usage" in capsys.readouterr().err


# --------------------------------------------------------------------------- schemas


def test_every_message_the_brief_names_has_a_schema_named_by_its_tag() -> None:
    stems = {p.stem for p in (PROTO / "schemas").glob("*.json")}
    expected = {
        "run_request", "submit_accepted", "submit_rejected", "event_record", "plan_proposed",
        "plan_refused", "tool_result", "tool_spec", "dead_letter", "run_events_query",
        "run_events_reply", "runs_query", "runs_reply", "trace_query", "trace_reply",
        "thread_query", "thread_reply", "ping", "pong", "plan",
    }  # fmt: skip
    assert expected <= stems, f"missing: {sorted(expected - stems)}"
    assert set(proto_gen.event_tags()) <= stems
    assert {"submit_reply", "run_event", "inbox_message"} <= stems


def test_new_tagged_struct_in_contracts_is_picked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    class RunPaused(contracts.Record, tag="run_paused", tag_field="type"):
        label: str

    RunPaused.__module__ = contracts.__name__
    monkeypatch.setattr(contracts, "RunPaused", RunPaused, raising=False)
    files = proto_gen.generate()
    assert "schemas/run_paused.json" in files
    assert json.loads(files["schemas/run_paused.json"])["title"] == "RunPaused"


@pytest.mark.parametrize("path", sorted((PROTO / "schemas").glob("*.json")), ids=lambda p: p.name)
def test_schema_is_valid_self_contained_2020_12(path: Path) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(doc)
    assert doc["$schema"] == proto_gen.DIALECT
    assert doc["$id"].endswith(":" + path.stem)
    assert doc["title"]
    for node in _walk(doc):
        ref = node.get("$ref")
        if isinstance(ref, str):
            assert ref.startswith("#/"), f"{path.name}: external $ref {ref!r}"
            _pointer(doc, ref)  # KeyError if dangling


def test_event_record_schema_covers_every_run_event() -> None:
    doc = _schema("event_record")
    mapping = doc["$defs"]["EventRecord"]["properties"]["event"]["discriminator"]["mapping"]
    assert sorted(mapping) == sorted(proto_gen.event_tags())


def test_encoded_records_validate_against_their_schemas() -> None:
    at = datetime(2026, 11, 21, 10, 15, tzinfo=UTC)
    events = [
        contracts.RunCompleted(output={"text": "HELLO"}),
        contracts.ToolCallCompleted(
            step_id="a", attempt=1, idempotency_key="r:a:1", output=3, started_at=at,
            finished_at=at,
        ),
        contracts.PlanRejected(issues=[contracts.PlanIssue("unknown_tool", "$.steps[0]", "x")]),
    ]  # fmt: skip
    for seq, event in enumerate(events, start=1):
        record = contracts.EventRecord(run_id="r", seq=seq, at=at, event=event)
        data = json.loads(msgspec.json.encode(record))
        _validator("event_record").validate(data)
        _validator("run_event").validate(data["event"])
        _validator(record.kind).validate(data["event"])
    reply = contracts.SubmitRejected(error=contracts.ErrorInfo("bad", "fix it", path="$.plan"))
    _validator("submit_reply").validate(json.loads(msgspec.json.encode(reply)))
    _validator("submit_reply").validate(
        json.loads(msgspec.json.encode(contracts.SubmitAccepted(run_id="r")))
    )


# --------------------------------------------------------------------------- example


def test_example_run_request_validates_and_decodes() -> None:
    data = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    _validator("run_request").validate(data)
    request = msgspec.json.decode(EXAMPLE.read_bytes(), type=contracts.RunRequest)
    assert request.plan is not None and [s.id for s in request.plan.steps] == ["hello", "shout"]


def test_readme_shows_the_example() -> None:
    readme = (PROTO / "README.md").read_text(encoding="utf-8")
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", readme, flags=re.S)]
    assert json.loads(EXAMPLE.read_text(encoding="utf-8")) in blocks


def test_schema_and_decoder_both_reject_a_misspelt_field() -> None:
    data = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    data["plan"]["steps"][1]["depend_on"] = data["plan"]["steps"][1].pop("depends_on")
    assert not _validator("run_request").is_valid(data)
    with pytest.raises(msgspec.ValidationError, match="depend_on"):
        msgspec.json.decode(json.dumps(data), type=contracts.RunRequest)


# --------------------------------------------------------------------------- AsyncAPI


def test_asyncapi_lists_every_subject() -> None:
    doc = _asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in doc["channels"].values()}
    expected = {
        subjects.SUBMIT,
        subjects.run_event("{run_id}", "{event}"),
        *(subjects.inbox("{run_id}", source) for source in subjects.INBOX_SOURCES),
        subjects.dead_letter("{service}"),
        subjects.API_RUN_EVENTS,
        subjects.API_RUNS,
        subjects.API_TRACE,
        subjects.API_THREAD,
        subjects.health("{service}"),
        f"$KV.{subjects.TOOLS_BUCKET}.{{tool}}",
    }
    assert expected <= addresses, f"missing channels: {sorted(expected - addresses)}"
    streams = {s["name"]: s["subjects"] for s in doc["x-jetstream-streams"]}
    assert streams == {
        subjects.RUN_EVENTS_STREAM: [subjects.RUN_EVENTS_ALL],
        subjects.INBOX_STREAM: [subjects.INBOX_ALL],
        subjects.SIGNALS_STREAM: [subjects.SIGNALS_ALL],
        subjects.DLQ_STREAM: [subjects.DLQ_ALL],
        "LOOM_REJECTS": ["loom.rejects.*"],  # client mistakes, apart from poison
    }
    text = (PROTO / proto_gen.ASYNCAPI_FILE).read_text(encoding="utf-8")
    for header in (
        subjects.MSG_ID, subjects.NOTIFICATION_ID, subjects.EVENT_TYPE, subjects.DLQ_REASON,
        subjects.TRACEPARENT,
    ):  # fmt: skip
        assert f"{header}:" in text, f"header {header} not described"


def test_asyncapi_parameters_match_addresses_and_contracts() -> None:
    doc = _asyncapi()
    for name, channel in doc["channels"].items():
        in_address = set(re.findall(r"{(\w+)}", channel["address"] or ""))
        assert in_address == set(channel.get("parameters", {})), name
    params = doc["components"]["parameters"]
    assert params["event"]["enum"] == proto_gen.event_tags()
    assert params["service"]["enum"] == list(subjects.SERVICES)


def test_asyncapi_references_resolve() -> None:
    doc = _asyncapi()
    for node in _walk(doc):
        ref = node.get("$ref")
        if not isinstance(ref, str):
            continue
        if ref.startswith("#/"):
            _pointer(doc, ref)
        else:
            assert (PROTO / ref).is_file(), f"asyncapi.yaml refers to missing {ref}"


def test_request_reply_operations_reply_on_the_request_inbox() -> None:
    doc = _asyncapi()
    replying = {}
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), name
        channel = _pointer(doc, op["channel"]["$ref"])
        for message in op["messages"]:
            assert message["$ref"].startswith(op["channel"]["$ref"] + "/messages/"), name
        if "reply" in op:
            assert _pointer(doc, op["reply"]["channel"]["$ref"])["address"] is None, name
            replying[channel["address"]] = name
    assert subjects.SUBMIT in replying
    assert {a for a in replying if a.startswith(f"{subjects.PREFIX}.api.")} == {
        subjects.API_RUN_EVENTS, subjects.API_RUNS, subjects.API_TRACE, subjects.API_THREAD,
        subjects.API_TRACES, subjects.API_TRACES_SLOWEST, subjects.API_TRACES_USAGE,
        subjects.API_TRACES_REBUILD, subjects.API_MEMORY_TOOL, subjects.API_MEMORY_OPERATOR,
        subjects.API_TOOLS, subjects.API_BLOB, subjects.API_DEAD_LETTERS,
    }  # fmt: skip
    assert {subjects.CONTROL, subjects.RESUME} <= set(replying)


def test_a_new_subject_must_be_described(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subjects, "API_FORK", "loom.api.fork", raising=False)
    with pytest.raises(ValueError, match=r"subjects\.API_FORK .*make proto"):
        proto_gen.generate()
