"""The run actor's brain: ``evolve`` folds events into state, ``decide`` turns the state
and one incoming message into new events.

Determinism contract (DESIGN decision 4): neither function reads a clock, draws a
random number or does I/O. Time arrives as the ``now`` argument and is stamped on the
envelope by the caller, ids are derived from the run id (``loom_core.ids``). Replaying
a run re-runs ``decide`` over its recorded inputs and must give the same events.

Cost: ``evolve`` is O(1) per event and ``decide`` touches only the step a message is
about and its direct dependents, so a step's cost does not grow with the run's history.
``evolve`` updates the state in place (the actor owns it); ``decide`` never mutates the
state: it works on a ``_Draft`` overlay so cascades (a completion that schedules the
next steps, a failure that skips the rest) see their own effects.

Failure semantics (v1): a failed step skips every step that still waits; the run
fails once no step is in flight, so every started effect's result is still recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from loom_core import ids
from loom_core.contracts import (
    ErrorInfo,
    InboxMessage,
    Plan,
    PlanAccepted,
    PlanProposed,
    PlanRefused,
    PlanRejected,
    RunCompleted,
    RunEvent,
    RunFailed,
    RunRequest,
    RunRequested,
    Step,
    StepCompleted,
    StepFailed,
    StepScheduled,
    StepSkipped,
    StepStarted,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolResult,
)
from loom_core.templating import TemplateError, render
from loom_core.validation import dependencies, validate_plan

RunStatus = Literal["new", "planning", "running", "completed", "failed", "rejected"]
StepStatus = Literal["pending", "running", "succeeded", "failed", "skipped"]
TERMINAL_RUN: frozenset[str] = frozenset({"completed", "failed", "rejected"})
DONE_STEP: frozenset[str] = frozenset({"succeeded", "failed", "skipped"})


@dataclass
class StepState:
    step: Step
    deps: tuple[str, ...]
    status: StepStatus = "pending"
    attempt: int = 0
    output: Any = None
    error: ErrorInfo | None = None


@dataclass
class RunState:
    run_id: str
    version: int = 0
    status: RunStatus = "new"
    plan: Plan | None = None
    input: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, StepState] = field(default_factory=dict)
    dependents: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # step id -> {"output": ...} of succeeded steps: the templating context, kept
    # incrementally so rendering never rebuilds it.
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    running: int = 0
    done: int = 0
    first_failure: str | None = None
    output: Any = None
    error: ErrorInfo | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_RUN

    def context(self) -> dict[str, Any]:
        return {"input": self.input, "steps": self.outputs}


# --------------------------------------------------------------------------- evolve


def initial_state(run_id: str) -> RunState:
    return RunState(run_id=run_id)


def fold(run_id: str, events: Iterable[RunEvent]) -> RunState:
    state = initial_state(run_id)
    for event in events:
        evolve(state, event)
    return state


def evolve(state: RunState, event: RunEvent) -> RunState:
    """Apply one event to ``state`` (in place) and return it."""
    state.version += 1
    match event:
        case RunRequested(input=run_input):
            state.status = "planning"
            state.input = run_input
        case PlanAccepted(plan=plan):
            _install_plan(state, plan)
            state.status = "running"
        case PlanRejected():
            state.status = "rejected"
        case StepScheduled():
            pass
        case StepStarted(step_id=sid, attempt=attempt):
            st = state.steps[sid]
            st.status, st.attempt = "running", attempt
            state.running += 1
        case ToolCallRequested() | ToolCallCompleted() | ToolCallFailed():
            pass  # the attempt's facts; the step's outcome follows as its own event
        case StepCompleted(step_id=sid, output=output):
            st = state.steps[sid]
            _leave_running(state, st)
            st.status, st.output = "succeeded", output
            state.outputs[sid] = {"output": output}
            state.done += 1
        case StepFailed(step_id=sid, error=error):
            st = state.steps[sid]
            _leave_running(state, st)
            st.status, st.error = "failed", error
            state.done += 1
            if state.first_failure is None:
                state.first_failure = sid
        case StepSkipped(step_id=sid):
            state.steps[sid].status = "skipped"
            state.done += 1
        case RunCompleted(output=output):
            state.status, state.output = "completed", output
        case RunFailed(error=error):
            state.status, state.error = "failed", error
    return state


def _leave_running(state: RunState, st: StepState) -> None:
    if st.status == "running":
        state.running -= 1


def _install_plan(state: RunState, plan: Plan) -> None:
    deps = dependencies(plan)
    state.plan = plan
    state.steps = {s.id: StepState(step=s, deps=deps[s.id]) for s in plan.steps}
    dependents: dict[str, list[str]] = {s.id: [] for s in plan.steps}
    for sid, ds in deps.items():
        for d in ds:
            dependents[d].append(sid)
    state.dependents = {k: tuple(v) for k, v in dependents.items()}


# --------------------------------------------------------------------------- decide

Message = RunRequest | InboxMessage


def decide(state: RunState, message: Message) -> list[RunEvent]:
    """The events that ``message`` causes in a run now in ``state``. Messages that no
    longer apply (duplicates, results for finished attempts, anything after the run
    ended) cause no events: redelivery is normal and must be harmless."""
    match message:
        case RunRequest():
            if state.version:
                return []
            return [
                RunRequested(
                    plan=message.plan,
                    request=message.request,
                    input=message.input,
                    thread_id=message.thread_id,
                    labels=message.labels,
                )
            ]
        case PlanProposed(plan=plan, planner=planner):
            if state.status != "planning":
                return []
            # The planner validated against the tool catalog; the executor re-checks
            # structure because its own invariants (a DAG of unique ids) depend on it.
            issues = validate_plan(plan, None, state.input)
            if issues:
                return [PlanRejected(issues=issues)]
            draft = _Draft(state)
            draft.emit(PlanAccepted(plan=plan, planner=planner))
            for step in plan.steps:
                if not draft.deps_of(step.id):
                    draft.start(step.id)
            draft.finish_if_done()
            return draft.events
        case PlanRefused(issues=issues):
            if state.status != "planning":
                return []
            return [PlanRejected(issues=issues)]
        case ToolResult():
            return _on_tool_result(state, message)
    return []


def _on_tool_result(state: RunState, result: ToolResult) -> list[RunEvent]:
    st = state.steps.get(result.step_id)
    if (
        state.terminal
        or st is None
        or st.status != "running"
        or st.attempt != result.attempt
        or result.idempotency_key
        != ids.idempotency_key(state.run_id, result.step_id, result.attempt)
    ):
        return []
    draft = _Draft(state)
    sid = result.step_id
    if result.ok:
        draft.emit(
            ToolCallCompleted(
                step_id=sid,
                attempt=result.attempt,
                idempotency_key=result.idempotency_key,
                output=result.output,
                started_at=result.started_at,
                finished_at=result.finished_at,
            )
        )
        draft.emit(StepCompleted(step_id=sid, output=result.output))
        for dependent in state.dependents.get(sid, ()):
            if draft.ready(dependent):
                draft.start(dependent)
    else:
        error = result.error or ErrorInfo(code="tool_error", message="tool failed without detail")
        draft.emit(
            ToolCallFailed(
                step_id=sid,
                attempt=result.attempt,
                idempotency_key=result.idempotency_key,
                error=error,
                started_at=result.started_at,
                finished_at=result.finished_at,
            )
        )
        draft.fail_step(sid, error)
    draft.finish_if_done()
    return draft.events


class _Draft:
    """An overlay over a RunState that sees the events decided so far in this call
    without mutating the state. Only the few fields decide reads are overlaid."""

    def __init__(self, state: RunState) -> None:
        self.base = state
        self.events: list[RunEvent] = []
        self.status: dict[str, StepStatus] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.running = state.running
        self.done = state.done
        self.failed: str | None = state.first_failure
        self.plan: Plan | None = state.plan
        self.deps: dict[str, tuple[str, ...]] = {}
        self.new_steps: dict[str, Step] = {}
        self.dependents: Mapping[str, tuple[str, ...]] = state.dependents

    # -- views
    def step_status(self, sid: str) -> StepStatus:
        if sid in self.status:
            return self.status[sid]
        return self.base.steps[sid].status if sid in self.base.steps else "pending"

    def deps_of(self, sid: str) -> tuple[str, ...]:
        if sid in self.deps:
            return self.deps[sid]
        return self.base.steps[sid].deps

    def step(self, sid: str) -> Step:
        if sid in self.base.steps:
            return self.base.steps[sid].step
        return self.new_steps[sid]

    def ready(self, sid: str) -> bool:
        return self.step_status(sid) == "pending" and all(
            self.step_status(d) == "succeeded" for d in self.deps_of(sid)
        )

    def total(self) -> int:
        return len(self.plan.steps) if self.plan else 0

    def context(self) -> dict[str, Any]:
        outputs = self.base.outputs
        if self.outputs:
            outputs = {**outputs, **self.outputs}
        return {"input": self.base.input, "steps": outputs}

    # -- changes
    def emit(self, event: RunEvent) -> None:
        self.events.append(event)
        match event:
            case PlanAccepted(plan=plan):
                self.plan = plan
                self.new_steps = {s.id: s for s in plan.steps}
                self.deps = dependencies(plan)
                dependents: dict[str, list[str]] = {s.id: [] for s in plan.steps}
                for sid, ds in self.deps.items():
                    for d in ds:
                        dependents[d].append(sid)
                self.dependents = {k: tuple(v) for k, v in dependents.items()}
            case StepStarted(step_id=sid):
                self.status[sid] = "running"
                self.running += 1
            case StepCompleted(step_id=sid, output=output):
                self._leave(sid)
                self.status[sid] = "succeeded"
                self.outputs[sid] = {"output": output}
                self.done += 1
            case StepFailed(step_id=sid):
                self._leave(sid)
                self.status[sid] = "failed"
                self.done += 1
                self.failed = self.failed or sid
            case StepSkipped(step_id=sid):
                self.status[sid] = "skipped"
                self.done += 1

    def _leave(self, sid: str) -> None:
        if self.step_status(sid) == "running":
            self.running -= 1

    def start(self, sid: str) -> None:
        """Schedule a ready step: render its input now (templates see every output
        recorded so far) and request its first attempt."""
        step = self.step(sid)
        self.emit(StepScheduled(step_id=sid))
        try:
            rendered = render(step.input, self.context(), path=f"$.steps.{sid}.input")
        except TemplateError as exc:
            self.fail_step(sid, ErrorInfo(code=exc.code, message=str(exc), path=exc.path))
            return
        attempt = 1
        self.emit(StepStarted(step_id=sid, attempt=attempt))
        self.emit(
            ToolCallRequested(
                step_id=sid,
                attempt=attempt,
                tool=step.tool,
                input=rendered,
                idempotency_key=ids.idempotency_key(self.base.run_id, sid, attempt),
                timeout_s=step.timeout_s,
            )
        )

    def fail_step(self, sid: str, error: ErrorInfo) -> None:
        self.emit(StepFailed(step_id=sid, error=error))
        if self.plan is None:
            return
        for step in self.plan.steps:
            if self.step_status(step.id) == "pending":
                self.emit(StepSkipped(step_id=step.id, reason=f"step '{sid}' failed"))

    def finish_if_done(self) -> None:
        if self.running or self.done < self.total():
            return
        if self.failed is not None:
            failed = self.failed
            cause = self._error_of(failed)
            self.emit(
                RunFailed(
                    error=ErrorInfo(
                        code=cause.code,
                        message=f"step '{failed}' failed: {cause.message}",
                        path=cause.path,
                        details={"step_id": failed},
                    )
                )
            )
            return
        try:
            output = self._output()
        except TemplateError as exc:
            self.emit(RunFailed(error=ErrorInfo(code=exc.code, message=str(exc), path=exc.path)))
            return
        self.emit(RunCompleted(output=output))

    def _error_of(self, sid: str) -> ErrorInfo:
        for event in reversed(self.events):
            if isinstance(event, StepFailed) and event.step_id == sid:
                return event.error
        st = self.base.steps.get(sid)
        if st is not None and st.error is not None:
            return st.error
        return ErrorInfo(code="step_failed", message="step failed")

    def _output(self) -> Any:
        assert self.plan is not None
        context = self.context()
        if self.plan.output is not None:
            return render(self.plan.output, context, path="$.output")
        sinks = [s.id for s in self.plan.steps if not self.dependents.get(s.id)]
        return {sid: context["steps"][sid]["output"] for sid in sinks}
