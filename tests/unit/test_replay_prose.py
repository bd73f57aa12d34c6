"""Replay compares decisions, never prose (issue 9: rewording one skip reason made
``tool-continue`` diverge, and ``RunHost._load`` would park every open run holding such
an event as ``diverged`` after a deploy).

- every field of every run event is classified as decision or prose
  (``loom_core.decisions.FIELDS``): a new event or field fails here until it is;
- a deploy that rewords every message: the executor and the plan validator are
  re-imported with every ``message=``/``reason=`` argument (and PlanIssue's message)
  rewritten in their source, independently of the classification; all golden
  histories still replay as identical, though the raw events now differ;
- the other side: histories whose stored prose is reworded still replay;
- a changed decision (step id, attempt, error code, output, delay, tool, key, timer) is
  still a divergence, reported at the first differing event with the field's name.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import loom_core.executor as executor
import loom_core.validation as validation
from loom_core import contracts
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    ModelCallRequested,
    ModelOutputRefused,
    RunEvent,
    StepCompleted,
    StepFailed,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    TimerStarted,
    ToolCallRequested,
)
from loom_core.decisions import FIELDS, NESTED, PROSE, decision, same_decision
from loom_core.replay import message_for, replay

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
FILES = sorted(GOLDEN.glob("*.jsonl"))
EVENT_TYPES: list[type[msgspec.Struct]] = list(RunEvent.__args__)  # type: ignore[attr-defined]
MARK = "[reworded] "


def read(path: Path) -> list[EventRecord]:
    decoder = msgspec.json.Decoder(EventRecord)
    return [decoder.decode(line) for line in path.read_text().splitlines() if line]


# ----------------------------------------------------------------------------- the list


def struct_types(annotation: Any) -> set[type]:
    """Struct classes named anywhere in a field's annotation (walks the *types*)."""
    found: set[type] = set()
    stack = [annotation]
    while stack:
        t = stack.pop()
        if isinstance(t, type) and issubclass(t, msgspec.Struct):
            found.add(t)
        stack.extend(typing.get_args(t))
    return found


def is_text(annotation: Any) -> bool:
    return str in typing.get_args(annotation) or annotation is str


def test_every_field_of_every_run_event_is_classified() -> None:
    assert len(FIELDS) == len(set(FIELDS))
    nested_types: set[type] = set()
    for t in EVENT_TYPES:
        assert t in FIELDS, f"classify {t.__name__}'s fields in loom_core.decisions.FIELDS"
        hints = typing.get_type_hints(t, vars(contracts))
        assert set(FIELDS[t]) == set(t.__struct_fields__), (
            f"{t.__name__}: classify the fields "
            f"{sorted(set(t.__struct_fields__) ^ set(FIELDS[t]))} in loom_core.decisions"
        )
        for name, kind in FIELDS[t].items():
            if kind == PROSE:
                assert is_text(hints[name]), f"{t.__name__}.{name}: only text can be prose"
            if kind == NESTED:
                inner = struct_types(hints[name])
                assert inner, f"{t.__name__}.{name} holds no struct: not nested"
                nested_types |= inner
    for t in nested_types:
        assert set(FIELDS.get(t, {})) == set(t.__struct_fields__), t.__name__
        assert NESTED not in FIELDS[t].values()  # one level: decision() relies on it
    assert set(FIELDS) == set(EVENT_TYPES) | nested_types  # nothing stale


def test_the_prose_is_the_messages_and_reasons() -> None:
    prose = sorted(
        f"{t.__name__}.{name}" for t, kinds in FIELDS.items()
        for name, kind in kinds.items() if kind == PROSE
    )  # fmt: skip
    assert prose == sorted([
        "ErrorInfo.message", "PlanIssue.message", "RunCancelRequested.reason",
        "RunCancelled.reason", "RunDiverged.message", "RunPaused.reason",
        "StepCancelled.reason", "StepSkipped.reason", "ToolCallCancelled.reason",
    ])  # fmt: skip


def test_decision_blanks_prose_only() -> None:
    failed = StepFailed(step_id="a", error=ErrorInfo(code="boom", message="why", path="$.x"))
    assert decision(failed) == StepFailed(
        step_id="a", error=ErrorInfo(code="boom", message="", path="$.x")
    )
    assert same_decision(StepSkipped(step_id="a", reason="x"), StepSkipped("a", "y"))
    assert not same_decision(StepSkipped(step_id="a", reason="x"), StepSkipped("b", "x"))
    assert not same_decision(StepScheduled(step_id="a"), StepStarted(step_id="a", attempt=1))


# ----------------------------------------------------------------- a deploy rewording all


class Reword(ast.NodeTransformer):
    """Prefix every message/reason the code passes to a struct or helper, and the
    message of positional ``PlanIssue(code, path, message)`` calls."""

    def __init__(self) -> None:
        self.sites = 0

    def _mark(self, value: ast.expr) -> ast.expr:
        self.sites += 1
        return ast.BinOp(left=ast.Constant(MARK), op=ast.Add(), right=value)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        for keyword in node.keywords:
            if keyword.arg in ("message", "reason"):
                keyword.value = self._mark(keyword.value)
        name = getattr(node.func, "id", None)
        if name == "PlanIssue" and len(node.args) == 3:
            node.args[2] = self._mark(node.args[2])
        return node


def reworded(module: types.ModuleType, tmp: Path) -> tuple[types.ModuleType, int]:
    """A copy of ``module`` imported from its source with every message reworded."""
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    transformer = Reword()
    tree = ast.fix_missing_locations(transformer.visit(tree))
    name = f"reworded_{module.__name__.rsplit('.', 1)[-1]}"
    path = tmp / f"{name}.py"
    path.write_text(ast.unparse(tree))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    copy = importlib.util.module_from_spec(spec)
    sys.modules[name] = copy
    spec.loader.exec_module(copy)
    return copy, transformer.sites


@pytest.fixture(scope="module")
def reworded_advance(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("reworded")
    new_validation, v_sites = reworded(validation, tmp)
    new_executor, e_sites = reworded(executor, tmp)
    # The copy brings new functions only: the state and message classes stay the
    # originals (replay and message_for build those), and it validates plans with the
    # reworded validator.
    for name in ("Submission", "Admit", "Scope", "Suspension", "Inst", "RunState"):
        setattr(new_executor, name, getattr(executor, name))
    new_executor.validate_plan = new_validation.validate_plan
    new_executor.dependencies = new_validation.dependencies
    # every ErrorInfo/PlanIssue the two build passes through one of these sites
    assert e_sites >= 30 and v_sites >= 3, (e_sites, v_sites)
    yield new_executor.advance
    for name in ("reworded_executor", "reworded_validation"):
        sys.modules.pop(name, None)


def test_a_reworded_skip_reason_used_to_diverge() -> None:
    # the finding, as it was: the old comparison was ``recorded != decided``
    records = read(GOLDEN / "tool-continue.jsonl")
    skip = next(r for r in records if isinstance(r.event, StepSkipped))
    changed = msgspec.structs.replace(skip.event, reason=MARK + skip.event.reason)
    assert changed != skip.event  # what replay compared before
    assert same_decision(skip.event, changed)  # what it compares now
    again = [msgspec.structs.replace(r, event=changed) if r is skip else r for r in records]
    report, _ = replay(again)
    assert report.identical, report.divergence


def replay_reworded(records: list[EventRecord], reworded_advance: Any) -> tuple[Any, list[int]]:
    """Replay under the rewording code; also the seqs whose raw event it changed."""
    differ: list[int] = []

    def advance(state: Any, message: Any, now: Any, recorded: Any = None) -> list[RunEvent]:
        at = state.version
        decided = reworded_advance(state, message, now, recorded)
        differ.extend(
            at + k for k, e in enumerate(decided, start=1)
            if at + k <= len(records) and e != records[at + k - 1].event
        )  # fmt: skip
        return decided

    report, state = replay(records, advance_fn=advance)
    assert report.identical, report.divergence
    assert report.events == len(records) and state.terminal
    return report, differ


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_golden_history_replays_under_code_that_rewords_every_message(
    path: Path, reworded_advance: Any
) -> None:
    replay_reworded(read(path), reworded_advance)


def test_the_rewording_changed_what_the_engine_writes(reworded_advance: Any) -> None:
    # the old comparison (``recorded != decided``) would have parked all of these
    changed = {p.stem: replay_reworded(read(p), reworded_advance)[1] for p in FILES}
    assert {name for name, seqs in changed.items() if seqs} == REWORDED
    assert sum(len(seqs) for seqs in changed.values()) >= 20


# histories where the engine writes prose of its own (elsewhere the only prose is a
# tool's or planner's error, recorded as received and fed back as it was)
REWORDED = {
    "approval", "approval-escalate", "cancel", "conditional", "nested", "pause",
    "run-timeout", "step-timeout", "tool-continue", "agent-intent-routing", "replan",
    "replan-refused",
    # recorded before issue 16 reworded schema problems (`expected number, got string`);
    # the current code already says it otherwise, the rewording code too
    "agent-hostile",
}  # fmt: skip


def test_the_reworded_code_really_says_something_else(reworded_advance: Any) -> None:
    records = read(GOLDEN / "tool-continue.jsonl")
    report, _ = replay(records, advance_fn=reworded_advance)
    assert report.identical
    state = executor.initial_state(records[0].run_id)
    decided: list[RunEvent] = []
    i = 0
    while i < len(records):
        message = message_for(state.run_id, records[i].event)
        out = reworded_advance(state, message, records[i].at)
        decided += out
        i += len(out)
    skipped = [e for e in decided if isinstance(e, StepSkipped)]
    assert skipped and all(e.reason.startswith(MARK) for e in skipped)


# ------------------------------------------------------------ old prose in the store


def reword_stored(event: RunEvent) -> RunEvent:
    """What an older version that worded everything differently would have stored."""
    changes: dict[str, Any] = {}
    for name, kind in FIELDS[type(event)].items():
        value = getattr(event, name)
        if kind == PROSE:
            changes[name] = "older words: " + value
        elif kind == NESTED and value is not None:
            items = value if isinstance(value, list) else [value]
            new = [msgspec.structs.replace(v, message="older words: " + v.message) for v in items]
            changes[name] = new if isinstance(value, list) else new[0]
    return msgspec.structs.replace(event, **changes) if changes else event


def reword_history(records: list[EventRecord]) -> list[EventRecord]:
    """Every record as ``reword_stored`` has it; and, as that older version told its
    own words back to the model, a refusal's words in the model requests after it."""
    told: dict[str, str] = {}  # JSON-escaped: as they stand in a message's content
    out = []
    for r in records:
        event = reword_stored(r.event)
        if isinstance(r.event, ModelOutputRefused) and isinstance(event, ModelOutputRefused):
            told[json.dumps(r.event.error.message)[1:-1]] = json.dumps(event.error.message)[1:-1]
        if isinstance(event, ModelCallRequested) and told:
            messages = []
            for m in event.messages:
                content = m.content
                for was, now in told.items():
                    content = content.replace(was, now) if content else content
                messages.append(msgspec.structs.replace(m, content=content))
            event = msgspec.structs.replace(event, messages=messages)
        out.append(msgspec.structs.replace(r, event=event))
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_golden_history_with_its_stored_prose_reworded_replays(path: Path) -> None:
    records = read(path)
    old = reword_history(records)
    report, _ = replay(old)
    assert report.identical, report.divergence
    assert report.events == len(records)
    assert (old != records) == any(decision(r.event) != r.event for r in records)


# ------------------------------------------------------ decisions still count


def first(records: list[EventRecord], kind: type, where: Callable[[Any], bool] = bool) -> int:
    """Index of the first ``kind`` event the engine decided (not a recorded input)."""
    run_id = records[0].run_id
    return next(
        i for i, r in enumerate(records)
        if isinstance(r.event, kind) and message_for(run_id, r.event) is None and where(r.event)
    )  # fmt: skip


def with_error(event: Any, **changes: Any) -> Any:
    return msgspec.structs.replace(event, error=msgspec.structs.replace(event.error, **changes))


CHANGES: list[tuple[str, type, Callable[[Any], Any], str]] = [
    ("hello-dag", StepScheduled, lambda e: msgspec.structs.replace(e, step_id="other"),
     "step_id"),
    ("tool-retry", StepStarted, lambda e: msgspec.structs.replace(e, attempt=e.attempt + 1),
     "attempt"),
    ("hello-dag", StepCompleted, lambda e: msgspec.structs.replace(e, output={"x": 1}),
     "output"),
    ("tool-retry", StepRetryScheduled, lambda e: msgspec.structs.replace(e, delay_s=9.0),
     "delay_s"),
    ("tool-retry", StepRetryScheduled, lambda e: with_error(e, code="other_code"), "error"),
    ("tool-continue", StepFailed, lambda e: with_error(e, code="other_code"), "error"),
    ("hello-dag", ToolCallRequested, lambda e: msgspec.structs.replace(e, tool="other"),
     "tool"),
    ("hello-dag", ToolCallRequested,
     lambda e: msgspec.structs.replace(e, idempotency_key="run:x:1"), "idempotency_key"),
    ("hello-dag", ToolCallRequested,
     lambda e: msgspec.structs.replace(e, input={"rendered": "differently"}), "input"),
    ("sleep", TimerStarted, lambda e: msgspec.structs.replace(e, timer_id="t2"), "timer_id"),
    # a decision changed together with prose: still a divergence
    ("tool-continue", StepSkipped,
     lambda e: msgspec.structs.replace(e, step_id="other", reason="reworded"), "step_id"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("golden", "kind", "change", "field"), CHANGES, ids=[f"{c[1].__name__}.{c[3]}" for c in CHANGES]
)
def test_a_changed_decision_is_still_a_divergence_at_the_first_differing_event(
    golden: str, kind: type, change: Callable[[Any], Any], field: str
) -> None:
    records = read(GOLDEN / f"{golden}.jsonl")
    i = first(records, kind)
    changed = records[:i] + [msgspec.structs.replace(records[i], event=change(records[i].event))]
    changed += records[i + 1 :]
    report, _ = replay(changed)
    assert report.divergence is not None, f"{kind.__name__}.{field} changed, not reported"
    assert report.divergence.seq == records[i].seq
    assert report.divergence.message == (
        f"event {records[i].seq}: the current code decides differently ({field})"
    )
    assert report.divergence.recorded == msgspec.to_builtins(changed[i].event)
    assert report.divergence.decided == msgspec.to_builtins(records[i].event)
