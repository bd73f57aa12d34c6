"""OTLP export of the spans rebuilt from run events.

Design note
- Our spans are not recorded by an OTel tracer: they are derived, after the fact, from
  events. So we build ``opentelemetry.sdk.trace.ReadableSpan`` objects directly, carrying
  OUR trace/span ids, parents and times, and hand them to the stock OTLP exporter. A
  collector therefore sees the same ids a rebuild produces (and can dedupe by them).
- Configuration is the standard ``OTEL_EXPORTER_OTLP_*`` variables. The protocol default
  is ``http/protobuf`` (the spec's default; the Python distro's gRPC default is a known
  trap). gRPC works only if ``opentelemetry-exporter-otlp-proto-grpc`` is installed, and
  asking for it without the package is a configuration error, not a silent fallback.
- No retry policy here: ``export`` makes one bounded attempt (the OTel client may retry a
  transient failure inside ``timeout``) and returns False on failure; the tracing
  service keeps unexported spans in its store and tries again later.
- Spans without an end are skipped: OTLP cannot update a span once sent.
- Header values (API keys) are never logged; ``repr`` shows header names only.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.re import parse_env_headers

from loom_core import ids
from loom_core.contracts import SpanRecord
from loom_infra.settings import SettingsError

__all__ = ["GRPC_PACKAGE", "OtlpConfigError", "OtlpExporter", "from_env", "to_readable_span"]

log = logging.getLogger("loom.otlp")

GRPC_PACKAGE = "opentelemetry-exporter-otlp-proto-grpc"
PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_TIMEOUT_S = 10.0

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS_PER_US = 1000
_US = timedelta(microseconds=1)
_INT64 = (-(2**63), 2**63 - 1)
_KINDS = {"internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT, "server": SpanKind.SERVER}
_SCOPE = InstrumentationScope("agentloom.tracing")
_HEX = re.compile(r"[0-9a-fA-F]+")


class OtlpConfigError(SettingsError):
    """An ``OTEL_EXPORTER_OTLP_*`` variable is malformed or asks for what is not installed.
    ``variable`` names it."""


# ----------------------------------------------------------------------------- exporter


class OtlpExporter:
    """Sends SpanRecords to an OTLP endpoint. ``endpoint`` is the full traces URL for
    http/protobuf (``http://collector:4318/v1/traces``) or ``host:port``/URL for gRPC.
    ``timeout`` (seconds) bounds one ``export`` call, internal retries included."""

    def __init__(
        self,
        endpoint: str,
        *,
        protocol: str = "http/protobuf",
        headers: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        compression: str = "none",
    ) -> None:
        self.endpoint = endpoint
        self.protocol = protocol
        self.timeout = timeout
        self._header_names = sorted(headers or {})
        self._exporter = _make_exporter(
            endpoint, protocol, dict(headers or {}), timeout, compression
        )
        self._resources: dict[str, Resource] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"OtlpExporter(endpoint={self.endpoint!r}, protocol={self.protocol!r}, "
            f"headers={self._header_names!r}, timeout={self.timeout!r})"
        )

    def export(self, spans: Sequence[SpanRecord], service_name: str = "agentloom") -> bool:
        """Export the ended spans among ``spans``; True when the endpoint accepted them
        (or there was nothing to send). Never raises for a failed export."""
        resource = self._resource(service_name)
        readable = []
        for span in spans:
            if span.end is None:
                continue
            try:
                readable.append(to_readable_span(span, resource))
            except ValueError as exc:
                # A span that cannot be represented would block the store's export queue
                # forever if it failed the batch: drop it, loudly.
                log.error(
                    "span %s of run %s cannot be exported, dropped: %s",
                    span.span_id,
                    span.run_id,
                    exc,
                )
        if not readable:
            return True
        with self._lock:
            try:
                result = self._exporter.export(readable)
            except Exception:
                log.exception("OTLP export to %s failed", self.endpoint)
                return False
        return result is SpanExportResult.SUCCESS

    def close(self) -> None:
        with self._lock:
            self._exporter.shutdown()

    def _resource(self, service_name: str) -> Resource:
        resource = self._resources.get(service_name)
        if resource is None:
            # Resource.create also merges OTEL_RESOURCE_ATTRIBUTES (k8s pod, version...).
            resource = Resource.create({SERVICE_NAME: service_name})
            self._resources[service_name] = resource
        return resource


def _make_exporter(
    endpoint: str, protocol: str, headers: dict[str, str], timeout: float, compression: str
) -> SpanExporter:
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(
            endpoint=endpoint,
            headers=headers,
            timeout=timeout,
            compression=Compression.Gzip if compression == "gzip" else Compression.NoCompression,
        )
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError:
            raise OtlpConfigError(
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                f"'grpc' needs the package {GRPC_PACKAGE} (pip install {GRPC_PACKAGE}), which "
                "is not installed; or set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf and point "
                "the endpoint at the collector's HTTP port (4318)",
            ) from None
        return GrpcSpanExporter(  # pragma: no cover - needs the optional package
            endpoint=endpoint,
            insecure=endpoint.startswith("http://"),
            headers=headers,
            timeout=timeout,
        )
    raise OtlpConfigError(
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        f"unsupported protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}",
    )


def from_env(
    env: Mapping[str, str] = os.environ, *, timeout: float = DEFAULT_TIMEOUT_S
) -> OtlpExporter | None:
    """An exporter configured by the standard variables, or None when no endpoint is set.

    - ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``: the traces URL, used as is; otherwise
      ``OTEL_EXPORTER_OTLP_ENDPOINT`` (base URL; ``/v1/traces`` is appended for HTTP).
    - ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``: ``http/protobuf`` (default) or ``grpc``.
    - ``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS``: ``key=value,key2=value2`` (URL-encoded).
    - ``OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION``: ``gzip`` or ``none``.
    The signal-specific variable wins over the general one."""

    def get(name: str) -> tuple[str, str | None]:
        for var in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
            value = (env.get(var) or "").strip()
            if value:
                return var, value
        return f"OTEL_EXPORTER_OTLP_{name}", None

    protocol_var, protocol = get("PROTOCOL")
    protocol = (protocol or "http/protobuf").lower()
    if protocol not in PROTOCOLS:
        raise OtlpConfigError(
            protocol_var,
            f"unsupported protocol {protocol!r}; use one of {', '.join(PROTOCOLS)} "
            "(http/json is not supported by the Python exporter)",
        )

    traces = (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or "").strip()
    base = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
    if traces:
        endpoint_var, endpoint = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces
    elif base:
        endpoint_var = "OTEL_EXPORTER_OTLP_ENDPOINT"
        endpoint = base if protocol == "grpc" else f"{base.rstrip('/')}/v1/traces"
    else:
        return None
    if protocol == "http/protobuf" and not endpoint.startswith(("http://", "https://")):
        raise OtlpConfigError(
            endpoint_var,
            f"must be an http:// or https:// URL, got {endpoint!r} "
            "(e.g. http://otel-collector:4318)",
        )

    _, raw_headers = get("HEADERS")
    headers = dict(parse_env_headers(raw_headers or "", liberal=True))

    compression_var, compression = get("COMPRESSION")
    compression = (compression or "none").lower()
    if compression not in ("none", "gzip"):
        raise OtlpConfigError(compression_var, f"must be 'gzip' or 'none', got {compression!r}")

    return OtlpExporter(
        endpoint, protocol=protocol, headers=headers, timeout=timeout, compression=compression
    )


# ----------------------------------------------------------------------------- conversion


def _ns(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return ((value - _EPOCH) // _US) * _NS_PER_US


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and _INT64[0] <= v <= _INT64[1]


def _json(value: Any) -> str:
    try:
        return msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        return str(value)


def attribute_value(value: Any) -> Any:
    """An OTel attribute value for a JSON value: primitives as they are, homogeneous
    lists of primitives as tuples, anything else (dicts, nested or mixed lists, huge
    ints) as a JSON string. None means "leave the attribute out"."""
    if value is None:
        return None
    if isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        return value if _is_int(value) else str(value)
    if isinstance(value, list | tuple):
        items = list(value)
        for check in (
            lambda v: isinstance(v, bool),
            lambda v: isinstance(v, str),
            _is_int,
            lambda v: isinstance(v, float),
        ):
            if all(check(v) for v in items):
                return tuple(items)
        return _json(items)
    return _json(value)


def _attributes(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        converted = attribute_value(value)
        if converted is not None:
            out[key] = converted
    return out


def to_readable_span(span: SpanRecord, resource: Resource) -> ReadableSpan:
    """One SpanRecord as an OTel ReadableSpan with our ids, parent, times and status.
    Raises ValueError when the ids are not OTel-shaped hex."""
    trace_id, span_id = _hex_id(span.trace_id, 32), _hex_id(span.span_id, 16)
    flags = TraceFlags(TraceFlags.SAMPLED)
    context = trace_api.SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags)
    parent = None
    if span.parent_span_id:
        # The run's root span may hang under the submitter's span: that parent is remote.
        remote = span.span_id == ids.span_id(span.run_id, "run")
        parent = trace_api.SpanContext(
            trace_id, _hex_id(span.parent_span_id, 16), is_remote=remote, trace_flags=flags
        )
    if span.status == "error":
        status = Status(StatusCode.ERROR, span.status_message or None)
    elif span.status == "ok":
        status = Status(StatusCode.OK)
    else:
        status = Status(StatusCode.UNSET)
    return ReadableSpan(
        name=span.name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=_attributes(span.attributes),
        events=[
            Event(e.name, attributes=_attributes(e.attributes), timestamp=_ns(e.at))
            for e in span.events
        ],
        kind=_KINDS.get(span.kind, SpanKind.INTERNAL),
        status=status,
        start_time=_ns(span.start),
        end_time=_ns(span.end) if span.end is not None else None,
        instrumentation_scope=_SCOPE,
    )


def _hex_id(value: str, width: int) -> int:
    if len(value) != width or not _HEX.fullmatch(value):
        raise ValueError(f"id {value!r} is not {width} hex chars")
    number = int(value, 16)
    if not number:
        raise ValueError(f"id {value!r} is all zero (invalid in OTel)")
    return number
