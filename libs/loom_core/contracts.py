"""Every message and event agentloom stores or sends, in one module.

Design notes
- Each Struct has an explicit, stable ``tag``: renaming a class never breaks a stored
  stream or a client in another language. ``proto/`` is generated from this module
  (``python -m loom_core.proto_gen``) and a test fails when it is stale.
- Inbound, user-written structures (run requests, plans, steps) forbid unknown fields so
  a typo (``depend_on``) is an error naming its path, not a silently ignored key.
- Stored events allow unknown fields: a newer writer may add optional fields and older
  readers keep working. ``EventRecord.schema_version`` says which shape was written;
  upcasting lives in ``loom_core.codec``.
- Time never comes from this module: timestamps are fields filled by the caller.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

JSON = Any  # any JSON value; kept as an alias so schemas read as intent

SCHEMA_VERSION = 1


class Inbound(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """Base for structures users write by hand (plans, requests)."""


class Record(msgspec.Struct, omit_defaults=True, frozen=True):
    """Base for structures the system writes (events, replies)."""


# --------------------------------------------------------------------------- errors


class ErrorInfo(Record, tag="error", tag_field="type"):
    """A typed error: ``code`` is stable and machine-readable, ``message`` says how to fix,
    ``path`` is the JSON path of the offending part of the input when there is one."""

    code: str
    message: str
    path: str | None = None
    retryable: bool = False
    details: dict[str, JSON] = {}


class PlanIssue(Record, tag="plan_issue", tag_field="type"):
    """One reason a plan was rejected. Codes: unknown_tool, dependency_cycle,
    missing_step, missing_field, duplicate_step_id, invalid_input, invalid_template,
    missing_input, invalid_plan, no_model_configured."""

    code: str
    path: str
    message: str


# --------------------------------------------------------------------------- plans


class ToolStep(Inbound, tag="tool", tag_field="kind"):
    """Call one tool. ``input`` values may hold templates such as
    ``{{ input.city }}`` or ``{{ steps.fetch.output.title }}``."""

    id: str
    tool: str
    input: dict[str, JSON] = {}
    depends_on: list[str] = []
    timeout_s: float | None = None
    description: str = ""


# Later step kinds (foreach, parallel, conditional, ...) join this union; each carries
# ``id`` and ``depends_on`` so the DAG logic stays the same.
Step = ToolStep


class Plan(Inbound, tag="plan", tag_field="type"):
    """A validated plan is a DAG of steps. ``output`` is a template rendered when every
    step is done; when absent the run's output maps each sink step to its output."""

    steps: list[Step]
    output: JSON = None
    name: str = ""
    version: Literal[1] = 1


# --------------------------------------------------------------------------- tools


class ToolSpec(Record, tag="tool_spec", tag_field="type"):
    """What the tool-runner publishes about a tool (in the ``loom_tools`` KV bucket)."""

    name: str
    description: str
    input_schema: dict[str, JSON]
    output_schema: dict[str, JSON]
    idempotent: bool = True
    timeout_s: float = 30.0


# --------------------------------------------------------------------------- submit


class RunRequest(Inbound, tag="run_request", tag_field="type"):
    """Published (request/reply) on ``loom.submit``. Give either ``plan`` or
    ``request`` (natural language, needs a model). ``run_id`` makes submission
    idempotent: submitting the same id twice returns the existing run."""

    plan: Plan | None = None
    request: str | None = None
    input: dict[str, JSON] = {}
    run_id: str | None = None
    thread_id: str | None = None
    labels: dict[str, str] = {}


class SubmitAccepted(Record, tag="submit_accepted", tag_field="type"):
    run_id: str
    existing: bool = False


class SubmitRejected(Record, tag="submit_rejected", tag_field="type"):
    error: ErrorInfo


SubmitReply = SubmitAccepted | SubmitRejected


# --------------------------------------------------------------------------- run events
# Past tense, one per fact. Every event belongs to exactly one run; the envelope
# (EventRecord) carries the run id, the position and the time.


class RunRequested(Record, tag="run_requested", tag_field="type"):
    plan: Plan | None = None
    request: str | None = None
    input: dict[str, JSON] = {}
    thread_id: str | None = None
    labels: dict[str, str] = {}


class PlanAccepted(Record, tag="plan_accepted", tag_field="type"):
    plan: Plan
    planner: str = "explicit"


class PlanRejected(Record, tag="plan_rejected", tag_field="type"):
    issues: list[PlanIssue]


class StepScheduled(Record, tag="step_scheduled", tag_field="type"):
    step_id: str


class StepStarted(Record, tag="step_started", tag_field="type"):
    step_id: str
    attempt: int


class ToolCallRequested(Record, tag="tool_call_requested", tag_field="type"):
    """The command to the tool-runner (requests are events). ``input`` is already
    rendered; ``idempotency_key`` is ``{run_id}:{step_id}:{attempt}``."""

    step_id: str
    attempt: int
    tool: str
    input: dict[str, JSON]
    idempotency_key: str
    timeout_s: float | None = None


class ToolCallCompleted(Record, tag="tool_call_completed", tag_field="type"):
    step_id: str
    attempt: int
    idempotency_key: str
    output: JSON
    started_at: datetime
    finished_at: datetime


class ToolCallFailed(Record, tag="tool_call_failed", tag_field="type"):
    step_id: str
    attempt: int
    idempotency_key: str
    error: ErrorInfo
    started_at: datetime | None = None
    finished_at: datetime | None = None


class StepCompleted(Record, tag="step_completed", tag_field="type"):
    step_id: str
    output: JSON


class StepFailed(Record, tag="step_failed", tag_field="type"):
    step_id: str
    error: ErrorInfo


class StepSkipped(Record, tag="step_skipped", tag_field="type"):
    step_id: str
    reason: str


class RunCompleted(Record, tag="run_completed", tag_field="type"):
    output: JSON


class RunFailed(Record, tag="run_failed", tag_field="type"):
    error: ErrorInfo


RunEvent = (
    RunRequested
    | PlanAccepted
    | PlanRejected
    | StepScheduled
    | StepStarted
    | ToolCallRequested
    | ToolCallCompleted
    | ToolCallFailed
    | StepCompleted
    | StepFailed
    | StepSkipped
    | RunCompleted
    | RunFailed
)

TERMINAL_EVENTS = (RunCompleted, RunFailed, PlanRejected)


class EventRecord(Record, tag="event_record", tag_field="type"):
    """A stored and published run event. ``seq`` is the 1-based position in the run's
    stream (the aggregate version); ``event_id`` = ``{run_id}/{seq}`` is the
    ``Nats-Msg-Id`` the relay publishes it with."""

    run_id: str
    seq: int
    at: datetime
    event: RunEvent
    schema_version: int = SCHEMA_VERSION

    @property
    def event_id(self) -> str:
        return f"{self.run_id}/{self.seq}"

    @property
    def kind(self) -> str:
        return type(self.event).__struct_config__.tag  # type: ignore[return-value]


# --------------------------------------------------------------------------- inbox
# Results arriving at a run (subject ``loom.inbox.{run_id}``, stream LOOM_INBOX).


class PlanProposed(Record, tag="plan_proposed", tag_field="type"):
    run_id: str
    plan: Plan
    planner: str = "explicit"


class PlanRefused(Record, tag="plan_refused", tag_field="type"):
    run_id: str
    issues: list[PlanIssue]


class ToolResult(Record, tag="tool_result", tag_field="type"):
    """The tool-runner's answer to one ToolCallRequested. Exactly one of ``output`` /
    ``error`` is meaningful, chosen by ``ok``."""

    run_id: str
    step_id: str
    attempt: int
    idempotency_key: str
    ok: bool
    started_at: datetime
    finished_at: datetime
    output: JSON = None
    error: ErrorInfo | None = None


InboxMessage = PlanProposed | PlanRefused | ToolResult


# --------------------------------------------------------------------------- dead letters


class DeadLetter(Record, tag="dead_letter", tag_field="type"):
    """What a service could not process, with why. ``payload`` is the original bytes
    decoded as UTF-8 with replacement (truncated to 64 KiB)."""

    origin_subject: str
    service: str
    error: ErrorInfo
    payload: str
    at: datetime
    deliveries: int = 1


# --------------------------------------------------------------------------- queries
# Request/reply APIs on ``loom.api.*``. Replies that can fail carry ``error``.


class RunEventsQuery(Inbound, tag="run_events_query", tag_field="type"):
    run_id: str
    after_seq: int = 0
    limit: int = 1000


class RunEventsReply(Record, tag="run_events_reply", tag_field="type"):
    run_id: str
    events: list[EventRecord] = []
    error: ErrorInfo | None = None


class RunSummary(Record, tag="run_summary", tag_field="type"):
    run_id: str
    status: str
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_ms: float | None = None
    name: str = ""
    steps_total: int = 0
    steps_done: int = 0


class RunsQuery(Inbound, tag="runs_query", tag_field="type"):
    limit: int = 50
    status: str | None = None


class RunsReply(Record, tag="runs_reply", tag_field="type"):
    runs: list[RunSummary] = []


class SpanEvent(Record, tag="span_event", tag_field="type"):
    name: str
    at: datetime
    attributes: dict[str, JSON] = {}


class SpanRecord(Record, tag="span", tag_field="type"):
    """One span of a run's trace, derived from its events. Ids are hex (OTel widths:
    32 for trace, 16 for span) derived from the run id, so rebuilding gives the same ids."""

    trace_id: str
    span_id: str
    run_id: str
    name: str
    start: datetime
    end: datetime | None = None
    parent_span_id: str | None = None
    status: Literal["unset", "ok", "error"] = "unset"
    status_message: str = ""
    kind: Literal["internal", "client", "server"] = "internal"
    attributes: dict[str, JSON] = {}
    events: list[SpanEvent] = []


class TraceQuery(Inbound, tag="trace_query", tag_field="type"):
    run_id: str
    rebuild: bool = False


class TraceReply(Record, tag="trace_reply", tag_field="type"):
    run_id: str
    spans: list[SpanRecord] = []
    error: ErrorInfo | None = None


class ThreadEntry(Record, tag="thread_entry", tag_field="type"):
    role: Literal["user", "assistant", "system"]
    content: JSON
    run_id: str
    at: datetime
    source_event_id: str


class ThreadQuery(Inbound, tag="thread_query", tag_field="type"):
    thread_id: str


class ThreadReply(Record, tag="thread_reply", tag_field="type"):
    thread_id: str
    entries: list[ThreadEntry] = []


class Ping(Inbound, tag="ping", tag_field="type"):
    pass


class Pong(Record, tag="pong", tag_field="type"):
    service: str
    instance: str
