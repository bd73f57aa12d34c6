"""Every error code a client can meet, with where it appears and what to do.

``ErrorInfo.code`` and ``PlanIssue.code`` are stable, machine-readable words. This is
their one list: ``proto/`` publishes it (the ``code`` property of the ``error`` and
``plan_issue`` schemas enumerates it, and ``proto/errors.json`` gives each one's
meaning), and a unit test fails when the code base uses a code that is not here, so the
list cannot drift from the code. A client should still treat an unknown code as an
error of the area it arrived in (a newer stack may add codes).

Areas: ``submit`` (a SubmitRejected reply), ``plan`` (a PlanIssue of a rejected plan,
or of a file the CLI refused), ``step`` (a step's or tool call's error, in step_failed
and tool results), ``run`` (run_failed), ``answer`` (refused resume, control and
signal requests), ``query`` (read API replies), ``transport`` (dead letters, relay,
any request), ``stack`` (starting a service).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["AREAS", "CODES", "Code", "codes_of"]


class Code(NamedTuple):
    area: str
    meaning: str


AREAS = ("submit", "plan", "step", "run", "answer", "query", "transport", "stack")

_S, _P, _T, _R, _A, _Q, _X, _K = AREAS

CODES: dict[str, Code] = {
    # ---- submit: the request was refused, nothing was stored
    "payload_too_large": Code(
        _S, "the request is over LOOM_MAX_PAYLOAD bytes; pass big data by reference"
    ),
    "too_deep": Code(_S, "JSON nested deeper than LOOM_MAX_JSON_DEPTH"),
    "not_json": Code(_S, "a value that is not JSON (NaN, a non-string key)"),
    "malformed_json": Code(_S, "the body is not JSON"),
    "invalid_shape": Code(
        _S, "the JSON does not fit the schema; details.issues lists every problem"
    ),
    "internal_field": Code(_S, "`parent` or `fork` set by a client; only the engine sets them"),
    "invalid_run_id": Code(_S, "run_id is not 1-64 of A-Z a-z 0-9 _ -"),
    "missing_plan": Code(_S, "neither `plan` nor `request` given"),
    "ambiguous_request": Code(_S, "both `plan` and `request` given"),
    "run_id_conflict": Code(_S, "the run id exists with another plan or input (details.differs)"),
    "not_authenticated": Code(_S, "the stack needs an Authorization: Bearer <JWT> header"),
    "token_expired": Code(_S, "the bearer token has expired"),
    "token_invalid": Code(_S, "the bearer token was refused (the message says why)"),
    "not_authorized": Code(_S, "the principal lacks the permission"),
    "tenant_mismatch": Code(
        _S, "the bearer token's tenant claim is not the tenant of the NATS user that sent it"
    ),
    "invalid_quotas": Code(_K, "LOOM_QUOTAS_FILE is not valid (the path names the field)"),
    "invalid_tenant": Code(_K, "a tenant name is not 1-40 of a-z 0-9 _ - (or is 'default')"),
    "run_id_taken": Code(_S, "the run id is used (by another tenant): choose another one"),
    "too_many_submissions": Code(
        _S, "over the tenant's submission rate; retry after details.retry_after_s (retryable)"
    ),
    "queue_full": Code(_S, "the tenant has the most runs waiting a queue holds; retry later"),
    "admission_busy": Code(_S, "the tenant's admission book kept changing; retry (retryable)"),
    "unavailable": Code(_S, "the stack could not store or check it now; retry (retryable)"),
    "invalid_fork": Code(_S, "a fork request names no such run or step, or a bad new id"),
    "unknown_step": Code(_S, "a fork names no step instance of the run (details.close_matches)"),
    "step_never_ran": Code(_S, "a fork names a step instance that never ran (what did run there)"),
    "invalid_budget": Code(_S, "a run budget that is negative or not a number"),
    "fork_too_large": Code(_S, "the fork's reused results would exceed LOOM_MAX_PAYLOAD"),
    "bad_blob_reference": Code(_S, 'a {"$blob": ...} value is malformed (the path names it)'),
    # ---- plan: issues of a rejected plan (every one is reported at once)
    "tool_forbidden": Code(_P, "the run's principal may not use the tool (catalog access rules)"),
    "unknown_tool": Code(_P, "no tool of that name (the message names the closest)"),
    "dependency_cycle": Code(_P, "steps wait for each other (the cycle is spelled out)"),
    "missing_step": Code(_P, "depends_on or a template names no visible step"),
    "missing_field": Code(
        _P, "a required field is missing, or a template reads a field the tool's output lacks"
    ),
    "unknown_field": Code(_P, "a field the step does not have (did you mean ...)"),
    "duplicate_step_id": Code(_P, "two steps share an id"),
    "invalid_step_id": Code(_P, "a step id is not 1-64 of A-Z a-z 0-9 _ -"),
    "invalid_input": Code(_P, "a tool input does not fit the tool's schema (also a step error)"),
    "invalid_template": Code(_P, "a `{{ ... }}` template is malformed or misplaced"),
    "missing_input": Code(_P, "a template reads a run input that was not given"),
    "invalid_plan": Code(_P, "the plan does not decode"),
    "invalid_json": Code(_P, "the plan is not JSON"),
    "invalid_step": Code(_P, "a step's fields contradict each other (empty body, bad bounds)"),
    "invalid_items": Code(
        _P, "foreach/reduce items is not an array or one template (also a step error)"
    ),
    "invalid_predicate": Code(_P, "a condition is not a declarative predicate"),
    "predicate_references_nothing": Code(_P, "a condition with no template can never change"),
    "loop_without_cap": Code(_P, "a loop needs max_iterations within the limit"),
    "multiple_final_steps": Code(_P, "more than one final step"),
    "no_model_configured": Code(_P, "a natural-language request needs a model (LOOM_MODEL)"),
    "too_many_items": Code(_P, "over LOOM_MAX_FOREACH_ITEMS (also a step error at run time)"),
    "too_much_concurrency": Code(_P, "over LOOM_MAX_FOREACH_CONCURRENCY"),
    "too_many_branches": Code(_P, "over LOOM_MAX_PARALLEL_BRANCHES"),
    "too_many_iterations": Code(_P, "over LOOM_MAX_LOOP_ITERATIONS"),
    "foreign_template": Code(
        _P, "`${...}` naming a plan value: not a template here; write `{{ ... }}`"
    ),
    "constant_output": Code(
        _P, "a foreach/loop/reduce `output` that is a bare name: a constant, not a result"
    ),
    # plan-execute conversion (loom convert, loom run --format plan-execute)
    "unknown_step_type": Code(_P, "a plan-execute step type that has no native form"),
    "unknown_variable": Code(_P, "a plan-execute reference to no input or step output"),
    "duplicate_variable": Code(_P, "two plan-execute steps name the same output variable"),
    "invalid_value": Code(_P, "a plan-execute field with a value of the wrong kind"),
    "invalid_expression": Code(_P, "a condition that does not parse (position in the message)"),
    "expression_too_long": Code(_P, "a condition over 4096 characters or 512 tokens"),
    "expression_too_deep": Code(_P, "a condition nested deeper than 32 levels"),
    # ---- step: why a step or a tool call failed
    "tool_error": Code(_T, "the tool raised an error"),
    "timeout": Code(_T, "one attempt ran past timeout_s"),
    "step_timeout": Code(_T, "the step ran past step_timeout_s (attempts and waits)"),
    "wait_timeout": Code(_T, "a wait_event step's timeout_s passed"),
    "invalid_output": Code(_T, "the tool returned what its output schema refuses"),
    "output_too_large": Code(_T, "a step's output is over LOOM_MAX_STEP_OUTPUT"),
    "input_too_large": Code(_T, "a rendered tool input is over LOOM_MAX_STEP_INPUT"),
    "blob_not_inline": Code(
        _T, "a template, condition or items reads inside a blob; hand on the whole reference"
    ),
    "blob_too_large": Code(_T, "a blob, or the blobs resolved into one tool input, over the limit"),
    "blob_store_full": Code(_T, "the blob bucket is at LOOM_BLOB_BUCKET_MAX_BYTES"),
    "blob_not_found": Code(_T, "a reference names no stored blob (expired or never uploaded)"),
    "blob_not_json": Code(_T, "a stored blob is not a JSON value"),
    "blob_corrupt": Code(_T, "a blob's bytes do not match its sha256; store the value again"),
    # an agent step and its model (loom_core.agent); each is recorded, most told back
    "model_error": Code(_T, "the model call failed after its retries and fallbacks"),
    "model_timeout": Code(_T, "the model did not answer within its timeout (retryable)"),
    "model_unavailable": Code(_T, "the named model is not configured where the planner runs"),
    "rate_limited": Code(_T, "the provider refused for rate (429) after retries (retryable)"),
    "model_output_too_large": Code(_T, "a model answer over the step output limit"),
    "invalid_model_output": Code(_T, "an answer that breaks the step's output schema (told back)"),
    "invalid_tool_arguments": Code(_T, "a model's tool call with malformed or invalid arguments"),
    "too_many_tool_calls": Code(_T, "more tool calls in one turn than the step allows"),
    "max_turns_exceeded": Code(_T, "the agent used max_turns without a final answer"),
    "context_too_large": Code(_T, "the conversation grew over the step input limit"),
    "too_many_delegate_calls": Code(
        _T, "an agent step's model called its delegates more times than the step allows"
    ),
    "conversation_unavailable": Code(
        _T,
        "a lean turn's earlier requests are not in the stored history (the planner "
        "cannot rebuild the conversation); the step fails",
    ),
    "suspend_not_supported": Code(_T, "a tool asked to suspend inside an agent step"),
    "tool_unavailable": Code(_T, "the tool's source (an MCP server) is down; retried (retryable)"),
    "circuit_open": Code(_T, "the tool's or server's breaker is open (details.retry_after_s)"),
    "blob_store_unavailable": Code(_T, "the blob bucket cannot be reached now; retry (retryable)"),
    "ambiguous_outcome": Code(_T, "a non-idempotent call may have run; the run needs review"),
    "cancelled": Code(_T, "the call or step was cancelled"),
    "step_failed": Code(_T, "a composite step failed because a child failed"),
    "fallback_failed": Code(_T, "the fallback step failed too"),
    "too_few_successes": Code(_T, "fewer foreach elements succeeded than min_success"),
    "invalid_event_key": Code(_T, "a wait_event key rendered to something not a subject token"),
    "secret_not_found": Code(_T, "the tool-runner has no such secret"),
    "secret_unreadable": Code(_T, "the secret's file cannot be read"),
    "untrusted_secret_reference": Code(_T, "a secret reference that the plan did not write"),
    "http_error": Code(_T, "http_get: the server answered with an error status"),
    "http_timeout": Code(_T, "http_get: no answer in time"),
    "connection_failed": Code(_T, "http_get: the connection failed"),
    "host_not_found": Code(_T, "http_get: the host name does not resolve"),
    "address_not_allowed": Code(
        _T, "http_get: a private or local address (LOOM_HTTP_ALLOW_PRIVATE)"
    ),
    "invalid_url": Code(_T, "http_get: not an http(s) URL"),
    "invalid_redirect": Code(_T, "http_get: a redirect without a usable Location"),
    "too_many_redirects": Code(_T, "http_get: more redirects than allowed"),
    "out_of_range": Code(_T, "math: a result beyond 64-bit integers"),
    "template_error": Code(_T, "a template failed to render at run time"),
    "sub_run_rejected": Code(_T, "a sub_run's child plan was rejected"),
    "child_run_conflict": Code(_T, "a sub_run's child id belongs to another run"),
    # ---- run: why a run failed
    "run_timeout": Code(_R, "the plan's timeout_s passed"),
    "run_diverged": Code(_R, "replaying the run's history decided differently; parked"),
    "event_too_large": Code(_R, "an event over the broker's max_payload could not be published"),
    "event_unpublishable": Code(_R, "an event could never be published"),
    # ---- answer: refused resume, control and signal requests
    "not_found": Code(_A, "no such run (or trace)"),
    "already_finished": Code(_A, "the run has ended"),
    "already_resumed": Code(_A, "the suspension was answered already (by whom: details)"),
    "suspension_expired": Code(_T, "an approval expired with on_expire: fail"),
    "suspension_closed": Code(_A, "the suspension expired or its step ended"),
    "unknown_label": Code(_A, "no open suspension with that label"),
    "unknown_suspension": Code(_A, "no suspension with that id"),
    "ambiguous_label": Code(_A, "several open suspensions share the label: give --id"),
    "missing_label": Code(_A, "neither label nor suspension id given"),
    "invalid_resume_data": Code(_A, "the answer does not fit the suspension's schema"),
    "not_applied": Code(_A, "the control action changed nothing (e.g. unpause of a running run)"),
    "reason_too_large": Code(_A, "a reason, by or label over LOOM_MAX_REASON_BYTES"),
    "data_too_large": Code(_A, "resume data over LOOM_MAX_RESUME_DATA_BYTES"),
    "conflict": Code(_A, "working memory changed since it was read; read it again and retry"),
    # ---- query: read API replies
    "summary_too_large": Code(_Q, "one run's summary is more than a reply can carry; describe it"),
    "invalid_query": Code(_Q, "a query with bad bounds or filters"),
    "bad_cursor": Code(_Q, "a paging cursor that does not move or does not parse"),
    "reply_too_large": Code(_Q, "one item is too large for any reply"),
    "not_stored": Code(_Q, "the data is not stored (yet)"),
    "export_rejected": Code(_Q, "the OTLP collector refused the spans"),
    "span_too_large": Code(_Q, "a span too large to store"),
    # ---- transport: dead letters and handler failures
    "span_build_failed": Code(_X, "the spans of one event could not be built; the trace goes on"),
    "invalid_message": Code(_X, "a message that does not decode for its subject"),
    "unexpected_message": Code(_X, "a message the run is not waiting for (dead-lettered)"),
    "unexpected_event": Code(_X, "an event of a kind the consumer does not take"),
    "wrong_subject": Code(_X, "a message on another run's subject"),
    "max_deliveries": Code(_X, "redelivered too often; dead-lettered"),
    "internal_error": Code(_X, "a handler failed unexpectedly (a bug: see the service log)"),
    "store_error": Code(_X, "the store failed; retry"),
    # ---- stack: starting a service
    "data_dir_locked": Code(_K, "another stack uses this data dir"),
    "data_dir_unusable": Code(_K, "the data dir cannot be created or written"),
    "server_start_failed": Code(_K, "the NATS server could not start (the message says why)"),
    "invalid_setting": Code(
        _K, "an environment setting is missing or malformed (details.variable)"
    ),
    "invalid_credentials": Code(_K, "an nkey seed file is missing, unreadable or not a user seed"),
    "embedder_unavailable": Code(_K, "the memory embedder cannot run (model files, configuration)"),
    "stream_missing": Code(_K, "a stream a service needs does not exist yet; start the stack"),
    "read_model_failed": Code(
        _K, "a read model's process (tracing, memory) exited or stayed silent at start (why)"
    ),
    # ---- executor replicas (loom_core.partitions, loom_infra.ownership)
    "not_owner": Code(_X, "this executor replica does not own the run's partition: retry"),
    "partition_moving": Code(_X, "nobody answered for the run's partition (it moves): retry"),
    "partition_count_changed": Code(_K, "LOOM_PARTITIONS is not the stack's count: drain first"),
    "admission_book_corrupt": Code(_X, "an admission book was not ours: rebuilt from the store"),
    # ---- the web console (services/loom_console): its HTTP guards and the plan it parses
    "bad_host": Code(_X, "the console does not serve that Host header (--allow-host NAME)"),
    "bad_origin": Code(_X, "a console action came from another origin"),
    "bad_csrf": Code(_X, "a console action without the page's CSRF token: reload the page"),
    "bad_content_type": Code(_X, "a console action whose body is not application/json"),
    "too_large": Code(_X, "a body or value over its limit (the message names it)"),
    "bad_setting": Code(_K, "a LOOM_* setting has a value that is not allowed (named)"),
    "not_yaml": Code(_P, "the plan text is neither YAML nor JSON (line and column given)"),
    "not_a_mapping": Code(_P, "the plan file is not a mapping with `plan:` or `steps:`"),
    # ---- schedules (loom.schedule.*): a create refused (nothing stored), a control
    "invalid_schedule": Code(_S, "a schedule's name, interval, time or rule is wrong (path)"),
    "invalid_cron": Code(_S, "a cron expression is wrong or never fires (path names the field)"),
    "invalid_timezone": Code(_S, "not an IANA time zone name (e.g. Europe/Lisbon)"),
    "schedule_exists": Code(_S, "the tenant has a schedule of that name: delete it first"),
    "too_many_schedules": Code(_S, "the tenant has LOOM_SCHEDULES_MAX schedules"),
    "schedule_not_found": Code(_A, "the tenant has no schedule of that name"),
}


def codes_of(*areas: str) -> list[str]:
    """The codes of ``areas`` (all when none), sorted."""
    return sorted(c for c, info in CODES.items() if not areas or info.area in areas)
