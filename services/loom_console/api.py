"""The console's JSON API, typed: every reply the page reads is one of these Structs.

Plain Structs (no tag): the API is for the console's own page and for scripts; it is
not a bus message, so it has no place in ``loom_core.contracts`` or ``proto/``. Values
taken from a run's events (inputs, outputs, errors) are ``Any`` and already redacted
(``loom_core.spans.redact``) when they get here."""

from __future__ import annotations

from typing import Any

import msgspec

from loom_core.contracts import ErrorInfo, PlanIssue


class Api(msgspec.Struct, omit_defaults=False):
    pass


class Session(Api):
    csrf_token: str  # sent back as the X-Loom-CSRF header on every POST
    identity: str  # the NATS identity the console reads and acts as
    statuses: dict[str, str]  # status word -> what it means


class RunRow(Api):
    run_id: str
    status: str
    name: str = ""
    started_at: str | None = None
    ended_at: str | None = None
    duration_ms: float | None = None
    steps_total: int = 0
    steps_done: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    labels: dict[str, str] = {}
    waiting: list[str] = []  # what it waits for, in words (people first)
    forked_from: str | None = None


class RunsPage(Api):
    runs: list[RunRow]
    next_after: str | None = None
    scanned: int = 0  # runs looked at (a label filter drops some of them)


class Suspension(Api):
    suspension_id: str
    step_id: str
    label: str
    payload: Any = None
    schema: dict[str, Any] = {}
    expires_at: str | None = None


class RunView(Api):
    run_id: str
    status: str
    name: str
    events: int
    started_at: str | None
    ended_at: str | None
    duration_ms: float | None
    labels: dict[str, str]
    input: Any
    output: Any
    error: Any
    paused: bool
    suspensions: list[Suspension]  # open ones: what a person can answer now
    top_steps: list[str]  # top-level step ids (what a fork can start from)
    stats: dict[str, Any]
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    forked_from: str | None = None
    fork_from_step: str | None = None


class EventRow(Api):
    seq: int
    at: str
    kind: str
    step_id: str | None
    summary: str
    data: Any


class EventPage(Api):
    run_id: str
    events: list[EventRow]
    total: int
    next_after: int | None = None


class Attempt(Api):
    attempt: int
    started_at: str | None = None
    finished_at: str | None = None
    duration_ms: float | None = None
    error: str | None = None
    retry_delay_s: float | None = None


class Wait(Api):
    kind: str  # person, timer, event, child, retry
    label: str
    started_at: str
    ended_at: str | None = None


class StepRow(Api):
    step_id: str
    depth: int  # 0: a top-level step; foreach elements and branches are deeper
    group: str  # the enclosing instance ("fe/3", "par/x"): rows of one group sit together
    status: str
    tool: str | None = None
    scheduled_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    duration_ms: float | None = None
    attempts: list[Attempt] = []
    waits: list[Wait] = []
    detail: str = ""  # the error, or why skipped / cancelled
    reused: bool = False  # a fork's reused output


class Timeline(Api):
    run_id: str
    steps: list[StepRow]
    total: int
    offset: int
    origin: str | None  # when the run started: the waterfall's zero


class Call(Api):
    kind: str  # tool or model
    step_id: str
    attempt: int  # the attempt (tool) or turn (model)
    name: str  # the tool, or the model
    seq: int  # the request's event
    input: Any
    output: Any = None
    error: Any = None
    duration_ms: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


class Calls(Api):
    run_id: str
    calls: list[Call]
    total: int
    offset: int


class SpanRow(Api):
    span_id: str
    parent_span_id: str | None
    depth: int
    name: str
    offset_ms: float  # from the first span's start
    duration_ms: float | None
    status: str
    status_message: str
    attributes: dict[str, Any]


class TraceView(Api):
    run_id: str
    spans: list[SpanRow]
    total_ms: float
    next_after: str | None = None


class StateAt(Api):
    run_id: str
    at: int
    events: int
    state: dict[str, Any]


class DiffChange(Api):
    field: str
    a: Any
    b: Any


class DiffRow(Api):
    step_id: str
    changes: list[DiffChange]


class DiffView(Api):
    a: str
    b: str
    steps: list[DiffRow]


class ReplayView(Api):
    run_id: str
    identical: bool
    events: int
    seq: int | None = None
    message: str = ""
    recorded: Any = None
    decided: Any = None


class ActionReply(Api):
    ok: bool
    run_id: str = ""
    status: str = ""
    error: ErrorInfo | None = None
    issues: list[PlanIssue] = []  # every problem, each at its path


class ValidateReply(Api):
    ok: bool
    issues: list[PlanIssue]
    name: str = ""
    steps: int = 0


# ------------------------------------------------------------------ requests (bodies)


class Body(msgspec.Struct, forbid_unknown_fields=True):
    pass


class ResumeBody(Body):
    suspension_id: str
    data: Any = None
    request_id: str = ""


class ControlBody(Body):
    action: str
    reason: str = ""


class ForkBody(Body):
    from_step: str
    set_output: dict[str, Any] = {}
    input: dict[str, Any] | None = None


class PlanBody(Body):
    text: str  # YAML or JSON: a run file (plan + input) or a bare plan
    input: dict[str, Any] | None = None  # overrides the file's input
    format: str = "native"  # or plan-execute (converted first, as `loom run --format`)
