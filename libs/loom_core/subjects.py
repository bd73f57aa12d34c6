"""NATS subjects, streams and headers: the wire names, in one place.

Run ids and step ids become subject tokens, so they are restricted to
``[A-Za-z0-9_-]`` (see ``loom_core.ids.check_token``).
"""

from __future__ import annotations

PREFIX = "loom"

# Clients publish RunRequest on loom.submit.{via} (request/reply), {via} being their own
# identity (client or operator): the executor reads who submitted from the subject. It
# answers SubmitReply only after the RunRequested event is stored (docs/design.md decision 9).
SUBMIT = PREFIX + ".submit.{via}"  # a pattern: publish on submit(via)


def submit(via: str) -> str:
    return f"{PREFIX}.submit.{via}"


# Every stored run event, published by the relay: loom.run.{run_id}.{event_tag}
RUN_EVENTS_STREAM = "LOOM_RUNS"
RUN_EVENTS_ALL = f"{PREFIX}.run.>"
RUN_EVENTS_PATTERN = PREFIX + ".run.{run_id}.{event}"
# Fillers on LOOM_RUNS (loom_infra.relay): three tokens, so no run-event filter
# (loom.run.*.*, loom.run.{run_id}.>) matches them
RUN_GAP = f"{PREFIX}.run.gap"


def run_event(run_id: str, event_tag: str) -> str:
    return f"{PREFIX}.run.{run_id}.{event_tag}"


def run_events_of(run_id: str) -> str:
    return f"{PREFIX}.run.{run_id}.>"


# Results addressed to a run: loom.inbox.{run_id}.{source}. Each source (plan, tool,
# timer, event, subrun) is its own route, publishable only by the service that owns that
# kind of fact (see loom_core.routes); the executor checks body against subject.
INBOX_STREAM = "LOOM_INBOX"
INBOX_ALL = f"{PREFIX}.inbox.>"
INBOX_SOURCES = ("plan", "tool", "timer", "event", "subrun", "model")


def inbox(run_id: str, source: str) -> str:
    return f"{PREFIX}.inbox.{run_id}.{source}"


# External events for wait_event steps: loom.signal.{name}.{key} (stream LOOM_SIGNALS)
SIGNALS_STREAM = "LOOM_SIGNALS"
SIGNALS_ALL = f"{PREFIX}.signal.>"


def signal(name: str, key: str) -> str:
    return f"{PREFIX}.signal.{name}.{key}"


# Poison messages, with the reason: loom.dlq.{service}
DLQ_STREAM = "LOOM_DLQ"
DLQ_ALL = f"{PREFIX}.dlq.>"


def dead_letter(service: str) -> str:
    return f"{PREFIX}.dlq.{service}"


# Operator control (request/reply): RunControl -> RunControlReply, served by the executor
CONTROL = f"{PREFIX}.control"


# Answer a suspension (request/reply): ResumeRun -> ResumeReply, served by the executor
RESUME = f"{PREFIX}.resume"


# Live progress of a run (RunProgress, plain NATS, not stored)
def progress(run_id: str) -> str:
    return f"{PREFIX}.progress.{run_id}"


# A tool request sent to the tool-runners as it is decided, before its commit (an
# EventRecord of a ToolCallRequested, plain NATS, not stored; issue 10: the hop and the
# commit overlap). The relay's publish of the stored event stays the durable command.
def tool_dispatch(run_id: str) -> str:
    return f"{PREFIX}.dispatch.{run_id}.tool"


# A tool call's result sent by the tool-runner straight to the executor (ToolResult ->
# InboxReceipt, plain NATS request/reply): answered once the run stored it, so the
# result needs no inbox stream write; the inbox stream is the fallback (issue 10).
def tool_result(run_id: str) -> str:
    return f"{PREFIX}.result.{run_id}.tool"


# Tokens of a model turn while it is generated (ModelChunk, plain NATS, not stored)
def model_stream(run_id: str) -> str:
    return f"{PREFIX}.stream.{run_id}"


# Request/reply APIs
API_RUN_EVENTS = f"{PREFIX}.api.run.events"  # executor: RunEventsQuery -> RunEventsReply
API_RUNS = f"{PREFIX}.api.runs"  # tracing: RunsQuery -> RunsReply
API_TRACE = f"{PREFIX}.api.trace"  # tracing: TraceQuery -> TraceReply
API_TRACES = f"{PREFIX}.api.traces"  # tracing: TracesQuery -> TracesReply
API_TRACES_SLOWEST = f"{PREFIX}.api.traces.slowest"  # tracing: SlowestStepsQuery -> ...Reply
API_TRACES_USAGE = f"{PREFIX}.api.traces.usage"  # tracing: UsageQuery -> UsageReply
API_TRACES_REBUILD = f"{PREFIX}.api.traces.rebuild"  # tracing: RebuildTracesQuery -> ...Reply
API_THREAD = f"{PREFIX}.api.memory.thread"  # memory: ThreadQuery -> ThreadReply
API_MEMORY_TOOL = f"{PREFIX}.api.memory.tool"  # memory, from tool calls: MemoryRequest
API_MEMORY_OPERATOR = f"{PREFIX}.api.memory.operator"  # memory, from the CLI: MemoryRequest
# read APIs a tenant's operator uses where the platform reads JetStream (planner)
API_TOOLS = f"{PREFIX}.api.tools"  # ToolsQuery -> ToolsReply
API_BLOB = f"{PREFIX}.api.blob"  # BlobQuery -> BlobReply
API_DEAD_LETTERS = f"{PREFIX}.api.dead_letters"  # DeadLettersQuery -> DeadLettersReply


def health(service: str) -> str:
    return f"{PREFIX}.health.{service}"  # Ping -> Pong


# Tool catalog: the tool-runner puts one ToolSpec per tool; the planner reads them.
TOOLS_BUCKET = "loom_tools"
# Executor replicas' partition leases (loom_infra.ownership)
PARTITIONS_BUCKET = "loom_partitions"
# Blobs: big values by sha256 (loom_infra.blobstore), a JetStream Object Store bucket.
BLOBS_BUCKET = "loom_blobs"
# Model answers by the digest of the turn request they answer (the planner's, so a
# redelivered request after a restart is answered again without paying the model twice)
MODEL_ANSWERS_BUCKET = "loom_model_answers"
# Each tenant's admission book (who holds a slot, who waits), shared by the executor
# replicas (loom_services.shared_admission); only with run limits in LOOM_QUOTAS_FILE
ADMISSION_BUCKET = "loom_admission"
# Token buckets of the rates in LOOM_QUOTAS_FILE, shared by all replicas
# (loom_services.shared_rates)
RATES_BUCKET = "loom_rates"

# Headers
MSG_ID = "Nats-Msg-Id"
NOTIFICATION_ID = "Loom-Notification-Id"  # position in the store's notification log
EVENT_TYPE = "Loom-Event-Type"
# on a tool_call_requested whose result is stored in the same commit (a local call,
# loom_services.local_tools): the tool-runner has nothing to do
ANSWERED = "Loom-Answered"
DLQ_REASON = "Loom-Dead-Letter-Reason"
TRACEPARENT = "traceparent"
AUTHORIZATION = "Authorization"  # Bearer JWT of the principal, on submit

SERVICES = ("executor", "planner", "toolrunner", "memory", "tracing")
