"""Every message and event agentloom stores or sends, in one module.

Design notes
- Each Struct has an explicit, stable ``tag``: renaming a class never breaks a stored
  stream or a client in another language. ``proto/`` is generated from this module
  (``python -m loom_infra.proto_gen``) and a test fails when it is stale.
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
    missing_step, missing_field, duplicate_step_id, invalid_step_id, invalid_input,
    invalid_template, missing_input, invalid_plan, invalid_json, invalid_step,
    invalid_items, invalid_predicate, predicate_references_nothing, loop_without_cap,
    multiple_final_steps, no_model_configured; over a fan-out cap (``loom_core.caps``):
    too_many_items, too_much_concurrency, too_many_branches, too_many_iterations."""

    code: str
    path: str
    message: str


# --------------------------------------------------------------------------- plans


# A predicate is declarative JSON, never code: {"eq": [a, b]}, {"gt": [a, b]} (also ne,
# gte, lt, lte), {"and": [p, ...]}, {"or": [p, ...]}, {"not": p},
# {"exists": "{{ steps.x.output.y }}"}, {"in": [a, [..]]}, {"contains": [list_or_text, a]},
# {"empty": a}. Operands are JSON values or templates. See loom_core.predicates.
Predicate = dict[str, JSON]


class RetryPolicy(Inbound, tag="retry", tag_field="type"):
    """Attempts of one step. The wait before attempt n+1 is
    ``min(initial_delay_s * multiplier**(n-1), max_delay_s)``, spread by up to ``jitter``
    (a fraction) derived from the idempotency key, so replay computes the same wait.
    Every error is retried except codes listed in ``non_retryable`` and errors that can
    never succeed by trying again (``loom_core.executor.NEVER_RETRIED``: invalid input,
    unknown tool, refused address, ambiguous outcome, ...)."""

    max_attempts: int = 3
    initial_delay_s: float = 1.0
    multiplier: float = 2.0
    max_delay_s: float = 60.0
    jitter: float = 0.0
    non_retryable: list[str] = []


# Steps are never tracked by the garbage collector (``gc=False``, every kind below): a
# step is frozen and holds strings, numbers, other steps and JSON values decoded from a
# plan, so no reference cycle can go through one. A long run holds two references to
# each step it ran (its plan's, its instance's): a restored state's steps are then not
# walked by the next young collection (issue 10, ``loom_core.executor.Inst``).
class ToolStep(Inbound, tag="tool", tag_field="kind", gc=False):
    """Call one tool. ``input`` values may hold templates such as
    ``{{ input.city }}`` or ``{{ steps.fetch.output.title }}``. ``timeout_s`` bounds one
    attempt, ``step_timeout_s`` the whole step including retries and waits.
    ``on_error``: ``fail`` the run, ``continue`` (the step fails, dependents are skipped,
    the run goes on) or ``fallback`` (run ``fallback`` in its place; its output becomes
    this step's output)."""

    id: str
    tool: str
    input: dict[str, JSON] = {}
    depends_on: list[str] = []
    timeout_s: float | None = None
    step_timeout_s: float | None = None
    retry: RetryPolicy | None = None
    on_error: Literal["fail", "continue", "fallback"] = "fail"
    fallback: ToolStep | None = None
    description: str = ""


class ForeachStep(Inbound, tag="foreach", tag_field="kind", gc=False):
    """Run ``do`` (a sub-plan) once per element of ``items`` (an array or a template
    naming one), at most ``concurrency`` at a time. Inside, ``{{ item }}`` and
    ``{{ index }}`` name the element. Each element's result is ``output`` rendered in its
    scope (default: the output of the body's last step); the step's output is the array
    of results in input order. ``failure``: ``fail_fast`` (first failure fails the step,
    the rest is cancelled), ``collect`` (every element runs; failed ones are null and
    their errors are listed), or set ``min_success`` (fails when fewer succeed)."""

    id: str
    items: JSON
    do: list[Step]
    depends_on: list[str] = []
    concurrency: int = 8
    failure: Literal["fail_fast", "collect"] = "fail_fast"
    min_success: int | None = None
    output: JSON = None
    on_error: Literal["fail", "continue"] = "fail"
    description: str = ""


class LoopStep(Inbound, tag="loop", tag_field="kind", gc=False):
    """Run ``do`` again and again: ``while`` is checked before each iteration,
    ``until`` after each; ``max_iterations`` is mandatory (a loop without a cap is an
    invalid plan). Inside, ``{{ iteration }}`` counts from 0 and ``{{ steps.x.output }}``
    sees the current iteration's steps (and, for steps not in the body, the outer
    ones). The step's output is the last iteration's result (``output`` or the body's
    last step)."""

    id: str
    do: list[Step]
    max_iterations: int
    while_: Predicate | None = msgspec.field(default=None, name="while")
    until: Predicate | None = None
    depends_on: list[str] = []
    output: JSON = None
    on_error: Literal["fail", "continue"] = "fail"
    description: str = ""


class ParallelStep(Inbound, tag="parallel", tag_field="kind", gc=False):
    """Branches (named sub-plans) that run concurrently and join; the output maps each
    branch to its result (the branch's last step)."""

    id: str
    branches: dict[str, list[Step]]
    depends_on: list[str] = []
    on_error: Literal["fail", "continue"] = "fail"
    description: str = ""


class ReduceStep(Inbound, tag="reduce", tag_field="kind", gc=False):
    """Fold ``items`` into one value, in order: ``do`` runs once per element with
    ``{{ acc }}`` (starting at ``initial``), ``{{ item }}`` and ``{{ index }}``; its
    result (``output`` or the body's last step) is the next ``acc``. The step's output
    is the final ``acc`` (``initial`` for no items)."""

    id: str
    items: JSON
    do: list[Step]
    initial: JSON = None
    depends_on: list[str] = []
    output: JSON = None
    on_error: Literal["fail", "continue"] = "fail"
    description: str = ""


class IfStep(Inbound, tag="if", tag_field="kind", gc=False):
    """Branch on a declarative predicate. The branch not taken is recorded as skipped.
    The output is the taken branch's result (its last step), or null."""

    id: str
    condition: Predicate
    then: list[Step] = []
    else_: list[Step] = msgspec.field(default_factory=list, name="else")
    depends_on: list[str] = []
    on_error: Literal["fail", "continue"] = "fail"
    description: str = ""


class FinalStep(Inbound, tag="final", tag_field="kind", gc=False):
    """Produce the run's output from earlier results (a template). When a plan has a
    final step, its output is the run's output."""

    id: str
    output: JSON
    depends_on: list[str] = []
    description: str = ""


class SleepStep(Inbound, tag="sleep", tag_field="kind", gc=False):
    """A durable timer: wait ``seconds`` or until ``until`` (an ISO 8601 time with a
    zone, or a template giving one). It survives restarts of every service."""

    id: str
    seconds: float | None = None
    until: str | None = None
    depends_on: list[str] = []
    description: str = ""


class ApprovalStep(Inbound, tag="approval", tag_field="kind", gc=False):
    """Suspend for a person: ``payload`` (a template) tells them what to decide,
    ``schema`` (JSON Schema) says what the answer must look like, ``label`` is how they
    find it (``loom resume RUN --label L``). The answer becomes the step's output.
    ``expires_in_s`` bounds the wait; ``on_expire``: ``fail`` the step, take ``default``
    as the answer, or ``escalate`` to ``escalate_to`` (a new label, waiting again)."""

    id: str
    label: str
    payload: JSON = None
    schema: dict[str, JSON] = {}
    depends_on: list[str] = []
    expires_in_s: float | None = None
    on_expire: Literal["fail", "default", "escalate"] = "fail"
    default: JSON = None
    escalate_to: str | None = None
    description: str = ""


class EventMatch(Inbound, tag="event_match", tag_field="type"):
    """An external event a run waits for: its ``name`` and correlation ``key`` (a
    template, e.g. ``{{ input.order_id }}``); both become subject tokens."""

    name: str
    key: str


class WaitEventStep(Inbound, tag="wait_event", tag_field="kind", gc=False):
    """Wait for external events (published to ``loom.signal.{name}.{key}``): ``any``
    one of them or ``all``. The output maps each received event's name to its payload.
    ``timeout_s`` bounds the wait (the step fails with ``wait_timeout``). An event
    published before the wait began counts (the latest one with that name and key)."""

    id: str
    events: list[EventMatch]
    mode: Literal["any", "all"] = "any"
    timeout_s: float | None = None
    depends_on: list[str] = []
    on_error: Literal["fail", "continue"] = "fail"
    description: str = ""


class SubRunStep(Inbound, tag="sub_run", tag_field="kind", gc=False):
    """Start a child run of ``plan`` with ``input`` (templates) and wait for it: the
    child's output becomes this step's output; its failure fails the step. The child's
    id is derived from this run and step (or ``run_id``, a template); parent and child
    record each other (``RunRequested.parent``, ``sub_run_requested``)."""

    id: str
    plan: Plan
    input: dict[str, JSON] = {}
    run_id: str | None = None
    depends_on: list[str] = []
    on_error: Literal["fail", "continue"] = "fail"
    description: str = ""


class Budget(Inbound, tag="budget", tag_field="type"):
    """Limits on model use the engine enforces (per run on the plan, per agent step on
    the step): total tokens (in + out), cost in USD, model calls. Crossing one suspends
    the step with label ``budget`` (``loom resume RUN --label budget --data
    '{"max_tokens": 20000}'`` raises it; cancel to stop). Unset: no limit."""

    max_tokens: int | None = None
    max_cost_usd: float | None = None
    max_model_calls: int | None = None


class SemanticRecall(Inbound, tag="semantic_recall", tag_field="type"):
    """Messages like the task recalled from memory before an agent's first turn: the
    ``top_k`` best hits, each with ``window`` neighbouring messages either side, from
    the run's thread (``scope: thread``) or all of the run's user's threads
    (``scope: resource``). ``query`` (a template) defaults to the step's rendered
    ``input``."""

    top_k: int = 3
    window: int = 1
    scope: Literal["thread", "resource"] = "thread"
    threshold: float | None = None
    query: str | None = None


class AgentMemory(Inbound, tag="agent_memory", tag_field="type"):
    """What an agent step recalls before its first turn (``loom_core.agent``), as tool
    calls the run records, put in front of the model's conversation: the run's thread's
    last ``last_messages`` messages, a semantic recall, the working memory document
    (``working_memory``: the run's thread's, or the user's own), which the model may then
    update by compare-and-set with the ``working_memory_set`` tool. ``thread_id`` (a
    template) names the thread; default: the run's."""

    last_messages: int = 0
    semantic_recall: SemanticRecall | None = None
    working_memory: Literal["thread", "user"] | None = None
    thread_id: str | None = None


class AgentDelegate(Inbound, tag="agent_delegate", tag_field="type"):
    """A plan an agent step's model may call as a tool, by its name in
    ``AgentStep.delegates``: each call is an ordinary sub-run of ``plan`` whose input is
    the call's arguments (checked against ``input_schema``), linked to the agent step
    (``RunRequested.parent``); the child's output, or its failure, is the tool's answer.
    Another agent as a tool is a plan with an agent step."""

    description: str
    plan: Plan
    input_schema: dict[str, JSON] = msgspec.field(default_factory=lambda: {"type": "object"})


class AgentStep(Inbound, tag="agent", tag_field="kind", gc=False):
    """A model working in turns (ReAct): each turn is requested as an event and
    answered by the planner service; the tools the model calls (only those in
    ``tools``) run as ordinary tool calls. ``instructions`` (the system prompt) and
    ``input`` (the task, any JSON) are templates. With ``output_schema`` the final
    answer must be JSON matching it (a violation is told to the model, within
    ``max_turns``); without, the output is the answer's text. ``model``: a configured
    model name (default: the planner's default model). Needs a model (LOOM_MODEL or
    LOOM_MODELS_FILE)."""

    id: str
    instructions: str
    input: JSON = None
    model: str | None = None
    tools: list[str] = []
    output_schema: dict[str, JSON] | None = None
    max_turns: int = 8
    budget: Budget | None = None
    depends_on: list[str] = []
    on_error: Literal["fail", "continue"] = "fail"
    description: str = ""
    memory: AgentMemory | None = None  # recalled into the context before the first turn
    delegates: dict[str, AgentDelegate] = {}  # plans (other agents) called as tools


Step = (
    ToolStep
    | ForeachStep
    | LoopStep
    | ParallelStep
    | ReduceStep
    | IfStep
    | FinalStep
    | SleepStep
    | ApprovalStep
    | SubRunStep
    | WaitEventStep
    | AgentStep
)


class Replan(Inbound, tag="replan", tag_field="type"):
    """Re-planning after a failed step (opt-in per plan): when a step's failure would
    fail the run, the planner's model is asked, at most ``max`` times per run, for the
    steps that remain given the failure; the steps that succeeded are kept with their
    outputs. ``model``: a configured model name (default: the planner's). Needs a model."""

    max: int = 1
    model: str | None = None


class Plan(Inbound, tag="plan", tag_field="type"):
    """A validated plan is a DAG of steps. ``output`` is a template rendered when every
    step is done; when absent the run's output maps each sink step to its output."""

    steps: list[Step]
    output: JSON = None
    name: str = ""
    timeout_s: float | None = None
    version: Literal[1] = 1
    budget: Budget | None = None  # model use of the whole run (agent steps)
    replan: Replan | None = None  # ask the planner for the rest after a failed step


# --------------------------------------------------------------------------- blobs


class BlobReference(
    msgspec.Struct,
    tag="blob_ref",
    tag_field="type",
    frozen=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
):
    """A big value stored by reference (``loom_core.blobs``): wherever a JSON value may
    stand (a run's input, a tool's input or output, a step's or the run's output), this
    object stands for the value whose canonical JSON (compact, keys sorted) has the sha256
    ``$blob`` and ``bytes`` bytes, stored in the blob bucket (the Object Store
    ``loom_blobs``, object name: the 64 hex digits). ``path``: only a part of that value
    (keys and indexes), what a template selecting into a reference renders to. Upload
    first (``loom blob put``, ``LoomClient.put_blob``), then pass the reference. The
    engine writes references without ``type`` (a dict with a ``$blob`` key is one);
    ``"type": "blob_ref"`` is accepted."""

    blob: str = msgspec.field(name="$blob")  # "sha256:" + 64 lowercase hex digits
    bytes: int
    media_type: str = "application/json"
    path: list[str | int] = []


# --------------------------------------------------------------------------- tools


class ToolSpec(Record, tag="tool_spec", tag_field="type"):
    """What the tool-runner publishes about a tool (in the ``loom_tools`` KV bucket)."""

    name: str
    description: str
    input_schema: dict[str, JSON]
    output_schema: dict[str, JSON]
    idempotent: bool = True
    timeout_s: float = 30.0
    # Catalog facts (issue 13); specs published before them read as a built-in tool.
    # ``source``: ``builtin``, ``module:<python module>`` or ``mcp:<server>``.
    source: str = "builtin"
    category: str = ""
    requires_auth: bool = False  # an anonymous principal may not use it
    admin_only: bool = False  # only a principal with the ``admin`` role may use it
    available: bool = True  # False while its MCP server is not connected
    breaker: str = "closed"  # its circuit breaker: closed, open or half_open
    unavailable_reason: str = ""


# --------------------------------------------------------------------------- submit


class ForkOrigin(Record, tag="fork_origin", tag_field="type"):
    """Where a forked run comes from: ``run_id`` and the step instance it re-executes
    from (``b``, ``each/2/ok``). ``reused`` maps each instance path whose recorded (or,
    for those in ``edited``, edited) result the fork takes instead of running it (a
    step, or a whole element / branch / composite); forks made before instance paths
    hold top-level step ids, which are paths too (``loom_core.fork_reuse``)."""

    run_id: str
    from_step: str
    reused: dict[str, JSON] = {}
    edited: list[str] = []


class ParentLink(Record, tag="parent_link", tag_field="type"):
    """The run and step that started a child run (a ``sub_run`` step)."""

    run_id: str
    step_id: str


class Principal(Record, tag="principal", tag_field="type"):
    """Who a run acts for. Only the executor sets it: from the JWT verified in the submit
    request's ``Authorization: Bearer`` header and from the NATS identity that submitted
    (``via``: the submit subject's last token, ``client`` or ``operator``; ``executor``
    for runs the engine made, which inherit their origin's principal). Never taken from a
    request body or a plan. A user is ``(issuer, user_id)``; ``anonymous`` (no token, when
    the stack allows it) has no roles and no permissions. The token is never stored;
    ``token_id`` is its ``jti`` claim, for audit."""

    user_id: str
    via: str
    roles: list[str] = []
    permissions: list[str] = []
    tenant: str = "default"
    anonymous: bool = False
    issuer: str | None = None
    token_id: str | None = None
    # the tenant is the NATS identity's (submitted by a tenant's user on its tenant's
    # subject, loom_core.tenancy), not only a token's claim: only such a run is that
    # tenant's for isolation, quotas and routing; sub-runs and forks inherit it
    tenant_verified: bool = False


class RunRequest(Inbound, tag="run_request", tag_field="type"):
    """Published (request/reply) on ``loom.submit.{via}`` (``via``: your identity,
    ``client`` or ``operator``). Give either ``plan`` or ``request`` (natural language,
    needs a model). ``run_id`` makes submission idempotent: submitting the same request
    with the same id again returns the existing run (``existing: true``); the same id
    with another plan or input is refused ``run_id_conflict``. Who the run acts for comes
    from the ``Authorization:
    Bearer <JWT>`` header, never from this body."""

    plan: Plan | None = None
    request: str | None = None
    input: dict[str, JSON] = {}
    run_id: str | None = None
    thread_id: str | None = None
    labels: dict[str, str] = {}
    # W3C trace context of the submitter; the ``traceparent`` NATS header wins over it
    traceparent: str | None = None
    fork: ForkOrigin | None = None  # set by `loom fork`: outputs reused from another run
    parent: ParentLink | None = None  # set for a child run started by a sub_run step
    # the run's model budget; wins over the plan's (a model-written plan cannot lift it)
    budget: Budget | None = None
    # the tenant's queue the run waits in when its tenant or queue is at its concurrent
    # run limit (loom_core.quotas; "" the tenant's default queue), and its priority
    # there: waiting runs start highest priority first, then in submission order
    queue: str = ""
    priority: int = 0


class SubmitAccepted(Record, tag="submit_accepted", tag_field="type"):
    run_id: str
    existing: bool = False


class SubmitRejected(Record, tag="submit_rejected", tag_field="type"):
    error: ErrorInfo


SubmitReply = SubmitAccepted | SubmitRejected


# --------------------------------------------------------------------------- models
# What a model was asked and answered (loom_core.agent, the planner's model layer).
# Model output is untrusted input: the executor checks it like any client's.


class ModelToolCall(Record, tag="model_tool_call", tag_field="type"):
    """One tool call a model asked for; ``arguments`` is its text as sent (JSON, maybe
    malformed: the executor parses and checks it)."""

    id: str
    name: str
    arguments: str = ""


class ModelMessage(Record, tag="model_message", tag_field="type"):
    """One chat message of a model conversation."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ModelToolCall] = []
    tool_call_id: str | None = None


class ModelUsage(Record, tag="model_usage", tag_field="type"):
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0


class ModelAttempt(Record, tag="model_attempt", tag_field="type"):
    """One HTTP call to a model provider (the litellm Router's retries and fallbacks
    each make one). ``model``: the configured name; ``fallback``: it stood in for the
    requested one; ``error`` set when the attempt failed."""

    model: str
    provider: str = ""
    provider_model: str = ""
    fallback: bool = False
    latency_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    error: ErrorInfo | None = None


class PlanningRecord(Record, tag="planning", tag_field="type"):
    """How a model planned a natural-language request: which model, the prompt's
    identity (``prompt_id``: a version and a digest of the prompt and tool catalog; the
    text is not stored), each proposal's problems fed back (``repairs``), every
    attempt, and the usage in total."""

    model: str
    prompt_id: str
    attempts: list[ModelAttempt] = []
    repairs: list[list[PlanIssue]] = []
    usage: ModelUsage = ModelUsage()


# --------------------------------------------------------------------------- run events
# Past tense, one per fact. Every event belongs to exactly one run; the envelope
# (EventRecord) carries the run id, the position and the time.


class SizeLimits(Record, tag="size_limits", tag_field="type"):
    """The size limits a run was decided under (``loom_core.sizes``): recorded in its
    ``run_requested`` from the executor's settings, so replay decides the same."""

    step_input_bytes: int
    step_output_bytes: int


class Caps(Record, tag="caps", tag_field="type"):
    """The fan-out caps a run was decided under (``loom_core.caps``): recorded in its
    ``run_requested`` from the executor's settings, so replay decides the same. Most
    elements of one foreach/reduce, most elements at once, most branches of one
    parallel, the highest ``max_iterations`` of a loop."""

    foreach_items: int
    foreach_concurrency: int
    parallel_branches: int
    loop_iterations: int


class RunRequested(Record, tag="run_requested", tag_field="type"):
    plan: Plan | None = None
    request: str | None = None
    input: dict[str, JSON] = {}
    thread_id: str | None = None
    labels: dict[str, str] = {}
    traceparent: str | None = None  # the submitter's trace: the run's trace continues it
    fork: ForkOrigin | None = None
    parent: ParentLink | None = None
    principal: Principal | None = None  # None only in runs stored before principals
    # JSON paths of the request whose inline secrets the executor replaced by
    # "[redacted]" before storing it (loom_core.secrets.redact_request)
    redacted: list[str] = []
    # None only in runs stored before size limits were recorded: they use the defaults
    limits: SizeLimits | None = None
    # None only in runs stored before caps were recorded: they were decided without
    # caps, and replay keeps it so (loom_core.caps)
    caps: Caps | None = None
    budget: Budget | None = None  # the submitter's model budget (wins over the plan's)
    # how its agent turns' model_call_requested hold the conversation: "new", only the
    # messages new since the previous turn's request (``appended``); "whole" (runs stored
    # before lean turns), each the whole conversation. Replay keeps the recorded one.
    turn_messages: Literal["whole", "new"] = "whole"
    queue: str = ""  # the request's queue and priority (loom_core.quotas)
    priority: int = 0
    # over its concurrent run limit when submitted: run_queued follows, and no step
    # starts before run_admitted (the executor's admission decided it, recorded here so
    # replay decides the same)
    queued: bool = False


class PlanAccepted(Record, tag="plan_accepted", tag_field="type"):
    plan: Plan
    planner: str = "explicit"
    planning: PlanningRecord | None = None  # set when a model wrote the plan


class PlanRejected(Record, tag="plan_rejected", tag_field="type"):
    issues: list[PlanIssue]
    planning: PlanningRecord | None = None  # set when a model tried to plan


class StepScheduled(Record, tag="step_scheduled", tag_field="type"):
    step_id: str


class StepStarted(Record, tag="step_started", tag_field="type"):
    step_id: str
    attempt: int


class SuspendRequest(Record, tag="suspend_request", tag_field="type"):
    """A tool asking for a person mid-run: the step suspends; on resume the tool is
    called again (next attempt) with the answer in ``ToolCallRequested.resume``."""

    label: str
    payload: JSON = None
    schema: dict[str, JSON] = {}


class ToolCallRequested(Record, tag="tool_call_requested", tag_field="type"):
    """The command to the tool-runner (requests are events). ``input`` is already
    rendered; ``idempotency_key`` is ``{run_id}:{step_id}:{attempt}``."""

    step_id: str
    attempt: int
    tool: str
    input: dict[str, JSON]
    idempotency_key: str
    timeout_s: float | None = None
    resume: JSON = None  # a person's answer, when the tool asked to suspend before
    # where the plan wrote `{{ secrets.NAME }}` in ``input`` (JSON path -> names, in
    # order): the tool-runner resolves these and no other (loom_core.secrets)
    secret_refs: dict[str, list[str]] = {}


class ToolCallCompleted(Record, tag="tool_call_completed", tag_field="type"):
    step_id: str
    attempt: int
    idempotency_key: str
    output: JSON
    started_at: datetime
    finished_at: datetime
    suspend: SuspendRequest | None = None  # the tool asked for a person instead
    # circuit-breaker transitions during the call (a failed call has them in its
    # error's ``details.breaker``); older events have none
    breaker: list[dict[str, JSON]] = []
    # how long the call waited for its tenant's call rate (LOOM_QUOTAS_FILE)
    throttled_ms: float = 0.0


class ToolCallFailed(Record, tag="tool_call_failed", tag_field="type"):
    step_id: str
    attempt: int
    idempotency_key: str
    error: ErrorInfo
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # how long the call waited for its tenant's call rate (LOOM_QUOTAS_FILE)
    throttled_ms: float = 0.0


class StepSuspended(Record, tag="step_suspended", tag_field="type"):
    """A step waits for a person (an approval step, or a tool that asked to suspend).
    ``suspension_id`` = ``{step_id}#{n}``; ``schema`` validates the answer."""

    step_id: str
    suspension_id: str
    label: str
    payload: JSON = None
    schema: dict[str, JSON] = {}
    expires_at: datetime | None = None


class StepResumed(Record, tag="step_resumed", tag_field="type"):
    """The answer to a suspension: exactly one per suspension. ``by`` is who answered
    (``expiry`` when a default was taken), ``request_id`` makes resume idempotent."""

    step_id: str
    suspension_id: str
    data: JSON
    by: str
    request_id: str


class EventWaitStarted(Record, tag="event_wait_started", tag_field="type"):
    """A step waits for external events (keys rendered); the signal router reads it."""

    step_id: str
    matches: list[EventMatch]
    mode: Literal["any", "all"] = "any"


class EventReceived(Record, tag="event_received", tag_field="type"):
    """An external event a waiting step matched (recorded once per name)."""

    step_id: str
    name: str
    key: str
    payload: JSON = None
    signal_id: str = ""


class SubRunRequested(Record, tag="sub_run_requested", tag_field="type"):
    """The command to start a child run (the executor's sub-run consumer submits it)."""

    step_id: str
    child_run_id: str
    plan: Plan
    input: dict[str, JSON] = {}


class SubRunEnded(Record, tag="sub_run_ended", tag_field="type"):
    """The child run ended: ``status`` completed, failed, cancelled or rejected."""

    step_id: str
    child_run_id: str
    status: str
    output: JSON = None
    error: ErrorInfo | None = None


class ModelCallRequested(Record, tag="model_call_requested", tag_field="type"):
    """The command to the planner service: one turn of agent step ``step_id``.
    ``messages`` is the conversation so far, or with ``appended`` only what is new since
    turn ``turn - 1``'s request (the model's answer, the tools' results, feedback): the
    conversation is the fold of the step's requests (``loom_core.agent.conversation``),
    so a long agent's history grows linearly, not quadratically. ``tools`` names the
    registry tools the model may call (the planner describes them from the catalog).
    ``idempotency_key`` is ``{run_id}:{step_id}:turn{turn}``."""

    step_id: str
    turn: int
    messages: list[ModelMessage]
    idempotency_key: str
    model: str | None = None
    tools: list[str] = []
    output_schema: dict[str, JSON] | None = None
    appended: bool = False
    # the step's delegates as the model sees them (name, description, input schema):
    # they are not in the tool catalog
    delegates: list[ToolSpec] = []


class ModelCallCompleted(Record, tag="model_call_completed", tag_field="type"):
    """A model's answer to one turn: the assistant ``message`` (text and/or tool calls),
    ``finish_reason``, the model that answered, each attempt and the usage."""

    step_id: str
    turn: int
    idempotency_key: str
    message: ModelMessage
    started_at: datetime
    finished_at: datetime
    finish_reason: str = ""
    model: str = ""
    provider: str = ""
    attempts: list[ModelAttempt] = []
    usage: ModelUsage = ModelUsage()
    # how long the call waited for its tenant's call rate (LOOM_QUOTAS_FILE)
    throttled_ms: float = 0.0


class ModelCallFailed(Record, tag="model_call_failed", tag_field="type"):
    step_id: str
    turn: int
    idempotency_key: str
    error: ErrorInfo
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: list[ModelAttempt] = []
    usage: ModelUsage = ModelUsage()
    # how long the call waited for its tenant's call rate (LOOM_QUOTAS_FILE)
    throttled_ms: float = 0.0


class ModelOutputRefused(Record, tag="model_output_refused", tag_field="type"):
    """Part of a model's answer the engine would not act on (a tool call with malformed
    JSON, an unknown tool, too many calls; a final answer that breaks the output
    schema): the error is told to the model in the next turn."""

    step_id: str
    turn: int
    error: ErrorInfo
    call_id: str = ""


class ReplanRequested(Record, tag="replan_requested", tag_field="type"):
    """The command to the planner: step ``step_id`` failed (``error``) and would fail the
    run; write the steps that remain (re-planning ``attempt`` of ``Replan.max``).
    ``plan``: the plan that failed; ``kept``: the top-level steps that succeeded (kept,
    with their outputs, in the revised plan); ``outputs``: their outputs, each at most
    ``loom_core.replanning.OUTPUT_TOLD_BYTES`` of JSON (a larger one is described)."""

    attempt: int
    step_id: str
    error: ErrorInfo
    plan: Plan
    kept: list[str] = []
    outputs: dict[str, JSON] = {}
    model: str | None = None
    # top-level ids the new steps must not take: steps of this run that did not succeed
    # (their instance paths name idempotency keys and child runs already used)
    retired: list[str] = []


class PlanRevised(Record, tag="plan_revised", tag_field="type"):
    """The planner's answer to re-planning ``attempt``, accepted: ``plan`` is the whole
    revised plan (the kept steps, verbatim, then the new ones); the run goes on with it
    and the kept steps are not run again."""

    attempt: int
    plan: Plan
    kept: list[str] = []
    planning: PlanningRecord | None = None


class ReplanRefused(Record, tag="replan_refused", tag_field="type"):
    """Re-planning ``attempt`` gave no valid plan (the model's problems, or no model):
    the run fails with the step's failure."""

    attempt: int
    issues: list[PlanIssue]
    planning: PlanningRecord | None = None


class StepCompleted(Record, tag="step_completed", tag_field="type"):
    step_id: str
    output: JSON
    reused_from: str | None = None  # a forked run reusing the origin's recorded output


class StepFailed(Record, tag="step_failed", tag_field="type"):
    step_id: str
    error: ErrorInfo


class StepSkipped(Record, tag="step_skipped", tag_field="type"):
    step_id: str
    reason: str


class StepCancelled(Record, tag="step_cancelled", tag_field="type"):
    step_id: str
    reason: str


class StepRetryScheduled(Record, tag="step_retry_scheduled", tag_field="type"):
    """Attempt ``attempt`` failed with ``error`` and will be retried after ``delay_s``
    (a durable timer, ``TimerStarted`` with purpose ``retry``, follows)."""

    step_id: str
    attempt: int
    delay_s: float
    error: ErrorInfo


class TimerStarted(Record, tag="timer_started", tag_field="type"):
    """A durable timer: the timer service answers ``TimerElapsed`` at ``fire_at``.
    Purposes: sleep, retry, step_timeout, run_timeout."""

    timer_id: str
    fire_at: datetime
    purpose: Literal[
        "sleep", "retry", "step_timeout", "run_timeout", "suspension_expiry", "wait_timeout"
    ]
    step_id: str | None = None


class TimerFired(Record, tag="timer_fired", tag_field="type"):
    timer_id: str


class ForeachStarted(Record, tag="foreach_started", tag_field="type"):
    """The items a foreach or reduce step iterates over, resolved when it starts."""

    step_id: str
    count: int
    items: list[JSON] = []


class LoopIterationStarted(Record, tag="loop_iteration_started", tag_field="type"):
    step_id: str
    iteration: int


class BranchTaken(Record, tag="branch_taken", tag_field="type"):
    """Which side of an ``if`` step runs; ``branch`` is ``then`` or ``else``."""

    step_id: str
    branch: Literal["then", "else"]


class ToolCallCancelled(Record, tag="tool_call_cancelled", tag_field="type"):
    """Tells the tool-runner to stop an in-flight call (its result, if any, is ignored)."""

    step_id: str
    attempt: int
    idempotency_key: str
    reason: str


class RunPaused(Record, tag="run_paused", tag_field="type"):
    by: str
    reason: str = ""


class RunUnpaused(Record, tag="run_unpaused", tag_field="type"):
    by: str


class RunQueued(Record, tag="run_queued", tag_field="type"):
    """The run's tenant or queue was at its concurrent run limit when it was submitted:
    it waits (planned, no step started) until a slot frees (``run_admitted``). Waiting
    runs start highest ``priority`` first, then in submission order; none is dropped."""

    queue: str = ""
    priority: int = 0


class RunAdmitted(Record, tag="run_admitted", tag_field="type"):
    """A slot of the run's tenant and queue freed: its steps start."""

    queue: str = ""


class RunNeedsReview(Record, tag="run_needs_review", tag_field="type"):
    """An effect's outcome is unknown (a non-idempotent tool's runner died mid-call): the
    run stops and waits for a person; it is never retried automatically."""

    step_id: str
    error: ErrorInfo


class RunCompleted(Record, tag="run_completed", tag_field="type"):
    output: JSON


class RunFailed(Record, tag="run_failed", tag_field="type"):
    error: ErrorInfo


class RunPublishFailed(Record, tag="run_publish_failed", tag_field="type"):
    """The relay could not publish event ``seq`` of this run, ever (``code``:
    ``event_too_large`` over the broker's max_payload, or ``event_unpublishable``); it
    went on with the other runs. The cancellations and ``run_failed`` follow."""

    seq: int
    event_type: str
    code: str
    size: int = 0
    limit: int = 0
    message: str = ""


class RunCancelRequested(Record, tag="run_cancel_requested", tag_field="type"):
    """An operator asked to cancel; the cancellations and ``run_cancelled`` follow."""

    by: str
    reason: str = ""


class RunDiverged(Record, tag="run_diverged", tag_field="type"):
    """Replaying the run's history with the current code decided differently at event
    ``seq``: the run is parked (never retried in a loop) until someone looks."""

    seq: int
    recorded: JSON
    decided: JSON
    message: str


class RunCancelled(Record, tag="run_cancelled", tag_field="type"):
    by: str
    reason: str = ""


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
    | StepCancelled
    | StepRetryScheduled
    | TimerStarted
    | TimerFired
    | ForeachStarted
    | LoopIterationStarted
    | BranchTaken
    | ToolCallCancelled
    | RunPaused
    | RunUnpaused
    | RunQueued
    | RunAdmitted
    | RunNeedsReview
    | StepSuspended
    | StepResumed
    | SubRunRequested
    | SubRunEnded
    | EventWaitStarted
    | EventReceived
    | ModelCallRequested
    | ModelCallCompleted
    | ModelCallFailed
    | ModelOutputRefused
    | ReplanRequested
    | PlanRevised
    | ReplanRefused
    | RunCancelRequested
    | RunPublishFailed
    | RunDiverged
    | RunCompleted
    | RunFailed
    | RunCancelled
)

TERMINAL_EVENTS = (RunCompleted, RunFailed, PlanRejected, RunCancelled)


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
        return type(self.event).__struct_config__.tag  # type: ignore[return-value]  # every event tag is a str


# --------------------------------------------------------------------------- inbox
# Results arriving at a run (subject ``loom.inbox.{run_id}``, stream LOOM_INBOX).


class PlanProposed(Record, tag="plan_proposed", tag_field="type"):
    run_id: str
    plan: Plan
    planner: str = "explicit"
    planning: PlanningRecord | None = None
    # digest of the run_requested record this answers (``loom_core.executor.
    # request_digest``): the executor believes only a verdict on the request it stored
    request_digest: str | None = None


class PlanRefused(Record, tag="plan_refused", tag_field="type"):
    run_id: str
    issues: list[PlanIssue]
    planning: PlanningRecord | None = None
    request_digest: str | None = None


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
    suspend: SuspendRequest | None = None
    # digest of the tool_call_requested record this answers: a result computed for
    # another (forged) request under the same idempotency key is refused
    request_digest: str | None = None
    # circuit-breaker transitions during this call (loom_services.tools.breakers):
    # {"breaker", "from", "to", "at", "failures"}; copied into ToolCallCompleted
    breaker: list[dict[str, JSON]] = []
    # how long the call waited for its tenant's call rate (LOOM_QUOTAS_FILE)
    throttled_ms: float = 0.0


class ModelResult(Record, tag="model_result", tag_field="type"):
    """The planner service's answer to one ModelCallRequested (``ok``: ``message`` is
    the model's answer; else ``error``). ``request_digest`` names the stored request."""

    run_id: str
    step_id: str
    turn: int
    idempotency_key: str
    ok: bool
    started_at: datetime
    finished_at: datetime
    message: ModelMessage | None = None
    finish_reason: str = ""
    model: str = ""
    provider: str = ""
    attempts: list[ModelAttempt] = []
    usage: ModelUsage = ModelUsage()
    error: ErrorInfo | None = None
    request_digest: str | None = None
    # how long the call waited for its tenant's call rate (LOOM_QUOTAS_FILE)
    throttled_ms: float = 0.0


class TimerElapsed(Record, tag="timer_elapsed", tag_field="type"):
    """From the timer service: a ``TimerStarted`` timer reached its time."""

    run_id: str
    timer_id: str


class RunControl(Inbound, tag="run_control", tag_field="type"):
    """Operator request on ``loom.control`` (request/reply): cancel a run, pause it (no
    new step starts; in-flight ones finish) or unpause it."""

    run_id: str
    action: Literal["cancel", "pause", "unpause"]
    by: str = "operator"
    reason: str = ""


class ResumeRun(Inbound, tag="resume_run", tag_field="type"):
    """Answer a suspension (request/reply on ``loom.resume``), by ``label`` or
    ``suspension_id``. ``request_id`` makes it idempotent: the same id gets the same
    answer. ``data`` must match the suspension's schema, else nothing changes."""

    run_id: str
    data: JSON
    label: str | None = None
    suspension_id: str | None = None
    request_id: str = ""
    by: str = "operator"


class ResumeReply(Record, tag="resume_reply", tag_field="type"):
    """``ok``: this request resumed it (or is a repeat of the request that did).
    Otherwise ``error`` says why; ``already`` holds who answered first, and with what."""

    run_id: str = ""
    ok: bool = False
    suspension_id: str | None = None
    error: ErrorInfo | None = None
    already: StepResumed | None = None
    # the run whose suspension this request answered (or names): the run addressed, or
    # a sub-run of it when the parent was resumed with a child's label or suspension id
    answered_run_id: str = ""


class ForkRun(Inbound, tag="fork_run", tag_field="type"):
    """Fork a recorded run (request/reply on ``loom.fork``): a new run with the same plan
    that reuses every recorded result that depends neither on ``from_step`` (a step
    instance path at any depth: ``b``, ``each/2/ok``, ``reviews/legal/legal_ok``) nor on
    an edited one. ``set_output`` edits recorded outputs by instance path (their
    dependents run again); ``input`` replaces the run input. The executor computes what
    is reused from its own store: a client never says which outputs a run produced.
    Refusals: ``unknown_step`` (details: close matches), ``step_never_ran``,
    ``invalid_output`` (an edit that does not fit an approval's schema), ``fork_too_large``
    (the reused results exceed what a run request may carry), ``invalid_fork``."""

    run_id: str
    from_step: str
    set_output: dict[str, JSON] = {}
    input: dict[str, JSON] | None = None
    new_run_id: str | None = None


class ForkReply(Record, tag="fork_reply", tag_field="type"):
    """``run_id``: the new run (``existing`` when that id was already taken by an
    earlier identical fork request). Otherwise ``error`` says why."""

    run_id: str = ""
    existing: bool = False
    error: ErrorInfo | None = None


class RunControlReply(Record, tag="run_control_reply", tag_field="type"):
    run_id: str = ""
    ok: bool = False
    status: str = ""
    error: ErrorInfo | None = None


class SubRunFinished(Record, tag="sub_run_finished", tag_field="type"):
    """To a parent run's inbox: its child run ended."""

    run_id: str
    step_id: str
    child_run_id: str
    status: str
    output: JSON = None
    error: ErrorInfo | None = None


class Signal(Inbound, tag="signal", tag_field="type"):
    """An external event, published (JetStream) to ``loom.signal.{name}.{key}`` by any
    system: runs waiting for that name and key receive ``payload``. ``signal_id``
    (default: the stream sequence) identifies it."""

    name: str
    key: str
    payload: JSON = None
    signal_id: str = ""


class ExternalEventArrived(Record, tag="external_event_arrived", tag_field="type"):
    """To a waiting run's inbox, from the signal router."""

    run_id: str
    step_id: str
    name: str
    key: str
    payload: JSON = None
    signal_id: str = ""


InboxMessage = (
    PlanProposed
    | PlanRefused
    | ToolResult
    | TimerElapsed
    | SubRunFinished
    | ExternalEventArrived
    | ModelResult
)


class ModelChunk(Record, tag="model_chunk", tag_field="type"):
    """Text of a model turn while it is generated, published by the planner on
    ``loom.stream.{run_id}`` (plain NATS, not stored: the complete turn is the
    ``model_call_completed`` event). ``seq`` orders the chunks of one turn."""

    run_id: str
    step_id: str
    turn: int
    seq: int
    text: str


class Wait(Record, tag="wait", tag_field="type"):
    """One thing a live run waits on (``loom_core.waits``): ``kind`` person (``ref`` the
    suspension id, ``label`` its label), timer (``ref`` the timer id, ``until`` when it
    fires), event (``ref`` ``name:key``), sub_run (``ref`` the child run id). ``run_id``
    is set when the wait belongs to another run: a person a sub-run waits on, listed on
    its parent."""

    kind: str
    step_id: str = ""
    ref: str = ""
    label: str = ""
    until: datetime | None = None
    run_id: str = ""


class RunProgress(Record, tag="run_progress", tag_field="type"):
    """Published on ``loom.progress.{run_id}`` after a run changes (not stored: a
    convenience for live views; the events are the truth). While a run keeps its
    status, at most one per 50 ms: the first change at once, the latest state at the
    interval's end; a change of status at once; the last state is always said. ``status`` is
    ``suspended`` by the rule of ``loom_core.waits.run_status``; ``waits`` lists what
    the run waits on."""

    run_id: str
    status: str
    steps_total: int
    steps_done: int
    steps_running: int
    at: datetime
    waits: list[Wait] = []


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
    """One page of a run's events: those after ``after_seq``, at most ``limit`` and at
    most what fits one reply (a byte budget under the broker's max_payload)."""

    run_id: str
    after_seq: int = 0
    limit: int = 1000


class RunEventsReply(Record, tag="run_events_reply", tag_field="type"):
    """``next_after_seq``: more events follow; ask again with this ``after_seq`` (None:
    this page ends the run's stream as stored now). A short page is not the end."""

    run_id: str = ""
    events: list[EventRecord] = []
    error: ErrorInfo | None = None
    next_after_seq: int | None = None


class RunSummary(Record, tag="run_summary", tag_field="type"):
    """A run as the tracing read model sees it. ``status`` is ``suspended`` while the
    run waits for people and nothing else of it runs; ``waiting`` maps each open
    suspension id to its label; ``forked_from`` links a fork to its origin."""

    run_id: str
    status: str
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_ms: float | None = None
    name: str = ""
    steps_total: int = 0
    steps_done: int = 0
    waiting: dict[str, str] = {}
    forked_from: str | None = None
    # a fork's step instance it re-executes from, its edited instances, and how many
    # recorded results it reuses (ForkOrigin)
    fork_from_step: str = ""
    fork_edited: list[str] = []
    fork_reused: int = 0
    # everything it waits on (people, timers, external events, children); a child's
    # people are listed here too (``Wait.run_id``) when the read model holds the child
    waits: list[Wait] = []
    tools_in_flight: int = 0  # tool calls requested and not answered (the run works)
    labels: dict[str, str] = {}  # the run request's (a schedule's runs: schedule=NAME)
    tenant: str = "default"  # whose run it is (its principal's tenant); scopes queries


class RunsQuery(Inbound, tag="runs_query", tag_field="type"):
    """One page of runs, newest first (by start, then run id): those after the opaque
    cursor ``after`` (a previous reply's ``next_after``; "" from the newest), at most
    ``limit`` (capped at 10,000) and at most what fits one reply."""

    limit: int = 50
    status: str | None = None
    after: str = ""


class RunsReply(Record, tag="runs_reply", tag_field="type"):
    """``next_after``: more runs may follow; ask again with ``after`` set to it (None:
    the listing ends here). A short page, even an empty one, is not the end."""

    runs: list[RunSummary] = []
    error: ErrorInfo | None = None
    next_after: str | None = None


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
    """One page of a run's spans (by start, then span id): those after the cursor
    ``after`` (a previous reply's ``next_after``; "" from the first), at most ``limit``
    and at most what fits one reply. ``rebuild`` recomputes the trace first (ask it
    with the first page only)."""

    run_id: str
    rebuild: bool = False
    after: str = ""
    limit: int = 10_000


class TraceReply(Record, tag="trace_reply", tag_field="type"):
    """``next_after``: more spans follow; ask again with ``after`` set to it (None:
    this page is the last)."""

    run_id: str = ""
    spans: list[SpanRecord] = []
    error: ErrorInfo | None = None
    next_after: str | None = None


class ToolsQuery(Inbound, tag="tools_query", tag_field="type"):
    """The tool catalog by name, a page at a time after ``after`` (the same catalog for
    every tenant: tools are the platform's)."""

    limit: int = 100
    after: str = ""


class ToolsReply(Record, tag="tools_reply", tag_field="type"):
    """``next_after``: more tools follow; ask again with it as ``after``."""

    tools: list[ToolSpec] = []
    next_after: str | None = None
    error: ErrorInfo | None = None


class BlobQuery(Inbound, tag="blob_query", tag_field="type"):
    """Bytes ``[offset, offset + limit)`` of the blob ``digest`` (``sha256:<hex>``), which
    an event of the run ``run_id`` refers to: a tenant reads only its own runs' blobs.
    ``limit`` 0 asks only for the size. ``after``: the previous page's ``next_after``
    (opaque; where the stored object goes on, so a page does not read the blob from its
    start), with ``offset`` its ``next_offset``."""

    run_id: str
    digest: str
    offset: int = 0
    limit: int = 256 * 1024
    after: str = ""


class BlobReply(Record, tag="blob_reply", tag_field="type"):
    """``data``: the bytes asked for (base64 in JSON); ``size``: the whole blob's;
    ``next_offset``: more bytes follow (None: ``data`` ends the blob): ask again with it
    as ``offset`` and ``next_after`` as ``after``. Check the assembled bytes against the
    digest: the reader does, a page carries no checksum."""

    digest: str = ""
    size: int = 0
    offset: int = 0
    data: bytes = b""
    next_offset: int | None = None
    next_after: str | None = None
    error: ErrorInfo | None = None


class DeadLettersQuery(Inbound, tag="dead_letters_query", tag_field="type"):
    """Dead letters (``rejects``: the rejected requests instead) after stream sequence
    ``after_seq``; a tenant gets only its own (sent on its subjects, or about its runs)."""

    after_seq: int = 0
    limit: int = 50
    rejects: bool = False


class StoredDeadLetter(Record, tag="stored_dead_letter", tag_field="type"):
    """A dead letter and its sequence in its stream (the cursor of a listing)."""

    seq: int
    letter: DeadLetter


class DeadLettersReply(Record, tag="dead_letters_reply", tag_field="type"):
    """``next_after_seq``: the stream goes on past what this page looked at; ask again
    with it as ``after_seq`` (a page may be short, even empty, and not be the end).
    None: nothing more is stored now."""

    letters: list[StoredDeadLetter] = []
    next_after_seq: int | None = None
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
    thread_id: str = ""
    entries: list[ThreadEntry] = []
    error: ErrorInfo | None = None


MemoryOp = Literal[
    "store",
    "search",
    "get",
    "update",
    "delete",
    "list",
    "stats",
    "bulk_delete",
    "export",
    "import",
    "inspect",
    "history",
    "recall",
    "working_get",
    "working_set",
    "working_history",
    "knowledge_add",
    "knowledge_search",
    "knowledge_list",
    "knowledge_delete",
]


class MemoryRequest(Inbound, tag="memory_request", tag_field="type"):
    """One memory operation (``op``) with its arguments (``args``, checked by the memory
    service per operation; a wrong one is an ``invalid_input`` naming its path).

    Who acts is never in ``args``. On the tool route (``loom.api.memory.tool``, the
    tool-runner only) it is the stored principal of run ``run_id``, read from the
    executor; on the operator route (``loom.api.memory.operator``) it is ``principal``
    (default: the operator itself, with the ``admin`` role, in tenant ``default``)."""

    op: MemoryOp
    args: dict[str, JSON] = {}
    run_id: str | None = None
    principal: Principal | None = None


class MemoryReply(Record, tag="memory_reply", tag_field="type"):
    result: JSON = None
    error: ErrorInfo | None = None


class Ping(Inbound, tag="ping", tag_field="type"):
    pass


class Pong(Record, tag="pong", tag_field="type"):
    service: str = ""
    instance: str = ""
    error: ErrorInfo | None = None


class InboxReceipt(Record, tag="inbox_receipt", tag_field="type"):
    """The executor's answer to a result sent to it directly (route ``toolResult``):
    ``recorded`` once the run's stored events hold it (its commit is done); otherwise
    ``error`` says why not, and the sender publishes the result to the run's inbox
    stream instead, where a refusal is dead-lettered with that reason."""

    recorded: bool = False
    error: ErrorInfo | None = None


class RelayWake(Record, tag="relay_wake", tag_field="type"):
    """An executor replica stored events (up to ``notification_id``): the relay, which
    runs on the owner of partition 0 only, reads the store now rather than at its next
    idle poll."""

    notification_id: int = 0


class PartitionLease(Record, tag="partition_lease", tag_field="type"):
    """A key of the partition leases bucket (``loom_partitions``): ``p-{n}`` says which
    executor replica owns partition n, ``member-{replica}`` that a replica is alive.
    Every write is a compare-and-set with a per-key TTL: a replica that stops renewing
    loses its keys when they expire (loom_infra.ownership). ``nonce``: the process
    that wrote it (a restarted replica keeps its name, not its nonce)."""

    replica: str
    nonce: str
    partitions: int = 0


class AdmissionSlot(Record, array_like=True):
    """One run in a tenant's admission book: ``order`` is its place in the tenant's
    submission order, ``booked_at`` the wall-clock second it was booked (a booking whose
    run was never stored is dropped after a grace: its replica died in between)."""

    run_id: str
    queue: str = ""
    priority: int = 0
    order: int = 0
    booked_at: float = 0.0


class AdmissionBook(Record, tag="admission_book", tag_field="type"):
    """A key of the admission bucket (``loom_admission``, one key per tenant): the
    tenant's runs that hold a slot (``running``) and those that wait (``waiting``), shared
    by every executor replica and changed only by compare-and-set, so a tenant's
    concurrent run limits and its queue order hold across replicas
    (loom_services.shared_admission). ``next_order``: the tenant's submission counter."""

    tenant: str
    running: list[AdmissionSlot] = []
    waiting: list[AdmissionSlot] = []
    next_order: int = 0


class RateBucket(Record, tag="rate_bucket", tag_field="type"):
    """A key of the rates bucket (``loom_rates``): one tenant's token bucket for one kind
    of action (``submit``, ``tool``, ``model``), shared by every replica of every service
    that takes from it, changed only by compare-and-set (loom_services.shared_rates).
    ``tokens`` left (negative: reserved ahead by waiting calls) at wall-clock second
    ``at``; the rate and burst are the quotas file's, the same in every replica."""

    tokens: float
    at: float


# --------------------------------------------------------------------------- trace queries
# Request/reply APIs of the tracing service on ``loom.api.traces*`` (issue 5). Time
# filters apply to a run's or a span's start: ``since`` inclusive, ``until`` exclusive.


class TracesQuery(Inbound, tag="traces_query", tag_field="type"):
    """Runs (one trace each), newest first. ``status``: the run's status; ``tool`` /
    ``model``: some span of the run names that tool (``gen_ai.tool.name``) or model
    (``gen_ai.request.model``); ``error``: some span has that ``error.type``."""

    since: datetime | None = None
    until: datetime | None = None
    status: str | None = None
    tool: str | None = None
    model: str | None = None
    error: str | None = None
    limit: int = 50
    after: str = ""  # a previous reply's next_after (paging as RunsQuery)


class TracesReply(Record, tag="traces_reply", tag_field="type"):
    runs: list[RunSummary] = []
    error: ErrorInfo | None = None
    next_after: str | None = None  # more may follow: ask again with after = this


class SlowestStepsQuery(Inbound, tag="slowest_steps_query", tag_field="type"):
    """The ``limit`` longest ended step spans, optionally only steps calling ``tool``."""

    since: datetime | None = None
    until: datetime | None = None
    tool: str | None = None
    limit: int = 10


class SlowestStepsReply(Record, tag="slowest_steps_reply", tag_field="type"):
    spans: list[SpanRecord] = []
    error: ErrorInfo | None = None


class UsageQuery(Inbound, tag="usage_query", tag_field="type"):
    """Tool and model calls aggregated by tool, model, run or time bucket (UTC)."""

    by: Literal["tool", "model", "run", "minute", "hour", "day"] = "tool"
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 1000


class UsageRow(Record, tag="usage_row", tag_field="type"):
    """One group of calls: ``key`` is the tool, model, run id, or the bucket's start
    (ISO 8601, UTC). Tokens and cost sum the spans' ``gen_ai.usage.input_tokens``,
    ``gen_ai.usage.output_tokens`` and ``loom.cost_usd`` (0 where absent)."""

    key: str
    calls: int
    errors: int = 0
    runs: int = 0
    total_ms: float = 0.0
    avg_ms: float = 0.0
    max_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


class UsageReply(Record, tag="usage_reply", tag_field="type"):
    by: str = ""
    rows: list[UsageRow] = []
    error: ErrorInfo | None = None


class RebuildTracesQuery(Inbound, tag="rebuild_traces_query", tag_field="type"):
    """Recompute runs' spans from the events the tracing service kept and export them
    again: the runs in ``run_ids``, else those started in [since, until), at most
    ``limit`` per request in run id order after ``after_run_id``."""

    run_ids: list[str] = []
    since: datetime | None = None
    until: datetime | None = None
    after_run_id: str | None = None
    limit: int = 100


class RebuildTracesReply(Record, tag="rebuild_traces_reply", tag_field="type"):
    """``changed``: spans whose rebuilt version differed from the stored one (0 means the
    rebuild equals what was built live). ``last_run_id`` is set when more runs may follow:
    ask again with it as ``after_run_id``."""

    runs: int = 0
    spans: int = 0
    changed: int = 0
    last_run_id: str | None = None
    error: ErrorInfo | None = None


# --------------------------------------------------------------------------- schedules
# Cron-like and one-shot schedules that submit runs (loom_core.schedules for the
# grammar and fire times; loom_services.schedules fires them, in the executor).


class ScheduleSpec(Inbound, tag="schedule_spec", tag_field="type"):
    """When a schedule fires: exactly one of ``cron`` (five fields, read in ``tz``),
    ``every`` (an interval: ``30s``, ``10m``, ``1h30m``) or ``at`` (one instant).
    ``catch_up``: what happens to firings missed while nothing ran: ``none`` (skip them;
    a firing at most the grace late still fires), ``latest`` (fire the latest one once)
    or ``all`` (fire each, oldest first, bounded)."""

    cron: str | None = None
    every: str | None = None
    at: datetime | None = None
    tz: str = "UTC"
    catch_up: Literal["none", "latest", "all"] = "latest"


class ScheduleCreate(Inbound, tag="schedule_create", tag_field="type"):
    """Create a schedule (on ``loom.schedule.{via}``). ``run`` is the run request each
    firing submits, without ``run_id`` (each firing's is derived from the schedule and
    its fire time). The runs act for whoever created the schedule: the principal of this
    request (its ``Authorization`` header and subject), never a body field."""

    name: str
    when: ScheduleSpec
    run: RunRequest
    paused: bool = False


class ScheduleControl(Inbound, tag="schedule_control", tag_field="type"):
    """Act on one schedule of the caller's tenant: ``describe``, ``pause``, ``resume``,
    ``delete``, or ``trigger`` (fire now, once, apart from its times)."""

    name: str
    action: Literal["describe", "pause", "resume", "delete", "trigger"]
    # the platform's operator only, to describe a tenant's schedule (``t-<tenant>`` scope)
    tenant: str = ""


class SchedulesQuery(Inbound, tag="schedules_query", tag_field="type"):
    """The caller's tenant's schedules by name, a page at a time after ``after``."""

    limit: int = 100
    after: str = ""
    # the platform's operator only: every tenant's schedules, ordered by tenant then name
    # (``after`` is then ``<tenant>/<name>``)
    every_tenant: bool = False


class Schedule(Record, tag="schedule", tag_field="type"):
    """A schedule as stored (JetStream key-value bucket ``loom_schedules``) and shown.
    ``next_at``: its next fire time not yet submitted (None: a one-shot that fired).
    ``principal``: who its runs act for. ``run`` is left out of listings."""

    schedule_id: str
    name: str
    tenant: str
    when: ScheduleSpec
    created_at: datetime
    anchor: datetime
    principal: Principal | None = None
    run: RunRequest | None = None
    redacted: list[str] = []
    next_at: datetime | None = None
    paused: bool = False
    fired: int = 0
    last_fire_at: datetime | None = None
    last_run_id: str = ""
    dropped: int = 0  # catch-ups that left missed firings unfired (the policy)
    # why the firer paused it (a rule that no longer compiles, e.g. a time zone the
    # system's tz data dropped); None while it is healthy
    error: ErrorInfo | None = None


class ScheduleReply(Record, tag="schedule_reply", tag_field="type"):
    """``schedule``: the one acted on (its state after the action); ``schedules``: a
    listing's page (``next_after``: ask again with it as ``after``); ``run_id``: the run
    a trigger submitted (``existing``: it was submitted before)."""

    schedule: Schedule | None = None
    schedules: list[Schedule] = []
    next_after: str | None = None
    run_id: str = ""
    existing: bool = False
    error: ErrorInfo | None = None


ScheduleMessage = ScheduleCreate | ScheduleControl | SchedulesQuery


# --------------------------------------------------------------------------- stream upkeep


class StreamFiller(Record, tag="stream_filler", tag_field="type"):
    """A message that only takes up a sequence number of LOOM_RUNS (``loom.run.gap``).
    After nats-server lost the stream's newest messages (asynchronous persistence) its
    durable consumers may stand past the stream's new end; the relay publishes fillers up
    to the furthest of them so that the events it publishes again get sequences every
    consumer will still deliver. No consumer's filter matches it."""

    after_seq: int  # the last stream sequence before these fillers (0: none)
    up_to_seq: int  # the consumer position the fillers cover
