"""The run actor's brain: a deterministic interpreter of the plan language.

Contract (docs/design.md decision 4)
- ``evolve(state, event)`` folds one event into the state (in place; the actor owns it).
- ``advance(state, message, now)`` decides what ``message`` causes *and* folds each new
  event as it is emitted, returning the events. It is the fused, efficient form used by
  the executor service: later decisions in the same call (a completion that schedules
  the next steps, a failure that skips the rest) see the earlier events' effects.
- ``decide(state, message, now)`` is the pure form: ``advance`` on a copy.
  ``fold(events) == state after advance`` is a tested property.
- No clock, randomness or I/O: time is the ``now`` argument (the executor stamps the
  same value on the events' envelope; replay passes the recorded one), ids derive from
  the run id and the step's path, retry jitter from the idempotency key.

Instances and scopes
A plan's steps form the root scope. A composite step (foreach, loop, reduce, parallel,
if) runs its body in child scopes, one per element / iteration / branch. Every running
thing is an *instance* with a path id: a top-level step ``fetch``; a foreach element
scope ``fe/3`` and a step inside it ``fe/3/fetch``; loop iteration ``lp/2``; parallel
branch ``par/left``; if branch ``cond/then``; a tool step's fallback ``fetch/fallback``.
Step ids are subject tokens (no ``/``), so a path parses unambiguously. A scope is
started by a ``step_scheduled`` event for its id and ends with ``step_completed`` /
``step_failed`` / ``step_cancelled`` like any step, so element results are events too.

Failure semantics
- A tool attempt's error is retried per the step's RetryPolicy (each wait a durable
  timer); when attempts are exhausted ``on_error`` decides: ``fail`` fails the scope
  (waiting siblings are skipped; running ones finish, so every started effect's result
  is recorded), ``continue`` only skips the step's dependents, ``fallback`` runs the
  fallback step in its place.
- A scope fails when a step in it failed with ``on_error: fail``; the composite owning
  it applies its own policy (foreach: fail_fast / collect / min_success).
- ``ambiguous_outcome`` (a non-idempotent tool whose runner died mid-call) is never
  retried: the run goes to ``needs_review`` and waits for a person.

Cost: each message touches the instance it is about, its scope and direct dependents;
nothing scans the run's history, so a step's cost does not grow with the run's length.
"""

from __future__ import annotations

import copy
import hashlib
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec

from loom_core import agent as agent_step
from loom_core import blobs, ids, replanning, secrets, sizes
from loom_core.caps import too_many
from loom_core.contracts import (
    AgentStep,
    ApprovalStep,
    BranchTaken,
    Budget,
    Caps,
    ErrorInfo,
    EventMatch,
    EventReceived,
    EventWaitStarted,
    ExternalEventArrived,
    FinalStep,
    ForeachStarted,
    ForeachStep,
    IfStep,
    InboxMessage,
    LoopIterationStarted,
    LoopStep,
    ModelResult,
    ParallelStep,
    ParentLink,
    Plan,
    PlanAccepted,
    PlanProposed,
    PlanRefused,
    PlanRejected,
    PlanRevised,
    Principal,
    ReduceStep,
    ReplanRefused,
    ReplanRequested,
    ResumeReply,
    ResumeRun,
    RetryPolicy,
    RunAdmitted,
    RunCancelled,
    RunCancelRequested,
    RunCompleted,
    RunControl,
    RunDiverged,
    RunEvent,
    RunFailed,
    RunNeedsReview,
    RunPaused,
    RunPublishFailed,
    RunQueued,
    RunRequest,
    RunRequested,
    RunUnpaused,
    SizeLimits,
    SleepStep,
    Step,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepResumed,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    StepSuspended,
    SubRunEnded,
    SubRunFinished,
    SubRunRequested,
    SubRunStep,
    TimerElapsed,
    TimerFired,
    TimerStarted,
    ToolCallCancelled,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolResult,
    ToolStep,
    WaitEventStep,
)
from loom_core.decisions import same_decision
from loom_core.predicates import PredicateError, evaluate
from loom_core.schemas import problems
from loom_core.templating import TemplateError, render
from loom_core.validation import dependencies, validate_plan

RunStatus = Literal[
    "new", "planning", "running", "paused", "queued", "needs_review", "diverged",
    "completed", "failed", "rejected", "cancelled",
]  # fmt: skip
InstStatus = Literal[
    "scheduled", "running", "retry_wait", "suspended",
    "succeeded", "failed", "skipped", "cancelled",
]  # fmt: skip
TERMINAL_RUN: frozenset[str] = frozenset({"completed", "failed", "rejected", "cancelled"})
DONE: frozenset[str] = frozenset({"succeeded", "failed", "skipped", "cancelled"})

# Errors that trying again cannot fix: never retried whatever the policy says.
NEVER_RETRIED: frozenset[str] = frozenset(
    {
        "unknown_tool",
        "invalid_input",
        "invalid_output",
        "output_too_large",
        "address_not_allowed",
        "invalid_url",
        "invalid_template",
        "missing_field",
        "ambiguous_outcome",
        "cancelled",
        "secret_not_found",
        "untrusted_secret_reference",
    }
)
RUN_TIMER = "run:timeout"


@dataclass(frozen=True)
class Submission:
    """A run request as the engine accepted it, with who it acts for. Only the executor
    host builds one (from a verified submission, or from the run a sub-run or fork comes
    from): the public RunRequest has no principal field a client could fill."""

    request: RunRequest
    principal: Principal | None = None
    redacted: tuple[str, ...] = ()  # paths of inline secrets replaced at submit
    # the size limits the run is decided under (the host's settings; recorded in
    # run_requested so replay decides the same), None: ``sizes.DEFAULT_LIMITS``
    limits: SizeLimits | None = None
    # the fan-out caps likewise (``loom_core.caps``), None: no caps
    caps: Caps | None = None
    # how agent turns hold the conversation (``RunRequested.turn_messages``): new runs
    # "new"; replay passes the recorded value, so runs stored before keep "whole"
    turn_messages: Literal["whole", "new"] = "new"
    # the host's admission found the run's tenant or queue at its concurrent run limit:
    # the run is recorded queued and starts no step before an ``Admit`` (loom_core.quotas)
    queued: bool = False


@dataclass(frozen=True)
class Admit:
    """The host's admission: a slot of the queued run's tenant and queue is free."""


# ``RunPublishFailed``: the executor host's relay reporting an event it can never publish
Message = RunRequest | Submission | InboxMessage | RunControl | ResumeRun | RunPublishFailed | Admit


# --------------------------------------------------------------------------- state


@dataclass
class Scope:
    """Where steps run: the root (``sid == ""``) or one element/iteration/branch."""

    sid: str
    steps: list[Step]
    by_id: dict[str, Step]
    deps: dict[str, tuple[str, ...]]
    dependents: dict[str, tuple[str, ...]]
    parent: str | None  # the enclosing scope's sid (None for the root)
    vars: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    remaining: int = 0
    failed: str | None = None  # iid of the first step that failed the scope

    def iid(self, step_id: str) -> str:
        return f"{self.sid}/{step_id}" if self.sid else step_id


@dataclass
class Suspension:
    suspension_id: str
    step_id: str
    label: str
    schema: dict[str, Any]
    payload: Any = None
    expires_at: datetime | None = None
    resumed: StepResumed | None = None


class Inst(msgspec.Struct, omit_defaults=True, gc=False):
    """One instance: a step in a scope, a composite's child scope, or a fallback.

    A Struct, not a dataclass, for the snapshots (issue 10): a long run holds one per
    step it ran, and most of their fields keep their defaults. Saved without them, a
    20,000-step chain's instances take 4.1 MB instead of 9.7, encode in 3.7 ms instead
    of 9.4 and decode in half the time.

    Never tracked by the garbage collector (``gc=False``): no reference cycle can go
    through an instance. Its fields hold strings, numbers, a step (a frozen contract,
    itself never tracked: ``contracts.ToolStep``), errors, and JSON values decoded from
    messages or events (outputs, items, results, payloads), which cannot refer back to
    anything; nothing stores the state, a scope or an instance in them. A cycle among
    objects an instance holds would still be found (they are tracked themselves). So a
    restored long run leaves the collector 4 objects per step instead of 9 (issue 10:
    what a service's next young collection walks after a load)."""

    iid: str
    # sid of the scope the instance belongs to ("": the root, most of a long run's)
    scope: str = ""
    # None for a child scope; a snapshot saves none for an instance running its scope's
    # step (``_steps_by_reference``): defaults, so neither is written
    step: Step | None = None
    status: InstStatus = "scheduled"
    attempt: int = 0
    output: Any = None
    error: ErrorInfo | None = None
    fallback_of: str | None = None
    # composite bookkeeping, maintained by evolve
    items: list[Any] | None = None
    running_children: int = 0
    ok_children: int = 0
    failed_children: int = 0
    next_child: int = 0
    results: dict[str, Any] = msgspec.field(default_factory=dict)
    acc: Any = None
    branch: str | None = None
    first_child_error: ErrorInfo | None = None
    inflight: bool = False  # a tool attempt was requested and has no outcome yet
    suspensions: int = 0  # how many times it suspended (numbers suspension ids)
    child_run_id: str | None = None  # a sub_run step's child
    matches: tuple[EventMatch, ...] = ()  # a wait_event step's events
    received: dict[str, Any] = msgspec.field(default_factory=dict)  # event name -> payload
    # a loop's last finished iteration's outputs (its ``until`` reads them); the
    # iteration's own scope and instances are gone by then (``_forget``)
    last_outputs: dict[str, dict[str, Any]] | None = None
    request_digest: str | None = None  # of its outstanding tool_call_requested


@dataclass
class RunState:
    run_id: str
    version: int = 0
    status: RunStatus = "new"
    plan: Plan | None = None
    input: dict[str, Any] = field(default_factory=dict)
    scopes: dict[str, Scope] = field(default_factory=dict)
    insts: dict[str, Inst] = field(default_factory=dict)
    timers: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    running: int = 0  # tool attempts in flight
    paused: bool = False  # no step starts: an operator's pause, or the queue's hold
    operator_paused: bool = False  # a pause an operator asked for (outlives the queue)
    # held by the admission (loom_core.quotas) until run_admitted; its queue and priority
    queued: bool = False
    queue: str = ""
    priority: int = 0
    suspensions: dict[str, Suspension] = field(default_factory=dict)
    reused: dict[str, Any] = field(default_factory=dict)  # a fork's recorded outputs
    forked_from: str | None = None
    parent: ParentLink | None = None  # set when a sub_run step started this run
    principal: Principal | None = None  # who the run acts for; sub-runs and forks inherit it
    thread_id: str | None = None  # the conversation thread it asked for (None: its own id)
    turn_messages: Literal["whole", "new"] = "new"  # from run_requested (loom_core.agent)
    # re-planning (loom_core.replanning): how many were asked, the one in flight (0:
    # none) and its request's digest (the planner's answer must name it)
    replans: int = 0
    replanning: int = 0
    replan_digest: str | None = None
    retired: list[str] = field(default_factory=list)  # top-level ids revisions dropped
    # what answers must match (see ``unexpected``): the run_requested's digest, the
    # explicit plan's digest, and when each pending timer is due
    request_digest: str | None = None
    plan_digest: str | None = None
    timer_due: dict[str, datetime] = field(default_factory=dict)
    # set by whoever loaded the run when replaying its history diverged: the next
    # message parks the run with this report instead of deciding anything
    divergence: RunDiverged | None = None
    output: Any = None
    error: ErrorInfo | None = None
    last_at: datetime | None = None
    limits: SizeLimits = sizes.DEFAULT_LIMITS  # from run_requested (sizes)
    caps: Caps | None = None  # from run_requested (loom_core.caps); None: no caps
    # agent steps between turns, model use so far, the run's budget once a person
    # raised it (loom_core.agent)
    agents: dict[str, agent_step.AgentRun] = field(default_factory=dict)
    model_usage: agent_step.Usage = field(default_factory=agent_step.Usage)
    budget: Budget | None = None
    _body_deps: dict[
        tuple[str, str], tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]
    ] = field(default_factory=dict, repr=False)
    # The instances that may be waited on now, so a run's waits (progress, after every
    # commit: ``loom_core.waits.state_waits``) cost O(waits), not O(instances ever
    # run): those suspended (in the order of their latest suspension) and those with an
    # event wait or a child run that have not ended (in the order they began waiting).
    # Kept by ``evolve``; derived, so not in snapshots (``restore`` rebuilds them).
    _suspended: dict[str, None] = field(default_factory=dict, repr=False)
    _awaiting: dict[str, None] = field(default_factory=dict, repr=False)
    # The JSON of the parts of the state that never change once made (the plan, a
    # scope's dependency maps), by identity, as ``snapshot`` last encoded them: a cache
    _encoded: dict[int, tuple[object, msgspec.Raw]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_RUN

    @property
    def steps_total(self) -> int:
        return len(self.plan.steps) if self.plan else 0

    @property
    def steps_done(self) -> int:
        root = self.scopes.get("")
        return self.steps_total - root.remaining if root else 0


def initial_state(run_id: str) -> RunState:
    return RunState(run_id=run_id)


def fold(run_id: str, events: Iterable[RunEvent]) -> RunState:
    state = initial_state(run_id)
    for event in events:
        evolve(state, event)
    return state


def _parent_path(iid: str) -> tuple[str, str]:
    head, _, last = iid.rpartition("/")
    return head, last


def _body(step: Step, key: str) -> list[Step]:
    match step:
        case ForeachStep(do=do) | ReduceStep(do=do) | LoopStep(do=do):
            return do
        case ParallelStep(branches=branches):
            return branches[key]
        case IfStep(then=then, else_=else_):
            return then if key == "then" else else_
    raise AssertionError(f"{type(step).__name__} has no body")


def _graph(steps: list[Step]) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    deps = dependencies(steps)
    dependents: dict[str, list[str]] = {s.id: [] for s in steps}
    for sid, ds in deps.items():
        for d in ds:
            dependents[d].append(sid)
    return deps, {k: tuple(v) for k, v in dependents.items()}


def _new_scope(
    state: RunState, sid: str, steps: list[Step], parent: str | None, cache_key: tuple[str, str]
) -> Scope:
    graph = state._body_deps.get(cache_key)
    if graph is None:
        graph = state._body_deps[cache_key] = _graph(steps)
    scope = Scope(
        sid=sid,
        steps=steps,
        by_id={s.id: s for s in steps},
        deps=graph[0],
        dependents=graph[1],
        parent=parent,
        remaining=len(steps),
    )
    state.scopes[sid] = scope
    return scope


# --------------------------------------------------------------------------- evolve


def evolve(state: RunState, event: RunEvent, at: datetime | None = None) -> RunState:
    """Apply one event to ``state`` (in place) and return it."""
    state.version += 1
    if at is not None:
        state.last_at = at
    if isinstance(event, _AGENT_EVENTS) and agent_step.fold_event(state, event):
        return state
    match event:
        case RunRequested(input=run_input, fork=fork):
            state.status = "planning"
            state.input = run_input
            state.parent = event.parent
            state.principal = event.principal
            state.thread_id = event.thread_id
            state.turn_messages = event.turn_messages
            state.queue, state.priority = event.queue, event.priority
            state.limits = event.limits or sizes.DEFAULT_LIMITS
            state.caps = event.caps
            state.budget = event.budget
            state.request_digest = request_digest(state.run_id, event)
            state.plan_digest = plan_digest(event.plan) if event.plan is not None else None
            if fork is not None:
                state.reused, state.forked_from = dict(fork.reused), fork.run_id
        case PlanAccepted(plan=plan):
            state.plan = plan
            if event.planning is not None:
                state.model_usage.add(event.planning.usage)
            state.status = "queued" if state.queued else "paused" if state.paused else "running"
            _new_scope(state, "", plan.steps, None, ("", ""))
        case PlanRejected():
            state.status = "rejected"
        case ReplanRequested(attempt=attempt):
            state.status, state.replans, state.replanning = "planning", attempt, attempt
            state.replan_digest = request_digest(state.run_id, event)
        case PlanRevised():
            _on_revised(state, event)
            if event.planning is not None:  # the run's budget counts re-planning too
                state.model_usage.add(event.planning.usage)
        case ReplanRefused():
            state.replanning, state.replan_digest = 0, None
            if event.planning is not None:
                state.model_usage.add(event.planning.usage)
        case StepScheduled(step_id=iid):
            _on_scheduled(state, iid)
        case StepStarted(step_id=iid, attempt=attempt):
            inst = state.insts[iid]
            inst.status, inst.attempt = "running", attempt
            state._suspended.pop(iid, None)
            if isinstance(inst.step, AgentStep):  # its memory calls fold into it
                state.agents.setdefault(iid, agent_step.AgentRun())
        case ToolCallRequested(step_id=iid):
            state.insts[iid].inflight = True
            state.insts[iid].request_digest = request_digest(state.run_id, event)
            state.running += 1
        case (
            ToolCallCompleted(step_id=iid)
            | ToolCallFailed(step_id=iid)
            | ToolCallCancelled(step_id=iid)
        ):
            inst = state.insts[iid]
            # the digest only checks the outstanding request's answer (``unexpected``);
            # kept past it, a long run's snapshot carried 32 bytes a step for nothing
            inst.inflight, inst.request_digest = False, None
            state.running -= 1
        case StepRetryScheduled(step_id=iid, attempt=attempt):
            inst = state.insts[iid]
            inst.status, inst.attempt = "retry_wait", attempt - 1
            state._suspended.pop(iid, None)
        case TimerStarted(timer_id=tid, purpose=purpose, step_id=sid):
            state.timers[tid] = (purpose, sid)
            state.timer_due[tid] = event.fire_at
        case TimerFired(timer_id=tid):
            state.timers.pop(tid, None)
            state.timer_due.pop(tid, None)
        case ForeachStarted(step_id=iid, items=items):
            inst = state.insts[iid]
            inst.items = items
            if isinstance(inst.step, ReduceStep):
                inst.acc = inst.step.initial
        case LoopIterationStarted():
            pass  # the iteration's scope is created by its step_scheduled
        case BranchTaken(step_id=iid, branch=branch):
            state.insts[iid].branch = branch
        case StepCompleted(step_id=iid, output=output):
            _on_done(state, iid, "succeeded", output=output)
            agent_step.forget(state, iid)
        case StepFailed(step_id=iid, error=error):
            _on_done(state, iid, "failed", error=error)
            agent_step.forget(state, iid)
        case StepSkipped(step_id=iid):
            _on_done(state, iid, "skipped")
        case StepCancelled(step_id=iid):
            _on_done(state, iid, "cancelled")
            agent_step.forget(state, iid)
        case RunPaused():
            state.paused = state.operator_paused = True
            if state.status == "running":
                state.status = "paused"
        case RunUnpaused():
            state.operator_paused = False
            state.paused = state.queued
            if state.status == "paused":
                state.status = "running"
        case RunQueued():
            # held like a pause (no step starts); its plan is still made meanwhile
            state.queued = state.paused = True
        case RunAdmitted():
            # an operator's pause sent while the run waited in the queue still holds
            state.queued, state.paused = False, state.operator_paused
            if state.status == "queued":
                state.status = "paused" if state.operator_paused else "running"
        case RunNeedsReview(error=error):
            state.status, state.error = "needs_review", error
        case RunCompleted(output=output):
            state.status, state.output = "completed", output
        case RunFailed(error=error):
            state.status, state.error = "failed", error
        case StepSuspended(step_id=iid, suspension_id=sid, label=label, schema=schema):
            inst = state.insts[iid]
            inst.status = "suspended"
            inst.suspensions += 1
            state._suspended.pop(iid, None)  # to the end: the order of latest suspension
            state._suspended[iid] = None
            state.suspensions[sid] = Suspension(
                sid, iid, label, schema, event.payload, event.expires_at
            )
        case StepResumed(step_id=iid, suspension_id=sid):
            state.suspensions[sid].resumed = event
            state.insts[iid].status = "running"
            state._suspended.pop(iid, None)
            agent_step.fold_resumed(state, event)
        case RunCancelRequested() | SubRunEnded() | RunPublishFailed():
            pass  # the outcome events follow
        case SubRunRequested(step_id=iid, child_run_id=child):
            state.insts[iid].child_run_id = child
            _awaits(state, iid)
        case EventWaitStarted(step_id=iid, matches=matches):
            state.insts[iid].matches = tuple(matches)
            _awaits(state, iid)
        case EventReceived(step_id=iid, name=name, payload=payload):
            state.insts[iid].received[name] = payload
        case RunDiverged():
            state.status, state.divergence = "diverged", None
        case RunCancelled():
            state.status = "cancelled"
    return state


def _awaits(state: RunState, iid: str) -> None:
    if state.insts[iid].status not in DONE:
        state._awaiting[iid] = None


def _new_inst(state: RunState, inst: Inst) -> Inst:
    """``inst`` in place of any instance of its id (a new one waits on nothing)."""
    state.insts[inst.iid] = inst
    state._suspended.pop(inst.iid, None)
    state._awaiting.pop(inst.iid, None)
    return inst


def _waiting_index(state: RunState) -> None:
    """``_suspended`` and ``_awaiting`` from the instances (a restored snapshot); and the
    steps of instances saved by reference (``_steps_by_reference``), in the same pass: a
    long run's restore walks its instances once."""
    people: dict[str, None] = {}
    for susp in state.suspensions.values():  # each step at its latest suspension
        people.pop(susp.step_id, None)
        people[susp.step_id] = None
    state._suspended = {
        iid: None for iid in people if (i := state.insts.get(iid)) and i.status == "suspended"
    }
    scopes = state.scopes
    in_root = scopes[""].by_id if "" in scopes else {}
    awaiting: dict[str, None] = {}
    for iid, i in state.insts.items():
        if i.step is None and iid not in scopes:  # not a child scope: saved by reference
            sid = i.scope
            i.step = scopes[sid].by_id[iid[len(sid) + 1 :]] if sid else in_root[iid]
        if (i.matches or i.child_run_id is not None) and i.status not in DONE:
            awaiting[iid] = None
    state._awaiting = awaiting


_AGENT_EVENTS = (
    agent_step.SubRunRequested,
    agent_step.SubRunEnded,
    agent_step.ModelCallRequested,
    agent_step.ModelCallCompleted,
    agent_step.ModelCallFailed,
    agent_step.ModelOutputRefused,
    ToolCallRequested,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallCancelled,
)


def _on_revised(state: RunState, event: PlanRevised) -> None:
    """The run goes on with the revised plan: a new root scope whose kept steps are
    done already, with the outputs they had (they are not run again)."""
    old = state.scopes.get("")
    outputs = dict(old.outputs) if old is not None else {}
    dropped = [s.id for s in state.plan.steps if s.id not in event.kept] if state.plan else []
    state.retired = sorted({*state.retired, *dropped})
    state.plan, state.replanning, state.replan_digest = event.plan, 0, None
    state.status = "paused" if state.paused else "running"
    state.scopes, state.insts, state.agents = {}, {}, {}
    state._suspended, state._awaiting = {}, {}
    state._body_deps.clear()
    root = _new_scope(state, "", event.plan.steps, None, ("", ""))
    for step_id in event.kept:
        output = outputs.get(step_id, {}).get("output")
        state.insts[step_id] = Inst(iid=step_id, scope="", step=root.by_id[step_id],
                                    status="succeeded", output=output)  # fmt: skip
        root.outputs[step_id] = {"output": output}
        root.remaining -= 1


def _on_scheduled(state: RunState, iid: str) -> None:
    head, last = _parent_path(iid)
    if not head:  # a top-level step
        _new_inst(state, Inst(iid=iid, scope="", step=state.scopes[""].by_id[last]))
        return
    if head in state.scopes:  # a step inside a running child scope
        _new_inst(state, Inst(iid=iid, scope=head, step=state.scopes[head].by_id[last]))
        return
    owner = state.insts[head]
    if last == "fallback":
        assert isinstance(owner.step, ToolStep) and owner.step.fallback is not None
        _new_inst(
            state, Inst(iid=iid, scope=owner.scope, step=owner.step.fallback, fallback_of=head)
        )
        return
    # a child scope of a composite step
    assert owner.step is not None
    _new_inst(state, Inst(iid=iid, scope=owner.scope, step=None, status="running"))
    owner.running_children += 1
    indexed = isinstance(owner.step, ForeachStep | ReduceStep | LoopStep)
    if indexed:
        owner.next_child = max(owner.next_child, int(last) + 1)
    scope = _new_scope(
        state, iid, _body(owner.step, last), owner.scope, (owner.step.id, "" if indexed else last)
    )
    match owner.step:
        case ForeachStep() | ReduceStep():
            index = int(last)
            assert owner.items is not None
            scope.vars = {"item": owner.items[index], "index": index}
            if isinstance(owner.step, ReduceStep):
                scope.vars["acc"] = owner.acc
        case LoopStep():
            scope.vars = {"iteration": int(last)}


def _on_done(
    state: RunState,
    iid: str,
    status: InstStatus,
    output: Any = None,
    error: ErrorInfo | None = None,
) -> None:
    inst = state.insts.get(iid)
    if inst is None:  # a step that never started: skipped or cancelled while waiting
        head, last = _parent_path(iid)
        waiting_in = state.scopes.get(head)
        if waiting_in is None or last not in waiting_in.by_id:
            return  # a step of a branch never taken: recorded, never instantiated
        inst = state.insts[iid] = Inst(iid=iid, scope=head, step=waiting_in.by_id[last])
    inst.status = status
    inst.output, inst.error = output, error
    state._suspended.pop(iid, None)
    state._awaiting.pop(iid, None)
    if inst.fallback_of is not None:
        return  # its owner's own outcome event follows
    if inst.step is None:  # a child scope ended: tell its owner
        head, key = _parent_path(iid)
        owner = state.insts[head]
        owner.running_children -= 1
        if status == "succeeded":
            owner.ok_children += 1
            if isinstance(owner.step, ReduceStep | LoopStep):
                owner.results = {key: output}  # only the latest is ever read
            else:
                owner.results[key] = output
            if isinstance(owner.step, ReduceStep):
                owner.acc = output
        elif status == "failed":
            owner.failed_children += 1
            owner.first_child_error = owner.first_child_error or error
        ended = state.scopes.pop(iid, None)  # its steps can no longer change
        if isinstance(owner.step, LoopStep):
            owner.last_outputs = ended.outputs if ended is not None else {}
        _forget(state, iid, ended)
        return
    scope = state.scopes.get(inst.scope)
    if scope is None:
        return
    scope.remaining -= 1
    if status == "succeeded":
        scope.outputs[inst.step.id] = {"output": output}
    elif status == "failed" and _on_error(inst.step) == "fail" and scope.failed is None:
        scope.failed = iid


def _forget(state: RunState, sid: str, ended: Scope | None) -> None:
    """A child scope (foreach/reduce element, loop iteration, branch) ended: its result is
    in its owner (``results``, ``acc``, ``last_outputs``) and nothing it ran can change
    or be read again, so its instances go: a run's memory (and snapshot) follows what
    runs now, not how many elements ended (issue 9). Nested child scopes went when they
    ended, so the scope's own steps (and their fallbacks) are all that is left.

    Every decision must stay as it was: whatever later looks an instance up treats a
    missing one as it treated an ended one (a late tool result, timer, sub-run end or
    event is ignored; a cancel skips it). Kept: a sub_run step's instance, through
    which a resume finds a child that has ended (``resume_route.children_of``); a
    sub-run costs a whole run, so one instance each adds no order of cost."""
    gone = [sid]
    if ended is not None:
        for step_id in ended.by_id:
            iid = ended.iid(step_id)
            inst = state.insts.get(iid)
            if inst is None or inst.child_run_id is None:
                gone += [iid, f"{iid}/fallback"]
    for iid in gone:
        state.insts.pop(iid, None)
        state._suspended.pop(iid, None)
        state._awaiting.pop(iid, None)


def _on_error(step: Step) -> str:
    return getattr(step, "on_error", "fail")


# --------------------------------------------------------------------------- decide


def decide(state: RunState, message: Message, now: datetime) -> list[RunEvent]:
    """The events ``message`` causes in a run now in ``state`` (pure: state untouched)."""
    return advance(copy.deepcopy(state), message, now)


Recorded = Callable[[int], RunEvent | None]


def advance(
    state: RunState, message: Message, now: datetime, recorded: Recorded | None = None
) -> list[RunEvent]:
    """Decide and fold: returns the new events, already applied to ``state``.
    Messages that no longer apply (duplicates, results for finished attempts, anything
    after the run ended) cause no events: redelivery is normal and must be harmless.
    ``recorded(k)``: in a replay, the k-th event the history holds from this message on.
    An event that decides what its recorded one decided is folded *as recorded*, so
    prose the run really had (an error told back to a model, say) is what later
    decisions read, not this code's rewording of it."""
    return _Turn(state, now, recorded).handle(message)


class _Turn:
    """One decision: emits events, folding each into the state at once."""

    def __init__(self, state: RunState, now: datetime, recorded: Recorded | None = None) -> None:
        self.s = state
        self.now = now
        self.recorded = recorded
        self.events: list[RunEvent] = []
        # re-entrancy guard: a child that ends synchronously inside its owner's
        # bookkeeping re-runs that bookkeeping in a loop instead of recursing deeper
        self._busy: set[str] = set()
        self._again: set[str] = set()

    def emit(self, event: RunEvent) -> None:
        # One gate for every output the engine records (a final step's value, a scope's
        # result such as a reduce accumulator, a foreach's list, the run's output): over
        # the run's limit it becomes the failure instead, so no site can forget it.
        match event:
            case StepCompleted(step_id=iid, output=output) if output is not None:
                error = sizes.check_output(output, self.s.limits, iid, f"$.steps.{iid}.output")
                if error is not None:
                    event = StepFailed(step_id=iid, error=error)
            case RunCompleted(output=output) if output is not None:
                error = sizes.check_output(output, self.s.limits, "run", "$.output")
                if error is not None:
                    event = RunFailed(error=error)
        self.events.append(event)
        if self.recorded is not None:
            was = self.recorded(len(self.events) - 1)
            if was is not None and was != event and same_decision(was, event):
                event = was
        evolve(self.s, event, self.now)

    def emit_completed(self, iid: str, output: Any) -> None:
        self.emit(StepCompleted(step_id=iid, output=output))
        self.after(iid)

    def bounded_input(self, value: Any, iid: str, path: str) -> Any:
        """``value`` (a rendered input), or _StepError ``input_too_large``."""
        error = sizes.check_input(value, self.s.limits, iid, path)
        if error is not None:
            raise _StepError(error)
        return value

    # ------------------------------------------------------------------ messages

    def handle(self, message: Message) -> list[RunEvent]:
        s = self.s
        if s.status == "diverged":
            # parked: a person must look at the report; cancelling it is all one can do
            if isinstance(message, RunControl) and message.action == "cancel":
                self.on_control(message)
            return self.events
        if s.divergence is not None and not s.terminal:
            self.emit(s.divergence)
            return self.events
        match message:
            case RunRequest() | Submission():
                if s.version == 0:
                    request, principal, redacted, limits, caps, turn_messages = (
                        (message.request, message.principal, list(message.redacted),
                         message.limits, message.caps, message.turn_messages)
                        if isinstance(message, Submission)
                        else (message, None, [], None, None, "new")
                    )  # fmt: skip
                    self.emit(
                        RunRequested(
                            plan=request.plan,
                            request=request.request,
                            input=request.input,
                            thread_id=request.thread_id,
                            labels=request.labels,
                            traceparent=request.traceparent,
                            fork=request.fork,
                            parent=request.parent,
                            principal=principal,
                            redacted=redacted,
                            limits=limits,
                            caps=caps,
                            budget=request.budget,
                            turn_messages=turn_messages,
                            queue=request.queue,
                            priority=request.priority,
                            queued=isinstance(message, Submission) and message.queued,
                        )
                    )
                    if isinstance(message, Submission) and message.queued:
                        self.emit(RunQueued(queue=request.queue, priority=request.priority))
            case Admit() if s.queued and not s.terminal:
                self.emit(RunAdmitted(queue=s.queue))
                if not s.operator_paused:
                    self.resume_all()
            case PlanProposed() | PlanRefused() if s.status == "planning" and s.replanning:
                self.on_replanned(message)
            case PlanProposed(plan=plan, planner=planner) if s.status == "planning":
                # The planner validated against the tool catalog; the executor re-checks
                # structure because its own invariants depend on it.
                issues = validate_plan(plan, None, s.input, caps=s.caps)
                if issues:
                    self.emit(PlanRejected(issues=issues, planning=message.planning))
                else:
                    self.emit(PlanAccepted(plan=plan, planner=planner, planning=message.planning))
                    if plan.timeout_s:
                        self.timer(RUN_TIMER, plan.timeout_s, "run_timeout", None)
                    self.start_ready("")
            case PlanRefused(issues=issues) if s.status == "planning":
                self.emit(PlanRejected(issues=issues, planning=message.planning))
            case ToolResult() if not s.terminal:
                self.on_tool_result(message)
            case ModelResult() if not s.terminal:
                agent_step.on_model_result(self, message)
            case TimerElapsed(timer_id=tid) if not s.terminal and tid in s.timers:
                self.on_timer(tid)
            case RunControl() if not s.terminal and s.status != "new":
                self.on_control(message)
            case ResumeRun() if not s.terminal:
                self.on_resume(message)
            case SubRunFinished() if not s.terminal:
                self.on_sub_run(message)
            case ExternalEventArrived() if not s.terminal:
                self.on_external_event(message)
            case RunPublishFailed() if not s.terminal:
                self.on_publish_failed(message)
        if not s.terminal and s.plan is not None:
            self.settle("")
        return self.events

    # ------------------------------------------------------------------ helpers

    def timer(self, timer_id: str, seconds: float, purpose: Any, step_id: str | None) -> None:
        fire_at = self.now + timedelta(seconds=max(0.0, seconds))
        self.emit(
            TimerStarted(timer_id=timer_id, fire_at=fire_at, purpose=purpose, step_id=step_id)
        )

    def context(self, sid: str) -> dict[str, Any]:
        """Templates see the run input, the outputs of this scope and every enclosing
        one (innermost first), and the innermost scope variables."""
        maps: list[dict[str, Any]] = []
        variables: dict[str, Any] = {}
        scope: Scope | None = self.s.scopes.get(sid)
        while scope is not None:
            maps.append(scope.outputs)
            for k, v in scope.vars.items():
                variables.setdefault(k, v)
            scope = self.s.scopes.get(scope.parent) if scope.parent is not None else None
        return {"input": self.s.input, "steps": ChainMap(*maps), **variables}

    def ready(self, scope: Scope, step_id: str) -> bool:
        if scope.iid(step_id) in self.s.insts:
            return False
        return all(d in scope.outputs for d in scope.deps[step_id])

    def start_ready(self, sid: str) -> None:
        scope = self.s.scopes.get(sid)
        if scope is None or scope.failed is not None:
            return
        for step in scope.steps:
            if self.s.scopes.get(sid) is not scope:
                return  # it ended meanwhile (a fork's reused steps end at once)
            if self.ready(scope, step.id):
                self.start(scope, step)

    # ------------------------------------------------------------------ starting steps

    def start(self, scope: Scope, step: Step, iid: str | None = None) -> None:
        if self.s.paused:
            return  # unpause starts whatever is ready
        iid = iid or scope.iid(step.id)
        self.emit(StepScheduled(step_id=iid))
        if iid in self.s.reused:  # a fork: the origin's output (loom_core.fork_reuse)
            output = self.s.reused[iid]
            self.emit(StepCompleted(step_id=iid, output=output, reused_from=self.s.forked_from))
            self.after(iid)
            return
        try:
            self._start(scope, step, iid)
        except (TemplateError, PredicateError) as exc:
            self.fail(iid, ErrorInfo(code=exc.code, message=str(exc), path=exc.path))
        except _StepError as exc:
            self.fail(iid, exc.error)
        else:
            inst = self.s.insts.get(iid)
            # it ended at once (final, empty body); gone: its scope ended with it
            if inst is not None and inst.status in DONE:
                self.after(iid)

    def _start(self, scope: Scope, step: Step, iid: str) -> None:
        ctx = self.context(scope.sid)
        match step:
            case AgentStep():
                agent_step.start(self, iid, step, ctx)
            case ToolStep():
                if step.step_timeout_s:
                    self.timer(f"{iid}:timeout", step.step_timeout_s, "step_timeout", iid)
                self.attempt(iid, step, 1, ctx)
            case FinalStep(output=output):
                value = render(output, ctx, path=f"$.steps.{iid}.output")
                self.emit(StepStarted(step_id=iid, attempt=1))
                self.emit(StepCompleted(step_id=iid, output=value))
            case SleepStep():
                self.emit(StepStarted(step_id=iid, attempt=1))
                self.timer(f"{iid}:sleep", self.sleep_seconds(step, ctx, iid), "sleep", iid)
            case WaitEventStep():
                matches = []
                for i, m in enumerate(step.events):
                    key = render(m.key, ctx, path=f"$.steps.{iid}.events[{i}].key")
                    if not isinstance(key, str | int) or not ids.is_token(str(key)):
                        raise _StepError(ErrorInfo(
                            code="invalid_event_key",
                            message=f"step '{iid}': event key {key!r} must render to 1-64 "
                            "of A-Z, a-z, 0-9, '_' or '-' (it is a subject token)",
                            path=f"$.steps.{iid}.events[{i}].key",
                        ))  # fmt: skip
                    matches.append(EventMatch(name=m.name, key=str(key)))
                self.emit(StepStarted(step_id=iid, attempt=1))
                self.emit(EventWaitStarted(step_id=iid, matches=matches, mode=step.mode))
                if step.timeout_s:
                    self.timer(f"{iid}:wait", step.timeout_s, "wait_timeout", iid)
            case SubRunStep():
                child_input = self.bounded_input(
                    render(step.input, ctx, path=f"$.steps.{iid}.input"),
                    iid, f"$.steps.{iid}.input",
                )  # fmt: skip
                child = (
                    render(step.run_id, ctx, path=f"$.steps.{iid}.run_id")
                    if step.run_id
                    else ids.child_run_id(self.s.run_id, iid)
                )
                if not isinstance(child, str) or not ids.is_token(child):
                    raise _StepError(ErrorInfo(
                        code="invalid_run_id",
                        message=f"step '{iid}': the child run id {child!r} must be 1-64 of "
                        "A-Z, a-z, 0-9, '_' or '-'",
                        path=f"$.steps.{iid}.run_id",
                    ))  # fmt: skip
                self.emit(StepStarted(step_id=iid, attempt=1))
                self.emit(SubRunRequested(
                    step_id=iid, child_run_id=child, plan=step.plan, input=child_input
                ))  # fmt: skip
            case ApprovalStep():
                payload = self.bounded_input(
                    render(step.payload, ctx, path=f"$.steps.{iid}.payload"),
                    iid, f"$.steps.{iid}.payload",
                )  # fmt: skip
                self.emit(StepStarted(step_id=iid, attempt=1))
                self.suspend(iid, step.label, payload, step.schema, step.expires_in_s)
            case ForeachStep() | ReduceStep():
                items = render(step.items, ctx, path=f"$.steps.{iid}.items")
                if isinstance(items, list):  # counted before measured: the clearer error
                    error = too_many("items", self.s.caps, iid, len(items),
                                     f"$.steps.{iid}.items")  # fmt: skip
                    if error is not None:
                        raise _StepError(error)
                items = self.bounded_input(items, iid, f"$.steps.{iid}.items")
                if blobs.is_ref(items):  # the engine never reads a blob (loom_core.blobs)
                    raise _StepError(ErrorInfo(
                        code="blob_not_inline",
                        message=f"step '{iid}': items are stored by reference (a blob) and "
                        "the engine never reads one; have a tool return the list (under "
                        f"{blobs.THRESHOLD_SETTING}) or a list of references",
                        path=f"$.steps.{iid}.items",
                    ))  # fmt: skip
                if not isinstance(items, list):
                    raise _StepError(ErrorInfo(
                        code="invalid_items",
                        message=f"step '{iid}': items must be an array, got {type(items).__name__}",
                        path=f"$.steps.{iid}.items",
                    ))  # fmt: skip
                self.emit(StepStarted(step_id=iid, attempt=1))
                self.emit(ForeachStarted(step_id=iid, count=len(items), items=items))
                if not items:
                    self.emit(
                        StepCompleted(
                            step_id=iid,
                            output=[] if isinstance(step, ForeachStep) else step.initial,
                        )
                    )
                    return
                width = step.concurrency if isinstance(step, ForeachStep) else 1
                inst = self.s.insts[iid]
                # by next_child: a reused element ends at once and its owner starts the
                # next ones itself (the same events as a plain loop when none ends at once)
                while inst.next_child < min(width, len(items)) and inst.status not in DONE:
                    self.start_child(iid, str(inst.next_child))
            case LoopStep():
                self.emit(StepStarted(step_id=iid, attempt=1))
                self.next_iteration(iid, step, 0)
            case ParallelStep(branches=branches):
                self.emit(StepStarted(step_id=iid, attempt=1))
                for name in branches:
                    self.start_child(iid, name)
            case IfStep():
                taken: Literal["then", "else"] = (
                    "then"
                    if evaluate(step.condition, ctx, path=f"$.steps.{iid}.condition")
                    else "else"
                )
                self.emit(StepStarted(step_id=iid, attempt=1))
                self.emit(BranchTaken(step_id=iid, branch=taken))
                other = step.else_ if taken == "then" else step.then
                for s in other:
                    self.emit(
                        StepSkipped(
                            step_id=f"{iid}/{'else' if taken == 'then' else 'then'}/{s.id}",
                            reason="branch not taken",
                        )
                    )
                if not _body(step, taken):
                    self.emit(StepCompleted(step_id=iid, output=None))
                    return
                self.start_child(iid, taken)

    def sleep_seconds(self, step: SleepStep, ctx: Mapping[str, Any], iid: str) -> float:
        if step.seconds is not None:
            return step.seconds
        until = render(step.until, ctx, path=f"$.steps.{iid}.until")
        try:
            when = datetime.fromisoformat(str(until))
            if when.tzinfo is None:
                raise ValueError("no time zone")
        except ValueError as exc:
            raise TemplateError(
                f"step '{iid}': `until` must be an ISO 8601 time with a zone, "
                f"got {until!r} ({exc})",
                path=f"$.steps.{iid}.until",
            ) from None
        return (when - self.now).total_seconds()

    def attempt(
        self,
        iid: str,
        step: ToolStep,
        attempt: int,
        ctx: Mapping[str, Any] | None = None,
        resume: Any = None,
    ) -> None:
        inst = self.s.insts[iid]
        path = f"$.steps.{iid}.input"
        rendered = self.bounded_input(
            render(step.input, ctx or self.context(inst.scope), path=path), iid, path
        )
        self.emit(StepStarted(step_id=iid, attempt=attempt))
        self.emit(
            ToolCallRequested(
                step_id=iid,
                attempt=attempt,
                tool=step.tool,
                input=rendered,
                idempotency_key=ids.idempotency_key(self.s.run_id, iid, attempt),
                timeout_s=step.timeout_s,
                resume=resume,
                secret_refs=secrets.reference_sites(step.input),
            )
        )

    def start_child(self, owner_iid: str, key: str) -> None:
        child = f"{owner_iid}/{key}"
        self.emit(StepScheduled(step_id=child))
        if child in self.s.reused:  # a fork: the element's / branch's recorded result
            output = self.s.reused[child]
            self.emit(StepCompleted(step_id=child, output=output, reused_from=self.s.forked_from))
            self.child_done(owner_iid)
            return
        self.start_ready(child)
        self.settle(child)  # an empty body, or one that failed at once

    def next_iteration(self, iid: str, step: LoopStep, k: int) -> None:
        inst = self.s.insts[iid]
        last = inst.results.get(str(k - 1))
        if k >= step.max_iterations:
            self.emit(StepCompleted(step_id=iid, output=last))
            return
        if step.while_ is not None:
            ctx = {**self.context(inst.scope), "iteration": k}
            if not evaluate(step.while_, ctx, path=f"$.steps.{iid}.while"):
                self.emit(StepCompleted(step_id=iid, output=last))
                return
        self.emit(LoopIterationStarted(step_id=iid, iteration=k))
        self.start_child(iid, str(k))

    # ------------------------------------------------------------------ outcomes

    def fail(self, iid: str, error: ErrorInfo) -> None:
        """Final failure of an instance (after retries and fallbacks)."""
        self.emit(StepFailed(step_id=iid, error=error))
        self.after(iid)

    def after(self, iid: str) -> None:
        """An instance reached its end: start what it unblocked, settle its scope."""
        inst = self.s.insts.get(iid)
        if inst is None:
            return
        if inst.fallback_of is not None:
            owner = inst.fallback_of
            if inst.status == "succeeded":
                self.emit(StepCompleted(step_id=owner, output=inst.output))
            else:
                self.emit(
                    StepFailed(
                        step_id=owner,
                        error=inst.error or _error("fallback_failed", "fallback failed"),
                    )
                )
            self.after(owner)
            return
        if inst.step is None:  # a child scope ended: its owner moves on
            self.child_done(_parent_path(iid)[0])
            return
        scope = self.s.scopes.get(inst.scope)
        if scope is None:
            return
        if inst.status == "succeeded" and scope.failed is None:
            for dependent in scope.dependents.get(inst.step.id, ()):
                if self.s.scopes.get(scope.sid) is not scope:
                    return  # it ended meanwhile (a fork's reused steps end at once)
                if self.ready(scope, dependent):
                    self.start(scope, scope.by_id[dependent])
        elif inst.status in ("failed", "cancelled", "skipped"):
            self.skip_unreachable(scope)
        self.settle(scope.sid)

    def skip_unreachable(self, scope: Scope) -> None:
        """Skip waiting steps that can no longer run: all of them when the scope
        failed, else those depending (transitively) on a step that did not succeed."""
        changed = True
        while changed:
            changed = False
            for step in scope.steps:
                iid = scope.iid(step.id)
                if iid in self.s.insts:
                    continue
                blocked = scope.failed is not None or any(
                    self._ended_without_success(scope, d) for d in scope.deps[step.id]
                )
                if blocked:
                    reason = (
                        f"step '{scope.failed}' failed"
                        if scope.failed is not None
                        else "a step it depends on did not succeed"
                    )
                    self.emit(StepSkipped(step_id=iid, reason=reason))
                    changed = True

    def _ended_without_success(self, scope: Scope, step_id: str) -> bool:
        inst = self.s.insts.get(scope.iid(step_id))
        return inst is not None and inst.status in ("failed", "skipped", "cancelled")

    def settle(self, sid: str) -> None:
        """When every step of a scope has ended, end the scope (or the run)."""
        scope = self.s.scopes.get(sid)
        if scope is None or scope.remaining > 0:
            return
        if sid == "":
            self.finish_run(scope)
            return
        owner_iid = _parent_path(sid)[0]
        if self.s.insts[sid].status in DONE:
            return
        if scope.failed is not None:
            failed = self.s.insts[scope.failed]
            self.emit(
                StepFailed(step_id=sid, error=failed.error or _error("step_failed", "step failed"))
            )
        else:
            try:
                output = self.scope_output(scope, self.s.insts[owner_iid].step)
            except (TemplateError, PredicateError) as exc:
                self.emit(
                    StepFailed(
                        step_id=sid, error=ErrorInfo(code=exc.code, message=str(exc), path=exc.path)
                    )
                )
            else:
                self.emit(StepCompleted(step_id=sid, output=output))
        # what ``after(sid)`` does for a child scope; its instance is already forgotten
        self.child_done(owner_iid)

    def scope_output(self, scope: Scope, owner_step: Step | None) -> Any:
        template = getattr(owner_step, "output", None)
        if template is not None and isinstance(owner_step, ForeachStep | LoopStep | ReduceStep):
            return render(template, self.context(scope.sid), path=f"$.steps.{scope.sid}.output")
        last = scope.steps[-1].id if scope.steps else None
        return scope.outputs.get(last, {}).get("output") if last else None

    def child_done(self, owner_iid: str) -> None:
        """A child scope of a composite ended (or room freed up): move the owner on."""
        owner = self.s.insts.get(owner_iid)
        if owner is None or owner.status in DONE:
            return
        if owner_iid in self._busy:
            self._again.add(owner_iid)
            return
        self._busy.add(owner_iid)
        try:
            while True:
                self._again.discard(owner_iid)
                self._move_owner(owner)
                if owner.status in DONE or owner_iid not in self._again:
                    break
        finally:
            self._busy.discard(owner_iid)
        if owner.status in DONE:
            self.after(owner_iid)

    def _move_owner(self, owner: Inst) -> None:
        iid, step = owner.iid, owner.step
        error = owner.first_child_error or _error("step_failed", "a child failed")
        match step:
            case ForeachStep():
                n = len(owner.items or [])
                if (
                    owner.failed_children
                    and step.failure == "fail_fast"
                    and step.min_success is None
                ):
                    if owner.running_children:
                        self.cancel_children(iid, "another item failed (fail_fast)")
                    if not owner.running_children:
                        self.emit(StepFailed(step_id=iid, error=error))
                    return
                while owner.next_child < n and owner.running_children < step.concurrency:
                    if self.s.paused:
                        return
                    self.start_child(iid, str(owner.next_child))
                if owner.running_children or owner.ok_children + owner.failed_children < n:
                    return
                if step.min_success is not None and owner.ok_children < step.min_success:
                    self.emit(StepFailed(step_id=iid, error=_error(
                        "too_few_successes",
                        f"foreach '{iid}': {owner.ok_children} of {n} items succeeded; "
                        f"min_success is {step.min_success}",
                    )))  # fmt: skip
                    return
                self.emit(
                    StepCompleted(step_id=iid, output=[owner.results.get(str(i)) for i in range(n)])
                )
            case ReduceStep():
                if owner.failed_children:
                    self.emit(StepFailed(step_id=iid, error=error))
                elif owner.running_children:
                    return
                elif owner.next_child < len(owner.items or []):
                    self.start_child(iid, str(owner.next_child))
                else:
                    self.emit(StepCompleted(step_id=iid, output=owner.acc))
            case LoopStep():
                if owner.running_children:
                    return
                if owner.failed_children:
                    self.emit(StepFailed(step_id=iid, error=error))
                    return
                k = owner.next_child
                if step.until is not None and k > 0:
                    ctx = self.context(owner.scope)
                    last = owner.last_outputs or {}
                    ctx = {**ctx, "iteration": k - 1, "steps": ChainMap(last, ctx["steps"])}
                    if evaluate(step.until, ctx, path=f"$.steps.{iid}.until"):
                        self.emit(StepCompleted(step_id=iid, output=owner.results.get(str(k - 1))))
                        return
                self.next_iteration(iid, step, k)
            case ParallelStep(branches=branches):
                # every branch must have ended (one may end before the next even starts)
                if owner.running_children or owner.ok_children + owner.failed_children < len(
                    branches
                ):
                    return
                if owner.failed_children:
                    self.emit(StepFailed(step_id=iid, error=error))
                else:
                    self.emit(
                        StepCompleted(
                            step_id=iid, output={b: owner.results.get(b) for b in branches}
                        )
                    )
            case IfStep():
                if owner.running_children:
                    return
                if owner.failed_children:
                    self.emit(StepFailed(step_id=iid, error=error))
                else:
                    self.emit(
                        StepCompleted(step_id=iid, output=owner.results.get(owner.branch or ""))
                    )

    # ------------------------------------------------------------------ tool results

    def on_tool_result(self, result: ToolResult) -> None:
        iid = result.step_id
        if self.s.agents and agent_step.owner_of(self.s, iid) is not None:
            agent_step.on_tool_result(self, result)
            return
        inst = self.s.insts.get(iid)
        if (
            inst is None
            or inst.status != "running"
            # answered already: after an ambiguous outcome the step stays running at the
            # same attempt (needs_review), and a redelivered result was recorded twice
            or not inst.inflight
            or inst.attempt != result.attempt
            or result.idempotency_key != ids.idempotency_key(self.s.run_id, iid, result.attempt)
            or not isinstance(inst.step, ToolStep)
        ):
            return
        if result.ok:
            # the tool-runner turns an oversized output into this failure before sending
            # it; one that arrives anyway (another runner's settings) is refused here
            too_large = sizes.check_output(
                [result.output, result.suspend], self.s.limits, iid, f"$.steps.{iid}.output"
            )
            if too_large is not None:
                result = msgspec.structs.replace(
                    result, ok=False, output=None, suspend=None, error=too_large
                )
        if result.ok:
            self.emit(ToolCallCompleted(
                step_id=iid, attempt=result.attempt, idempotency_key=result.idempotency_key,
                output=result.output, started_at=result.started_at, finished_at=result.finished_at,
                suspend=result.suspend, breaker=result.breaker, throttled_ms=result.throttled_ms,
            ))  # fmt: skip
            if result.suspend is not None:  # the tool asks a person first
                request = result.suspend
                self.suspend(iid, request.label, request.payload, request.schema, None)
                return
            self.emit(StepCompleted(step_id=iid, output=result.output))
            self.after(iid)
            return
        error = result.error or _error("tool_error", "tool failed without detail")
        self.emit(ToolCallFailed(
            step_id=iid, attempt=result.attempt, idempotency_key=result.idempotency_key,
            error=error, started_at=result.started_at, finished_at=result.finished_at,
            throttled_ms=result.throttled_ms,
        ))  # fmt: skip
        if error.code == "ambiguous_outcome":
            self.emit(RunNeedsReview(step_id=iid, error=error))
            return
        self.attempt_failed(inst, inst.step, error)

    def attempt_failed(self, inst: Inst, step: ToolStep, error: ErrorInfo) -> None:
        policy = step.retry
        if (
            policy is not None
            and self.retryable(policy, error)
            and inst.attempt < policy.max_attempts
        ):
            delay = retry_delay(
                policy, inst.attempt, ids.idempotency_key(self.s.run_id, inst.iid, inst.attempt)
            )
            self.emit(
                StepRetryScheduled(
                    step_id=inst.iid, attempt=inst.attempt + 1, delay_s=delay, error=error
                )
            )
            self.timer(f"{inst.iid}:retry:{inst.attempt + 1}", delay, "retry", inst.iid)
            return
        if step.on_error == "fallback" and step.fallback is not None and inst.fallback_of is None:
            scope = self.s.scopes[inst.scope]
            self.start(scope, step.fallback, iid=f"{inst.iid}/fallback")
            return
        self.fail(inst.iid, error)

    @staticmethod
    def retryable(policy: RetryPolicy, error: ErrorInfo) -> bool:
        return error.code not in NEVER_RETRIED and error.code not in policy.non_retryable

    # ------------------------------------------------------------------ timers

    def on_timer(self, tid: str) -> None:
        purpose, iid = self.s.timers[tid]
        self.emit(TimerFired(timer_id=tid))
        if purpose == "run_timeout":
            self.cancel_everything("run timed out")
            self.emit(
                RunFailed(error=_error("run_timeout", "the run exceeded its plan's timeout_s"))
            )
            return
        inst = self.s.insts.get(iid or "")
        if inst is None or inst.status in DONE:
            return
        if purpose == "retry" and inst.status == "retry_wait" and isinstance(inst.step, ToolStep):
            if self.s.paused:
                return  # unpause restarts waiting retries
            try:
                self.attempt(inst.iid, inst.step, inst.attempt + 1)
            except (TemplateError, _StepError) as exc:
                self.fail(inst.iid, _as_error(exc))
        elif purpose == "sleep":
            self.emit(StepCompleted(step_id=inst.iid, output={"woke_at": self.now.isoformat()}))
            self.after(inst.iid)
        elif purpose == "wait_timeout" and inst.status == "running":
            missing = sorted({m.name for m in inst.matches} - set(inst.received))
            self.fail(inst.iid, _error(
                "wait_timeout", f"step '{inst.iid}' waited in vain for {', '.join(missing)}"
            ))  # fmt: skip
        elif purpose == "suspension_expiry":
            self.expire(inst, tid.rsplit(":", 1)[0])
        elif purpose == "step_timeout":
            self.cancel_attempt(inst, "step timed out")
            self.fail(
                inst.iid,
                _error(
                    "step_timeout", f"step '{inst.iid}' did not finish within its step_timeout_s"
                ),
            )

    # ------------------------------------------------------------------ external events

    def on_external_event(self, arrived: ExternalEventArrived) -> None:
        inst = self.s.insts.get(arrived.step_id)
        if inst is None or inst.status != "running" or not isinstance(inst.step, WaitEventStep):
            return
        if not any(m.name == arrived.name and m.key == arrived.key for m in inst.matches):
            return
        if arrived.name in inst.received:
            return  # one per name: a repeat of an event already taken
        self.emit(EventReceived(
            step_id=arrived.step_id, name=arrived.name, key=arrived.key,
            payload=arrived.payload, signal_id=arrived.signal_id,
        ))  # fmt: skip
        names = {m.name for m in inst.matches}
        if inst.step.mode == "any" or names <= set(inst.received):
            self.emit(StepCompleted(step_id=arrived.step_id, output=dict(inst.received)))
            self.after(arrived.step_id)

    # ------------------------------------------------------------------ sub-runs

    def on_sub_run(self, done: SubRunFinished) -> None:
        if self.s.agents and agent_step.owner_of(self.s, done.step_id) is not None:
            agent_step.on_sub_run(self, done)  # a delegate called by an agent's model
            return
        inst = self.s.insts.get(done.step_id)
        if inst is None or inst.status != "running" or inst.child_run_id != done.child_run_id:
            return
        self.emit(SubRunEnded(
            step_id=done.step_id, child_run_id=done.child_run_id, status=done.status,
            output=done.output, error=done.error,
        ))  # fmt: skip
        if done.status == "completed":
            self.emit(StepCompleted(step_id=done.step_id, output=done.output))
            self.after(done.step_id)
            return
        cause = done.error or _error(f"sub_run_{done.status}", f"the child run was {done.status}")
        self.fail(done.step_id, ErrorInfo(
            code=cause.code,
            message=f"child run '{done.child_run_id}' {done.status}: {cause.message}",
            path=cause.path,
            details={"child_run_id": done.child_run_id},
        ))  # fmt: skip

    # ------------------------------------------------------------------ the relay

    def on_publish_failed(self, report: RunPublishFailed) -> None:
        """One of the run's events can never reach the bus (the relay skipped it): what
        waits on it would wait forever, so the run ends failed with the reason."""
        self.emit(report)
        what = f"event {report.seq} ({report.event_type}) could not be published"
        self.cancel_everything(what)
        self.emit(RunFailed(error=ErrorInfo(
            code=report.code,
            message=f"{what}: {report.message}" if report.message else what,
            details={"seq": report.seq, "event_type": report.event_type,
                     "size": report.size, "limit": report.limit},
        )))  # fmt: skip

    # ------------------------------------------------------------------ people

    def suspend(
        self, iid: str, label: str, payload: Any, schema: dict[str, Any], expires_in: float | None
    ) -> None:
        n = self.s.insts[iid].suspensions + 1
        sid = f"{iid}#{n}"
        expires_at = self.now + timedelta(seconds=expires_in) if expires_in else None
        self.emit(StepSuspended(
            step_id=iid, suspension_id=sid, label=label, payload=payload, schema=schema,
            expires_at=expires_at,
        ))  # fmt: skip
        if expires_in:
            self.timer(f"{sid}:expiry", expires_in, "suspension_expiry", iid)

    def on_resume(self, request: ResumeRun) -> None:
        found = find_suspension(self.s, request)
        if not isinstance(found, Suspension) or not is_open(self.s, found):
            return
        if problems(found.schema, request.data):
            return
        self.answer(found, request.data, request.by, request.request_id)

    def answer(self, susp: Suspension, data: Any, by: str, request_id: str) -> None:
        iid = susp.step_id
        self.emit(StepResumed(
            step_id=iid, suspension_id=susp.suspension_id, data=data, by=by, request_id=request_id
        ))  # fmt: skip
        inst = self.s.insts[iid]
        if isinstance(inst.step, AgentStep):  # a budget raised: the held-back turn goes on
            agent_step.resumed(self, inst)
            return
        if isinstance(inst.step, ToolStep):  # the tool asked: call it again with the answer
            try:
                self.attempt(iid, inst.step, inst.attempt + 1, resume=data)
            except (TemplateError, _StepError) as exc:
                self.fail(iid, _as_error(exc))
            return
        self.emit(StepCompleted(step_id=iid, output=data))
        self.after(iid)

    def expire(self, inst: Inst, sid: str) -> None:
        susp = self.s.suspensions.get(sid)
        if susp is None or susp.resumed is not None or inst.status != "suspended":
            return
        step = inst.step
        escalated = inst.suspensions > 1
        if isinstance(step, ApprovalStep) and not escalated:
            if step.on_expire == "default":
                self.answer(susp, step.default, "expiry", f"expiry:{sid}")
                return
            if step.on_expire == "escalate" and step.escalate_to:
                self.suspend(
                    inst.iid, step.escalate_to, susp.payload, susp.schema, step.expires_in_s
                )
                return
        self.fail(inst.iid, _error(
            "suspension_expired", f"nobody answered '{susp.label}' ({sid}) before {susp.expires_at}"
        ))  # fmt: skip

    # ------------------------------------------------------------------ control

    def on_control(self, control: RunControl) -> None:
        s = self.s
        if control.action == "cancel":
            self.emit(RunCancelRequested(by=control.by, reason=control.reason))
            self.cancel_everything(
                f"run cancelled by {control.by}" + (f": {control.reason}" if control.reason else "")
            )
            self.emit(RunCancelled(by=control.by, reason=control.reason))
        elif control.action == "pause" and not s.operator_paused:
            self.emit(RunPaused(by=control.by, reason=control.reason))
        elif control.action == "unpause" and s.operator_paused:
            self.emit(RunUnpaused(by=control.by))
            if not s.queued:  # a queued run starts when the queue admits it
                self.resume_all()

    def resume_all(self) -> None:
        """After an unpause: start every ready step, retry every retry whose wait is
        over, and let composites start the children they held back."""
        for sid in list(self.s.scopes):
            self.start_ready(sid)
        for inst in list(self.s.insts.values()):
            if (
                inst.status == "retry_wait"
                and not any(p == "retry" and i == inst.iid for p, i in self.s.timers.values())
                and isinstance(inst.step, ToolStep)
            ):
                try:
                    self.attempt(inst.iid, inst.step, inst.attempt + 1)
                except (TemplateError, _StepError) as exc:
                    self.fail(inst.iid, _as_error(exc))
            elif (
                inst.step is not None
                and isinstance(inst.step, ForeachStep)
                and inst.status == "running"
            ):
                self.child_done(inst.iid)

    def cancel_attempt(self, inst: Inst, reason: str) -> None:
        if isinstance(inst.step, AgentStep):
            agent_step.cancel_calls(self, inst.iid, reason)
        if inst.inflight:
            key = ids.idempotency_key(self.s.run_id, inst.iid, inst.attempt)
            self.emit(ToolCallCancelled(
                step_id=inst.iid, attempt=inst.attempt, idempotency_key=key, reason=reason
            ))  # fmt: skip

    def cancel_children(self, owner_iid: str, reason: str) -> None:
        prefix = owner_iid + "/"
        for iid in sorted(
            (i for i in self.s.insts if i.startswith(prefix)), key=lambda i: -i.count("/")
        ):
            inst = self.s.insts.get(iid)  # None: forgotten with its ended scope
            if inst is None or inst.status in DONE:
                continue
            self.cancel_attempt(inst, reason)
            self.emit(StepCancelled(step_id=iid, reason=reason))

    def cancel_everything(self, reason: str) -> None:
        """Every unfinished instance, innermost first, is cancelled; steps that never
        started are recorded as cancelled too."""
        for iid in sorted(list(self.s.insts), key=lambda i: -i.count("/")):
            inst = self.s.insts.get(iid)  # None: forgotten with its ended scope
            if inst is None or inst.status in DONE:
                continue
            self.cancel_attempt(inst, reason)
            self.emit(StepCancelled(step_id=iid, reason=reason))
        root = self.s.scopes.get("")
        if root is not None:
            for step in root.steps:
                if step.id not in self.s.insts:
                    self.emit(StepCancelled(step_id=step.id, reason=reason))

    # ------------------------------------------------------------------ the run

    def finish_run(self, root: Scope) -> None:
        s = self.s
        if s.terminal or s.status == "needs_review" or s.replanning:
            return
        if root.failed is not None:
            failed = s.insts[root.failed]
            cause = failed.error or _error("step_failed", "step failed")
            assert s.plan is not None
            outputs = {k: v["output"] for k, v in root.outputs.items()}
            ask = replanning.request(s.plan, s.replans, root.failed, cause, outputs, s.retired)
            if ask is not None:  # the plan opted in: the planner writes the rest
                self.emit(ask)
                return
            self.fail_run(root.failed, cause)
            return
        try:
            output = self.run_output(root)
        except TemplateError as exc:
            self.emit(RunFailed(error=ErrorInfo(code=exc.code, message=str(exc), path=exc.path)))
            return
        self.emit(RunCompleted(output=output))

    def on_replanned(self, verdict: PlanProposed | PlanRefused) -> None:
        """The planner's answer to the re-planning in flight: go on with the revised
        plan, or fail the run with the step's failure."""
        s = self.s
        asked = self.replan_request()
        issues = verdict.issues if isinstance(verdict, PlanRefused) else []
        if isinstance(verdict, PlanProposed):
            issues = validate_plan(verdict.plan, None, s.input, caps=s.caps)
            issues = issues or replanning.kept_issues(asked, verdict.plan)
            if not issues:
                self.emit(PlanRevised(
                    attempt=asked.attempt, plan=verdict.plan, kept=list(asked.kept),
                    planning=verdict.planning,
                ))  # fmt: skip
                self.start_ready("")
                return
        self.emit(ReplanRefused(attempt=asked.attempt, issues=issues, planning=verdict.planning))
        self.fail_run(asked.step_id, asked.error, {"replan_issues": [i.code for i in issues]})

    def replan_request(self) -> ReplanRequested:
        """The re-planning request in flight: the last one the run recorded. Kept out of
        the state (it holds a plan); rebuilt from the scope it failed in."""
        s = self.s
        assert s.plan is not None
        root = s.scopes[""]
        failed = root.failed or ""
        cause = s.insts[failed].error if failed in s.insts else None
        outputs = {k: v["output"] for k, v in root.outputs.items()}
        cause = cause or _error("step_failed", "step failed")
        asked = replanning.request(s.plan, s.replans - 1, failed, cause, outputs, s.retired)
        assert asked is not None
        return asked

    def fail_run(self, step_id: str, cause: ErrorInfo, more: dict[str, Any] | None = None) -> None:
        self.emit(RunFailed(error=ErrorInfo(
            code=cause.code, message=f"step '{step_id}' failed: {cause.message}",
            path=cause.path, details={"step_id": step_id, **(more or {})},
        )))  # fmt: skip

    def run_output(self, root: Scope) -> Any:
        assert self.s.plan is not None
        finals = [s for s in root.steps if isinstance(s, FinalStep)]
        if finals:
            return root.outputs.get(finals[0].id, {}).get("output")
        if self.s.plan.output is not None:
            return render(self.s.plan.output, self.context(""), path="$.output")
        sinks = [s.id for s in root.steps if not root.dependents.get(s.id)]
        return {sid: root.outputs[sid]["output"] for sid in sinks if sid in root.outputs}


# --------------------------------------------------------------------------- what a run waits for

# A timer may reach the inbox this much before its ``fire_at`` by the host's clock (the
# timer service fires within a millisecond of it, from the same clock); anything
# earlier is not the timer service's and is refused.
TIMER_EARLY_S = 0.25
_EARLY = timedelta(seconds=TIMER_EARLY_S)


def request_digest(run_id: str, event: RunEvent) -> str:
    """Names one stored request exactly (a ``tool_call_requested``, a ``run_requested``).
    The service answering it echoes the digest, so an answer to a forged request with
    the same ids but other content is told apart from the answer to the stored one."""
    body = msgspec.json.encode(event)
    return hashlib.sha256(run_id.encode() + b"\x1f" + body).hexdigest()[:32]


def plan_digest(plan: Plan) -> str:
    return hashlib.sha256(msgspec.json.encode(plan)).hexdigest()[:32]


def unexpected(
    state: RunState, message: InboxMessage, now: datetime | None = None
) -> ErrorInfo | None:
    """None when ``state``'s run is waiting for ``message``: the verdict on its pending
    plan request, the result of its outstanding tool attempt (same attempt, key and
    request digest), a pending timer (and, given the host's ``now``, one that is due),
    an event for an open wait, the end of its running sub-run. Otherwise an
    ``unexpected_message`` error naming what the run expects and what arrived.

    The executor host asks this before deciding and dead-letters what it refuses.
    ``advance`` itself does not call it: it still ignores what no longer applies, and a
    recorded history replays exactly as it was decided."""
    got = _describe(message)
    if message.run_id != state.run_id:
        return _refuse(state, f"messages for run '{state.run_id}'", got, "$.run_id")
    if state.version == 0:
        return _refuse(state, "nothing: no such run", got, "$.run_id")
    if state.status == "diverged":
        return _refuse(state, "nothing: the run is parked after diverging", got)
    if state.divergence is not None:
        return None  # advance parks the run on this message
    if state.terminal:
        return _refuse(state, f"nothing: the run is {state.status}", got)
    match message:
        case PlanProposed() | PlanRefused() if state.replanning:
            if message.request_digest != state.replan_digest:
                return _refuse(
                    state,
                    f"the answer to its re-planning {state.replanning} (digest "
                    f"{state.replan_digest})",
                    f"{got} (digest {message.request_digest})",
                    "$.request_digest",
                )
        case PlanProposed() | PlanRefused():
            if state.status != "planning":
                return _refuse(state, "no plan verdict: its plan is decided", got)
            if state.request_digest is not None and message.request_digest != state.request_digest:
                return _refuse(
                    state,
                    f"a verdict on its stored run_requested (digest {state.request_digest})",
                    f"{got} (digest {message.request_digest})",
                    "$.request_digest",
                )
            if (
                isinstance(message, PlanProposed)
                and state.plan_digest is not None
                and plan_digest(message.plan) != state.plan_digest
            ):
                return _refuse(
                    state,
                    "the explicit plan it was submitted with (validated, never replaced)",
                    f"{got} with another plan",
                    "$.plan",
                )
        case ToolResult(step_id=sid) if agent_step.owner_of(state, sid) is not None:
            expected = agent_step.unexpected_tool_result(state, message)
            if expected is not None:
                return _refuse(state, expected, got, "$.step_id")
        case ModelResult():
            expected = agent_step.unexpected_model_result(state, message)
            if expected is not None:
                return _refuse(state, expected, got, "$.turn")
        case ToolResult(step_id=sid):
            inst = state.insts.get(sid)
            if inst is None or inst.status != "running" or not isinstance(inst.step, ToolStep):
                now_is = inst.status if inst is not None else "not started"
                return _refuse(state, f"no tool result for step '{sid}' ({now_is})", got,
                               "$.step_id")  # fmt: skip
            key = ids.idempotency_key(state.run_id, sid, inst.attempt)
            if message.attempt != inst.attempt or message.idempotency_key != key:
                return _refuse(state, f"the result of attempt {inst.attempt} of step '{sid}' "
                               f"({key})", got, "$.attempt")  # fmt: skip
            if not inst.inflight:  # e.g. a redelivered ambiguous outcome
                return _refuse(state, f"nothing: attempt {inst.attempt} of step '{sid}' is "
                               "answered already", got, "$.attempt")  # fmt: skip
            if inst.request_digest is not None and message.request_digest != inst.request_digest:
                return _refuse(
                    state,
                    f"the result of the stored request {key} (digest {inst.request_digest})",
                    f"{got} (digest {message.request_digest})",
                    "$.request_digest",
                )
        case TimerElapsed(timer_id=tid):
            if tid not in state.timers:
                pending = ", ".join(sorted(state.timers)[:10]) or "none"
                return _refuse(state, f"one of its pending timers ({pending})", got, "$.timer_id")
            due = state.timer_due.get(tid)
            if now is not None and due is not None and now < due - _EARLY:
                when = f"{got} at {now.isoformat()}, before it is due"
                return _refuse(state, f"timer '{tid}' at {due.isoformat()}", when, "$.timer_id")
        case SubRunFinished(step_id=sid) if agent_step.owner_of(state, sid) is not None:
            expected = agent_step.unexpected_sub_run(state, message)
            if expected is not None:
                return _refuse(state, expected, got, "$.step_id")
        case SubRunFinished(step_id=sid):
            inst = state.insts.get(sid)
            if inst is None or inst.status != "running" or inst.child_run_id is None:
                now_is = inst.status if inst is not None else "not started"
                return _refuse(state, f"no sub-run end for step '{sid}' ({now_is})", got,
                               "$.step_id")  # fmt: skip
            if message.child_run_id != inst.child_run_id:
                return _refuse(state, f"the end of child run '{inst.child_run_id}'", got,
                               "$.child_run_id")  # fmt: skip
        case ExternalEventArrived(step_id=sid):
            inst = state.insts.get(sid)
            if inst is None or inst.status != "running" or not isinstance(inst.step, WaitEventStep):
                now_is = inst.status if inst is not None else "not started"
                return _refuse(state, f"no external event for step '{sid}' ({now_is})", got,
                               "$.step_id")  # fmt: skip
            open_ = [f"{m.name}/{m.key}" for m in inst.matches if m.name not in inst.received]
            if f"{message.name}/{message.key}" not in open_:
                return _refuse(state, f"an event step '{sid}' still waits for ({', '.join(open_)})",
                               got, "$.name")  # fmt: skip
    return None


def _describe(message: InboxMessage) -> str:
    match message:
        case ToolResult():
            return (f"a tool result for attempt {message.attempt} of step '{message.step_id}' "
                    f"({message.idempotency_key})")  # fmt: skip
        case TimerElapsed():
            return f"timer '{message.timer_id}'"
        case SubRunFinished():
            return f"the end of child run '{message.child_run_id}' for step '{message.step_id}'"
        case ExternalEventArrived():
            return f"event {message.name}/{message.key} for step '{message.step_id}'"
        case ModelResult():
            return (f"a model result for turn {message.turn} of step '{message.step_id}' "
                    f"({message.idempotency_key})")  # fmt: skip
        case PlanProposed():
            return "a plan proposal"
        case PlanRefused():
            return "a plan refusal"
    return type(message).__name__


def _refuse(state: RunState, expected: str, got: str, path: str | None = None) -> ErrorInfo:
    return ErrorInfo(
        code="unexpected_message",
        message=f"run '{state.run_id}' expects {expected}; got {got}",
        path=path,
        details={"run_id": state.run_id, "expected": expected, "received": got},
    )


def is_open(state: RunState, susp: Suspension) -> bool:
    """Still answerable: not answered, and its step still waits on *this* suspension
    (not expired, escalated to a newer one, cancelled or ended)."""
    inst = state.insts.get(susp.step_id)
    return (
        susp.resumed is None
        and inst is not None
        and inst.status == "suspended"
        and susp.suspension_id == f"{susp.step_id}#{inst.suspensions}"
    )


def find_suspension(state: RunState, request: ResumeRun) -> Suspension | ErrorInfo:
    """The suspension a resume request names (by id, or by label among the open ones;
    an answered one is returned so a repeat can be told who answered first)."""
    if request.suspension_id is not None:
        found = state.suspensions.get(request.suspension_id)
        if found is None:
            return ErrorInfo(
                code="unknown_suspension",
                message=f"run '{state.run_id}' has no suspension '{request.suspension_id}'",
                path="$.suspension_id",
            )
        return found
    if request.label is None:
        return ErrorInfo(code="missing_label", message="give a label or a suspension_id", path="$")
    same = [x for x in state.suspensions.values() if x.label == request.label]
    # A repeat of a request that was recorded names the suspension it answered, whatever
    # else now waits under that label (else the reply to a recorded answer could be a
    # refusal naming another suspension, and a repeat could answer a second one).
    mine = [
        x for x in same
        if request.request_id and x.resumed is not None
        and x.resumed.request_id == request.request_id
    ]  # fmt: skip
    if mine:
        return mine[0]
    waiting = [x for x in same if is_open(state, x)]
    if len(waiting) > 1:
        ids_ = ", ".join(x.suspension_id for x in waiting)
        return ErrorInfo(
            code="ambiguous_label",
            message=f"{len(waiting)} suspensions wait under label '{request.label}' ({ids_}): "
            "resume one by its suspension_id",
            path="$.label",
        )
    if waiting:
        return waiting[0]
    if same:
        return same[-1]  # already answered: the reply says by whom
    labels = sorted({x.label for x in state.suspensions.values() if is_open(state, x)})
    return ErrorInfo(
        code="unknown_label",
        message=f"nothing in run '{state.run_id}' waits under label '{request.label}'; "
        f"waiting labels: {labels}",
        path="$.label",
    )


def explain_resume(state: RunState, request: ResumeRun) -> ResumeReply:
    """The reply to a resume request, read from the run's state after it was handled."""
    found = find_suspension(state, request)
    if isinstance(found, ErrorInfo):
        return ResumeReply(run_id=state.run_id, ok=False, error=found)
    sid = found.suspension_id
    if state.status == "diverged":
        return ResumeReply(
            run_id=state.run_id,
            ok=False,
            suspension_id=sid,
            error=ErrorInfo(
                code="run_diverged",
                message="the run is parked: replaying its history with the current code "
                "decided differently; see its run_diverged event (loom replay RUN)",
            ),
        )
    if found.resumed is not None:
        if found.resumed.request_id == request.request_id:
            return ResumeReply(run_id=state.run_id, ok=True, suspension_id=sid)
        first = found.resumed
        return ResumeReply(
            run_id=state.run_id,
            ok=False,
            suspension_id=sid,
            already=first,
            error=ErrorInfo(
                code="already_resumed",
                message=f"'{found.label}' ({sid}) was already resumed by {first.by} "
                f"with {first.data!r}",
            ),
        )
    if state.terminal:
        return ResumeReply(
            run_id=state.run_id,
            ok=False,
            suspension_id=sid,
            error=ErrorInfo(code="already_finished", message=f"run is {state.status}"),
        )
    if not is_open(state, found):
        inst = state.insts.get(found.step_id)
        now = inst.status if inst is not None else "gone"
        return ResumeReply(
            run_id=state.run_id,
            ok=False,
            suspension_id=sid,
            error=ErrorInfo(
                code="suspension_closed",
                message=f"'{found.label}' ({sid}) no longer waits for an answer: its step is "
                f"{now}" + (f" and waits on {found.step_id}#{inst.suspensions}"
                            if inst is not None and inst.status == "suspended" else ""),
            ),
        )  # fmt: skip
    issues = problems(found.schema, request.data, "$.data")
    if issues:
        text = "; ".join(f"{path}: {message}" for path, message in issues)
        return ResumeReply(
            run_id=state.run_id,
            ok=False,
            suspension_id=sid,
            error=ErrorInfo(
                code="invalid_resume_data",
                message=f"the answer does not fit '{found.label}': {text}; the run stays suspended",
                path=issues[0][0],
                details={"problems": [list(p) for p in issues], "schema": found.schema},
            ),
        )
    return ResumeReply(
        run_id=state.run_id,
        ok=False,
        suspension_id=sid,
        error=ErrorInfo(code="not_applied", message="the answer was not recorded; retry"),
    )


class _StepError(Exception):
    """A step cannot start (its inputs are wrong at run time): it fails with ``error``."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def _as_error(exc: TemplateError | _StepError) -> ErrorInfo:
    if isinstance(exc, _StepError):
        return exc.error
    return ErrorInfo(code=exc.code, message=str(exc), path=exc.path)


def retry_delay(policy: RetryPolicy, attempt: int, key: str) -> float:
    """The wait before attempt ``attempt + 1``; jitter is derived from ``key`` so the
    same run always waits the same (replay must reproduce it)."""
    base = min(policy.initial_delay_s * policy.multiplier ** (attempt - 1), policy.max_delay_s)
    if policy.jitter:
        u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        base *= 1 + policy.jitter * (2 * u - 1)
    return round(max(0.0, base), 6)


def _error(code: str, message: str) -> ErrorInfo:
    return ErrorInfo(code=code, message=message)


# --------------------------------------------------------------------------- snapshots

SNAPSHOT_EVERY = 1000  # events between snapshots of a long run
# The state's shape: bumped when the same events fold into a different state, so an
# older snapshot is not restored (the host then folds the history, the truth). 2: ended
# child scopes are forgotten (``_forget``), a loop keeps its last iteration's outputs.
# 3: the run's thread id; an agent's state from its step_started; lean turn requests.
# 4: an operator's pause kept apart from the queue's hold (``operator_paused``).
# 5: a scope's ``steps`` and ``by_id`` are not saved: they are the plan's steps (the
# root) or the body of the composite that owns the scope, so ``restore`` takes them from
# there; an instance's request digest goes when its attempt has an outcome. A
# 20,000-step chain kept its steps three times (plan, scope list, scope map): 9.5 MB
# and 54 ms to decode, now 6.6 MB and 37 ms (issue 10).
# 6: an instance running its scope's step saves no copy of it (``_steps_by_reference``);
# a layout 5 snapshot (every instance with its step) restores into the same state.
SNAPSHOT_LAYOUT = 6
_LAYOUTS_READ = frozenset({5, 6})


_DERIVED = frozenset({"_body_deps", "_suspended", "_awaiting", "_encoded"})  # not saved
_SCOPE_SAVED = tuple(f.name for f in fields(Scope) if f.name not in ("steps", "by_id"))


class _Snapshot(msgspec.Struct):
    layout: int
    state: RunState


def snapshot(state: RunState) -> bytes:
    """The folded state as JSON, to resume folding from (a cache of the fold)."""
    body = {f.name: getattr(state, f.name) for f in fields(RunState) if f.name not in _DERIVED}
    encoded: dict[int, tuple[object, msgspec.Raw]] = {}
    if state.plan is not None:
        body["plan"] = _encoded_once(state, state.plan, encoded)
    # a scope's steps are where ``_scope_steps`` finds them again (a run has few scopes
    # at once: the root and the child scopes running now)
    body["scopes"] = {
        sid: {
            "steps": [],
            "by_id": {},
            **{name: getattr(scope, name) for name in _SCOPE_SAVED},
            "deps": _encoded_once(state, scope.deps, encoded),
            "dependents": _encoded_once(state, scope.dependents, encoded),
        }
        for sid, scope in state.scopes.items()
    }
    state._encoded = encoded  # what this snapshot used: a part that went goes with it
    # an instance running its scope's step saves no copy of it (``restore`` takes it from
    # the scope): taken off for the encode and put back, the state is unchanged after
    insts, steps = _steps_by_reference(state)
    try:
        return msgspec.json.encode({"layout": SNAPSHOT_LAYOUT, "state": body})
    finally:
        for inst, step in zip(insts, steps, strict=True):
            inst.step = step


def _encoded_once(
    state: RunState, part: object, encoded: dict[int, tuple[object, msgspec.Raw]]
) -> msgspec.Raw:
    """The JSON of ``part``, a part of the state never changed once made (a frozen plan, a
    scope's dependency maps, shared by a body's scopes), encoded once per run: of a
    20,000-step chain's snapshot they are most of the bytes, and every snapshot encoded
    them again on the writer's loop (issue 10: 0.8-2.2 ms every 200 steps of a 2,000-step
    run). Held with the object, so its id cannot be another object's."""
    held = state._encoded.get(id(part))
    if held is None or held[0] is not part:
        held = (part, msgspec.Raw(msgspec.json.encode(part)))
    encoded[id(part)] = held
    return held[1]


def _steps_by_reference(state: RunState) -> tuple[list[Inst], list[Step]]:
    """Take off the step of every instance whose step is its scope's step of that id (the
    very object, so ``restore`` finds the same one), and say which (two lists: a pair
    per instance cost as much as the rest of the pass). An instance with no step is then
    either a child scope (its iid is a scope's sid: both go together, ``_forget``) or
    one of these. Kept: a fallback's step (not in the scope), and the step of an
    instance whose scope has gone (a sub_run step's, kept by ``_forget``)."""
    insts: list[Inst] = []
    steps: list[Step] = []
    scopes = state.scopes
    root = scopes.get("")
    in_root = root.by_id if root is not None else {}
    for inst in state.insts.values():
        step = inst.step
        if step is None or inst.fallback_of is not None:
            continue
        sid = inst.scope
        if not sid:  # most of a long run's: its iid is the step's id
            if in_root.get(inst.iid) is not step:
                continue
        elif (scope := scopes.get(sid)) is None or scope.by_id.get(
            inst.iid[len(sid) + 1 :]
        ) is not step:  # its iid: the scope's sid, "/", the step's id
            continue
        inst.step = None
        insts.append(inst)
        steps.append(step)
    return insts, steps


def restore(data: bytes) -> RunState:
    """The state ``snapshot`` saved; raises (``msgspec.ValidationError``, ValueError,
    LookupError) on a snapshot of another layout, as on a damaged one."""
    taken = msgspec.json.decode(data, type=_Snapshot)
    if taken.layout not in _LAYOUTS_READ:
        raise ValueError(f"snapshot layout {taken.layout}, this code reads {SNAPSHOT_LAYOUT}")
    state = taken.state
    # a scope's owner is an instance of a shorter scope (its sid a prefix): once that
    # scope is rebuilt, the owner's step saved by reference is found there
    for sid in sorted(state.scopes, key=len):
        scope = state.scopes[sid]
        scope.steps = _scope_steps(state, sid)
        scope.by_id = {s.id: s for s in scope.steps}
    _waiting_index(state)  # also puts back the other steps saved by reference
    if taken.layout == 5:  # each instance saved its own copy: share the scope's
        _share_steps(state)
    return state


def _share_steps(state: RunState) -> None:
    """An instance whose step equals its scope's step of that id takes that very object,
    as a live state has it (so its next snapshot saves it by reference)."""
    for iid, inst in state.insts.items():
        step, scope = inst.step, state.scopes.get(inst.scope)
        if step is None or inst.fallback_of is not None or scope is None:
            continue
        same = scope.by_id.get(step.id)
        if same is not None and same == step and iid == scope.iid(step.id):
            inst.step = same


def _saved_step(state: RunState, iid: str, inst: Inst) -> Step | None:
    """The instance's step, put back first if it was saved by reference (its scope must
    be rebuilt already); None for a child scope."""
    if inst.step is None and iid not in state.scopes:
        sid = inst.scope
        inst.step = state.scopes[sid].by_id[iid[len(sid) + 1 :] if sid else iid]
    return inst.step


def _scope_steps(state: RunState, sid: str) -> list[Step]:
    """The steps a scope runs, as ``_new_scope`` was given them: the plan's (the root;
    a revision replaces both) or its owner's body (``_on_scheduled``)."""
    if not sid:
        if state.plan is None:
            raise ValueError("snapshot has a root scope and no plan")
        return state.plan.steps
    head, key = _parent_path(sid)
    owner = _saved_step(state, head, state.insts[head])
    if owner is None:
        raise ValueError(f"snapshot's scope {sid!r} has no composite step owning it")
    return _body(owner, key)
