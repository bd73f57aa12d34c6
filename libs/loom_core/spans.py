"""A run's trace, rebuilt from its events alone.

Design notes
- Pure: no clock, no I/O. Every timestamp comes from an event (the envelope's ``at``, or
  the tool-runner's ``started_at``/``finished_at``), every id from ``loom_core.ids``, so
  the same events (and the same :class:`TraceOptions`) always give byte-identical
  ``SpanRecord``s (docs/design.md decision 4).
- Incremental: ``TraceBuilder.apply`` touches only the spans one event is about, found by
  dict lookups, so its cost does not grow with the run's length. ``build_spans`` is just
  ``apply`` in a loop, which is why incremental and batch results agree by construction
  (and a property test checks it).
- Spans are frozen structs; a change makes a new version (``msgspec.structs.replace`` and
  a copied attribute dict) so versions already handed out never change under a caller.
- Redelivery is normal: an event whose ``seq`` is not past the last one applied is
  ignored (``apply`` returns ``[]``).
- Names follow the OpenTelemetry GenAI conventions: the run is ``invoke_workflow {name}``,
  each tool call ``execute_tool {tool}`` (kind client).

Tree (instance ids are paths, see ``loom_core.executor``)::

    invoke_workflow {plan name | run}     span_id(run, "run")      parent: the submitter's
    ├── plan                              span_id(run, "plan")     span (W3C traceparent)
    ├── step {id}   (fetch)               span_id(run, "step", "fetch")
    │   ├── attempt {n}                   span_id(run, "step", iid, "attempt", n)
    │   │   └── execute_tool {tool}       span_id(run, "step", iid, "attempt", n, "tool")
    │   │   └── chat {model}              span_id(run, "step", iid, "turn", n, "chat")
    │   │                                 (an agent step: one per model turn)
    │   ├── wait retry                    span_id(run, "step", iid, "retry", n)
    │   ├── step {fallback id}            the fallback ``fetch/fallback``
    │   └── wait suspension               span_id(run, "step", iid, "suspension", susp_id)
    ├── step {id}   (nap, a sleep step)
    │   └── wait sleep                    span_id(run, "step", iid, "sleep")
    └── step {id}   (fe, a foreach)
        └── item 3                        the element scope ``fe/3``
            └── step sq                   ``fe/3/sq``

Scopes are ``item {i}`` (foreach, reduce), ``iteration {k}`` (loop) and ``branch {name}``
(parallel; ``then``/``else`` of an if). A step skipped in a branch never taken hangs
under the nearest instance that has a span (the ``if`` step). Only tool steps have
attempt spans; other kinds' ``step_started`` only marks them running.

Choices (documented, tested)
- Retry backoff is a ``wait retry`` span under the step, from ``step_retry_scheduled``
  to its timer firing (or the next attempt starting), carrying the delay and the error
  that caused it; a sleep step's timer is a ``wait sleep`` span; a suspension (a person
  must answer) is a ``wait suspension`` span from ``step_suspended`` to ``step_resumed``
  (or its expiry). Waiting is therefore visible as time in the tree, not only as events.
- Cancelled steps, tool calls and runs keep status *unset* (cancelling is not a fault)
  with ``loom.step.status=cancelled`` (``loom.run.status`` for the run) and a span event
  ``cancelled`` carrying the reason.
- Pause/unpause are span events on the run span; the run span carries
  ``loom.run.paused_ms`` (the total) once it has been paused.
- ``run_needs_review`` is a span event ``needs_review`` (with the error) on the run span
  and on the step's span.
- Step inputs/outputs are captured only when ``TraceOptions.capture_io`` is set, as JSON
  strings in ``loom.step.input`` / ``loom.step.output``, secrets redacted (:func:`redact`)
  and truncated (:func:`capture_json`).

A span left open when its parent ends (an attempt whose step failed before a result, any
span still open when the run ends) is closed at that moment with ``loom.incomplete=true``
so a finished run's trace has no dangling span.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Any

import msgspec
from msgspec.structs import replace

from loom_core import ids, secrets, tenancy
from loom_core.contracts import (
    JSON,
    BranchTaken,
    ErrorInfo,
    EventReceived,
    EventRecord,
    EventWaitStarted,
    ForeachStarted,
    ForeachStep,
    IfStep,
    LoopIterationStarted,
    LoopStep,
    ModelAttempt,
    ModelCallCompleted,
    ModelCallFailed,
    ModelCallRequested,
    ModelOutputRefused,
    ParallelStep,
    Plan,
    PlanAccepted,
    PlanningRecord,
    PlanRejected,
    PlanRevised,
    ReduceStep,
    ReplanRefused,
    ReplanRequested,
    RunAdmitted,
    RunCancelled,
    RunCancelRequested,
    RunCompleted,
    RunDiverged,
    RunFailed,
    RunNeedsReview,
    RunPaused,
    RunQueued,
    RunRequested,
    RunSummary,
    RunUnpaused,
    SpanEvent,
    SpanRecord,
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
from loom_core.waits import WAIT_TIMER_PURPOSES, run_status

__all__ = [
    "DEFAULT_IO_LIMIT",
    "REDACTED",
    "TraceBuilder",
    "TraceOptions",
    "build_spans",
    "capture_json",
    "parse_traceparent",
    "redact",
    "span_category",
]

DEFAULT_IO_LIMIT = 4096
REDACTED = secrets.MARKER

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_DONE = frozenset({"completed", "failed", "skipped", "cancelled"})
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_MODEL_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "embeddings"})


@dataclass(frozen=True)
class TraceOptions:
    """What the builder adds beyond the event stream's shape. ``capture_io``: step inputs
    and outputs as attributes (redacted, truncated to ``io_limit`` bytes of JSON)."""

    capture_io: bool = False
    io_limit: int = DEFAULT_IO_LIMIT

    def __post_init__(self) -> None:
        if self.io_limit < 0:
            raise ValueError(f"io_limit must be >= 0 bytes, got {self.io_limit}")


# ----------------------------------------------------------------------------- trace context


def parse_traceparent(value: object) -> tuple[str, str] | None:
    """``(trace_id, parent span id)`` of a W3C ``traceparent`` header, or None when it is
    not valid: ``<version>-<32 hex>-<16 hex>-<2 hex>`` in lower case, version not ``ff``
    (``00`` has exactly these four fields; a later version may append ``-...``), neither
    id all zeros."""
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None:
        return None
    version, trace, span, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if not int(trace, 16) or not int(span, 16):
        return None
    return trace, span


# ----------------------------------------------------------------------------- redaction

# One list of secret-looking keys and credential patterns for the whole system:
# loom_core.secrets (its notes say what counts). Spans mask a secret key's whole value.
_secret_key = secrets.is_secret_key
_redact_text = secrets.scrub_text


def redact(value: Any) -> Any:
    """``value`` (JSON) with secrets masked: the value of any object key that names a
    secret (password, token, api key, authorization, cookie, credential, private key...;
    case-insensitive, anywhere in the key) becomes ``"[redacted]"`` (``null`` and ``""``
    stay: nothing to hide), and strings that look like credentials (bearer tokens,
    ``sk-...`` keys, JWTs, GitHub/Slack/AWS keys, passwords in URLs) are masked wherever
    they appear. Returns a new value; the input is not changed."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if _secret_key(k) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _redact_text(value)
    return value


def capture_json(value: Any, limit: int = DEFAULT_IO_LIMIT) -> str:
    """``value`` redacted and encoded as JSON, cut to ``limit`` bytes (never inside a
    UTF-8 character) with a ``…[truncated N bytes]`` marker saying how much was left out."""
    data = msgspec.json.encode(redact(msgspec.to_builtins(value)))
    if len(data) <= limit:
        return data.decode()
    kept = data[:limit].decode("utf-8", errors="ignore")
    return f"{kept}…[truncated {len(data) - len(kept.encode())} bytes]"


# ----------------------------------------------------------------------------- categories


def span_category(span: SpanRecord) -> str:
    """What a span stands for, for stores and queries: ``run``, ``plan``, ``step``,
    ``scope`` (foreach item, loop iteration, branch), ``attempt``, ``tool`` (a tool
    call), ``model`` (a model call: GenAI operation chat, text_completion,
    generate_content, embeddings), ``wait`` (retry backoff, sleep, suspension) or
    ``other``. Derived from the span alone, so a stored span can be re-classified."""
    attrs = span.attributes
    operation = attrs.get("gen_ai.operation.name")
    if operation == "invoke_workflow":
        return "run"
    if operation == "execute_tool":
        return "tool"
    if operation in _MODEL_OPERATIONS:
        return "model"
    if "loom.scope.kind" in attrs:
        return "scope"
    if "loom.step.kind" in attrs:
        return "step"
    name = span.name
    if name == "plan":
        return "plan"
    if name.startswith("attempt "):
        return "attempt"
    if name.startswith("wait "):
        return "wait"
    return "other"


# ----------------------------------------------------------------------------- builder


def _model_attrs(usage: Any, attempts: list[ModelAttempt]) -> dict[str, JSON]:
    return {
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
        "loom.cost_usd": usage.cost_usd,
        "loom.model.attempts": len(attempts),
        "loom.model.fallback": any(a.fallback and a.error is None for a in attempts),
    }


def _attempt_events(attempts: list[ModelAttempt], at: datetime) -> list[SpanEvent]:
    """A span event per failed attempt (a 429 before the fallback answered)."""
    return [
        SpanEvent(
            name="model_attempt_failed",
            at=at,
            attributes={
                "gen_ai.request.model": a.model,
                "gen_ai.provider.name": a.provider,
                "error.type": a.error.code,
                "loom.model.latency_ms": a.latency_ms,
            },
        )  # fmt: skip
        for a in attempts
        if a.error is not None
    ]


def _body(step: Step, key: str) -> list[Step] | None:
    """The sub-plan of composite ``step`` that scope key ``key`` names, if any."""
    match step:
        case ForeachStep(do=do) | ReduceStep(do=do) | LoopStep(do=do):
            return do if key.isdigit() else None
        case ParallelStep(branches=branches):
            return branches.get(key)
        case IfStep(then=then, else_=else_):
            return then if key == "then" else else_ if key == "else" else None
    return None


def _scope_description(owner: Step, key: str) -> tuple[str, dict[str, JSON]]:
    match owner:
        case ForeachStep() | ReduceStep():
            return f"item {key}", {"loom.scope.kind": "item", "loom.foreach.index": int(key)}
        case LoopStep():
            return f"iteration {key}", {
                "loom.scope.kind": "iteration",
                "loom.loop.iteration": int(key),
            }
    return f"branch {key}", {"loom.scope.kind": "branch", "loom.branch": key}


def _iso(at: datetime) -> str:
    return at.isoformat()


def _ms(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() * 1000.0


class TraceBuilder:
    """Folds one run's events into its span tree and summary.

    ``parent`` is the submitter's W3C context ``(trace_id, span_id)`` (lower-case hex,
    32 and 16 chars): the run then joins that trace under that span. Without it, the
    ``traceparent`` of the run's ``run_requested`` event is used when valid (an invalid
    one is ignored and kept in ``loom.traceparent_invalid``); without either the trace id
    derives from the run id."""

    def __init__(
        self,
        run_id: str,
        parent: tuple[str, str] | None = None,
        options: TraceOptions | None = None,
    ) -> None:
        self.run_id = run_id
        self.options = options or TraceOptions()
        self._fixed_parent = parent is not None
        self._root_parent: str | None
        if parent is not None:
            trace, span = parent
            if not _HEX32.match(trace) or not _HEX16.match(span) or not int(trace, 16):
                raise ValueError(
                    f"invalid parent trace context {parent!r}: expected (trace_id, span_id) "
                    "as lower-case hex of 32 and 16 chars, trace id not all zero "
                    "(the W3C traceparent fields)"
                )
            self.trace_id, self._root_parent = trace, span
        else:
            self.trace_id, self._root_parent = ids.trace_id(run_id), None
        # span id by path: a step's ids are asked for ~12 times over its 5 events, each
        # a sha256 (issue 10: a quarter of apply's cost); bounded by the spans held
        self._ids: dict[tuple[str, ...], str] = {}
        self._root_id = self._sid("run")
        self._plan_id = self._sid("plan")

        self._spans: dict[str, SpanRecord] = {}
        self._order: dict[str, int] = {}  # span id -> creation index (stable tie-break)
        self._open: dict[str, None] = {}  # insertion-ordered set of spans with no end
        self._changed: dict[str, SpanRecord] = {}  # spans touched by the current apply
        self._last_seq = 0
        # why the last apply could not build its spans (None: it could); see apply
        self.last_error: ErrorInfo | None = None

        # the plan, to name instances and tell their kind
        self._top: dict[str, Step] = {}
        self._bodies: dict[int, dict[str, Step]] = {}  # id(body list) -> steps by id
        # per instance (step or scope, by path): kind, latest status, the spans under it
        # that must be closed when it ends (attempts, tool calls, waits), open retry wait
        self._kind: dict[str, str] = {}
        self._status_of: dict[str, str] = {}
        self._under: dict[str, list[str]] = {}
        self._retry_wait: dict[str, str] = {}
        # timer id -> (purpose, instance, span the timer belongs to)
        self._timers: dict[str, tuple[str, str | None, str | None]] = {}
        self._suspension_span: dict[str, str] = {}  # suspension id -> span id
        self._event_wait: dict[str, str] = {}  # step instance -> its open "wait event" span

        # summary
        self._status = "pending"
        self._name = ""
        self._tenant = "default"  # the run's principal's: what scopes its queries
        self._queued = False  # waiting for a slot (run_queued until run_admitted)
        self._plan_seen = False
        self._started_at: datetime | None = None
        self._ended_at: datetime | None = None
        self._steps_total = 0
        self._steps_done = 0
        self._paused = False
        # what the run waits on (loom_core.waits): open suspensions by id, sleep/retry
        # timers by id, external events still awaited per step, running child runs
        self._people: dict[str, Wait] = {}
        self._wait_timers: dict[str, Wait] = {}
        self._awaited: dict[str, list[str]] = {}  # step instance -> ["name:key", ...]
        self._children: dict[str, str] = {}  # step instance -> child run id
        self._busy_tools = 0  # tool calls requested and not yet answered
        self._forked_from: str | None = None
        self._fork_facts: tuple[str, list[str], int] = ("", [], 0)  # from, edited, reused
        self._labels: dict[str, str] = {}
        self._paused_since: datetime | None = None
        self._paused_ms = 0.0
        self._pauses = 0

    def _sid(self, *path: str) -> str:
        """``ids.span_id(run, *path)``, computed once per path."""
        span_id = self._ids.get(path)
        if span_id is None:
            span_id = self._ids[path] = ids.span_id(self.run_id, *path)
        return span_id

    # ------------------------------------------------------------------ public API

    def apply(self, record: EventRecord) -> list[SpanRecord]:
        """Fold one event; return the current versions of the spans it created or
        changed (``[]`` for an event already applied)."""
        if record.run_id != self.run_id:
            raise ValueError(
                f"event {record.event_id} belongs to run {record.run_id!r}, not "
                f"{self.run_id!r}: use one TraceBuilder per run"
            )
        if record.seq <= self._last_seq:
            return []
        self._last_seq = record.seq
        self._changed = {}
        self.last_error = None
        at = record.at
        if self._root_id not in self._spans and not isinstance(record.event, RunRequested):
            # A stream that does not start with RunRequested (a truncated history):
            # anchor the tree at the first event seen rather than fail.
            self._create_root(at, {})
        try:
            self._dispatch(at, record.event)
        except Exception as exc:  # noqa: BLE001 - a bug met on one event
            # must not end the run's trace (nor, in the tracing service, hold other
            # runs): the failure is an event on the run's span, the fold goes on with
            # the next event. Deterministic: a rebuild records the same.
            self._build_failed(record, exc)
        self._show_suspended()
        return list(self._changed.values())

    def _build_failed(self, record: EventRecord, exc: Exception) -> None:
        what = f"{type(exc).__name__}: {exc}"[:300]
        self.last_error = ErrorInfo(
            code="span_build_failed",
            message=f"the spans of event {record.seq} ({record.kind}) of run {self.run_id} "
            f"could not be built ({what}); the trace goes on without them. A bug in span "
            "building: report it with the run's events (`loom show RUN -o jsonl`)",
            details={"run_id": self.run_id, "seq": record.seq, "kind": record.kind},
        )
        if self._root_id not in self._spans:
            self._create_root(record.at, {})
        attrs: dict[str, JSON] = {
            "loom.event.seq": record.seq,
            "loom.event.kind": record.kind,
            "error.type": type(exc).__name__,
            "error.message": what,
        }
        self._event(self._root_id, "span_build_failed", record.at, attrs)

    def spans(self) -> list[SpanRecord]:
        """Every span's current version, by start time then creation order."""
        order = self._order
        return sorted(self._spans.values(), key=lambda s: (s.start, order[s.span_id]))

    @property
    def last_seq(self) -> int:
        """The seq of the last event applied (0 before any)."""
        return self._last_seq

    @property
    def summary(self) -> RunSummary:
        duration = None
        if self._started_at is not None and self._ended_at is not None:
            duration = _ms(self._started_at, self._ended_at)
        waits = self.waits()
        return RunSummary(
            run_id=self.run_id,
            status=run_status(self._status, waits, self._busy_tools > 0),
            waiting={w.ref: w.label for w in waits if w.kind == "person"},
            waits=waits,
            tools_in_flight=self._busy_tools,
            forked_from=self._forked_from,
            fork_from_step=self._fork_facts[0],
            fork_edited=list(self._fork_facts[1]),
            fork_reused=self._fork_facts[2],
            labels=dict(self._labels),
            started_at=self._started_at,
            ended_at=self._ended_at,
            duration_ms=duration,
            name=self._name,
            tenant=self._tenant,
            steps_total=self._steps_total,
            steps_done=self._steps_done,
        )

    def _show_suspended(self) -> None:
        """The run span's ``loom.run.status`` says ``suspended`` when the run's summary
        does (``waits.run_status``; one person and one child decide it, so this costs
        the same for any number of waits). A parent waiting on a child is lifted where
        the child is known: the trace query (tracing service), as ``loom runs``."""
        if self._status != "running" or self._root_id not in self._spans:
            return
        if not self._people and not self._children:  # nothing to lift: shown as is
            if self._spans[self._root_id].attributes.get("loom.run.status") != "running":
                self._update(self._root_id, attrs={"loom.run.status": "running"})
            return
        probe = [*islice(self._people.values(), 1)]
        probe += [Wait(kind="sub_run", ref=c) for c in islice(self._children.values(), 1)]
        shown = run_status(self._status, probe, self._busy_tools > 0)
        if self._spans[self._root_id].attributes.get("loom.run.status") != shown:
            self._update(self._root_id, attrs={"loom.run.status": shown})

    def waits(self) -> list[Wait]:
        """What the run waits on now: people, timers, external events, child runs (the
        order of ``loom_core.waits.state_waits``)."""
        out = list(self._people.values())
        out += self._wait_timers.values()
        out += [
            Wait(kind="event", step_id=iid, ref=ref)
            for iid, refs in self._awaited.items()
            for ref in refs
        ]
        out += [Wait(kind="sub_run", step_id=iid, ref=c) for iid, c in self._children.items()]
        return out

    def _forget_waits(self, iid: str | None = None) -> None:
        """A step that ended (``iid``), or the whole run (None), waits on nothing."""
        for waits in (self._people, self._wait_timers):
            for key in [k for k, w in waits.items() if iid is None or w.step_id == iid]:
                del waits[key]
        for inner in (self._awaited, self._children):
            if iid is None:
                inner.clear()
            else:
                inner.pop(iid, None)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, at: datetime, event: Any) -> None:
        match event:
            # the events of every tool step first (the match tries cases in order; no
            # event class derives from another, so the order changes nothing else)
            case StepScheduled(step_id=iid):
                self._ensure_inst(iid, at)
                self._set_status(iid, "scheduled")
            case StepStarted(step_id=iid, attempt=n):
                self._on_step_started(at, iid, n)
            case ToolCallRequested():
                self._on_tool_requested(at, event)
                if self._agent_call(event.step_id):
                    self._update(self._step_id(event.step_id), name=f"call {event.tool}",
                                 attrs={"loom.step.kind": "agent_call",
                                        "loom.step.tool": event.tool})  # fmt: skip
            case ToolCallCompleted():
                self._on_tool_result(at, event, event.started_at, event.finished_at, None)
                if event.suspend is not None:
                    tool_id = self._tool_id(event.step_id, event.attempt)
                    self._update(tool_id, attrs={"loom.tool.suspend": event.suspend.label})
                if self._agent_call(event.step_id):  # a call has no step events: it ends here
                    self._end_inst(event.step_id, at, "completed", "ok")
            case StepCompleted(step_id=iid, output=output):
                attrs: dict[str, JSON] = {}
                if self.options.capture_io:
                    attrs["loom.step.output"] = capture_json(output, self.options.io_limit)
                if getattr(event, "reused_from", None):
                    attrs["loom.step.reused_from"] = event.reused_from
                self._end_agent_attempt(iid, at, None)
                self._end_inst(iid, at, "completed", "ok", attrs=attrs)
            case RunRequested():
                self._on_requested(at, event)
            case PlanAccepted():
                self._on_plan_accepted(at, event)
            case PlanRejected():
                self._on_plan_rejected(at, event)
            case ReplanRequested(attempt=n, step_id=sid, error=error):
                self._create(self._replan_id(n), f"replan {n}", at, self._root_id,
                             {"loom.replan.step": sid, "error.type": error.code})  # fmt: skip
            case PlanRevised(attempt=n) | ReplanRefused(attempt=n):
                self._on_replanned(at, event, n)
            case ModelCallRequested():
                self._on_model_requested(at, event)
            case ModelCallCompleted() | ModelCallFailed():
                self._on_model_result(at, event)
            case ModelOutputRefused(step_id=iid, error=error, call_id=call):
                attrs = {"error.type": error.code, "loom.model.turn": event.turn}
                if call:
                    attrs["loom.model.call"] = call
                self._event(self._ensure_inst(iid, at), "model_output_refused", at, attrs)
            case ToolCallFailed():
                self._on_tool_result(at, event, event.started_at, event.finished_at, event.error)
                if self._agent_call(event.step_id):
                    self._end_inst(event.step_id, at, "failed", "error",
                                   message=event.error.message,
                                   attrs={"error.type": event.error.code})  # fmt: skip
            case ToolCallCancelled():
                self._on_tool_cancelled(at, event)
                if self._agent_call(event.step_id):
                    self._end_inst(event.step_id, at, "cancelled", "unset")
            case StepRetryScheduled():
                self._on_retry_scheduled(at, event)
            case TimerStarted():
                self._on_timer_started(at, event)
            case TimerFired(timer_id=tid):
                self._on_timer_fired(at, tid)
            case ForeachStarted(step_id=iid, count=count, items=items):
                span = self._ensure_inst(iid, at)
                attrs = {"loom.foreach.count": count}
                if self.options.capture_io:
                    attrs["loom.step.input"] = capture_json(items, self.options.io_limit)
                self._update(span, attrs=attrs)
            case LoopIterationStarted(step_id=iid, iteration=k):
                self._update(self._ensure_inst(iid, at), attrs={"loom.loop.iterations": k + 1})
            case BranchTaken(step_id=iid, branch=branch):
                self._update(self._ensure_inst(iid, at), attrs={"loom.branch": branch})
            case EventWaitStarted(step_id=iid, matches=matches, mode=mode):
                span_id = self._sid("step", iid, "wait_event")
                if span_id not in self._spans:
                    attrs = {
                        "loom.step.id": iid,
                        "loom.wait.events": [f"{m.name}:{m.key}" for m in matches],
                        "loom.wait.mode": mode,
                    }
                    self._create(span_id, "wait event", at, self._ensure_inst(iid, at), attrs)
                    self._under_add(iid, span_id)
                    self._event_wait[iid] = span_id
                    self._awaited[iid] = [f"{m.name}:{m.key}" for m in matches]
            case EventReceived(step_id=iid, name=name, key=key, signal_id=sig):
                if iid in self._awaited:
                    left = [r for r in self._awaited[iid] if r.split(":", 1)[0] != name]
                    self._awaited[iid] = left
                    if not left:
                        del self._awaited[iid]
                if iid in self._event_wait:
                    received = {
                        "loom.event.name": name,
                        "loom.event.key": key,
                        "loom.signal.id": sig,
                    }
                    self._event(self._event_wait[iid], "event_received", at, received)
            case SubRunRequested(step_id=iid, child_run_id=child):
                self._update(self._ensure_inst(iid, at), attrs={"loom.child_run.id": child})
                self._children[iid] = child
                if self._agent_call(iid):  # a delegate an agent's model called
                    self._update(self._step_id(iid), name="call delegate",
                                 attrs={"loom.step.kind": "agent_call"})  # fmt: skip
            case SubRunEnded(step_id=iid, status=child_status):
                self._children.pop(iid, None)
                self._update(
                    self._ensure_inst(iid, at), attrs={"loom.child_run.status": child_status}
                )
                if self._agent_call(iid):  # a call has no step events: it ends here
                    ok = child_status == "completed" and event.error is None
                    self._end_inst(iid, at, "completed" if ok else "failed",
                                   "ok" if ok else "error")  # fmt: skip
            case StepSuspended():
                self._on_suspended(at, event)
            case StepResumed():
                self._on_resumed(at, event)
            case StepFailed(step_id=iid, error=error):
                self._end_agent_attempt(iid, at, error)
                self._end_inst(
                    iid, at, "failed", "error", error.message, {"error.type": error.code}
                )
            case StepSkipped(step_id=iid, reason=reason):
                self._end_inst(iid, at, "skipped", "unset", attrs={"loom.step.skip_reason": reason})
            case StepCancelled(step_id=iid, reason=reason):
                cancelled = SpanEvent(
                    name="cancelled", at=at, attributes={"loom.cancel.reason": reason}
                )
                self._end_inst(iid, at, "cancelled", "unset", events=[cancelled])
            case RunPaused(by=by, reason=reason):
                self._on_paused(at, by, reason)
            case RunUnpaused(by=by):
                self._on_unpaused(at, by)
            case RunQueued(queue=queue, priority=priority):
                self._queued = True
                if self._status in ("planning", "running"):
                    self._status = "queued"
                self._update(self._root_id, attrs={"loom.run.status": self._status})
                queued: dict[str, JSON] = {"loom.queue": queue, "loom.queue.priority": priority}
                self._event(self._root_id, "queued", at, queued)
            case RunAdmitted():
                self._queued = False
                if self._status == "queued":
                    self._status = "running" if self._plan_seen else "planning"
                    self._update(self._root_id, attrs={"loom.run.status": self._status})
                self._event(self._root_id, "admitted", at, {})
            case RunNeedsReview(step_id=iid, error=error):
                self._on_needs_review(at, iid, error)
            case RunCancelRequested(by=by, reason=reason):
                attrs = {"loom.cancel.by": by, "loom.cancel.reason": reason}
                self._event(self._root_id, "cancel_requested", at, attrs)
            case RunDiverged(seq=seq, message=message):
                self._status = "diverged"
                self._update(self._root_id, attrs={"loom.run.status": "diverged"})
                self._event(
                    self._root_id,
                    "diverged",
                    at,
                    {"loom.diverged.seq": seq, "loom.diverged.message": message},
                )
            case RunCompleted():
                self._end_run(at, "completed", "ok", "")
            case RunFailed(error=error):
                self._end_run(at, "failed", "error", error.message, {"error.type": error.code})
            case RunCancelled(by=by, reason=reason):
                cancelled = SpanEvent(
                    name="cancelled",
                    at=at,
                    attributes={"loom.cancel.by": by, "loom.cancel.reason": reason},
                )
                self._end_run(at, "cancelled", "unset", "", events=[cancelled])

    # ------------------------------------------------------------------ run and plan

    def _on_requested(self, at: datetime, ev: RunRequested) -> None:
        self._started_at = at
        self._status = "planning"
        if ev.fork is not None:
            self._forked_from = ev.fork.run_id
            self._fork_facts = (ev.fork.from_step, list(ev.fork.edited), len(ev.fork.reused))
        if ev.plan is not None and ev.plan.name:
            self._name = ev.plan.name
        self._labels = dict(ev.labels)
        attrs: dict[str, JSON] = {
            "gen_ai.operation.name": "invoke_workflow",
            "loom.run.id": self.run_id,
        }
        if ev.thread_id:
            attrs["gen_ai.conversation.id"] = ev.thread_id
        if ev.principal is not None:  # who the run acts for (never the token)
            attrs["enduser.id"] = ev.principal.user_id
            attrs["loom.tenant"] = ev.principal.tenant
            self._tenant = tenancy.run_tenant(ev.principal)
        attrs["loom.run.status"] = self._status
        fork = getattr(ev, "fork", None)
        if fork is not None:
            attrs["loom.fork.run_id"] = fork.run_id
            attrs["loom.fork.from_step"] = fork.from_step
            attrs["loom.fork.reused"] = len(fork.reused)
            if fork.edited:
                attrs["loom.fork.edited"] = list(fork.edited)
        if ev.traceparent and not self._fixed_parent:
            parsed = parse_traceparent(ev.traceparent)
            if parsed is None:
                attrs["loom.traceparent_invalid"] = ev.traceparent[:128]
            elif self._root_id not in self._spans:  # the trace id cannot change later
                self.trace_id, self._root_parent = parsed
        if self._root_id not in self._spans:
            self._create_root(at, attrs)
        else:  # unreachable in a seq-ordered stream (RunRequested is seq 1); be lenient
            self._update(self._root_id, attrs=attrs)

    def _create_root(self, at: datetime, attrs: dict[str, JSON]) -> None:
        base: dict[str, JSON] = {
            "gen_ai.operation.name": "invoke_workflow",
            "loom.run.id": self.run_id,
            "loom.run.status": self._status,
        }
        self._create(self._root_id, self._root_name(), at, self._root_parent, {**base, **attrs})
        self._create(self._plan_id, "plan", at, self._root_id, {})

    def _on_plan_accepted(self, at: datetime, ev: PlanAccepted) -> None:
        self._planning_span(at, ev.planning, ok=True)
        plan: Plan = ev.plan
        if plan.name:
            self._name = plan.name
        self._steps_total = len(plan.steps)
        self._top = {step.id: step for step in plan.steps}
        self._plan_seen = True
        self._status = "queued" if self._queued else "paused" if self._paused else "running"
        self._update(self._root_id, name=self._root_name(), attrs={"loom.run.status": self._status})
        self._update(
            self._plan_id,
            end=at,
            status="ok",
            attrs={"loom.plan.steps": len(plan.steps), "loom.planner": ev.planner},
        )

    def _replan_id(self, attempt: int) -> str:
        return self._sid("replan", str(attempt))

    def _on_replanned(self, at: datetime, ev: PlanRevised | ReplanRefused, n: int) -> None:
        """Re-planning ``n`` ended: its model calls as a ``chat`` span under it; a revised
        plan's new steps are described through it from now on."""
        ok = isinstance(ev, PlanRevised)
        self._planning_span(at, ev.planning, ok, parent=self._replan_id(n), key=f"replan{n}")
        self._update(self._replan_id(n), end=at, status="ok" if ok else "error")
        if isinstance(ev, PlanRevised):
            self._top = {step.id: step for step in ev.plan.steps}
            self._steps_total = len(ev.plan.steps)

    def _on_plan_rejected(self, at: datetime, ev: PlanRejected) -> None:
        self._planning_span(at, ev.planning, ok=False)
        issues = ev.issues
        first = f": {issues[0].path}: {issues[0].message}" if issues else ""
        message = f"plan rejected ({len(issues)} issue{'s' if len(issues) != 1 else ''}){first}"
        events = [
            SpanEvent(
                name="loom.plan.issue",
                at=at,
                attributes={
                    "loom.issue.code": i.code,
                    "loom.issue.path": i.path,
                    "loom.issue.message": i.message,
                },
            )
            for i in issues
        ]
        self._update(
            self._plan_id,
            end=at,
            status="error",
            message=message,
            attrs={"error.type": "plan_rejected"},
            events=events,
        )
        self._end_run(at, "rejected", "error", message, {"error.type": "plan_rejected"})

    def _on_paused(self, at: datetime, by: str, reason: str) -> None:
        if self._paused:
            return
        self._paused, self._paused_since = True, at
        self._pauses += 1
        if self._status == "running":
            self._status = "paused"
            self._update(self._root_id, attrs={"loom.run.status": "paused"})
        attrs: dict[str, JSON] = {"loom.paused.by": by}
        if reason:
            attrs["loom.paused.reason"] = reason
        self._event(self._root_id, "paused", at, attrs)

    def _on_unpaused(self, at: datetime, by: str) -> None:
        if not self._paused:
            return
        self._paused = False
        self._stop_pause_clock(at)
        attrs: dict[str, JSON] = {"loom.run.paused_ms": self._paused_ms}
        if self._status == "paused":
            self._status = "running"
            attrs["loom.run.status"] = "running"
        self._update(self._root_id, attrs=attrs)
        self._event(self._root_id, "unpaused", at, {"loom.unpaused.by": by})

    def _stop_pause_clock(self, at: datetime) -> None:
        if self._paused_since is not None:
            self._paused_ms += _ms(self._paused_since, at)
            self._paused_since = None

    def _on_needs_review(self, at: datetime, iid: str, error: ErrorInfo) -> None:
        self._status = "needs_review"
        attrs: dict[str, JSON] = {
            "loom.step.id": iid,
            "error.type": error.code,
            "loom.error.message": error.message,
        }
        self._update(self._root_id, attrs={"loom.run.status": "needs_review"})
        self._event(self._root_id, "needs_review", at, attrs)
        step_span = self._ensure_inst(iid, at)
        if self._status_of.get(iid) not in _DONE:
            self._set_status(iid, "needs_review")
        self._event(step_span, "needs_review", at, attrs)

    def _end_run(
        self,
        at: datetime,
        status: str,
        span_status: str,
        message: str,
        attrs: dict[str, JSON] | None = None,
        events: list[SpanEvent] | None = None,
    ) -> None:
        self._status = status
        self._ended_at = at
        self._forget_waits()
        # Close whatever is still open (children first: they were created later).
        for sid in reversed(list(self._open)):
            if sid != self._root_id:
                self._update(sid, end=at, attrs={"loom.incomplete": True})
        final: dict[str, JSON] = {"loom.run.status": status, **(attrs or {})}
        if self._pauses:
            self._stop_pause_clock(at)
            final["loom.run.paused_ms"] = self._paused_ms
        self._update(
            self._root_id,
            end=at,
            status=span_status,
            message=message,
            attrs=final,
            events=events,
        )

    def _root_name(self) -> str:
        return f"invoke_workflow {self._name or 'run'}"

    # ------------------------------------------------------------------ instances

    def _step_id(self, iid: str) -> str:
        return self._sid("step", iid)

    def _describe(self, iid: str) -> tuple[str, str, dict[str, JSON]]:
        """(kind, span name, attributes) of instance ``iid``, resolved through the plan:
        a step's kind is its plan tag, a child scope's kind is ``scope``."""
        parts = iid.split("/")
        steps: dict[str, Step] | None = self._top
        step: Step | None = None
        fallback_of: str | None = None
        for i, part in enumerate(parts):
            if step is None:
                step = steps.get(part) if steps is not None else None
                if step is None:
                    break
                fallback_of = None
            elif isinstance(step, ToolStep) and part == "fallback" and step.fallback is not None:
                fallback_of = "/".join(parts[:i])
                step = step.fallback
            else:
                body = _body(step, part)
                if body is None:
                    step = None
                    break
                if i == len(parts) - 1:
                    name, attrs = _scope_description(step, part)
                    return "scope", name, {"loom.step.id": iid, **attrs}
                steps = self._body_index(body)
                step = None
        if step is None:  # no plan yet (a truncated stream) or a path it does not name
            return "tool", f"step {parts[-1]}", {"loom.step.id": iid, "loom.step.kind": "tool"}
        kind: str = step.__struct_config__.tag  # type: ignore[assignment]  # a contract tag is always a str
        attrs = {"loom.step.id": iid, "loom.step.kind": kind}
        if isinstance(step, ToolStep):
            attrs["loom.step.tool"] = step.tool
        if fallback_of is not None:
            attrs["loom.step.fallback_of"] = fallback_of
        return kind, f"step {step.id}", attrs

    def _body_index(self, body: list[Step]) -> dict[str, Step]:
        index = self._bodies.get(id(body))
        if index is None:
            index = self._bodies[id(body)] = {s.id: s for s in body}
        return index

    def _parent_of(self, iid: str) -> str:
        """The span of the nearest enclosing instance that has one, else the run's."""
        head = iid
        while "/" in head:
            head = head.rpartition("/")[0]
            span_id = self._step_id(head)
            if span_id in self._spans:
                return span_id
        return self._root_id

    def _ensure_inst(self, iid: str, at: datetime) -> str:
        span_id = self._step_id(iid)
        if span_id not in self._spans:
            kind, name, attrs = self._describe(iid)
            self._kind[iid] = kind
            self._status_of[iid] = "scheduled"
            self._create(
                span_id, name, at, self._parent_of(iid), {**attrs, "loom.step.status": "scheduled"}
            )
        return span_id

    def _set_status(self, iid: str, status: str) -> None:
        if self._status_of.get(iid) != status:
            self._status_of[iid] = status
            self._update(self._step_id(iid), attrs={"loom.step.status": status})

    def _under_add(self, iid: str, span_id: str) -> None:
        self._under.setdefault(iid, []).append(span_id)

    def _end_inst(
        self,
        iid: str,
        at: datetime,
        status: str,
        span_status: str,
        message: str = "",
        attrs: dict[str, JSON] | None = None,
        events: list[SpanEvent] | None = None,
    ) -> None:
        # A skipped or cancelled step usually was never scheduled: its span is created
        # here, so it starts and ends at the same instant (zero duration).
        span_id = self._ensure_inst(iid, at)
        waited = self._event_wait.pop(iid, None)
        if waited is not None and waited in self._open:  # the wait ends with its step
            self._update(waited, end=at, status="ok" if status == "completed" else "error")
        # its attempts, tool calls and waits end with it (the latest first)
        for child in reversed(self._under.pop(iid, [])):
            if child in self._open:
                self._update(child, end=at, attrs={"loom.incomplete": True})
        self._retry_wait.pop(iid, None)
        self._forget_waits(iid)
        if "/" not in iid and self._status_of.get(iid) not in _DONE:
            self._steps_done += 1
        self._status_of[iid] = status
        self._update(
            span_id,
            end=at,
            status=span_status,
            message=message,
            attrs={"loom.step.status": status, **(attrs or {})},
            events=events,
        )

    def _on_step_started(self, at: datetime, iid: str, n: int) -> None:
        self._ensure_inst(iid, at)
        self._end_retry_wait(iid, at)
        if self._kind.get(iid) in ("tool", "agent"):
            self._ensure_attempt(iid, n, at)
        self._set_status(iid, "running")

    # ------------------------------------------------------------------ model turns

    def _end_agent_attempt(self, iid: str, at: datetime, error: ErrorInfo | None) -> None:
        """An agent step's one attempt ends with the step (its turns are inside it)."""
        if self._kind.get(iid) != "agent":
            return
        attempt_id = self._attempt_id(iid, 1)
        if attempt_id not in self._open:
            return
        if error is None:
            self._update(attempt_id, end=at, status="ok")
        else:
            self._update(attempt_id, end=at, status="error", message=error.message,
                         attrs={"error.type": error.code})  # fmt: skip

    def _agent_call(self, iid: str) -> bool:
        """A tool call an agent step's model asked for (``{agent}/c{turn}-{k}``)."""
        head = iid.rpartition("/")[0]
        return bool(head) and self._kind.get(head) == "agent"

    def _chat_id(self, iid: str, turn: int) -> str:
        return self._sid("step", iid, "turn", str(turn), "chat")

    def _on_model_requested(self, at: datetime, ev: ModelCallRequested) -> None:
        iid = ev.step_id
        attempt_id = self._ensure_attempt(iid, 1, at)
        span_id = self._chat_id(iid, ev.turn)
        if span_id in self._spans:
            return
        model = ev.model or "default"
        attrs: dict[str, JSON] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model,
            "loom.model.turn": ev.turn,
            "loom.idempotency_key": ev.idempotency_key,
        }
        self._create(span_id, f"chat {model}", at, attempt_id, attrs, kind="client")
        self._under_add(iid, span_id)

    def _on_model_result(self, at: datetime, ev: ModelCallCompleted | ModelCallFailed) -> None:
        iid = ev.step_id
        span_id = self._chat_id(iid, ev.turn)
        if span_id not in self._spans:
            self._create(span_id, "chat", ev.started_at or at, self._ensure_attempt(iid, 1, at),
                         {"gen_ai.operation.name": "chat"}, kind="client")  # fmt: skip
            self._under_add(iid, span_id)
        requested = self._spans[span_id].attributes.get("gen_ai.request.model")
        if requested == "default" and ev.attempts:  # the model the planner resolved it to
            requested = ev.attempts[0].model
        attrs = {**_model_attrs(ev.usage, ev.attempts), "gen_ai.request.model": requested}
        events = _attempt_events(ev.attempts, ev.finished_at or at)
        if isinstance(ev, ModelCallCompleted):
            attrs.update({
                "gen_ai.provider.name": ev.provider,
                "gen_ai.response.model": ev.model,
                "gen_ai.response.finish_reasons": [ev.finish_reason] if ev.finish_reason else [],
                "loom.model.tool_calls": len(ev.message.tool_calls),
            })  # fmt: skip
            self._update(span_id, name=f"chat {requested}", start=ev.started_at,
                         end=ev.finished_at, status="ok", attrs=attrs, events=events)  # fmt: skip
        else:
            attrs["error.type"] = ev.error.code
            self._update(span_id, name=f"chat {requested}", start=ev.started_at,
                         end=ev.finished_at or at, status="error", message=ev.error.message,
                         attrs=attrs, events=events)  # fmt: skip

    def _planning_span(
        self,
        at: datetime,
        planning: PlanningRecord | None,
        ok: bool,
        parent: str | None = None,
        key: str = "plan",
    ) -> None:
        """The model calls that planned the run: one ``chat`` span under ``plan`` (or
        under a re-planning's span)."""
        if planning is None:
            return
        parent = parent or self._plan_id
        span_id = self._sid(key, "chat")
        if span_id in self._spans:
            return
        start = self._spans[parent].start if parent in self._spans else at
        attrs: dict[str, JSON] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": planning.model,
            "gen_ai.response.model": planning.model,
            "loom.prompt.id": planning.prompt_id,
            "loom.plan.repairs": len(planning.repairs),
            **_model_attrs(planning.usage, planning.attempts),
        }
        self._create(span_id, f"chat {planning.model}", start, parent, attrs, "client")
        self._update(span_id, end=at, status="ok" if ok else "error",
                     events=_attempt_events(planning.attempts, at))  # fmt: skip

    # ------------------------------------------------------------------ attempts

    def _attempt_id(self, iid: str, n: int) -> str:
        return self._sid("step", iid, "attempt", str(n))

    def _tool_id(self, iid: str, n: int) -> str:
        return self._sid("step", iid, "attempt", str(n), "tool")

    def _ensure_attempt(self, iid: str, n: int, at: datetime) -> str:
        step_span = self._ensure_inst(iid, at)
        span_id = self._attempt_id(iid, n)
        if span_id not in self._spans:
            self._create(
                span_id, f"attempt {n}", at, step_span, {"loom.step.id": iid, "loom.attempt": n}
            )
            self._under_add(iid, span_id)
            self._update(step_span, attrs={"loom.step.attempts": n})
        return span_id

    def _tool_attrs(self, key: str, n: int) -> dict[str, JSON]:
        return {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.call.id": key,
            "loom.idempotency_key": key,
            "loom.attempt": n,
        }

    def _on_tool_requested(self, at: datetime, ev: ToolCallRequested) -> None:
        self._busy_tools += 1
        iid, n = ev.step_id, ev.attempt
        attempt_id = self._ensure_attempt(iid, n, at)
        self._set_status(iid, "running")
        if self.options.capture_io:
            self._update(
                self._step_id(iid),
                attrs={"loom.step.input": capture_json(ev.input, self.options.io_limit)},
            )
        tool_id = self._tool_id(iid, n)
        attrs = {"gen_ai.tool.name": ev.tool, **self._tool_attrs(ev.idempotency_key, n)}
        if tool_id not in self._spans:
            # In flight: the request time stands in for the start until the result
            # brings the tool-runner's own clock.
            self._create(tool_id, f"execute_tool {ev.tool}", at, attempt_id, attrs, kind="client")
            self._under_add(iid, tool_id)
        else:
            self._update(tool_id, name=f"execute_tool {ev.tool}", attrs=attrs)

    def _on_tool_result(
        self,
        at: datetime,
        ev: ToolCallCompleted | ToolCallFailed,
        started_at: datetime | None,
        finished_at: datetime | None,
        error: ErrorInfo | None,
    ) -> None:
        self._busy_tools = max(0, self._busy_tools - 1)
        iid, n = ev.step_id, ev.attempt
        attempt_id = self._ensure_attempt(iid, n, at)
        tool_id = self._tool_id(iid, n)
        if tool_id not in self._spans:  # result without a recorded request
            self._create(
                tool_id,
                "execute_tool",
                started_at or at,
                attempt_id,
                self._tool_attrs(ev.idempotency_key, n),
                kind="client",
            )
            self._under_add(iid, tool_id)
        end = finished_at or at
        transitions = ev.breaker if isinstance(ev, ToolCallCompleted) else []
        if error is not None and isinstance(error.details.get("breaker"), list):
            transitions = error.details["breaker"]
        if transitions:  # circuit-breaker state changes during this call
            self._update(tool_id, events=_breaker_events(transitions, end))
        if error is None:
            self._update(tool_id, start=started_at, end=end, status="ok")
            self._update(attempt_id, end=at, status="ok")
        else:
            err = {"error.type": error.code}
            self._update(
                tool_id, start=started_at, end=end, status="error", message=error.message, attrs=err
            )
            self._update(attempt_id, end=at, status="error", message=error.message, attrs=err)

    def _on_tool_cancelled(self, at: datetime, ev: ToolCallCancelled) -> None:
        self._busy_tools = max(0, self._busy_tools - 1)
        """The executor told the tool-runner to stop: the call and its attempt end now
        (a late result is ignored by the executor, so none will follow)."""
        event = SpanEvent(name="cancelled", at=at, attributes={"loom.cancel.reason": ev.reason})
        tool_id = self._tool_id(ev.step_id, ev.attempt)
        if tool_id in self._open:
            self._update(tool_id, end=at, attrs={"loom.tool.cancelled": True}, events=[event])
        attempt_id = self._attempt_id(ev.step_id, ev.attempt)
        if attempt_id in self._open:
            self._update(attempt_id, end=at, attrs={"loom.tool.cancelled": True})

    # ------------------------------------------------------------------ waits

    def _on_retry_scheduled(self, at: datetime, ev: StepRetryScheduled) -> None:
        iid = ev.step_id
        step_span = self._ensure_inst(iid, at)
        self._end_retry_wait(iid, at)
        span_id = self._sid("step", iid, "retry", str(ev.attempt))
        if span_id not in self._spans:
            attrs: dict[str, JSON] = {
                "loom.step.id": iid,
                "loom.retry.attempt": ev.attempt,
                "loom.retry.delay_s": ev.delay_s,
                "loom.retry.error": ev.error.code,
            }
            self._create(span_id, "wait retry", at, step_span, attrs)
            self._under_add(iid, span_id)
            self._retry_wait[iid] = span_id
        self._set_status(iid, "retry_wait")

    def _end_retry_wait(self, iid: str, at: datetime) -> None:
        span_id = self._retry_wait.pop(iid, None)
        if span_id is not None and span_id in self._open:
            self._update(span_id, end=at)

    def _on_timer_started(self, at: datetime, ev: TimerStarted) -> None:
        iid, purpose, fire_at = ev.step_id, ev.purpose, _iso(ev.fire_at)
        span_id: str | None = None
        if purpose == "retry" and iid is not None:
            span_id = self._retry_wait.get(iid)
            if span_id is not None:
                self._update(
                    span_id, attrs={"loom.timer.id": ev.timer_id, "loom.timer.fire_at": fire_at}
                )
        elif purpose == "sleep" and iid is not None:
            step_span = self._ensure_inst(iid, at)
            span_id = self._sid("step", iid, "sleep")
            if span_id not in self._spans:
                attrs: dict[str, JSON] = {
                    "loom.step.id": iid,
                    "loom.timer.id": ev.timer_id,
                    "loom.timer.fire_at": fire_at,
                    "loom.sleep.seconds": _ms(at, ev.fire_at) / 1000.0,
                }
                self._create(span_id, "wait sleep", at, step_span, attrs)
                self._under_add(iid, span_id)
        elif purpose == "step_timeout" and iid is not None:
            span_id = self._ensure_inst(iid, at)
            self._update(span_id, attrs={"loom.step.timeout_at": fire_at})
        elif purpose == "run_timeout":
            span_id = self._root_id
            self._update(span_id, attrs={"loom.run.timeout_at": fire_at})
        elif purpose == "suspension_expiry":
            # the timer id is "{suspension id}:expiry"
            span_id = self._suspension_span.get(ev.timer_id.rpartition(":")[0])
        self._timers[ev.timer_id] = (purpose, iid, span_id)
        if purpose in WAIT_TIMER_PURPOSES:
            self._wait_timers[ev.timer_id] = Wait(
                kind="timer", step_id=iid or "", ref=ev.timer_id, until=ev.fire_at
            )

    def _on_timer_fired(self, at: datetime, timer_id: str) -> None:
        purpose, iid, span_id = self._timers.pop(timer_id, ("", None, None))
        self._wait_timers.pop(timer_id, None)
        if span_id is None:
            return
        if purpose in ("retry", "sleep"):
            if span_id in self._open:
                self._update(span_id, end=at)
            if purpose == "retry" and iid is not None and self._retry_wait.get(iid) == span_id:
                del self._retry_wait[iid]
        elif purpose == "step_timeout":
            self._event(span_id, "step_timeout", at, {})
        elif purpose == "run_timeout":
            self._event(span_id, "run_timeout", at, {})
        elif purpose == "suspension_expiry" and span_id in self._open:
            self._people.pop(timer_id.rpartition(":")[0], None)
            expired = SpanEvent(name="expired", at=at)
            self._update(span_id, end=at, attrs={"loom.suspension.expired": True}, events=[expired])

    def _on_suspended(self, at: datetime, ev: StepSuspended) -> None:
        iid = ev.step_id
        step_span = self._ensure_inst(iid, at)
        span_id = self._sid("step", iid, "suspension", ev.suspension_id)
        if span_id not in self._spans:
            attrs: dict[str, JSON] = {
                "loom.step.id": iid,
                "loom.suspension.id": ev.suspension_id,
                "loom.suspension.label": ev.label,
            }
            if ev.expires_at is not None:
                attrs["loom.suspension.expires_at"] = _iso(ev.expires_at)
            if self.options.capture_io and ev.payload is not None:
                attrs["loom.suspension.payload"] = capture_json(ev.payload, self.options.io_limit)
            self._create(span_id, "wait suspension", at, step_span, attrs)
            self._under_add(iid, span_id)
            self._suspension_span[ev.suspension_id] = span_id
        self._people[ev.suspension_id] = Wait(
            kind="person",
            step_id=iid,
            ref=ev.suspension_id,
            label=ev.label,
            until=ev.expires_at,
        )
        self._set_status(iid, "suspended")

    def _on_resumed(self, at: datetime, ev: StepResumed) -> None:
        self._people.pop(ev.suspension_id, None)
        span_id = self._suspension_span.get(ev.suspension_id)
        if span_id is None or span_id not in self._open:
            return
        attrs: dict[str, JSON] = {"loom.suspension.resumed_by": ev.by}
        if self.options.capture_io:
            attrs["loom.suspension.answer"] = capture_json(ev.data, self.options.io_limit)
        self._update(span_id, end=at, status="ok", attrs=attrs)
        self._set_status(ev.step_id, "running")

    # ------------------------------------------------------------------ span plumbing

    def _create(
        self,
        span_id: str,
        name: str,
        start: datetime,
        parent: str | None,
        attrs: dict[str, JSON],
        kind: str = "internal",
    ) -> None:
        if self._tenant != "default":  # a tenant's span says whose it is (OTLP backends)
            attrs = {**attrs, "loom.tenant": self._tenant}
        span = SpanRecord(
            trace_id=self.trace_id,
            span_id=span_id,
            run_id=self.run_id,
            name=name,
            start=start,
            parent_span_id=parent,
            kind=kind,  # type: ignore[arg-type]  # a step kind tag, a str to mypy; the Literal lists them
            attributes=attrs,
        )
        self._order[span_id] = len(self._order)
        self._open[span_id] = None
        self._put(span)

    def _event(self, span_id: str, name: str, at: datetime, attrs: dict[str, JSON]) -> None:
        self._update(span_id, events=[SpanEvent(name=name, at=at, attributes=attrs)])

    def _update(
        self,
        span_id: str,
        *,
        name: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        status: str | None = None,
        message: str | None = None,
        attrs: dict[str, JSON] | None = None,
        events: list[SpanEvent] | None = None,
    ) -> None:
        """Make a new version of a span with the given fields changed (none if nothing
        actually differs, so ``apply`` reports only real changes)."""
        span = self._spans[span_id]
        changes: dict[str, Any] = {}
        if name is not None and name != span.name:
            changes["name"] = name
        if start is not None and start != span.start:
            changes["start"] = start
        if end is not None:
            self._open.pop(span_id, None)
            if end != span.end:
                changes["end"] = end
        if status is not None and status != span.status:
            changes["status"] = status
        if message and message != span.status_message:
            changes["status_message"] = message
        if attrs and any(span.attributes.get(k, _MISSING) != v for k, v in attrs.items()):
            changes["attributes"] = {**span.attributes, **attrs}
        if events:
            changes["events"] = [*span.events, *events]
        if changes:
            self._put(replace(span, **changes))

    def _put(self, span: SpanRecord) -> None:
        self._spans[span.span_id] = span
        self._changed[span.span_id] = span


_MISSING = object()


def _breaker_events(transitions: list[Any], default_at: datetime) -> list[SpanEvent]:
    """Span events ``breaker.<state>`` from the transitions a tool call reported (their
    ``at`` is the tool-runner's clock; an unreadable one falls back to the call's end)."""
    events = []
    for t in transitions[:16]:
        if not isinstance(t, dict):
            continue
        try:
            at = datetime.fromisoformat(str(t.get("at")))
        except ValueError:
            at = default_at
        events.append(
            SpanEvent(
                name=f"breaker.{t.get('to', 'unknown')}",
                at=at,
                attributes={
                    "loom.breaker.name": str(t.get("breaker", "")),
                    "loom.breaker.from": str(t.get("from", "")),
                    "loom.breaker.to": str(t.get("to", "")),
                    "loom.breaker.failures": t.get("failures", 0),
                },
            )
        )
    return events


def build_spans(
    records: Iterable[EventRecord],
    parent: tuple[str, str] | None = None,
    options: TraceOptions | None = None,
) -> list[SpanRecord]:
    """The span tree of one run's events (in ``seq`` order), as ``TraceBuilder.spans``."""
    builder: TraceBuilder | None = None
    for record in records:
        if builder is None:
            builder = TraceBuilder(record.run_id, parent, options)
        builder.apply(record)
    return builder.spans() if builder is not None else []
