"""Generate ``proto/``: one JSON Schema per message and an AsyncAPI 3.0 document.

Usage: ``python -m loom_infra.proto_gen proto`` (the argument is the output directory).

Design note
- ``generate()`` is a pure function of ``contracts``, ``routes`` and ``subjects``: it
  returns ``{relative path: text}``. Channels and operations come from the route registry
  (``loom_core.routes``), the one declaration of who publishes and consumes what, so the
  document cannot drift from the code that subscribes through the same registry.
  Only ``write`` and ``main`` touch the file system, which is why this build tool lives
  in ``loom_infra`` and not in the pure core it reads.
- Messages are found by introspection: every ``msgspec.Struct`` subclass defined in
  ``contracts`` with a ``tag`` gets ``schemas/<tag>.json``; every module-level union of
  such structs (``SubmitReply``, ``RunEvent``, ...) gets ``schemas/<snake_name>.json``.
  A new struct therefore appears after ``make proto`` with no change here.
- Subjects are not guessed: each public name of ``subjects`` must be placed in
  ``_SUBJECT_NAMES`` (channel, stream, header, ...). A new name makes ``generate`` fail with
  a message saying where to describe it, so the AsyncAPI document cannot silently miss one.
- Output is byte-for-byte deterministic: sorted keys, fixed order, no YAML aliases,
  a trailing newline on every file.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import yaml

from loom_core import caps, contracts, error_codes, limits, resubmit, routes, sizes, subjects
from loom_infra.settings import DEFAULT_MAX_PAYLOAD

__all__ = [
    "ASYNCAPI_FILE",
    "ERRORS_FILE",
    "LIMITS_FILE",
    "DIALECT",
    "SCHEMA_DIR",
    "asyncapi",
    "event_tags",
    "generate",
    "json_schemas",
    "main",
    "message_types",
    "union_types",
    "write",
]

DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_DIR = "schemas"
ASYNCAPI_FILE = "asyncapi.yaml"
ERRORS_FILE = "errors.json"
LIMITS_FILE = "limits.json"
# A URN, not a URL: we do not serve the schemas anywhere; the id only has to be stable.
_ID_PREFIX = "urn:agentloom:schema:"

Schema = dict[str, Any]


# --------------------------------------------------------------------------- discovery


def _tag(cls: type[msgspec.Struct]) -> str | None:
    tag = cls.__struct_config__.tag
    return tag if isinstance(tag, str) else None


def message_types() -> list[type[msgspec.Struct]]:
    """Every tagged Struct defined in ``contracts``, sorted by tag."""
    found = {
        obj
        for obj in vars(contracts).values()
        if inspect.isclass(obj)
        and issubclass(obj, msgspec.Struct)
        and obj.__module__ == contracts.__name__
        and _tag(obj) is not None
    }
    return sorted(found, key=lambda cls: _tag(cls) or "")


def _union_members(value: Any) -> tuple[type[msgspec.Struct], ...] | None:
    if not isinstance(value, types.UnionType) and typing.get_origin(value) is not typing.Union:
        return None
    members = typing.get_args(value)
    if all(inspect.isclass(m) and issubclass(m, msgspec.Struct) and _tag(m) for m in members):
        return members
    return None


def union_types() -> dict[str, Any]:
    """Module-level unions of tagged structs in ``contracts`` (``RunEvent``, ...), by name."""
    return {
        name: value
        for name, value in sorted(vars(contracts).items())
        if not name.startswith("_") and _union_members(value) is not None
    }


def event_tags() -> list[str]:
    """Tags of the ``RunEvent`` union, in the union's order (the token after the run id in
    ``loom.run.{run_id}.{event_tag}``)."""
    return [_tag(cls) or "" for cls in _union_members(contracts.RunEvent) or ()]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""


# --------------------------------------------------------------------------- JSON Schema


def _tidy(schema: Schema) -> Schema:
    # msgspec copies docstrings verbatim; dedent them so the files read well.
    for definition in schema.get("$defs", {}).values():
        if isinstance(definition.get("description"), str):
            definition["description"] = inspect.cleandoc(definition["description"])
    return schema


# Which codes each struct's ``code`` carries (loom_core.error_codes): listed in the
# schema as ``examples`` (not ``enum``: a newer stack may add codes, and a client must
# treat an unknown one as an error of its area), each explained in errors.json.
_CODE_FIELDS = {
    "ErrorInfo": ((), "Stable, machine-readable: one of the codes in `errors.json`"),
    "PlanIssue": (("plan",), "Stable, machine-readable: a `plan` code of `errors.json`"),
}


def _annotate_codes(schema: Schema) -> Schema:
    for name, definition in schema.get("$defs", {}).items():
        if name not in _CODE_FIELDS:
            continue
        areas, text = _CODE_FIELDS[name]
        definition["properties"]["code"] = {
            "type": "string",
            "description": text + " (a newer stack may add codes).",
            "examples": error_codes.codes_of(*areas),
        }
    return schema


def _document(stem: str, title: str, schema: Schema, description: str = "") -> Schema:
    doc: Schema = {"$schema": DIALECT, "$id": f"{_ID_PREFIX}{stem}", "title": title}
    if description:
        doc["description"] = description
    doc.update(_annotate_codes(_tidy(schema)))
    return doc


def json_schemas() -> dict[str, Schema]:
    """File stem -> self-contained JSON Schema (draft 2020-12) for every message and union."""
    out: dict[str, Schema] = {}
    for cls in message_types():
        stem = _tag(cls) or ""
        out[stem] = _document(stem, cls.__name__, msgspec.json.schema(cls))
    for name, union in union_types().items():
        stem = _snake(name)
        if stem in out:
            raise ValueError(
                f"contracts.{name} would be written to {SCHEMA_DIR}/{stem}.json, which is "
                f"already the schema of the struct tagged {stem!r}; rename the union or the tag"
            )
        members = _union_members(union) or ()
        field = members[0].__struct_config__.tag_field
        names = ", ".join(m.__name__ for m in members)
        description = f"One of {names}; the `{field}` field tells which."
        out[stem] = _document(stem, name, msgspec.json.schema(union), description)
    return dict(sorted(out.items()))


def _schema_ref(stem: str) -> Schema:
    return {"$ref": f"./{SCHEMA_DIR}/{stem}.json"}


# --------------------------------------------------------------------------- AsyncAPI

# Every public name of ``subjects`` and where this module describes it. Adding a name to
# ``subjects`` without adding it here makes ``generate`` fail (see _check_subjects).
_SUBJECT_NAMES = {
    "PREFIX": "part of every subject",
    "SUBMIT": "channel submit",
    "submit": "channel submit",
    "RUN_EVENTS_STREAM": "x-jetstream-streams",
    "RUN_EVENTS_ALL": "x-jetstream-streams",
    "run_event": "channel runEvent",
    "RUN_EVENTS_PATTERN": "channel runEvent",
    "RUN_GAP": "channel runGap",
    "INBOX_SOURCES": "channels inbox.*",
    "run_events_of": "channel runEvent (filter)",
    "INBOX_STREAM": "x-jetstream-streams",
    "INBOX_ALL": "x-jetstream-streams",
    "inbox": "channels inbox.*",
    "DLQ_STREAM": "x-jetstream-streams",
    "DLQ_ALL": "x-jetstream-streams",
    "dead_letter": "channel deadLetter",
    "API_RUN_EVENTS": "channel apiRunEvents",
    "API_RUNS": "channel apiRuns",
    "API_TRACE": "channel apiTrace",
    "API_TRACES": "channel apiTraces",
    "API_TRACES_SLOWEST": "channel apiTracesSlowest",
    "API_TRACES_USAGE": "channel apiTracesUsage",
    "API_TRACES_REBUILD": "channel apiTracesRebuild",
    "API_THREAD": "channel apiThread",
    "API_MEMORY_TOOL": "channel apiMemoryTool",
    "API_MEMORY_OPERATOR": "channel apiMemoryOperator",
    "API_TOOLS": "channel apiTools",
    "API_BLOB": "channel apiBlob",
    "API_DEAD_LETTERS": "channel apiDeadLetters",
    "health": "channel health",
    "CONTROL": "channel control",
    "SIGNALS_STREAM": "x-jetstream-streams",
    "SIGNALS_ALL": "x-jetstream-streams",
    "signal": "channel signal",
    "RESUME": "channel resume",
    "progress": "channel progress",
    "model_stream": "channel modelStream",
    "tool_dispatch": "channel toolDispatch",
    "tool_result": "channel toolResult",
    "TOOLS_BUCKET": "channel toolCatalog",
    "PARTITIONS_BUCKET": "channel partitionLeases",
    "BLOBS_BUCKET": "channel blobs",
    "MODEL_ANSWERS_BUCKET": "channel modelAnswers",
    "ADMISSION_BUCKET": "channel admissionBook",
    "RATES_BUCKET": "channel rateBuckets",
    "MSG_ID": "headers",
    "NOTIFICATION_ID": "headers",
    "EVENT_TYPE": "headers",
    "ANSWERED": "headers",
    "DLQ_REASON": "headers",
    "TRACEPARENT": "headers",
    "AUTHORIZATION": "headers",
    "SERVICES": "parameter service",
}


def _public_subject_names() -> set[str]:
    names = set()
    for name, value in vars(subjects).items():
        if name.startswith("_"):
            continue
        is_function = inspect.isfunction(value) and value.__module__ == subjects.__name__
        if is_function or isinstance(value, str | tuple):
            names.add(name)
    return names


def _check_subjects() -> None:
    missing = sorted(_public_subject_names() - set(_SUBJECT_NAMES))
    if missing:
        raise ValueError(
            f"subjects.{', subjects.'.join(missing)} not described in the AsyncAPI document: "
            "add a channel/stream/header for it in loom_infra/proto_gen.py (and list it in "
            "_SUBJECT_NAMES), then run: make proto"
        )


_HEADER_TEXT = {
    subjects.MSG_ID: (
        "JetStream de-duplication id: a message published twice with the same id within the "
        "stream's duplicate window is stored once. On run events it is "
        "`{run_id}/{seq}/{digest of the message}` (bound to the content, so it cannot be "
        "claimed first); inbox messages carry none (the executor dedupes by the run's "
        "state)."
    ),
    subjects.NOTIFICATION_ID: (
        "Position of the event in the store's notification log (an integer as text); "
        "set by the relay that publishes stored events."
    ),
    subjects.EVENT_TYPE: "The event's tag, the same as the last subject token.",
    subjects.ANSWERED: (
        "On a `tool_call_requested` whose result was stored in the same commit (a pure "
        "built-in the executor ran itself): nothing is left for a tool-runner to do."
    ),
    subjects.DLQ_REASON: (
        "Why the message was dead-lettered: `<error code>: <message>`, truncated; the full "
        "error is in the payload's `error`."
    ),
    subjects.AUTHORIZATION: (
        "`Bearer <JWT>` naming the principal a submitted run acts for; verified by the "
        "executor against the configured issuer keys, never stored."
    ),
    subjects.TRACEPARENT: (
        "W3C trace context (`00-<trace_id>-<span_id>-<flags>`); optional, propagated so a "
        "client's trace joins the run's trace."
    ),
}


_SUBMIT_MSG_ID = (
    "Optional dedupe key of a submission without `run_id`: the run id is derived from "
    "(tenant, user, identity, this header), so repeating the request with the same header "
    "reaches the same run (`existing: true`), for as long as the run is stored. At most "
    f"{resubmit.MAX_MSG_ID} characters (longer: ignored). `loom.submit` is request/reply, "
    "not a JetStream publish: the broker dedupes nothing; `run_id` is the primary key."
)


def _headers(
    required: Sequence[str],
    optional: Sequence[str],
    const: dict[str, str] | None = None,
    text: dict[str, str] | None = None,
) -> Schema:
    props: Schema = {}
    for name in (*required, *optional):
        about = (text or {}).get(name) or _HEADER_TEXT[name]
        prop: Schema = {"type": "string", "description": about}
        if const and name in const:
            prop["const"] = const[name]
        props[name] = prop
    schema: Schema = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


def _message(
    name: str, payload: Schema, summary: str = "", headers: Schema | None = None
) -> Schema:
    message: Schema = {"name": name, "contentType": "application/json", "payload": payload}
    if summary:
        message["summary"] = summary
    if headers is not None:
        message["headers"] = headers
    return message


def _struct_message(cls: type[msgspec.Struct], headers: Schema | None = None) -> Schema:
    summary = _doc(cls).split("\n\n")[0].replace("\n", " ")
    return _message(cls.__name__, _schema_ref(_tag(cls) or ""), summary, headers)


def _run_event_messages() -> dict[str, Schema]:
    out: dict[str, Schema] = {}
    for cls in _union_members(contracts.RunEvent) or ():
        tag = _tag(cls) or ""
        payload = {
            "allOf": [
                _schema_ref(_tag(contracts.EventRecord) or ""),
                {"type": "object", "properties": {"event": _schema_ref(tag)}},
            ]
        }
        headers = _headers(
            [subjects.MSG_ID, subjects.EVENT_TYPE, subjects.NOTIFICATION_ID],
            [subjects.TRACEPARENT]
            + ([subjects.ANSWERED] if tag == _tag(contracts.ToolCallRequested) else []),
            {subjects.EVENT_TYPE: tag},
        )
        summary = f"An EventRecord whose `event` is a {cls.__name__} (`{tag}`)."
        out[f"{cls.__name__}Event"] = _message(f"{cls.__name__}Event", payload, summary, headers)
    return out


def _ref(*path: str) -> Schema:
    return {"$ref": "#/" + "/".join(path)}


def _channel(
    address: str | None, description: str, messages: Iterable[str], params: Sequence[str] = ()
) -> Schema:
    channel: Schema = {
        "address": address,
        "description": description,
        "messages": {m: _ref("components", "messages", m) for m in messages},
    }
    if params:
        channel["parameters"] = {k: _ref("components", "parameters", k) for k in params}
    return channel


def _names(*classes: type[msgspec.Struct]) -> list[str]:
    return [cls.__name__ for cls in classes]


def _parameters() -> dict[str, Schema]:
    return {
        "run_id": {
            "description": "The run's id: 1-64 characters from `[A-Za-z0-9_-]` (a subject token).",
            "examples": ["greet-001"],
        },
        "event": {
            "description": "The event's tag (the `type` of EventRecord.event).",
            "enum": event_tags(),
        },
        "service": {"description": "A loom service.", "enum": list(subjects.SERVICES)},
        "tool": {"description": "A tool's name (the ToolSpec's `name`)."},
        "digest": {"description": "The digest of the model_call_requested an answer is for."},
        "part": {"description": "`C` (a chunk) or `M` (an object's metadata).", "enum": ["C", "M"]},
        "id": {"description": "A chunk set's nuid, or the base64url object name."},
        "name": {"description": "An external event's name (a subject token)."},
        "key": {"description": "An external event's correlation key (a subject token)."},
        "partition": {
            "description": "An executor partition: FNV-1a (32 bit) of the run id modulo "
            "LOOM_PARTITIONS (nats-server's `partition()` mapping).",
            "examples": ["3"],
        },
        "via": {
            "description": "The submitting identity (client or operator); NATS permissions "
            "let each identity publish only its own.",
            "enum": ["client", "operator"],
        },
        "tenant": {"description": "A digest of a tenant's name (16 hex characters)."},
        "schedule": {"description": "A schedule's name (1-48 of `[A-Za-z0-9_-]`)."},
    }


def _message_headers(route: routes.Route) -> Schema | None:
    if route.name.startswith("inbox."):
        return _headers([], [subjects.TRACEPARENT])
    if route is routes.SUBMIT:
        return _headers(
            [],
            [subjects.TRACEPARENT, subjects.AUTHORIZATION, subjects.MSG_ID],
            text={subjects.MSG_ID: _SUBMIT_MSG_ID},
        )
    if route is routes.SIGNAL:
        return _headers([], [subjects.MSG_ID])
    if route is routes.SCHEDULE:  # the principal the schedule's runs act for
        return _headers([], [subjects.AUTHORIZATION])
    if route in (routes.DEAD_LETTER, routes.REJECTED):  # one message type, same headers
        return _headers([subjects.DLQ_REASON], [subjects.TRACEPARENT])
    return None


def _messages() -> dict[str, Schema]:
    """One component message per message type carried by a route (run events wrapped in
    their EventRecord), with the headers its route defines. A type carried by several
    routes (a RunRequest on submit, and forwarded between executor replicas) is
    described by the first route that carries it: the public one."""
    out: dict[str, Schema] = {}
    for route in routes.ROUTES:
        if route is routes.RUN_EVENTS:
            continue
        for cls in (*route.messages, *route.replies):
            if cls.__name__ in out:
                continue
            headers = _message_headers(route) if cls in route.messages else None
            out[cls.__name__] = _struct_message(cls, headers)
    out.update(_run_event_messages())
    return dict(sorted(out.items()))


_IDENTITY_TEXT = {
    "client": "a client (may only submit runs)",
    "operator": "an operator (the CLI, the console)",
}


def _who(identities: Sequence[str]) -> str:
    return ", ".join(_IDENTITY_TEXT.get(i, f"the {i} service") for i in identities)


def _channel_description(route: routes.Route) -> str:
    lines = [route.description, "", f"Publishers: {_who(route.publishers)}."]
    if route.own_param:
        lines[-1] += f" Each publishes only with its own name as `{{{route.own_param}}}`."
    listeners = []
    for consumer in route.consumers:
        how = f"durable `{consumer.durable}`" if consumer.durable else "subscription"
        if consumer.queue:
            how = f"queue group `{consumer.queue}`"
        what = ""
        if consumer.events:
            what = " on " + ", ".join(f"`{routes.tag_of(e)}`" for e in consumer.events)
        note = f" ({consumer.note})" if consumer.note else ""
        listeners.append(f"{_who([consumer.identity])}: {how}{what}{note}")
    lines.append("Consumers: " + "; ".join(listeners) + ".")
    if route.stream:
        lines.append(f"Stream: {route.stream}.")
    return "\n".join(lines)


def _reply_channel(route: routes.Route) -> str:
    return f"{route.name}Reply"


def _channels() -> dict[str, Schema]:
    reply = "The NATS reply subject of the request (a per-request inbox); no fixed address."
    out: dict[str, Schema] = {}
    for route in routes.ROUTES:
        messages = (
            sorted(_run_event_messages()) if route is routes.RUN_EVENTS else _names(*route.messages)
        )
        out[route.name] = _channel(
            route.pattern, _channel_description(route), messages, route.params
        )
        if route.replies:
            out[_reply_channel(route)] = _channel(None, reply, _names(*route.replies))
    return out


def _operation(
    channels: dict[str, Schema],
    action: str,
    channel: str,
    services: Sequence[str],
    description: str,
    reply: str | None = None,
) -> Schema:
    def messages(name: str) -> list[Schema]:
        return [_ref("channels", name, "messages", m) for m in channels[name]["messages"]]

    op: Schema = {
        "action": action,
        "channel": _ref("channels", channel),
        "description": description,
        "messages": messages(channel),
        "tags": [{"name": s} for s in services],
    }
    if reply:
        op["reply"] = {"channel": _ref("channels", reply), "messages": messages(reply)}
    return op


def _operations(channels: dict[str, Schema]) -> dict[str, Schema]:
    """Written from agentloom's side: ``send`` where services publish a route,
    ``receive`` where services consume it (tags name the services)."""
    out: dict[str, Schema] = {}
    for route in routes.ROUTES:
        reply = _reply_channel(route) if route.replies else None
        senders = [i for i in route.publishers if i in routes.SERVICES]
        if senders:
            out[f"send.{route.name}"] = _operation(
                channels, "send", route.name, senders, f"Publish on {route.name}."
            )
        receivers = sorted({c.identity for c in route.consumers if c.identity in routes.SERVICES})
        if receivers:
            verb = "Answer" if reply else "Consume"
            out[f"receive.{route.name}"] = _operation(
                channels, "receive", route.name, receivers, f"{verb} {route.name}.", reply=reply
            )
    return out


def _streams() -> list[Schema]:
    return [
        {
            "name": subjects.RUN_EVENTS_STREAM,
            "subjects": [subjects.RUN_EVENTS_ALL],
            "description": (
                "Every stored run event, published from the store by the relay with "
                f"{subjects.MSG_ID} = event id (duplicates dropped). The store is the system "
                "of record: this stream can be rebuilt from it."
            ),
        },
        {
            "name": subjects.INBOX_STREAM,
            "subjects": [subjects.INBOX_ALL],
            "description": "Results addressed to runs; consumed by the executor.",
        },
        {
            "name": subjects.SIGNALS_STREAM,
            "subjects": [subjects.SIGNALS_ALL],
            "description": "External events for wait_event steps; the latest per name and key.",
        },
        {
            "name": subjects.DLQ_STREAM,
            "subjects": [subjects.DLQ_ALL],
            "description": (
                f"Dead letters, with {subjects.DLQ_REASON} and the original payload; kept for "
                "inspection, never redelivered."
            ),
        },
        {
            "name": routes.REJECTED.stream,
            "subjects": [routes.REJECTED.wildcard],
            "description": "Client mistakes (refused requests), bounded; apart from poison.",
        },
    ]


_INFO = """\
Every subject agentloom uses over NATS, with the JSON payload of each message.

- Payloads are JSON documents described by the JSON Schema (draft 2020-12) files in
  `schemas/`. Every object carries its tag (`type`, or `kind` for plan steps): always send it.
- Operations are written from agentloom's side: `receive` means a loom service consumes the
  channel, `send` means it publishes there. A client does the opposite: to submit a run it
  sends a NATS request with a RunRequest to `{submit}` and reads the reply.
- Request/reply channels answer on the request's reply subject (channels with no address).
- Streams (JetStream) are listed under `x-jetstream-streams`.
- Headers: {headers}.
"""


def asyncapi() -> Schema:
    """The AsyncAPI 3.0 document as a dict (sorted and dumped by ``generate``)."""
    _check_subjects()
    channels = _channels()
    schemas = json_schemas()
    headers = ", ".join(f"`{h}`" for h in sorted(_HEADER_TEXT))
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "agentloom",
            "version": f"{contracts.SCHEMA_VERSION}.0.0",
            "description": _INFO.format(submit=subjects.SUBMIT, headers=headers),
        },
        "defaultContentType": "application/json",
        "servers": {
            "kubernetes": {
                "host": "nats.agentloom.svc:4222",
                "protocol": "nats",
                "description": "The NATS Service of deploy/k8s (namespace agentloom).",
            },
            "local": {
                "host": "localhost:4222",
                "protocol": "nats",
                "description": "A NATS server with JetStream on the default port.",
            },
        },
        "channels": channels,
        "operations": _operations(channels),
        "components": {
            "messages": _messages(),
            "parameters": _parameters(),
            "schemas": {doc["title"]: _schema_ref(stem) for stem, doc in schemas.items()},
        },
        "x-jetstream-streams": _streams(),
    }


# --------------------------------------------------------------------------- errors, limits


def errors_document() -> Schema:
    """Every error code with its area and meaning (``loom_core.error_codes``)."""
    return {
        "description": (
            "Error codes of agentloom: `ErrorInfo.code` and `PlanIssue.code`. `area` says "
            "where a code appears: " + ", ".join(f"`{a}`" for a in error_codes.AREAS) + " "
            "(see loom_core/error_codes.py). Treat an unknown code as an error of its area."
        ),
        "codes": {
            code: {"area": info.area, "meaning": info.meaning}
            for code, info in sorted(error_codes.CODES.items())
        },
    }


def limits_document() -> Schema:
    """The bounds a client meets, their defaults, settings and the code over each."""
    rows = [
        ("message", DEFAULT_MAX_PAYLOAD, "bytes", "LOOM_MAX_PAYLOAD", "payload_too_large",
         "a request (a RunRequest included); the embedded broker allows twice this"),
        ("json_depth", limits.DEFAULT_MAX_DEPTH, "levels", limits.MAX_DEPTH_SETTING,
         "too_deep", "nesting of any JSON a client sends"),
        ("step_input", sizes.DEFAULT_STEP_INPUT_BYTES, "bytes", sizes.STEP_INPUT_SETTING,
         "input_too_large", "a step's rendered tool input"),
        ("step_output", sizes.DEFAULT_STEP_OUTPUT_BYTES, "bytes", sizes.STEP_OUTPUT_SETTING,
         "output_too_large", "a step's output"),
        ("foreach_items", caps.DEFAULT_CAPS.foreach_items, "elements", caps.ITEMS_SETTING,
         "too_many_items", "elements of one foreach or reduce"),
        ("foreach_concurrency", caps.DEFAULT_CAPS.foreach_concurrency, "elements",
         caps.CONCURRENCY_SETTING, "too_much_concurrency", "a foreach's concurrency"),
        ("parallel_branches", caps.DEFAULT_CAPS.parallel_branches, "branches",
         caps.BRANCHES_SETTING, "too_many_branches", "branches of one parallel step"),
        ("loop_iterations", caps.DEFAULT_CAPS.loop_iterations, "iterations",
         caps.ITERATIONS_SETTING, "too_many_iterations", "a loop's max_iterations"),
        ("id", 64, "characters", None, "invalid_run_id",
         "run ids, step ids, event names and keys: 1-64 of A-Z a-z 0-9 _ - (subject tokens)"),
        ("submit_msg_id", resubmit.MAX_MSG_ID, "characters", None, None,
         "a Nats-Msg-Id on loom.submit used as the dedupe key; longer ones are ignored"),
    ]  # fmt: skip
    return {
        "description": (
            "Bounds of agentloom with their defaults. A deployment may change a bound "
            "through its setting; over a bound, the request or step fails with the code."
        ),
        "limits": {
            name: {
                "default": default,
                "unit": unit,
                "setting": setting,
                "code": code,
                "applies_to": about,
            }
            for name, default, unit, setting, code, about in rows
        },  # fmt: skip
    }


# --------------------------------------------------------------------------- output


_YAML_HEADER = "# Generated by `python -m loom_infra.proto_gen proto` (make proto). Do not edit.\n"


class _Dumper(yaml.SafeDumper):
    """No ``&id001`` anchors: shared dicts are written out in full, every time."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line text (descriptions) as a literal block, readable in a diff.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _yaml_text(value: Any) -> str:
    text = yaml.dump(
        value, Dumper=_Dumper, sort_keys=True, allow_unicode=True, width=100,
        default_flow_style=False,
    )  # fmt: skip
    return _YAML_HEADER + text


def generate() -> dict[str, str]:
    """Relative path -> file content, for everything generated under ``proto/``."""
    files = {f"{SCHEMA_DIR}/{stem}.json": _json_text(s) for stem, s in json_schemas().items()}
    files[ASYNCAPI_FILE] = _yaml_text(asyncapi())
    files[ERRORS_FILE] = _json_text(errors_document())
    files[LIMITS_FILE] = _json_text(limits_document())
    return dict(sorted(files.items()))


def write(out_dir: Path, files: dict[str, str]) -> list[str]:
    """Write ``files`` under ``out_dir``; delete generated schema files no longer produced.
    Returns the relative paths that changed. Hand-written files (README, examples) stay."""
    changed = []
    for rel, text in files.items():
        path = out_dir / rel
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        changed.append(rel)
    schema_dir = out_dir / SCHEMA_DIR
    if schema_dir.is_dir():
        for path in sorted(schema_dir.glob("*.json")):
            rel = f"{SCHEMA_DIR}/{path.name}"
            if rel not in files:
                path.unlink()
                changed.append(rel)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m loom_infra.proto_gen <output dir>   (e.g. proto)", file=sys.stderr)
        return 2
    out_dir = Path(args[0])
    changed = write(out_dir, generate())
    for rel in changed:
        print(f"updated {out_dir / rel}")
    print(f"{out_dir}: {len(changed)} file(s) changed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
