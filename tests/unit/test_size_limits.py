"""Size limits (issue 9): the pure checks, the engine's decisions under the limits the
run recorded (and replay deciding the same), the relay's report ending a run, the
settings and the tool-runner's own check. No servers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from loom_core import codec, sizes
from loom_core.contracts import (
    EventRecord,
    Plan,
    PlanProposed,
    ReduceStep,
    RunCancelled,
    RunFailed,
    RunPublishFailed,
    RunRequest,
    SizeLimits,
    SleepStep,
    StepCancelled,
    StepFailed,
    ToolCallFailed,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_core.executor import RunState, Submission, advance, initial_state
from loom_core.replay import replay
from loom_infra.settings import SettingsError, settings_from_env, size_limits_from_env
from loom_services.toolrunner import bounded_outcome
from loom_services.tools.registry import ToolOutcome

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SMALL = SizeLimits(step_input_bytes=2048, step_output_bytes=2048)


class Run:
    """A run driven message by message, keeping every event as a record (for replay)."""

    def __init__(self, plan: Plan, run_input: dict[str, Any], limits: SizeLimits | None) -> None:
        self.state: RunState = initial_state("r1")
        self.records: list[EventRecord] = []
        request = RunRequest(plan=plan, input=run_input)
        self.send(Submission(request, None, (), limits=limits))
        self.send(PlanProposed(run_id="r1", plan=plan))

    def send(self, message: Any) -> list[Any]:
        produced = advance(self.state, message, T0)
        base = len(self.records)
        self.records += [
            EventRecord(run_id="r1", seq=base + i, at=T0, event=e)
            for i, e in enumerate(produced, start=1)
        ]
        return produced

    def answer(self, output: Any) -> list[Any]:
        request = next(
            r.event for r in reversed(self.records) if isinstance(r.event, ToolCallRequested)
        )
        return self.send(ToolResult(
            run_id="r1", step_id=request.step_id, attempt=request.attempt,
            idempotency_key=request.idempotency_key, ok=True, started_at=T0, finished_at=T0,
            output=output,
        ))  # fmt: skip

    def replays_identically(self) -> bool:
        # through the codec, as stored: the limits must survive the round trip
        stored = [codec.decode_event(codec.encode(r)) for r in self.records]
        return replay(stored)[0].identical


# ----------------------------------------------------------------- the pure checks


def test_json_size_measures_compact_json_and_only_past_the_limit() -> None:
    assert sizes.json_size({"a": "x" * 10}, 100) is None
    assert sizes.json_size("x" * 200, 100) == 202
    # control characters are escaped: the measure is what the event will hold
    assert sizes.json_size("\x01" * 100, 100) == 602
    deep: Any = []
    for _ in range(5000):  # deeper than the encoder goes: the iterative walk measures
        deep = [deep, "y" * 10]
    assert (sizes.json_size(deep, 1000) or 0) > 1000


def test_errors_name_the_step_size_limit_and_setting() -> None:
    error = sizes.check_input(["x" * 3000], SMALL, "fe/2/fetch", "$.steps.fe/2/fetch.input")
    assert error is not None and error.code == "input_too_large"
    assert error.details == {
        "step_id": "fe/2/fetch", "size": 3004, "limit": 2048,
        "setting": "LOOM_MAX_STEP_INPUT_BYTES",
    }  # fmt: skip
    assert "fe/2/fetch" in error.message and "LOOM_MAX_STEP_INPUT_BYTES" in error.message
    out = sizes.check_output("x" * 3000, SMALL, "run", "$.output")
    assert out is not None and out.code == "output_too_large"
    assert "LOOM_MAX_STEP_OUTPUT_BYTES" in out.message
    assert sizes.check_output("x" * 100, SMALL, "a", "$") is None


# ----------------------------------------------------------------- the engine


def test_a_rendered_input_over_the_limit_fails_the_step_and_replays() -> None:
    plan = Plan(steps=[ToolStep(id="a", tool="echo", input={"m": ["{{ input.blob }}"] * 6})])
    run = Run(plan, {"blob": "x" * 500}, SMALL)
    assert not any(isinstance(r.event, ToolCallRequested) for r in run.records)
    failed = [r.event for r in run.records if isinstance(r.event, StepFailed)]
    assert failed[0].error.code == "input_too_large" and failed[0].step_id == "a"
    end = run.records[-1].event
    assert isinstance(end, RunFailed) and end.error.code == "input_too_large"
    assert run.replays_identically()
    # the same run under the default limits passes: the limit is the run's, recorded
    assert any(
        isinstance(r.event, ToolCallRequested) for r in Run(plan, {"blob": "x" * 500}, None).records
    )


def test_a_tool_output_over_the_limit_is_a_failed_attempt_never_recorded() -> None:
    plan = Plan(steps=[ToolStep(id="a", tool="echo", input={"m": "hi"})])
    run = Run(plan, {}, SMALL)
    produced = run.answer({"big": "y" * 5000})
    attempt = next(e for e in produced if isinstance(e, ToolCallFailed))
    assert attempt.error.code == "output_too_large"
    assert isinstance(produced[-1], RunFailed)
    assert "y" * 100 not in codec.encode(produced).decode()  # the output is nowhere
    assert run.replays_identically()


def test_a_reduce_that_doubles_its_accumulator_fails_at_the_limit() -> None:
    # the body's result (the reduce's `output` template) is the next accumulator
    step = ReduceStep(
        id="r", items=list(range(20)), initial="ab",
        do=[ToolStep(id="n", tool="noop", input={})], output="{{ acc }}{{ acc }}",
    )  # fmt: skip
    run = Run(Plan(steps=[step]), {}, SMALL)
    while not run.state.terminal:
        run.answer({})
    failed = [r.event for r in run.records if isinstance(r.event, StepFailed)]
    assert failed and failed[0].error.code == "output_too_large"
    assert failed[-1].step_id == "r"
    assert isinstance(run.records[-1].event, RunFailed)
    # nothing recorded holds a value over the limit
    assert max(len(codec.encode(r)) for r in run.records) < 2 * SMALL.step_output_bytes
    assert run.replays_identically()


def test_the_relays_report_ends_the_run_failed_and_replays() -> None:
    plan = Plan(steps=[SleepStep(id="nap", seconds=60)])
    run = Run(plan, {}, None)
    report = RunPublishFailed(
        seq=3, event_type="step_started", code="event_too_large", size=2_000_000, limit=1_048_576
    )
    produced = run.send(report)
    assert produced[0] == report
    assert any(isinstance(e, StepCancelled) for e in produced)
    end = produced[-1]
    assert isinstance(end, RunFailed) and end.error.code == "event_too_large"
    assert end.error.details["seq"] == 3
    assert run.send(report) == []  # a repeat (relay retry) changes nothing
    assert run.replays_identically()
    assert not any(isinstance(e, RunCancelled) for e in produced)


# ----------------------------------------------------------------- settings, tool-runner


def test_settings_read_the_limits_and_refuse_what_cannot_fit() -> None:
    assert settings_from_env({}).size_limits == sizes.DEFAULT_LIMITS
    env = {"LOOM_MAX_STEP_INPUT_BYTES": "4096", "LOOM_MAX_STEP_OUTPUT_BYTES": "8192"}
    assert settings_from_env(env).size_limits == SizeLimits(4096, 8192)
    with pytest.raises(SettingsError) as refused:
        size_limits_from_env({"LOOM_MAX_STEP_OUTPUT_BYTES": str(2**20)}, 262_144)
    assert refused.value.variable == "LOOM_MAX_STEP_OUTPUT_BYTES"
    # a bigger LOOM_MAX_PAYLOAD raises the broker's max_payload, and so the ceiling
    assert (
        size_limits_from_env({"LOOM_MAX_STEP_OUTPUT_BYTES": str(2**20)}, 2**20).step_output_bytes
        == 2**20
    )
    with pytest.raises(SettingsError):
        size_limits_from_env({"LOOM_MAX_STEP_INPUT_BYTES": "10"}, 262_144)


def test_the_tool_runner_turns_an_oversized_output_into_a_failure() -> None:
    ok = ToolOutcome(ok=True, output={"text": "z" * 5000})
    bounded = bounded_outcome(ok, SMALL, "a")
    assert not bounded.ok and bounded.error is not None
    assert bounded.error.code == "output_too_large" and bounded.output is None
    small = ToolOutcome(ok=True, output={"text": "z"})
    assert bounded_outcome(small, SMALL, "a") is small
