"""Golden histories: runs recorded through the real stack (``tests/golden/record.py``)
replay identically with the current code. A change to the executor that would decide
differently over runs already stored fails here, with the event number.

Also the upcasting mechanism: an old-schema history (``schema_version`` 0 with a field
renamed) decodes through an upcaster registered in ``loom_core.codec._UPCASTERS`` and
still replays identically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

import loom_core.executor as executor
from loom_core import codec
from loom_core.contracts import (
    SCHEMA_VERSION,
    TERMINAL_EVENTS,
    EventRecord,
    PlanAccepted,
    RunEvent,
    Step,
    StepRetryScheduled,
)
from loom_core.replay import replay

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = sorted(GOLDEN.glob("*.jsonl"))
SCENARIOS = {
    "approval-escalate", "approval-many", "tool-suspend", "cancel", "pause", "queue", "fork",
    "fork-origin", "fork-nested", "fork-nested-origin", "agent-hostile", "replan-refused",
}  # fmt: skip
# Event kinds no recorded scenario produces: a diverged run is parked, never finished,
# and needs_review takes a tool-runner crashing mid-call (tests/e2e/test_crash.py).
# A publish failure takes an event over the broker's max_payload (tests/integration/test_sizes.py).
NOT_RECORDED = {"run_diverged", "run_needs_review", "run_publish_failed"}


def read(path: Path) -> list[EventRecord]:
    return [codec.decode_event(line.encode()) for line in path.read_text().splitlines() if line]


def step_kinds(steps: list[Step]) -> set[str]:
    kinds: set[str] = set()
    stack = list(steps)
    while stack:
        step = stack.pop()
        kinds.add(step.__struct_config__.tag)  # type: ignore[arg-type]
        for body in ("do", "then", "else_"):
            stack.extend(getattr(step, body, []))
        stack.extend(s for b in getattr(step, "branches", {}).values() for s in b)
        if getattr(step, "fallback", None) is not None:
            stack.append(step.fallback)  # type: ignore[union-attr]
    return kinds


def test_every_example_and_scenario_has_a_golden_history() -> None:
    names = {p.stem for p in FILES}
    expected = {p.stem for p in EXAMPLES.glob("*.yaml")} | SCENARIOS
    assert names == expected, "record them: .venv/bin/python tests/golden/record.py"
    kinds, events = set(), set()
    for path in FILES:
        records = read(path)
        events |= {r.kind for r in records}
        plans = [r.event.plan for r in records if isinstance(r.event, PlanAccepted)]
        kinds |= {k for plan in plans for k in step_kinds(plan.steps)}
    # every step kind of the plan language ran, and every fact a run can record but two
    all_kinds = {t.__struct_config__.tag for t in RunEvent.__args__}  # type: ignore[attr-defined]
    assert kinds == {t.__struct_config__.tag for t in Step.__args__}  # type: ignore[attr-defined]
    assert events == all_kinds - NOT_RECORDED


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_golden_history_replays_identically(path: Path) -> None:
    assert path.stat().st_size < 50_000
    records = read(path)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert isinstance(records[-1].event, TERMINAL_EVENTS)
    report, state = replay(records)
    assert report.identical, report.divergence
    assert report.events == len(records)
    assert state.terminal and state.version == len(records)


def test_a_changed_decision_is_caught_on_the_golden_history(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = read(GOLDEN / "tool-retry.jsonl")
    monkeypatch.setattr(executor, "retry_delay", lambda policy, attempt, key: 99.0)
    report, _ = replay(records)
    first_retry = next(r for r in records if isinstance(r.event, StepRetryScheduled))
    assert report.divergence is not None
    assert report.divergence.seq == first_retry.seq
    assert report.divergence.recorded["delay_s"] == first_retry.event.delay_s != 99.0
    assert report.divergence.decided["delay_s"] == 99.0
    assert report.divergence.message.startswith(f"event {first_retry.seq}:")


# ----------------------------------------------------------------------------- upcasting


def as_old_schema(path: Path, kind: str, old: str, new: str) -> list[bytes]:
    """The file's records as a version-0 writer would have stored them: every record
    says ``schema_version: 0`` and events of ``kind`` name field ``new`` as ``old``."""
    lines = []
    for line in path.read_text().splitlines():
        raw = json.loads(line)
        raw["schema_version"] = 0
        if raw["event"]["type"] == kind and new in raw["event"]:
            raw["event"][old] = raw["event"].pop(new)
        lines.append(json.dumps(raw).encode())
    return lines


def renaming(kind: str, old: str, new: str) -> Any:
    def upcast(raw: dict[str, Any]) -> dict[str, Any]:
        event = raw["event"]
        if event.get("type") == kind and old in event:
            event[new] = event.pop(old)
        return raw

    return upcast


def check_upcast(
    monkeypatch: pytest.MonkeyPatch, golden: str, kind: str, old: str, new: str
) -> None:
    path = GOLDEN / golden
    current = read(path)
    old_lines = as_old_schema(path, kind, old, new)
    assert sum(f'"{old}"'.encode() in line for line in old_lines) >= 1  # really renamed
    monkeypatch.setitem(codec._UPCASTERS, 0, renaming(kind, old, new))
    assert SCHEMA_VERSION == 1  # the upcaster takes version 0 to the current one

    upcast = [codec.decode_event(line) for line in old_lines]
    assert upcast == current  # same events, now at the current schema version
    assert {r.schema_version for r in upcast} == {SCHEMA_VERSION}
    report, _ = replay(upcast)
    assert report.identical, report.divergence
    assert report.events == len(current)


def test_an_old_history_with_a_renamed_optional_field_is_upcast_and_replays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # run_requested.input (optional, defaults to {}) was once called `inputs`: without
    # the upcaster the run would lose its input and replay differently
    check_upcast(monkeypatch, "hello-dag.jsonl", "run_requested", "inputs", "input")
    records = [
        msgspec.json.decode(line) for line in as_old_schema(
            GOLDEN / "hello-dag.jsonl", "run_requested", "inputs", "input"
        )
    ]  # fmt: skip
    assert records[0]["event"]["inputs"] == {"city": "Lisbon", "name": "Ada"}


def test_an_old_history_with_a_renamed_required_field_is_upcast_and_replays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # step_completed.output (required) was once called `result`
    check_upcast(monkeypatch, "fork.jsonl", "step_completed", "result", "output")
