"""Every route of the system, declared once: who says what, where, and who listens.

A route is a subject pattern, the message types it carries (and the reply types when it
is a request), the JetStream stream holding it (if any), which identities may publish on
it and which consume it (with the durable consumer and the event filter they use).

Everything about the edge is derived from this table and nothing else:
- services subscribe, consume and publish through it (``Route.subject``,
  ``Consumer.filters``), so a subject string is never written twice;
- ``proto/asyncapi.yaml`` is generated from it (``loom_infra.proto_gen``);
- each identity's NATS permissions are generated from it (``loom_infra.credentials``);
- a test starts the stack and checks that every subscription and durable consumer that
  exists is declared here, and every declaration is used.

Identities (one NATS user each): the five services, ``client`` (may only submit runs)
and ``operator`` (the CLI and the console: submit, follow, query, control, resume,
signal). A fact is believed only if it arrives on its own route, which only its owner
may publish on (docs/design.md decision 11).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from loom_core import contracts as c
from loom_core import partitions, subjects, tenancy

Identity = Literal["executor", "planner", "toolrunner", "memory", "tracing", "client", "operator"]
SERVICES: tuple[Identity, ...] = ("executor", "planner", "toolrunner", "memory", "tracing")
IDENTITIES: tuple[Identity, ...] = (*SERVICES, "client", "operator")

Kind = Literal["request", "stream", "broadcast", "kv", "object"]
"""``request``: core NATS request/reply (answered by one member of the consumer's queue
group); ``stream``: published into a JetStream stream and consumed durably;
``broadcast``: plain NATS, every subscriber gets it; ``kv``: a JetStream key-value
bucket's underlying subject; ``object``: a JetStream Object Store bucket's underlying
subjects (chunks and metadata)."""

_PARAM = re.compile(r"\{(\w+)\}")
# how the description of a tenant-scoped route says where tenants use it
_TWIN_NOTE = (
    " A tenant's users use it on `loom.t.<tenant>.` + the rest of the subject "
    "(loom_core.tenancy); it covers only that tenant's runs."
)


def tag_of(cls: type[msgspec.Struct]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str), cls
    return tag


@dataclass(frozen=True)
class Consumer:
    """One identity's way of listening on a route.

    ``durable``: the JetStream durable consumer's name (None: a plain subscription, or
    an ephemeral consumer for ``operator`` following a run). ``events``: for the run
    event route, the event classes it takes (empty: all of them)."""

    identity: Identity
    durable: str | None = None
    events: tuple[type[msgspec.Struct], ...] = ()
    queue: str | None = None  # core NATS queue group (request routes: the service name)
    note: str = ""
    # a durable this one took over from (an ack policy cannot change on a JetStream
    # consumer: a new durable starts after the old one's ack floor, then deletes it)
    replaces: str | None = None


@dataclass(frozen=True)
class Route:
    name: str
    pattern: str  # e.g. "loom.inbox.{run_id}.tool"; a trailing {…} may be a subject tail
    kind: Kind
    messages: tuple[type[msgspec.Struct], ...]
    publishers: tuple[Identity, ...]
    consumers: tuple[Consumer, ...]
    description: str
    replies: tuple[type[msgspec.Struct], ...] = ()
    stream: str | None = None
    # publishers may only fill these parameters with their own identity (dead letters)
    own_param: str | None = None
    # a tenant other than default uses this route on its twin subject
    # (``loom.t.<tenant>.…``, loom_core.tenancy); services serve both
    tenant_scoped: bool = False
    params: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(_PARAM.findall(self.pattern)))

    def subject(self, **values: str) -> str:
        """The concrete subject; every parameter must be given."""
        missing = set(self.params) - set(values)
        if missing:
            raise KeyError(f"route {self.name}: missing {sorted(missing)}")
        return self.pattern.format(**values)

    @property
    def wildcard(self) -> str:
        """The pattern with every parameter as ``*`` (NATS syntax)."""
        return _PARAM.sub("*", self.pattern)

    def consumer(self, identity: Identity, durable: str | None = None) -> Consumer:
        for consumer in self.consumers:
            if consumer.identity == identity and (durable is None or consumer.durable == durable):
                return consumer
        raise KeyError(f"route {self.name} has no consumer {identity}/{durable}")

    def filters(self, consumer: Consumer) -> list[str]:
        """The subjects ``consumer`` listens on: one per event kind on the run events;
        a ``{service}`` parameter is the consumer's own name (health); others are ``*``."""
        if consumer.events:
            return [self.pattern.format(run_id="*", event=tag_of(e)) for e in consumer.events]
        # on a request route {service} addresses the server; elsewhere (dead letters,
        # inspected by the operator) a consumer hears every service's subject
        own = self.pattern
        if self.kind == "request":
            own = own.replace("{service}", consumer.identity)
        plain = _PARAM.sub("*", own)
        if self.tenant_scoped and consumer.identity in SERVICES:
            return [plain, tenancy.twin(plain, "*")]  # every tenant's twin too
        return [plain]

    def publisher_subjects(self, identity: Identity) -> list[str]:
        """What ``identity`` may publish on this route (for its NATS permissions)."""
        if identity not in self.publishers:
            return []
        if self.own_param:
            return [_PARAM.sub("*", self.pattern.replace("{" + self.own_param + "}", identity))]
        if self.tenant_scoped and identity in SERVICES:
            return [self.wildcard, tenancy.twin(self.wildcard, "*")]
        return [self.wildcard]

    def tenant_publish(self, role: Identity, tenant: str) -> list[str]:
        """What ``role`` (client or operator) of ``tenant`` may publish: only its own
        tenant's twin of what the plain ``role`` may publish."""
        if not self.tenant_scoped:
            return []
        return [tenancy.twin(s, tenant) for s in self.publisher_subjects(role)]

    def tenant_filters(self, consumer: Consumer, tenant: str) -> list[str]:
        """What ``consumer`` (a client or operator) of ``tenant`` may listen on."""
        if not self.tenant_scoped or consumer.identity in SERVICES:
            return []
        return [tenancy.twin(s, tenant) for s in self.filters(consumer)]


def _event_tag(cls: type[msgspec.Struct]) -> str:
    return tag_of(cls)


TERMINAL: tuple[type[msgspec.Struct], ...] = tuple(c.TERMINAL_EVENTS)
RUN_EVENT_TYPES: tuple[type[msgspec.Struct], ...] = tuple(c.RunEvent.__args__)

SUBMIT = Route(
    name="submit",
    pattern=subjects.SUBMIT,
    tenant_scoped=True,
    kind="request",
    messages=(c.RunRequest,),
    replies=(c.SubmitAccepted, c.SubmitRejected),
    publishers=("client", "operator"),
    # {via} is the submitter's own identity: NATS permissions let each publish only on its
    # own suffix, so the executor learns who submitted from the subject (core NATS
    # carries no sender identity).
    own_param="via",
    consumers=(Consumer("executor", queue="executor"),),
    description="Submit a run (NATS request/reply) on `loom.submit.client` or "
    "`loom.submit.operator`, your own identity. The reply is sent only once the "
    "RunRequested event is stored, so an accepted run is never lost. The run id is the "
    "dedupe key: submitting the same request with the same `run_id` again answers "
    "`existing: true` (resubmit with the same id after a timeout); the same `run_id` with "
    "another plan or input is refused `run_id_conflict` (`details.differs`). Without "
    "`run_id`, a `Nats-Msg-Id` header stands for one (per submitter); without either, "
    "each request starts a new run. A refused shape lists every problem in "
    "`details.issues`. Limits: `limits.json`; codes: `errors.json`. "
    "Fields the engine sets itself (`parent`, `fork`) are refused (`internal_field`). "
    "An `Authorization: Bearer <JWT>` header names the principal the run acts for "
    "(verified against the configured issuer keys, never stored); without one the run is "
    "anonymous if the stack allows it, else refused `not_authenticated`. A bad token is "
    "refused `token_expired` or `token_invalid`." + _TWIN_NOTE,
)

RUN_EVENTS = Route(
    name="runEvent",
    pattern=subjects.RUN_EVENTS_PATTERN,
    kind="stream",
    stream=subjects.RUN_EVENTS_STREAM,
    messages=RUN_EVENT_TYPES,
    publishers=("executor",),  # the relay, from the store only (docs/design.md decision 2)
    consumers=(
        Consumer("planner", durable="planner", events=(c.RunRequested,)),
        Consumer("planner", durable="planner-models", events=(c.ModelCallRequested,)),
        Consumer("planner", durable="planner-replans", events=(c.ReplanRequested,)),
        Consumer("toolrunner", durable="toolrunner", events=(c.ToolCallRequested,)),
        # cancellation is heard by every tool-runner replica: a plain subscription
        Consumer("toolrunner", events=(c.ToolCallCancelled,), note="every replica"),
        Consumer("memory", durable="memory", events=(c.RunRequested, c.RunCompleted)),
        # acks a whole fold batch at once (AckPolicy.ALL, issue 10 traceack); was
        # "tracing" (explicit acks), taken over at its ack floor
        Consumer("tracing", durable="tracing-fold", replaces="tracing"),
        Consumer("executor", durable="subruns-start", events=(c.SubRunRequested,)),
        Consumer("executor", durable="subruns-end", events=TERMINAL),
        Consumer("executor", durable="timers", events=(c.TimerStarted,)),
        Consumer("executor", durable="signal-waits", events=(c.EventWaitStarted,)),
        Consumer("operator", note="ephemeral: follow one run"),
    ),
    description="Every stored run event (an EventRecord), in the run's order, on stream "
    f"{subjects.RUN_EVENTS_STREAM}. Only the executor's relay publishes here, from the "
    "store. Filters: one run `loom.run.{run_id}.>`, one kind `loom.run.*.{event}`. A run's "
    "last event is one of: " + ", ".join(tag_of(e) for e in TERMINAL) + ".",
)


RUN_GAP = Route(
    name="runGap",
    pattern=subjects.RUN_GAP,
    kind="stream",
    stream=subjects.RUN_EVENTS_STREAM,
    messages=(c.StreamFiller,),
    publishers=("executor",),  # the relay, after nats-server lost the stream's tail
    # no service reads them; an operator reading the whole stream meets them
    consumers=(Consumer("operator", note="reading the whole stream: skip them"),),
    description=f"Fillers on {subjects.RUN_EVENTS_STREAM}: they only take up sequence "
    "numbers. After nats-server lost the stream's newest messages, the relay publishes them "
    "up to the furthest durable consumer's position before publishing the lost events "
    "again, so every consumer delivers those. No consumer reads them; skip them when "
    "reading the whole stream.",
)

# The executor's inbox consumer of one partition (``{partition}``: 0 .. LOOM_PARTITIONS-1)
PARTITION_DURABLE = "executor-p{partition}"


def _inbox(source: str, messages: tuple[type[msgspec.Struct], ...], owner: Identity,
           what: str, direct: bool = False) -> Route:  # fmt: skip
    # ``direct``: the executor also takes the owner's publish itself, before the stream
    # stores and delivers it (LOOM_DIRECT_DISPATCH); the durable is the fallback
    plain = (Consumer("executor", note="direct dispatch: the publish, before the stream"),)
    return Route(
        name=f"inbox.{source}",
        pattern=subjects.inbox("{run_id}", source),
        kind="stream",
        stream=subjects.INBOX_STREAM,
        messages=messages,
        publishers=(owner,),
        # one durable per partition, consumed by the replica that owns it (the stream
        # stores the subject with the run's partition: loom_core.partitions)
        consumers=(Consumer("executor", durable=PARTITION_DURABLE), *(plain if direct else ())),
        description=f"{what}, to one run's inbox (stream {subjects.INBOX_STREAM}). Only the "
        f"{owner} publishes here; the executor records it as a run event when the run is "
        "waiting for it (its `run_id` must be the subject's). The stream stores it as "
        "`loom.inbox.{partition}.{run_id}.{source}` (the server computes the partition).",
    )


INBOX_PLAN = _inbox(
    "plan", (c.PlanProposed, c.PlanRefused), "planner", "The planner's verdict", direct=True
)
INBOX_TOOL = _inbox("tool", (c.ToolResult,), "toolrunner", "A tool call's result", direct=True)
INBOX_TIMER = _inbox("timer", (c.TimerElapsed,), "executor", "A durable timer that is due")
INBOX_EVENT = _inbox(
    "event", (c.ExternalEventArrived,), "executor", "An external event a wait matched"
)
INBOX_SUBRUN = _inbox("subrun", (c.SubRunFinished,), "executor", "A child run's end")
INBOX_MODEL = _inbox("model", (c.ModelResult,), "planner", "A model turn's result", direct=True)
INBOXES = (INBOX_PLAN, INBOX_TOOL, INBOX_TIMER, INBOX_EVENT, INBOX_SUBRUN, INBOX_MODEL)
# the inboxes whose publishes the executor takes itself (``direct``): another service's
# answer on a run's critical path (a run's start, each step's hop, each model turn)
DIRECT_INBOXES = tuple(
    r for r in INBOXES if any(x.identity == "executor" and x.durable is None for x in r.consumers)
)

SIGNAL = Route(
    name="signal",
    pattern=subjects.signal("{name}", "{key}"),
    tenant_scoped=True,
    kind="stream",
    stream=subjects.SIGNALS_STREAM,
    messages=(c.Signal,),
    publishers=("operator",),
    consumers=(Consumer("executor", note="live signals, plus the stream's latest per subject"),),
    description="External events for `wait_event` steps (publish with JetStream; stream "
    f"{subjects.SIGNALS_STREAM} keeps the latest per name and key, so a wait that starts "
    "later still sees it). The executor's router delivers each to the runs waiting on it."
    + _TWIN_NOTE,
)

DEAD_LETTER = Route(
    name="deadLetter",
    pattern=subjects.dead_letter("{service}"),
    kind="stream",
    stream=subjects.DLQ_STREAM,
    messages=(c.DeadLetter,),
    publishers=SERVICES,
    own_param="service",
    consumers=(Consumer("operator", note="inspection"),),
    description=f"Messages a service could not process, with the reason, on stream "
    f"{subjects.DLQ_STREAM}. Never retried automatically. Each service writes only its own "
    "subject; secrets in the payload are redacted.",
)

REJECTED = Route(
    name="rejected",
    pattern=f"{subjects.PREFIX}.rejects.{{service}}",
    kind="stream",
    stream="LOOM_REJECTS",
    messages=(c.DeadLetter,),
    publishers=SERVICES,
    own_param="service",
    consumers=(Consumer("operator", note="inspection"),),
    description="Requests refused as the client's mistake (a malformed or refused "
    "submission), with the reason, on stream LOOM_REJECTS: apart from real poison in "
    f"{subjects.DLQ_STREAM}, bounded in count, size and age, payload truncated. Recorded "
    "off the request path: the client was answered already; when the record falls behind, "
    "rejections are dropped (counted) rather than waited for.",
)

PROGRESS = Route(
    name="progress",
    pattern=subjects.progress("{run_id}"),
    tenant_scoped=True,
    kind="broadcast",
    messages=(c.RunProgress,),
    publishers=("executor",),
    consumers=(Consumer("operator"),),
    description="Live progress of a run after each change (plain NATS, not stored; the "
    "run's events are the truth)." + _TWIN_NOTE,
)


MODEL_STREAM = Route(
    name="modelStream",
    pattern=subjects.model_stream("{run_id}"),
    tenant_scoped=True,
    kind="broadcast",
    messages=(c.ModelChunk,),
    publishers=("planner",),
    consumers=(Consumer("operator"),),
    description="Text of a model turn while it is generated (plain NATS, not stored; the "
    "complete turn is the run's model_call_completed event). Sent when the models "
    "file says `stream: true`; `loom run` shows it live. A tenant's run's text goes only "
    "to its tenant's twin." + _TWIN_NOTE,
)


def _request(
    name: str,
    pattern: str,
    message: type[msgspec.Struct],
    replies: tuple[type[msgspec.Struct], ...],
    server: Identity,
    callers: tuple[Identity, ...],
    description: str,
    tenant_scoped: bool = True,
) -> Route:
    return Route(
        name=name,
        pattern=pattern,
        kind="request",
        messages=(message,),
        replies=replies,
        publishers=callers,
        consumers=(Consumer(server, queue=server),),
        description=f"{description} (request/reply, answered by the {server})."
        + (_TWIN_NOTE if tenant_scoped else ""),
        tenant_scoped=tenant_scoped,
    )


CONTROL = _request(
    "control", subjects.CONTROL, c.RunControl, (c.RunControlReply,), "executor", ("operator",),
    "Operator control of a run: cancel, pause (no new step starts; in-flight steps finish) "
    "or unpause",
)  # fmt: skip
RESUME = _request(
    "resume", subjects.RESUME, c.ResumeRun, (c.ResumeReply,), "executor", ("operator",),
    "Answer a suspended step, by label or suspension id. The data is validated against the "
    "suspension's schema; exactly one answer wins, a repeat of the same request_id gets "
    "the same reply",
)  # fmt: skip
FORK = _request(
    "fork", f"{subjects.PREFIX}.fork", c.ForkRun, (c.ForkReply,), "executor", ("operator",),
    "Fork a recorded run from one of its top-level steps: a new run with the same plan "
    "that reuses the recorded outputs of every step neither that one nor downstream of "
    "it (edited ones first, with their dependents run again). The executor reads what is "
    "reused from its own store; a run request's `fork` field is refused on submit",
)  # fmt: skip
API_RUN_EVENTS = _request(
    "apiRunEvents", subjects.API_RUN_EVENTS, c.RunEventsQuery, (c.RunEventsReply,), "executor",
    ("operator", "memory", "tracing", "toolrunner", "planner"),
    "A run's stored events after `after_seq`, a page at a time",
)  # fmt: skip
API_RUNS = _request(
    "apiRuns", subjects.API_RUNS, c.RunsQuery, (c.RunsReply,), "tracing", ("operator",),
    "Recent runs with status and timings",
)  # fmt: skip
API_TRACE = _request(
    "apiTrace", subjects.API_TRACE, c.TraceQuery, (c.TraceReply,), "tracing", ("operator",),
    "A run's spans, derived from its events",
)  # fmt: skip
API_TRACES = _request(
    "apiTraces", subjects.API_TRACES, c.TracesQuery, (c.TracesReply,), "tracing", ("operator",),
    "Runs' traces filtered by status, time range, tool, model or error code, newest first",
)  # fmt: skip
API_TRACES_SLOWEST = _request(
    "apiTracesSlowest", subjects.API_TRACES_SLOWEST, c.SlowestStepsQuery,
    (c.SlowestStepsReply,), "tracing", ("operator",),
    "The slowest steps (ended step spans by duration), optionally of one tool",
)  # fmt: skip
API_TRACES_USAGE = _request(
    "apiTracesUsage", subjects.API_TRACES_USAGE, c.UsageQuery, (c.UsageReply,), "tracing",
    ("operator",),
    "Tool and model calls aggregated by tool, model, run or time bucket: counts, "
    "durations, tokens and cost",
)  # fmt: skip
API_TRACES_REBUILD = _request(
    "apiTracesRebuild", subjects.API_TRACES_REBUILD, c.RebuildTracesQuery,
    (c.RebuildTracesReply,), "tracing", ("operator",),
    "Recompute runs' spans from their events and export them again, a page of runs per "
    "request (the platform's only)",
    tenant_scoped=False,
)  # fmt: skip
API_THREAD = _request(
    "apiThread", subjects.API_THREAD, c.ThreadQuery, (c.ThreadReply,), "memory", ("operator",),
    "A conversation thread's entries",
)  # fmt: skip
API_MEMORY_TOOL = _request(
    "apiMemoryTool", subjects.API_MEMORY_TOOL, c.MemoryRequest, (c.MemoryReply,), "memory",
    ("toolrunner",),
    "A memory operation from a tool call (memory_* and knowledge_* tools): the memory "
    "service acts as the stored principal of the run `run_id`, never as anyone the "
    "request names",
    tenant_scoped=False,
)  # fmt: skip
API_MEMORY_OPERATOR = _request(
    "apiMemoryOperator", subjects.API_MEMORY_OPERATOR, c.MemoryRequest, (c.MemoryReply,),
    "memory", ("operator",),
    "A memory operation from the operator (`loom memory`, `loom knowledge`), as the "
    "principal it names (default: the operator, role admin, tenant default)",
)  # fmt: skip

# Reads a tenant's operator makes through a service, where the platform reads JetStream
# (a stream read cannot be limited to one tenant by subject): answered by the planner,
# which already reads the catalog and may read blobs and dead letters (credentials.READS)
API_TOOLS = _request(
    "apiTools", subjects.API_TOOLS, c.ToolsQuery, (c.ToolsReply,), "planner", ("operator",),
    "The tool catalog, a page of ToolSpecs by name at a time. One catalog for every "
    "tenant: tools are the platform's (a tool's access rules, `requires_auth` and "
    "`admin_only`, decide who may call it)",
)  # fmt: skip
API_BLOB = _request(
    "apiBlob", subjects.API_BLOB, c.BlobQuery, (c.BlobReply,), "planner", ("operator",),
    "A page of a blob's bytes, read through a run whose events refer to it: the caller "
    "must be able to see the run (a tenant: its own runs only). Another tenant's run, a "
    "blob the run does not refer to and one not stored are all `blob_not_found`, alike",
)  # fmt: skip
API_DEAD_LETTERS = _request(
    "apiDeadLetters", subjects.API_DEAD_LETTERS, c.DeadLettersQuery, (c.DeadLettersReply,),
    "planner", ("operator",),
    "Dead letters (or rejected requests) a page at a time by stream sequence. A tenant "
    "gets only those it sent (its twin subjects) or about its own runs; the platform's "
    "operator every one (secrets in payloads are redacted when the letter is written)",
)  # fmt: skip

HEALTH = Route(
    name="health",
    pattern=subjects.health("{service}"),
    kind="request",
    messages=(c.Ping,),
    replies=(c.Pong,),
    # services too: a pod's liveness probe pings its own service with the pod's own key
    publishers=("operator", "client", *SERVICES),
    consumers=tuple(Consumer(s, queue=s) for s in SERVICES),
    description="Liveness of one service (request/reply); any instance answers.",
)

TOOL_CATALOG = Route(
    name="toolCatalog",
    pattern=f"$KV.{subjects.TOOLS_BUCKET}.{{tool}}",
    kind="kv",
    stream=f"KV_{subjects.TOOLS_BUCKET}",
    messages=(c.ToolSpec,),
    publishers=("toolrunner",),
    consumers=(Consumer("planner"), Consumer("operator")),
    description=f"The tool catalog: JetStream key-value bucket `{subjects.TOOLS_BUCKET}`, one "
    "ToolSpec per tool, keyed by tool name. Read it with a KV client (get/watch); the "
    "address is the bucket's underlying subject. Only the tool-runner writes it.",
)

MODEL_ANSWERS = Route(
    name="modelAnswers",
    pattern=f"$KV.{subjects.MODEL_ANSWERS_BUCKET}.{{digest}}",
    kind="kv",
    stream=f"KV_{subjects.MODEL_ANSWERS_BUCKET}",
    messages=(c.ModelResult,),
    publishers=("planner",),
    consumers=(Consumer("planner"),),
    description=f"Model answers already paid for: JetStream key-value bucket "
    f"`{subjects.MODEL_ANSWERS_BUCKET}`, one ModelResult per agent turn, keyed by the digest "
    "of the model_call_requested it answers, kept a day. The planner stores an answer "
    "before it sends it, and answers a redelivered request (after a restart) from here "
    "instead of calling the model again. Only the planner reads and writes it.",
)

BLOBS = Route(
    name="blobs",
    pattern=f"$O.{subjects.BLOBS_BUCKET}.{{part}}.{{id}}",
    kind="object",
    stream=f"OBJ_{subjects.BLOBS_BUCKET}",
    messages=(c.BlobReference,),
    # the tool-runner stores big tool outputs; clients and operators upload big inputs
    publishers=("toolrunner", "operator", "client"),
    consumers=(
        Consumer("toolrunner", note="resolves references in a tool's input"),
        Consumer("executor", note="checks that a submitted reference is stored"),
        Consumer("operator", note="`loom blob get`"),
        Consumer("planner", note="serves apiBlob: a page of a run's blob"),
    ),
    description=f"Big values by reference: JetStream Object Store bucket "
    f"`{subjects.BLOBS_BUCKET}` (chunks `$O.{subjects.BLOBS_BUCKET}.C.<nuid>`, metadata "
    f"`$O.{subjects.BLOBS_BUCKET}.M.<base64url name>`), one object per value, named by the "
    "hex sha256 of the value's canonical JSON. Events carry a BlobReference in the value's "
    "place. Use any NATS Object Store client to upload (then submit the reference); "
    "readers check every blob's sha256 against its name. Bounded in total bytes; blobs "
    "expire after LOOM_BLOB_MAX_AGE_DAYS.",
)

SCHEDULES_BUCKET = "loom_schedules"

SCHEDULE = Route(
    name="schedule",
    pattern=f"{subjects.PREFIX}.schedule.{{via}}",
    tenant_scoped=True,
    kind="request",
    messages=(c.ScheduleCreate, c.ScheduleControl, c.SchedulesQuery),
    replies=(c.ScheduleReply,),
    publishers=("operator",),
    # as on submit: {via} is the caller's own identity, and the Authorization header
    # names the principal the schedule's runs act for
    own_param="via",
    consumers=(Consumer("executor", queue="executor"),),
    description="Schedules that submit runs (request/reply on `loom.schedule.operator`): "
    "create (cron, every or at; a catch-up policy), list, describe, pause, resume, "
    "delete, trigger. A schedule belongs to the caller's tenant and its runs act for "
    "the principal that created it (the `Authorization: Bearer <JWT>` header, as on "
    "submit). Each firing's run id is derived from the schedule and its fire time, so a "
    "firing is submitted once however many executors see it due; its runs carry the "
    "label `schedule`. Refusals: `invalid_schedule`, `invalid_cron`, `invalid_timezone` "
    "(with the path of the field), `schedule_exists`, `schedule_not_found`, "
    "`too_many_schedules`, and every refusal of a run request. A tenant's operator uses "
    "`loom.t.<tenant>.schedule.operator`: its schedules are that tenant's only, and their "
    "runs are the tenant's runs",
)

SCHEDULE_STORE = Route(
    name="scheduleStore",
    pattern=f"$KV.{SCHEDULES_BUCKET}.{{tenant}}.{{schedule}}",
    kind="kv",
    stream=f"KV_{SCHEDULES_BUCKET}",
    messages=(c.Schedule,),
    publishers=("executor",),
    consumers=(
        Consumer(
            "executor",
            note="every replica watches it; the owner of a firing's partition submits it",
        ),
    ),
    description=f"The schedules: JetStream key-value bucket `{SCHEDULES_BUCKET}`, one "
    "Schedule per key `<tenant>.<schedule name>` (`<tenant>`: `t-<tenant>` for a tenant's "
    "own users' schedules, else a digest of the token's tenant claim). "
    "Only the executor writes it, each change a compare-and-set on the key's revision.",
)

FORWARD = Route(
    name="forward",
    pattern=f"{subjects.PREFIX}.fwd.{{partition}}",
    # every replica hears it and only the partition's owner answers (no queue group: a
    # member of one would often not be the owner)
    kind="broadcast",
    messages=(c.RunRequest, c.RunControl, c.ResumeRun, c.ForkRun, c.EventRecord),
    replies=(c.SubmitAccepted, c.SubmitRejected, c.RunControlReply, c.ResumeReply, c.ForkReply),
    publishers=("executor",),
    consumers=(Consumer("executor", note="every replica; the partition's owner answers"),),
    description="Between executor replicas only: a request (submit, control, resume, fork) or "
    "a run event (sub-run start) that reached a replica not owning the run's partition, "
    "passed to the owner of `{partition}` with its original subject in the `Loom-Subject` "
    "header; the owner's answer goes back to the original asker.",
)

TOOL_DISPATCH = Route(
    name="toolDispatch",
    pattern=subjects.tool_dispatch("{run_id}"),
    kind="broadcast",
    messages=(c.ToolCallRequested,),
    publishers=("executor",),
    # one runner of the group starts the call; the durable on runEvent is the fallback
    consumers=(
        Consumer("toolrunner", queue="toolrunner", note="direct dispatch, before the commit"),
    ),
    description="Between services only (LOOM_DIRECT_DISPATCH): a tool request (an "
    "EventRecord of `tool_call_requested`) sent to one tool-runner as the executor decides "
    "it, before its commit, so the call and the commit overlap. Plain NATS, not stored: the "
    "relay's publish of the stored event on runEvent stays the command that survives "
    "crashes, and a result is recorded only for a request the run has stored.",
)

TOOL_RESULT = Route(
    name="toolResult",
    pattern=subjects.tool_result("{run_id}"),
    # every executor replica hears it and only the run's writer answers (no queue group:
    # a member of one would often not be the writer); no answer: the sender falls back
    kind="broadcast",
    messages=(c.ToolResult,),
    replies=(c.InboxReceipt,),
    publishers=("toolrunner",),
    consumers=(Consumer("executor", note="every replica; the run's writer answers"),),
    description="Between services only (LOOM_DIRECT_DISPATCH): a tool call's result, sent "
    "by the tool-runner to the executor as a request. The run's writer checks it as an "
    "inbox message and answers `recorded` once the run's events hold it (stored), so the "
    "result needs no write to the inbox stream; otherwise the answer says why not and "
    "the tool-runner publishes the result to `inbox.tool` (the durable path) instead, as "
    "it does when no answer comes.",
)

RELAY_WAKE = Route(
    name="relayWake",
    pattern=f"{subjects.PREFIX}.relay.wake",
    kind="broadcast",
    messages=(c.RelayWake,),
    publishers=("executor",),
    consumers=(Consumer("executor", note="the replica running the relay"),),
    description="Between executor replicas only: events were stored; the one relay (on the "
    "owner of partition 0) publishes them now (plain NATS; a lost wake only delays them to "
    "the relay's idle poll).",
)

PARTITION_LEASES = Route(
    name="partitionLeases",
    pattern=f"$KV.{subjects.PARTITIONS_BUCKET}.{{key}}",
    kind="kv",
    stream=f"KV_{subjects.PARTITIONS_BUCKET}",
    messages=(c.PartitionLease,),
    publishers=("executor",),
    consumers=(Consumer("executor"), Consumer("operator")),
    description=f"Which executor replica owns which partition: key-value bucket "
    f"`{subjects.PARTITIONS_BUCKET}`, keys `p-{{n}}` (the owner of partition n) and "
    "`member-{replica}` (a live replica), each written by compare-and-set with a TTL and "
    "renewed by its owner. Only executors write it; read it to see the assignment.",
)

ADMISSION_BOOK = Route(
    name="admissionBook",
    pattern=f"$KV.{subjects.ADMISSION_BUCKET}.{{key}}",
    kind="kv",
    stream=f"KV_{subjects.ADMISSION_BUCKET}",
    messages=(c.AdmissionBook,),
    publishers=("executor",),
    consumers=(
        Consumer("executor", note="every replica watches it; a run's owner records its admission"),
        Consumer("operator", note="read only: who runs and who waits, per tenant"),
    ),
    description=f"Each tenant's admission book: key-value bucket "
    f"`{subjects.ADMISSION_BUCKET}`, key `t-{{tenant}}`, the runs that hold a slot of the "
    "tenant's concurrent run limits and those that wait, in order. Written only by "
    "executors, by compare-and-set; present only when LOOM_QUOTAS_FILE sets run limits.",
)

RATE_BUCKETS = Route(
    name="rateBuckets",
    pattern=f"$KV.{subjects.RATES_BUCKET}.{{key}}",
    kind="kv",
    stream=f"KV_{subjects.RATES_BUCKET}",
    messages=(c.RateBucket,),
    publishers=("executor", "planner", "toolrunner"),
    consumers=(Consumer("executor"), Consumer("planner"), Consumer("toolrunner")),
    description=f"The tenants' rate limits as token buckets: key-value bucket "
    f"`{subjects.RATES_BUCKET}`, key `{{kind}}-{{tenant}}` (kind: submit, tool, model), "
    "taken by compare-and-set by every replica (submissions in the executor, tool calls "
    "in the tool-runner, model calls in the planner), so a rate holds whatever the "
    "number of replicas; present only when LOOM_QUOTAS_FILE sets rates.",
)

ROUTES: tuple[Route, ...] = (
    SUBMIT,
    RUN_EVENTS,
    RUN_GAP,
    *INBOXES,
    SIGNAL,
    DEAD_LETTER,
    REJECTED,
    CONTROL,
    RESUME,
    FORK,
    PROGRESS,
    MODEL_STREAM,
    API_RUN_EVENTS,
    API_RUNS,
    API_TRACE,
    API_TRACES,
    API_TRACES_SLOWEST,
    API_TRACES_USAGE,
    API_TRACES_REBUILD,
    API_THREAD,
    API_MEMORY_TOOL,
    API_MEMORY_OPERATOR,
    API_TOOLS,
    API_BLOB,
    API_DEAD_LETTERS,
    HEALTH,
    TOOL_CATALOG,
    BLOBS,
    SCHEDULE,
    SCHEDULE_STORE,
    MODEL_ANSWERS,
    FORWARD,
    TOOL_DISPATCH,
    TOOL_RESULT,
    RELAY_WAKE,
    PARTITION_LEASES,
    ADMISSION_BOOK,
    RATE_BUCKETS,
)

BY_NAME = {route.name: route for route in ROUTES}

# Which inbox route each inbox message must arrive on: a message on another route is
# refused (``unexpected_message``), whatever its body says.
INBOX_ROUTE_OF: dict[type[msgspec.Struct], Route] = {
    message: route for route in INBOXES for message in route.messages
}


def inbox_subject(message: msgspec.Struct) -> str:
    """The subject an inbox message is published on (its run's, for its kind)."""
    route = INBOX_ROUTE_OF[type(message)]
    return route.subject(run_id=message.run_id)  # type: ignore[attr-defined]  # every inbox message type has run_id (INBOX_ROUTE_OF's keys)


def inbox_source(subject: str) -> tuple[str, str] | None:
    """``(run_id, source)`` of an inbox subject, or None if it is not one."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != subjects.PREFIX or parts[1] != "inbox":
        return None
    return parts[2], parts[3]


def event_filter(*events: type[msgspec.Struct], run_id: str = "*") -> list[str]:
    """Subjects of the run events of these classes (of one run, or of all): filters take
    the event class, never a hand-written tag."""
    return [RUN_EVENTS.subject(run_id=run_id, event=tag_of(e)) for e in events]


def consumers_of(identity: Identity) -> list[tuple[Route, Consumer]]:
    return [(r, cons) for r in ROUTES for cons in r.consumers if cons.identity == identity]


def published_by(identity: Identity) -> list[Route]:
    return [r for r in ROUTES if identity in r.publishers]


def declared_subscriptions(identity: Identity) -> set[tuple[str, str]]:
    """``(subject, queue group)`` of every plain subscription ``identity`` declares (request
    routes it answers, broadcasts it hears). Durable consumers are in ``declared_durables``;
    the operator's ephemeral followers are neither."""
    out: set[tuple[str, str]] = set()
    for route, consumer in consumers_of(identity):
        # a key-value bucket is read with gets, not subscriptions
        if consumer.durable is None and identity in SERVICES and route.kind not in ("kv", "object"):
            out.update((subject, consumer.queue or "") for subject in route.filters(consumer))
    return out


def declared_durables(
    count: int | None = partitions.DEFAULT_COUNT,
) -> dict[tuple[str, str], tuple[Identity, set[str]]]:
    """``(stream, durable) -> (owner, filter subjects)`` of every durable consumer. A
    partitioned one (``{partition}`` in its name) is listed once per partition of
    ``count``, with the filters as the stream stores them; ``count=None`` lists it once,
    as declared (permissions grant it whatever the count)."""
    out: dict[tuple[str, str], tuple[Identity, set[str]]] = {}
    for route in ROUTES:
        for consumer in route.consumers:
            if consumer.durable is None:
                continue
            assert route.stream is not None, route.name
            named = [(consumer.durable, route.filters(consumer))]
            if "{partition}" in consumer.durable and count is not None:
                named = [
                    (consumer.durable.format(partition=p),
                     [partitions.stored_filter(f, p) for f in route.filters(consumer)])
                    for p in range(count)
                ]  # fmt: skip
            for durable, subjects_ in named:
                key = (route.stream, durable)
                owner, filters = out.setdefault(key, (consumer.identity, set()))
                assert owner == consumer.identity, f"durable {key} declared for two identities"
                filters.update(subjects_)
    return out


def replaced_durables() -> dict[tuple[str, str], Identity]:
    """``(stream, durable) -> owner`` of every durable a declared one took over from: its
    owner may read it (its ack floor) and delete it, nothing else."""
    out: dict[tuple[str, str], Identity] = {}
    for route in ROUTES:
        for consumer in route.consumers:
            if consumer.replaces is not None:
                assert route.stream is not None, route.name
                out[(route.stream, consumer.replaces)] = consumer.identity
    return out
