"""A run's statistics, computed from its events alone (what ``loom describe`` shows).

Design notes
- Pure: no clock, no I/O. Every time comes from an event: the envelope's ``at`` (the
  executor's clock) or a tool result's ``started_at``/``finished_at`` (the tool-runner's
  clock). An interval still open (a timer not fired, a pause not lifted) ends at the run's
  terminal event, else at the last event, or at ``as_of`` when the caller passes one (the
  CLI passes "now" for a live run; stats stay a function of their arguments).
- Step ids are paths (``fe/3/fetch``); they are opaque except that the first segment names
  the top-level step and a known step id that prefixes another is its ancestor (``fe`` of
  ``fe/3/fetch``). An event about a descendant shows the ancestor as running, since
  composite steps may have no ``StepStarted`` of their own.
- Time accounting sums over work, not wall-clock: two attempts running side by side count
  twice, so ``running_ms + waiting_ms`` can exceed ``duration_ms``. Intervals measured
  across two clocks (``queued_ms``) are clamped at zero per attempt, so skew never makes a
  duration negative.
- Only ``sleep`` and ``retry`` timers are waits; ``step_timeout``/``run_timeout`` timers
  are guards that run beside the work (and have no cancellation event), so counting them
  would double-count the run's own time.
- People, external events and child runs are waits as well (``StepSuspended`` until
  its ``StepResumed`` or the step's end; ``EventWaitStarted`` until every awaited event
  arrived or the step ended; ``SubRunRequested`` until ``SubRunEnded`` or the step's
  end), listed in ``pending_work`` and counted in ``waiting_ms``. ``suspended`` comes
  from the rule shared with ``loom runs`` and progress (``loom_core.waits.run_status``):
  from a run's own events a child run's state is unknown, so a parent whose child waits
  on a person stays ``running`` and lists the child (``sub_run``) it waits on, until
  :func:`lift_stats` (``family_stats``, what ``loom describe`` uses) adds the children's
  statistics: then it is ``suspended`` and lists the child's people, as ``loom runs``.
- The status follows the executor's fold (``loom_core.executor.evolve``): a pause shows
  as ``paused`` only over ``running`` (a pause while planning or in review keeps that
  status; the pause is still listed in ``pending_work`` and counted in ``paused_ms``), and
  ``needs_review`` lasts until the run ends (cancel is the way out).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from loom_core.contracts import (
    BranchTaken,
    EventReceived,
    EventRecord,
    EventWaitStarted,
    ForeachStarted,
    LoopIterationStarted,
    PlanAccepted,
    PlanIssue,
    PlanRejected,
    RunAdmitted,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunNeedsReview,
    RunPaused,
    RunQueued,
    RunRequested,
    RunUnpaused,
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
    SubRunRequested,
    TimerFired,
    TimerStarted,
    ToolCallCancelled,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolStep,
    Wait,
)
from loom_core.waits import WAIT_TIMER_PURPOSES, lift_children, run_status

__all__ = [
    "PendingWork",
    "RunStats",
    "RunStatus",
    "StepCounts",
    "StepOutcome",
    "StepStats",
    "TERMINAL_RUN_STATUSES",
    "run_stats",
]

RunStatus = Literal[
    "planning",
    "queued",
    "running",
    "suspended",
    "paused",
    "needs_review",
    "completed",
    "failed",
    "cancelled",
    "rejected",
]
_AGENT_CALL = re.compile(r"^(.+)/c\d+-\d+$")
StepOutcome = Literal["pending", "running", "succeeded", "failed", "skipped", "cancelled"]
TERMINAL_RUN_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled", "rejected"})
_FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "skipped", "cancelled"})
_WAIT_PURPOSES: frozenset[str] = WAIT_TIMER_PURPOSES


@dataclass(frozen=True, slots=True)
class StepCounts:
    """Step instances by outcome; ``total`` is their sum."""

    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    cancelled: int = 0
    running: int = 0
    pending: int = 0
    total: int = 0


@dataclass(frozen=True, slots=True)
class PendingWork:
    """One thing a live run waits on. ``kind``: planning, paused, needs_review, tool_call
    (in flight; ``since`` = requested at), timer (``until`` = fire_at), person (``ref``
    the suspension id, ``label`` its label, ``until`` its expiry), event (``ref``
    ``name:key``) or sub_run (``ref`` the child run id)."""

    kind: Literal[
        "planning", "paused", "needs_review", "tool_call", "timer", "person", "event", "sub_run"
    ]
    text: str
    step_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    ref: str | None = None
    label: str | None = None
    run_id: str | None = None  # set on a child run's person, listed on its parent


@dataclass(frozen=True, slots=True)
class StepStats:
    """One top-level step. ``status`` is ``not_started`` for a plan step with no event
    yet. ``attempts`` counts tool calls of the step and everything inside it (children,
    fallback); ``children`` counts the instances inside it (None when there are none);
    ``duration_ms`` runs from its first event to its outcome (None while unfinished or
    when skipped)."""

    id: str
    status: StepOutcome | Literal["not_started"]
    kind: str = ""
    tool: str = ""
    attempts: int = 0
    duration_ms: float | None = None
    children: StepCounts | None = None
    detail: str | None = None  # why it failed, was skipped or cancelled


@dataclass(frozen=True, slots=True)
class RunStats:
    """A run's statistics (see ``run_stats``).

    Counts are over step *instances* (``fe`` and ``fe/3/fetch`` are two): ``total`` is
    every instance seen (scheduled, or finished without being scheduled, e.g. skipped);
    ``running`` ones have started (StepStarted, a tool call, a composite's start or
    activity inside it) and not finished; ``pending`` ones are scheduled, or waiting for
    their next attempt, and not finished. ``planned`` is the number of top-level steps in
    the accepted plan. ``duration_ms`` is None until the run ends. ``running_ms`` sums
    tool-call attempts (tool-runner clock), ``queued_ms`` the time from each request to
    its tool starting, ``waiting_ms`` = ``timer_wait_ms`` (sleep and retry timers) +
    ``paused_ms`` + ``person_wait_ms`` + ``event_wait_ms`` + ``child_wait_ms``.
    ``pending_work`` is empty once the run has ended; ``waits`` is its part that
    ``loom runs`` and progress show too (people, timers, events, children)."""

    run_id: str
    status: RunStatus
    started_at: datetime
    ended_at: datetime | None
    duration_ms: float | None
    last_event_at: datetime
    events: int
    name: str = ""
    detail: str = ""  # why it failed / was rejected / cancelled, when it did
    planned: int = 0
    # step instances by outcome
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    cancelled: int = 0
    running: int = 0
    pending: int = 0
    total: int = 0
    # attempts
    attempts: int = 0
    retries: int = 0
    tool_calls_failed: int = 0
    # time accounting (ms, summed over work)
    running_ms: float = 0.0
    waiting_ms: float = 0.0  # the sum of the five waits below
    queued_ms: float = 0.0
    timer_wait_ms: float = 0.0
    paused_ms: float = 0.0
    person_wait_ms: float = 0.0
    event_wait_ms: float = 0.0
    child_wait_ms: float = 0.0
    pending_work: tuple[PendingWork, ...] = ()
    waits: tuple[Wait, ...] = ()
    per_step: tuple[StepStats, ...] = ()

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_RUN_STATUSES


def run_stats(records: Sequence[EventRecord], as_of: datetime | None = None) -> RunStats:
    """Statistics of one run from its events (any order; duplicates by ``seq`` are
    ignored). ``as_of`` ends the open intervals of a live run (default: its last event);
    it is ignored once the run has ended. Raises ValueError for no events or events of
    several runs."""
    if not records:
        raise ValueError("no events: a run's statistics need at least its first event")
    run_ids = {r.run_id for r in records}
    if len(run_ids) > 1:
        raise ValueError(
            f"events of several runs ({', '.join(sorted(run_ids))}): pass one run's events"
        )
    fold = _Fold(records[0].run_id)
    seen: set[int] = set()
    for record in sorted(records, key=lambda r: r.seq):
        if record.seq in seen:
            continue
        seen.add(record.seq)
        fold.apply(record)
    return fold.result(as_of)


# --------------------------------------------------------------------------- the fold


def _ms(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds() * 1000.0)


def _issue(issue: PlanIssue) -> str:
    return f": {issue.code} at {issue.path}: {issue.message}"


def _when(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds")


@dataclass(slots=True)
class _Instance:
    status: StepOutcome
    first_at: datetime
    end_at: datetime | None = None
    detail: str | None = None


@dataclass(slots=True)
class _Call:
    tool: str
    requested_at: datetime


@dataclass(slots=True)
class _Waiting:
    """A person, an external event or a child run waited on (one per step instance)."""

    kind: Literal["person", "event", "sub_run"]
    step_id: str
    ref: str
    since: datetime
    label: str = ""
    until: datetime | None = None
    pending: list[str] | None = None  # an event wait's names still awaited (name:key)


@dataclass(slots=True)
class _Timer:
    started_at: datetime
    fire_at: datetime
    purpose: str
    step_id: str | None
    fired_at: datetime | None = None


class _Fold:
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.status: RunStatus = "planning"
        self.name = ""
        self.detail = ""
        self.started_at: datetime | None = None
        self.ended_at: datetime | None = None
        self.last_at: datetime | None = None
        self.events = 0
        self.plan_steps: dict[str, tuple[str, str]] = {}  # top-level id -> (kind, tool)
        self.instances: dict[str, _Instance] = {}
        self.top_order: dict[str, None] = {}  # top-level ids in first-seen order
        self.top_attempts: dict[str, int] = {}
        self.calls: dict[tuple[str, int], _Call] = {}
        self.in_flight: dict[tuple[str, int], None] = {}
        self.timers: dict[str, _Timer] = {}
        self.attempts = 0
        self.retries = 0
        self.tool_calls_failed = 0
        self.running_ms = 0.0
        self.queued_ms = 0.0
        # pauses: closed intervals' total, and the open one
        self.paused_ms = 0.0
        self.paused_since: datetime | None = None
        self.paused_by = ""
        self.paused_reason = ""
        self.review: tuple[str, str, datetime] | None = None  # (step id, message, since)
        self.requested_at: datetime | None = None
        self.plan_accepted = False
        self.top_tool: dict[str, str] = {}  # top-level id -> tool it called
        # open waits on people / events / children, by (kind, step id); closed ones'
        # time by kind
        self.waiting: dict[tuple[str, str], _Waiting] = {}
        self.waited_ms: dict[str, float] = {"person": 0.0, "event": 0.0, "sub_run": 0.0}

    # ------------------------------------------------------------------ events

    def apply(self, record: EventRecord) -> None:
        at = record.at
        self.events += 1
        if self.started_at is None:
            self.started_at = at
        self.last_at = at
        match record.event:
            case RunRequested(plan=plan):
                self.requested_at = at
                if plan is not None and plan.name:
                    self.name = plan.name
            case PlanAccepted(plan=plan):
                self.name = plan.name or self.name
                for step in plan.steps:
                    tool = step.tool if isinstance(step, ToolStep) else ""
                    self.plan_steps[step.id] = (step.__struct_config__.tag, tool)  # type: ignore[assignment]  # msgspec types a tag str | int | None; every contract tag is a str
                self.plan_accepted = True
                if self.status == "planning":
                    self.status = "paused" if self.paused_since is not None else "running"
            case PlanRejected(issues=issues):
                first = _issue(issues[0]) if issues else ""
                self._end(at, "rejected", f"plan rejected ({len(issues)} issues){first}")
            case StepScheduled(step_id=sid):
                self._touch(sid, at)
                self._ancestors_run(sid)
            case StepStarted(step_id=sid):
                self._activate(sid, at)
            case ForeachStarted(step_id=sid) | LoopIterationStarted(step_id=sid):
                self._activate(sid, at)
            case BranchTaken(step_id=sid):
                self._activate(sid, at)
            case ToolCallRequested(step_id=sid, attempt=n, tool=tool):
                # an agent's call (``{step}/c{turn}-{k}``) is the agent step at work,
                # not an instance of its own: it has no step_* events to end it
                owner = _AGENT_CALL.match(sid)
                self._activate(owner[1] if owner and owner[1] in self.instances else sid, at)
                self.attempts += 1
                top = sid.split("/", 1)[0]
                self.top_attempts[top] = self.top_attempts.get(top, 0) + 1
                if sid == top:
                    self.top_tool.setdefault(top, tool)
                self.calls[(sid, n)] = _Call(tool=tool, requested_at=at)
                self.in_flight[(sid, n)] = None
            case ToolCallCompleted(step_id=sid, attempt=n, started_at=t0, finished_at=t1):
                self._tool_result(sid, n, at, t0, t1)
            case ToolCallFailed(step_id=sid, attempt=n, started_at=t0, finished_at=t1):
                self.tool_calls_failed += 1
                self._tool_result(sid, n, at, t0, t1)
            case ToolCallCancelled(step_id=sid, attempt=n):
                self.in_flight.pop((sid, n), None)
            case StepRetryScheduled(step_id=sid):
                self.retries += 1
                inst = self._touch(sid, at)
                if inst.status == "running":
                    inst.status = "pending"  # waiting for its next attempt
            case StepCompleted(step_id=sid):
                self._finish(sid, at, "succeeded")
            case StepFailed(step_id=sid, error=error):
                self._finish(sid, at, "failed", f"{error.code}: {error.message}")
            case StepSkipped(step_id=sid, reason=reason):
                self._finish(sid, at, "skipped", reason or None)
            case StepCancelled(step_id=sid, reason=reason):
                self._finish(sid, at, "cancelled", reason or None)
            case TimerStarted(timer_id=tid, fire_at=fire_at, purpose=purpose, step_id=sid):
                self.timers[tid] = _Timer(at, fire_at, purpose, sid)
                if sid is not None and purpose == "sleep":
                    self._activate(sid, at)
            case TimerFired(timer_id=tid):
                timer = self.timers.get(tid)
                if timer is not None and timer.fired_at is None:
                    timer.fired_at = at
            case StepSuspended(step_id=sid, suspension_id=ref, label=label, expires_at=until):
                self._activate(sid, at)
                self._close_wait("person", sid, at)  # an escalation replaces the first
                self._open_wait(_Waiting("person", sid, ref, at, label, until))
            case StepResumed(step_id=sid):
                self._close_wait("person", sid, at)
            case EventWaitStarted(step_id=sid, matches=matches):
                self._activate(sid, at)
                names = [f"{m.name}:{m.key}" for m in matches]
                self._open_wait(_Waiting("event", sid, ", ".join(names), at, pending=names))
            case EventReceived(step_id=sid, name=name):
                wait = self.waiting.get(("event", sid))
                if wait is not None and wait.pending is not None:
                    wait.pending = [n for n in wait.pending if n.split(":", 1)[0] != name]
                    if not wait.pending:
                        self._close_wait("event", sid, at)
            case SubRunRequested(step_id=sid, child_run_id=child):
                owner = _AGENT_CALL.match(sid)  # a delegate an agent called: the agent works
                self._activate(owner[1] if owner and owner[1] in self.instances else sid, at)
                self._open_wait(_Waiting("sub_run", sid, child, at))
            case SubRunEnded(step_id=sid):
                self._close_wait("sub_run", sid, at)
            case RunPaused(by=by, reason=reason):
                if not self._ended and self.paused_since is None:
                    self.paused_since, self.paused_by, self.paused_reason = at, by, reason
                    if self.status == "running":
                        self.status = "paused"
            case RunUnpaused():
                self._close_pause(at)
                if self.status == "paused":
                    self.status = "running"
            case RunQueued():
                if not self._ended and self.status in ("planning", "running"):
                    self.status = "queued"
            case RunAdmitted():
                if self.status == "queued":
                    self.status = "running" if self.plan_accepted else "planning"
            case RunNeedsReview(step_id=sid, error=error):
                if not self._ended:
                    self.review = (sid, f"{error.code}: {error.message}", at)
                    self.status = "needs_review"
            case RunCompleted():
                self._end(at, "completed", "")
            case RunFailed(error=error):
                self._end(at, "failed", f"{error.code}: {error.message}")
            case RunCancelled(by=by, reason=reason):
                self._end(at, "cancelled", f"cancelled by {by}" + (f": {reason}" if reason else ""))

    @property
    def _ended(self) -> bool:
        return self.ended_at is not None

    def _end(self, at: datetime, status: RunStatus, detail: str) -> None:
        if self._ended:
            return  # a malformed stream with two endings: the first one stands
        self.ended_at, self.status, self.detail = at, status, detail
        self._close_pause(at)
        for kind, sid in list(self.waiting):
            self._close_wait(kind, sid, at)

    def _close_pause(self, at: datetime) -> None:
        if self.paused_since is not None:
            self.paused_ms += _ms(self.paused_since, at)
            self.paused_since = None

    def _open_wait(self, wait: _Waiting) -> None:
        if not self._ended:
            self.waiting[(wait.kind, wait.step_id)] = wait

    def _close_wait(self, kind: str, sid: str, at: datetime) -> None:
        wait = self.waiting.pop((kind, sid), None)
        if wait is not None:
            self.waited_ms[kind] += _ms(wait.since, at)

    def _touch(self, sid: str, at: datetime) -> _Instance:
        inst = self.instances.get(sid)
        if inst is None:
            inst = self.instances[sid] = _Instance(status="pending", first_at=at)
            self.top_order.setdefault(sid.split("/", 1)[0], None)
        return inst

    def _activate(self, sid: str, at: datetime) -> None:
        inst = self._touch(sid, at)
        if inst.status not in _FINISHED:
            inst.status = "running"
        self._ancestors_run(sid)

    def _ancestors_run(self, sid: str) -> None:
        # Known ancestors (``fe`` and ``fe/3/inner`` of ``fe/3/inner/0/x``) are running
        # while anything inside them is: composites may have no StepStarted of their own.
        parts = sid.split("/")
        for cut in range(1, len(parts)):
            ancestor = self.instances.get("/".join(parts[:cut]))
            if ancestor is not None and ancestor.status == "pending":
                ancestor.status = "running"

    def _finish(
        self, sid: str, at: datetime, outcome: StepOutcome, detail: str | None = None
    ) -> None:
        inst = self._touch(sid, at)
        # A later outcome replaces an earlier one; nothing reopens a finished step.
        inst.status, inst.end_at, inst.detail = outcome, at, detail
        for kind in ("person", "event", "sub_run"):
            self._close_wait(kind, sid, at)  # a step that ended waits on nothing

    def _tool_result(
        self, sid: str, n: int, at: datetime, t0: datetime | None, t1: datetime | None
    ) -> None:
        self.in_flight.pop((sid, n), None)
        if t0 is not None and t1 is not None:
            self.running_ms += _ms(t0, t1)
        call = self.calls.get((sid, n))
        if call is not None and t0 is not None:
            self.queued_ms += _ms(call.requested_at, t0)

    # ------------------------------------------------------------------ result

    def result(self, as_of: datetime | None) -> RunStats:
        assert self.started_at is not None and self.last_at is not None
        if self.ended_at is not None:
            horizon = self.ended_at
        elif as_of is not None:
            horizon = max(as_of, self.last_at)
        else:
            horizon = self.last_at

        timer_wait = 0.0
        for timer in self.timers.values():
            if timer.purpose not in _WAIT_PURPOSES:
                continue
            ends = [horizon]
            if timer.fired_at is not None:
                ends.append(timer.fired_at)
            inst = self.instances.get(timer.step_id) if timer.step_id else None
            if inst is not None and inst.end_at is not None:
                ends.append(inst.end_at)
            timer_wait += _ms(timer.started_at, min(ends))
        paused = self.paused_ms
        if self.paused_since is not None:
            paused += _ms(self.paused_since, horizon)

        waited = dict(self.waited_ms)
        for wait in self.waiting.values():
            waited[wait.kind] += _ms(wait.since, horizon)
        pending = () if self._ended else tuple(self._pending_work())
        waits = tuple(w for item in pending for w in _as_waits(item))
        busy = any(w.kind == "tool_call" for w in pending)

        counts = _count(self.instances.values())
        return RunStats(
            run_id=self.run_id,
            status=run_status(self.status, waits, busy),  # type: ignore[arg-type]  # run_status returns a RUN_STATUSES word, a str to mypy
            started_at=self.started_at,
            ended_at=self.ended_at,
            duration_ms=_ms(self.started_at, self.ended_at) if self.ended_at else None,
            last_event_at=self.last_at,
            events=self.events,
            name=self.name,
            detail=self.detail,
            planned=len(self.plan_steps),
            succeeded=counts.succeeded,
            failed=counts.failed,
            skipped=counts.skipped,
            cancelled=counts.cancelled,
            running=counts.running,
            pending=counts.pending,
            total=counts.total,
            attempts=self.attempts,
            retries=self.retries,
            tool_calls_failed=self.tool_calls_failed,
            running_ms=self.running_ms,
            waiting_ms=timer_wait + paused + sum(waited.values()),
            queued_ms=self.queued_ms,
            timer_wait_ms=timer_wait,
            paused_ms=paused,
            person_wait_ms=waited["person"],
            event_wait_ms=waited["event"],
            child_wait_ms=waited["sub_run"],
            pending_work=pending,
            waits=waits,
            per_step=tuple(self._per_step()),
        )

    def _pending_work(self) -> list[PendingWork]:
        items: list[PendingWork] = []
        if not self.plan_accepted:
            items.append(PendingWork("planning", "waiting for a plan", since=self.requested_at))
        if self.paused_since is not None:
            why = f": {self.paused_reason}" if self.paused_reason else ""
            items.append(
                PendingWork("paused", f"paused by {self.paused_by}{why}", since=self.paused_since)
            )
        if self.review is not None:
            sid, message, since = self.review
            items.append(
                PendingWork("needs_review", f"needs review: step {sid}: {message}", sid, since)
            )
        work: list[PendingWork] = []
        for sid, n in self.in_flight:
            inst = self.instances.get(sid)
            if inst is not None and inst.status in _FINISHED:
                continue  # the run no longer waits on a call of a finished step
            call = self.calls[(sid, n)]
            work.append(
                PendingWork(
                    "tool_call",
                    f"step {sid}: tool {call.tool}, attempt {n}, in flight since "
                    f"{_when(call.requested_at)}",
                    sid,
                    since=call.requested_at,
                )
            )
        for tid, timer in self.timers.items():
            if timer.fired_at is not None or timer.purpose not in _WAIT_PURPOSES:
                continue
            inst = self.instances.get(timer.step_id) if timer.step_id else None
            if inst is not None and inst.status in _FINISHED:
                continue
            what = "sleeping" if timer.purpose == "sleep" else "retry"
            where = f"step {timer.step_id}: " if timer.step_id else ""
            work.append(
                PendingWork(
                    "timer",
                    f"{where}{what} timer fires at {_when(timer.fire_at)}",
                    timer.step_id,
                    since=timer.started_at,
                    until=timer.fire_at,
                    ref=tid,
                )
            )
        for wait in self.waiting.values():
            work.append(_pending(wait))
        last = self.last_at
        assert last is not None
        work.sort(key=lambda w: w.since or last)
        return items + work

    def _per_step(self) -> list[StepStats]:
        groups: dict[str, list[tuple[str, _Instance]]] = {}
        for sid, inst in self.instances.items():
            groups.setdefault(sid.split("/", 1)[0], []).append((sid, inst))
        out: list[StepStats] = []
        for top in {**dict.fromkeys(self.plan_steps), **self.top_order}:
            members = groups.get(top, [])
            own = next((inst for sid, inst in members if sid == top), None)
            inner = [inst for sid, inst in members if sid != top]
            kind, tool = self.plan_steps.get(top, ("", ""))
            tool = tool or self.top_tool.get(top, "")
            status: StepOutcome | Literal["not_started"] = (
                own.status if own is not None else "running" if inner else "not_started"
            )
            duration = None
            if own is not None and own.end_at is not None and own.status != "skipped":
                duration = _ms(own.first_at, own.end_at)
            out.append(
                StepStats(
                    id=top,
                    status=status,
                    kind=kind,
                    tool=tool,
                    attempts=self.top_attempts.get(top, 0),
                    duration_ms=duration,
                    children=_count(inner) if inner else None,
                    detail=own.detail if own is not None else None,
                )
            )
        return out


def _pending(wait: _Waiting) -> PendingWork:
    if wait.kind == "person":
        expires = f", expires {_when(wait.until)}" if wait.until else ""
        text = f"step {wait.step_id}: a person, label '{wait.label}' ({wait.ref}){expires}"
    elif wait.kind == "event":
        text = f"step {wait.step_id}: external events {', '.join(wait.pending or [])}"
    else:
        text = f"step {wait.step_id}: child run {wait.ref}"
    return PendingWork(
        wait.kind,
        text,
        wait.step_id,
        since=wait.since,
        until=wait.until,
        ref=wait.ref if wait.kind != "event" else ", ".join(wait.pending or []),
        label=wait.label or None,
    )


def _as_waits(item: PendingWork) -> list[Wait]:
    """The shared form (``loom_core.waits``) of one pending item: one wait per awaited
    event, none for what is not a wait (planning, pauses, reviews, tool calls)."""
    if item.kind not in ("person", "timer", "event", "sub_run"):
        return []
    refs = (item.ref or "").split(", ") if item.kind == "event" else [item.ref or ""]
    return [
        Wait(kind=item.kind, step_id=item.step_id or "", ref=ref, label=item.label or "",
             until=item.until)
        for ref in refs
    ]  # fmt: skip


# ----------------------------------------------------------------------- parents and children


def lift_stats(stats: RunStats, children: Mapping[str, RunStats]) -> RunStats:
    """``stats`` (a run's own events) seen with the statistics of the child runs it waits
    on (each already lifted, for grandchildren): the children's people join its waits
    and pending work, marked with their run, and its status follows
    ``waits.run_status`` with the children's statuses. The same rule and the same waits
    as ``loom runs`` (``waits.lift_summary``) and progress, so the three agree."""
    if not children or stats.status not in ("running", "suspended"):
        return stats
    waits = lift_children(stats.waits, {c: s.waits for c, s in children.items()})
    busy = any(p.kind == "tool_call" for p in stats.pending_work)
    status = run_status("running", waits, busy, {c: s.status for c, s in children.items()})
    work: list[PendingWork] = []
    for item in stats.pending_work:
        child = children.get(item.ref or "") if item.kind == "sub_run" else None
        if child is None:
            work.append(item)
            continue
        people = [p for p in child.pending_work if p.kind == "person"]
        asks = ", ".join(f"'{p.label}' ({_owner(p, item.ref)}: {p.ref})" for p in people)
        text = f"{item.text} ({child.status}" + (f", waiting on {asks})" if people else ")")
        work.append(replace(item, text=text))
        for p in people:
            owner = _owner(p, item.ref)
            work.append(replace(p, run_id=owner, text=f"child run {owner}: {p.text}"))
    return replace(stats, status=status, waits=tuple(waits), pending_work=tuple(work))  # type: ignore[arg-type]  # status is a RUN_STATUSES word, a str to mypy


def _owner(person: PendingWork, child: str | None) -> str:
    return person.run_id or child or ""


async def family_stats(
    run_id: str,
    events_of: Callable[[str], Awaitable[Sequence[EventRecord]]],
    as_of: datetime | None = None,
    max_depth: int = 8,
) -> RunStats | None:
    """``run_id``'s statistics lifted with the child runs it waits on (recursively, to
    ``max_depth``): what ``loom describe`` shows. ``events_of`` reads one run's events
    ([] when unknown: that child then counts as work in progress, as in a pure fold).
    None when ``run_id`` has no events."""

    async def lifted(rid: str, depth: int) -> RunStats | None:
        records = await events_of(rid)
        if not records:
            return None
        own = run_stats(records, as_of=as_of)
        children: dict[str, RunStats] = {}
        if depth < max_depth:
            for wait in own.waits:
                if wait.kind == "sub_run" and wait.ref not in children:
                    child = await lifted(wait.ref, depth + 1)
                    if child is not None:
                        children[wait.ref] = child
        return lift_stats(own, children)

    return await lifted(run_id, 0)


def _count(instances: Iterable[_Instance]) -> StepCounts:
    tally = dict.fromkeys(("succeeded", "failed", "skipped", "cancelled", "running", "pending"), 0)
    total = 0
    for inst in instances:
        tally[inst.status] += 1
        total += 1
    return StepCounts(**tally, total=total)
