"""OTLP export of the spans rebuilt from run events, over HTTP (protobuf) or gRPC.

Design note
- Our spans are not recorded by an OTel tracer: they are derived, after the fact, from
  events. So we build ``opentelemetry.sdk.trace.ReadableSpan`` objects directly, carrying
  OUR trace/span ids, parents and times, and encode them with the stock OTLP encoder. A
  collector therefore sees the same ids a rebuild produces (and can dedupe by them).
- The request is sent by us (httpx for ``http/protobuf``, grpcio's generated stub for
  ``grpc``), not by the stock exporters: those only answer SUCCESS or FAILURE, and the
  tracing service must tell a collector that is *down* (retry later, forever: spans are
  never lost) from one that *refuses this data* (retrying the same bytes cannot help;
  after a few attempts the spans are given up so they do not block the queue). Hence
  :class:`ExportResult` with outcome ``ok``, ``retry`` or ``rejected``:
  - HTTP 2xx is ok (a partial success is logged); 400, 413, 415, 422 and other 4xx are
    rejected, except 401/403/404/405/407/408/429 (configuration or load: retry); 5xx,
    3xx and connection errors/timeouts are retry.
  - gRPC OK is ok; INVALID_ARGUMENT, and RESOURCE_EXHAUSTED for a message over the size
    limit, are rejected; every other status (UNAVAILABLE, DEADLINE_EXCEEDED,
    UNAUTHENTICATED, ...) is retry.
  A rejected batch of several spans may hold one bad span: the service halves the batch
  until it isolates it (see ``loom_services.tracing``).
- Configuration is the standard ``OTEL_EXPORTER_OTLP_*`` variables. The protocol default
  is ``http/protobuf`` (the spec's default; the Python distro's gRPC default is a known
  trap). gRPC needs ``grpcio`` (a project dependency); without it, asking for gRPC is a
  configuration error, not a silent fallback.
- No retry loop here: ``send`` makes one bounded attempt (``timeout`` seconds); the
  tracing service keeps unexported spans in its store and tries again later.
- Spans without an end are skipped: OTLP cannot update a span once sent.
- Header values (API keys) are never logged; ``repr`` shows header names only.
"""

from __future__ import annotations

import gzip
import logging
import re
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import msgspec
from opentelemetry import trace as trace_api
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags

from loom_core import ids
from loom_core.contracts import SpanRecord

# defined with the reading of the OTEL_EXPORTER_OTLP_* variables, at start
from loom_infra.settings import OTLP_PROTOCOLS, OtlpConfigError, OtlpSettings

__all__ = [
    "GRPC_PACKAGE",
    "ExportResult",
    "OtlpConfigError",
    "OtlpExporter",
    "attribute_value",
    "exporter_for",
    "to_readable_span",
]

log = logging.getLogger("loom.otlp")

GRPC_PACKAGE = "grpcio"
PROTOCOLS = OTLP_PROTOCOLS
DEFAULT_TIMEOUT_S = 10.0

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS_PER_US = 1000
_US = timedelta(microseconds=1)
_INT64 = (-(2**63), 2**63 - 1)
_KINDS = {"internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT, "server": SpanKind.SERVER}
_SCOPE = InstrumentationScope("agentloom.tracing")
_HEX = re.compile(r"[0-9a-fA-F]+")
# 4xx statuses that say "fix the configuration or slow down", not "this data is bad"
_HTTP_RETRY_4XX = frozenset({401, 403, 404, 405, 407, 408, 429})

Outcome = Literal["ok", "retry", "rejected"]


@dataclass(frozen=True)
class ExportResult:
    """What one export attempt came to. ``outcome``: ``ok`` (accepted, or nothing to
    send), ``retry`` (the collector is unreachable, overloaded or misconfigured: try the
    same spans later) or ``rejected`` (the collector refused this data: retrying it
    unchanged cannot succeed). ``sent``: spans in the request. ``dropped``: ids of spans
    that cannot be represented in OTLP at all (left out of the request)."""

    outcome: Outcome
    message: str = ""
    sent: int = 0
    dropped: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


# ----------------------------------------------------------------------------- exporter


class OtlpExporter:
    """Sends SpanRecords to an OTLP endpoint. ``endpoint`` is the full traces URL for
    http/protobuf (``http://collector:4318/v1/traces``) or ``host:port``/URL for gRPC
    (``http://`` means plaintext, as does ``insecure=True``). ``timeout`` (seconds) bounds
    one ``send``. ``certificate``: CA bundle to trust; ``client_certificate`` and
    ``client_key``: mutual TLS."""

    def __init__(
        self,
        endpoint: str,
        *,
        protocol: str = "http/protobuf",
        headers: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        compression: str = "none",
        insecure: bool | None = None,
        certificate: str | None = None,
        client_certificate: str | None = None,
        client_key: str | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise OtlpConfigError(
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                f"unsupported protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}",
            )
        self.endpoint = endpoint
        self.protocol = protocol
        self.timeout = timeout
        self.compression = compression
        self._header_names = sorted(headers or {})
        self._resources: dict[str, Resource] = {}
        self._lock = threading.Lock()
        tls = _TlsFiles(certificate, client_certificate, client_key)
        if protocol == "grpc":
            self._transport: _Transport = _GrpcTransport(
                endpoint, dict(headers or {}), timeout, compression, insecure, tls
            )
        else:
            self._transport = _HttpTransport(
                endpoint, dict(headers or {}), timeout, compression, tls
            )

    def __repr__(self) -> str:
        return (
            f"OtlpExporter(endpoint={self.endpoint!r}, protocol={self.protocol!r}, "
            f"headers={self._header_names!r}, timeout={self.timeout!r})"
        )

    def send(self, spans: Sequence[SpanRecord], service_name: str = "agentloom") -> ExportResult:
        """Export the ended spans among ``spans`` in one request. Never raises for a
        failed export: the result says what happened."""
        resource = self._resource(service_name)
        readable = []
        dropped = []
        for span in spans:
            if span.end is None:
                continue
            try:
                readable.append(to_readable_span(span, resource))
            except ValueError as exc:
                # Not representable in OTLP: retrying would never help; the caller
                # gives these up instead of blocking its queue on them.
                log.error(
                    "span %s of run %s cannot be exported, dropped: %s",
                    span.span_id,
                    span.run_id,
                    exc,
                )
                dropped.append(span.span_id)
        if not readable:
            return ExportResult("ok", "nothing to send", 0, tuple(dropped))
        try:
            request = encode_spans(readable)
        except Exception as exc:  # an attribute the encoder refuses: this data is bad
            return ExportResult(
                "rejected", f"cannot encode the spans: {exc}", len(readable), tuple(dropped)
            )
        with self._lock:
            outcome, message = self._transport.send(request)
        if outcome != "ok":
            log.warning(
                "OTLP export of %d spans to %s: %s (%s)",
                len(readable),
                self.endpoint,
                outcome,
                message,
            )
        return ExportResult(outcome, message, len(readable), tuple(dropped))

    def export(self, spans: Sequence[SpanRecord], service_name: str = "agentloom") -> bool:
        """``send`` reduced to True when the endpoint accepted the spans (or there was
        nothing to send)."""
        return self.send(spans, service_name).ok

    def close(self) -> None:
        with self._lock:
            self._transport.close()

    def _resource(self, service_name: str) -> Resource:
        resource = self._resources.get(service_name)
        if resource is None:
            # Resource.create also merges OTEL_RESOURCE_ATTRIBUTES (k8s pod, version...).
            resource = Resource.create({SERVICE_NAME: service_name})
            self._resources[service_name] = resource
        return resource


# ----------------------------------------------------------------------------- transports


@dataclass(frozen=True)
class _TlsFiles:
    certificate: str | None
    client_certificate: str | None
    client_key: str | None

    def read(self, path: str | None, variable: str) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise OtlpConfigError(variable, f"cannot read {path!r}: {exc}") from None


class _Transport:
    def send(self, request: ExportTraceServiceRequest) -> tuple[Outcome, str]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _HttpTransport(_Transport):
    def __init__(
        self,
        endpoint: str,
        headers: dict[str, str],
        timeout: float,
        compression: str,
        tls: _TlsFiles,
    ) -> None:
        self.endpoint = endpoint
        self.gzip = compression == "gzip"
        self.headers = {**headers, "Content-Type": "application/x-protobuf"}
        if self.gzip:
            self.headers["Content-Encoding"] = "gzip"
        verify: ssl.SSLContext | bool = True
        if tls.certificate or tls.client_certificate:
            context = ssl.create_default_context(cafile=tls.certificate or None)
            if tls.client_certificate:
                context.load_cert_chain(tls.client_certificate, tls.client_key or None)
            verify = context
        self.client = httpx.Client(timeout=timeout, verify=verify, follow_redirects=False)

    def send(self, request: ExportTraceServiceRequest) -> tuple[Outcome, str]:
        body = request.SerializeToString()
        if self.gzip:
            body = gzip.compress(body)
        try:
            response = self.client.post(self.endpoint, content=body, headers=self.headers)
        except httpx.HTTPError as exc:  # refused, reset, timed out, DNS...
            return "retry", f"{type(exc).__name__}: {exc}"
        status = response.status_code
        if 200 <= status < 300:
            _log_partial_success(response.content)
            return "ok", ""
        message = f"HTTP {status} {response.reason_phrase}"
        if 400 <= status < 500 and status not in _HTTP_RETRY_4XX:
            return "rejected", message
        return "retry", message

    def close(self) -> None:
        self.client.close()


class _GrpcTransport(_Transport):
    def __init__(
        self,
        endpoint: str,
        headers: dict[str, str],
        timeout: float,
        compression: str,
        insecure: bool | None,
        tls: _TlsFiles,
    ) -> None:
        try:
            import grpc
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
                TraceServiceStub,
            )
        except ImportError:
            raise OtlpConfigError(
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                f"'grpc' needs the package {GRPC_PACKAGE} (pip install {GRPC_PACKAGE}), which "
                "is not installed; or set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf and point "
                "the endpoint at the collector's HTTP port (4318)",
            ) from None
        self._grpc = grpc
        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        target = parts.netloc or endpoint
        plaintext = parts.scheme == "http" if insecure is None else insecure
        options = [("grpc.enable_retries", 0)]
        kwargs: dict[str, Any] = {"options": options}
        if compression == "gzip":
            kwargs["compression"] = grpc.Compression.Gzip
        if plaintext:
            self.channel = grpc.insecure_channel(target, **kwargs)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.read(tls.certificate, "OTEL_EXPORTER_OTLP_CERTIFICATE"),
                private_key=tls.read(tls.client_key, "OTEL_EXPORTER_OTLP_CLIENT_KEY"),
                certificate_chain=tls.read(
                    tls.client_certificate, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"
                ),
            )
            self.channel = grpc.secure_channel(target, credentials, **kwargs)
        self.stub = TraceServiceStub(self.channel)
        self.metadata = tuple((k.lower(), v) for k, v in headers.items())
        self.timeout = timeout

    def send(self, request: ExportTraceServiceRequest) -> tuple[Outcome, str]:
        grpc = self._grpc
        try:
            response = self.stub.Export(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            message = f"gRPC {getattr(code, 'name', code)}: {details}"
            too_large = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (
                details or ""
            )
            if code == grpc.StatusCode.INVALID_ARGUMENT or too_large:
                return "rejected", message
            return "retry", message
        _log_partial_success(response)
        return "ok", ""

    def close(self) -> None:
        self.channel.close()


def _log_partial_success(response: bytes | ExportTraceServiceResponse) -> None:
    """A collector may accept a request but drop some spans (``partial_success``): we
    cannot tell which, so the batch counts as delivered and the drop is logged."""
    if isinstance(response, bytes | bytearray):
        if not response:
            return
        try:
            parsed = ExportTraceServiceResponse.FromString(bytes(response))
        except Exception:  # a 2xx with a body that is not the OTLP response: accepted
            return
    else:
        parsed = response
    partial = parsed.partial_success
    if partial.rejected_spans or partial.error_message:
        log.warning(
            "the collector accepted the export but rejected %d spans: %s",
            partial.rejected_spans,
            partial.error_message,
        )


# ----------------------------------------------------------------------------- configuration


def exporter_for(
    settings: OtlpSettings | None, *, timeout: float = DEFAULT_TIMEOUT_S
) -> OtlpExporter | None:
    """The exporter ``settings`` describe (read at start from the standard
    ``OTEL_EXPORTER_OTLP_*`` variables by ``loom_infra.settings.otlp_settings_from_env``),
    or None when no endpoint is set."""
    if settings is None:
        return None
    return OtlpExporter(
        settings.endpoint,
        protocol=settings.protocol,
        headers=dict(settings.headers),
        timeout=timeout,
        compression=settings.compression,
        insecure=settings.insecure,
        certificate=settings.certificate,
        client_certificate=settings.client_certificate,
        client_key=settings.client_key,
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
