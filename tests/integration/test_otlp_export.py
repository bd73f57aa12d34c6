"""OTLP export over HTTP and gRPC against real receivers on 127.0.0.1 that decode the
protobuf payload like a collector would: ids, nesting, attributes, and how each kind of
failure is told apart (collector down: retry; data refused: rejected)."""

from __future__ import annotations

import gzip
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import msgspec
import pytest
import waiting  # type: ignore[import-not-found]  # tests/integration on sys.path
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from loom_core import ids
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    Plan,
    PlanAccepted,
    PlanIssue,
    PlanRejected,
    RunCompleted,
    RunRequested,
    SpanRecord,
    StepCompleted,
    StepScheduled,
    StepStarted,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolStep,
)
from loom_core.spans import build_spans
from loom_infra.otlp import GRPC_PACKAGE, ExportResult, OtlpConfigError, OtlpExporter, exporter_for
from loom_infra.settings import otlp_settings_from_env

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
RUN = "run-otlp"


def ms(n: float) -> datetime:
    return T0 + timedelta(milliseconds=n)


# --------------------------------------------------------------------------- receiver


class Receiver:
    """A minimal OTLP/HTTP trace receiver. Its socket is bound at once (the port is
    reserved) but only listens after ``start()``: before that, connections are refused,
    which is exactly "collector down"."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], ExportTraceServiceRequest]] = []
        self.got_request = threading.Event()
        # what to answer: (HTTP status, OTLP response); the default accepts everything
        self.answer: Callable[[ExportTraceServiceRequest], tuple[int, ExportTraceServiceResponse]]
        self.answer = lambda request: (200, ExportTraceServiceResponse())
        self.refused: list[ExportTraceServiceRequest] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, response = receiver.answer(request)
                if status != 200:
                    receiver.refused.append(request)
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    receiver.got_request.set()
                    return
                receiver.requests.append((headers, request))
                reply = response.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                receiver.got_request.set()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()
        self.port = self.server.server_address[1]
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server.server_activate()
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()

    def spans(self) -> list[tuple[str, Span, dict[str, Any]]]:
        """(service.name, span, resource attributes) of everything received."""
        out = []
        for _, request in self.requests:
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.append((resource["service.name"], span, resource))
        return out


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs(span: Span) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


# --------------------------------------------------------------------------- a run


def run_records() -> list[EventRecord]:
    plan = Plan(steps=[ToolStep(id="fetch", tool="http_get")], name="demo")
    key1, key2 = ids.idempotency_key(RUN, "fetch", 1), ids.idempotency_key(RUN, "fetch", 2)
    events = [
        RunRequested(plan=plan, thread_id="th-1"),
        PlanAccepted(plan=plan),
        StepScheduled(step_id="fetch"),
        StepStarted(step_id="fetch", attempt=1),
        ToolCallRequested(
            step_id="fetch", attempt=1, tool="http_get", input={}, idempotency_key=key1
        ),
        ToolCallFailed(
            step_id="fetch",
            attempt=1,
            idempotency_key=key1,
            error=ErrorInfo(code="http_503", message="upstream unavailable"),
            started_at=ms(4),
            finished_at=ms(6),
        ),
        StepStarted(step_id="fetch", attempt=2),
        ToolCallRequested(
            step_id="fetch", attempt=2, tool="http_get", input={}, idempotency_key=key2
        ),
        ToolCallCompleted(
            step_id="fetch",
            attempt=2,
            idempotency_key=key2,
            output={"ok": True},
            started_at=ms(17),
            finished_at=ms(19),
        ),
        StepCompleted(step_id="fetch", output={"ok": True}),
        RunCompleted(output={"ok": True}),
    ]
    return [
        EventRecord(run_id=RUN, seq=i, at=ms(2 * i), event=e) for i, e in enumerate(events, start=1)
    ]


def ns(t: datetime) -> int:
    return int((t - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000) * 1000


# --------------------------------------------------------------------------- tests


def from_env(env: dict[str, str], timeout: float = 10.0) -> OtlpExporter | None:
    """The exporter a tracing service started with ``env`` would use."""
    return exporter_for(otlp_settings_from_env(env), timeout=timeout)


def test_export_sends_our_ids_nesting_times_and_attributes(receiver: Receiver) -> None:
    receiver.start()
    spans = build_spans(run_records())
    exporter = from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.base_url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s3cr3t%20value,tenant=acme",
        },
        timeout=5,
    )
    assert exporter is not None
    assert "s3cr3t" not in repr(exporter)
    assert exporter.export(spans, service_name="agentloom-test") is True

    headers, _ = receiver.requests[0]
    assert headers["x-api-key"] == "s3cr3t value" and headers["tenant"] == "acme"
    assert headers["content-type"] == "application/x-protobuf"

    received = receiver.spans()
    assert {service for service, _, _ in received} == {"agentloom-test"}
    got = {span.span_id.hex(): span for _, span, _ in received}
    ours = {s.span_id: s for s in spans}
    assert set(got) == set(ours)
    assert {span.trace_id.hex() for span in got.values()} == {ids.trace_id(RUN)}

    for span_id, mine in ours.items():
        theirs = got[span_id]
        assert theirs.name == mine.name
        assert theirs.parent_span_id.hex() == (mine.parent_span_id or "")
        assert theirs.start_time_unix_nano == ns(mine.start)
        assert mine.end is not None and theirs.end_time_unix_nano == ns(mine.end)

    root = got[ids.span_id(RUN, "run")]
    assert root.name == "invoke_workflow demo"
    assert root.status.code == Status.STATUS_CODE_OK
    assert attrs(root) == {
        "gen_ai.operation.name": "invoke_workflow",
        "loom.run.id": RUN,
        "gen_ai.conversation.id": "th-1",
        "loom.run.status": "completed",
    }
    step = got[ids.span_id(RUN, "step", "fetch")]
    assert step.parent_span_id == root.span_id
    attempt1 = got[ids.span_id(RUN, "step", "fetch", "attempt", "1")]
    assert attempt1.parent_span_id == step.span_id
    tool1 = got[ids.span_id(RUN, "step", "fetch", "attempt", "1", "tool")]
    assert (tool1.name, tool1.kind) == ("execute_tool http_get", Span.SPAN_KIND_CLIENT)
    assert tool1.parent_span_id == attempt1.span_id
    assert (tool1.status.code, tool1.status.message) == (
        Status.STATUS_CODE_ERROR,
        "upstream unavailable",
    )
    assert attrs(tool1) == {
        "gen_ai.tool.name": "http_get",
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.call.id": ids.idempotency_key(RUN, "fetch", 1),
        "loom.idempotency_key": ids.idempotency_key(RUN, "fetch", 1),
        "loom.attempt": 1,
        "error.type": "http_503",
    }
    tool2 = got[ids.span_id(RUN, "step", "fetch", "attempt", "2", "tool")]
    assert tool2.status.code == Status.STATUS_CODE_OK
    assert (tool2.start_time_unix_nano, tool2.end_time_unix_nano) == (ns(ms(17)), ns(ms(19)))


def test_json_attributes_and_span_events_survive(receiver: Receiver) -> None:
    receiver.start()
    records = run_records()[:1] + [
        EventRecord(
            run_id=RUN,
            seq=2,
            at=ms(3),
            event=PlanRejected(
                issues=[PlanIssue(code="unknown_tool", path="$.steps[0]", message="no 'x'")]
            ),
        )
    ]
    spans = build_spans(records)
    extra = SpanRecord(
        trace_id=ids.trace_id(RUN),
        span_id=ids.span_id(RUN, "extra"),
        run_id=RUN,
        name="extra",
        start=ms(1),
        end=ms(2),
        parent_span_id=ids.span_id(RUN, "run"),
        attributes={
            "dict": {"a": [1, 2], "b": None},
            "nested": [[1], [2]],
            "mixed": [1, "x"],
            "strs": ["a", "b"],
            "ints": [1, 2],
            "float": 1.5,
            "big": 2**70,
            "none": None,
        },
    )
    exporter = OtlpExporter(f"{receiver.base_url}/v1/traces", timeout=5)
    assert exporter.export([*spans, extra]) is True
    got = {span.name: span for _, span, _ in receiver.spans()}
    assert attrs(got["extra"]) == {
        "dict": '{"a":[1,2],"b":null}',
        "nested": "[[1],[2]]",
        "mixed": '[1,"x"]',
        "strs": ["a", "b"],
        "ints": [1, 2],
        "float": 1.5,
        "big": str(2**70),
    }
    plan = got["plan"]
    assert plan.status.code == Status.STATUS_CODE_ERROR
    assert [(e.name, e.time_unix_nano, attrs(e)) for e in plan.events] == [
        (
            "loom.plan.issue",
            ns(ms(3)),
            {
                "loom.issue.code": "unknown_tool",
                "loom.issue.path": "$.steps[0]",
                "loom.issue.message": "no 'x'",
            },
        )
    ]


def test_open_spans_are_not_sent(receiver: Receiver) -> None:
    receiver.start()
    spans = build_spans(run_records()[:5])  # tool call in flight
    open_ids = {s.span_id for s in spans if s.end is None}
    assert open_ids
    exporter = OtlpExporter(f"{receiver.base_url}/v1/traces", timeout=5)
    assert exporter.export(spans) is True
    sent = {span.span_id.hex() for _, span, _ in receiver.spans()}
    assert sent == {s.span_id for s in spans} - open_ids
    # nothing ended yet at all: nothing to send, and that is a success
    only_open = [s for s in spans if s.end is None]
    before = len(receiver.requests)
    assert exporter.export(only_open) is True
    assert len(receiver.requests) == before


def test_receiver_down_fails_fast_then_the_same_spans_succeed(receiver: Receiver) -> None:
    spans = build_spans(run_records())
    exporter = OtlpExporter(f"{receiver.base_url}/v1/traces", timeout=1.0)
    # bound but not listening: connection refused
    assert exporter.export(spans) is False
    assert receiver.requests == []
    receiver.start()
    assert exporter.export(spans) is True
    assert {span.span_id.hex() for _, span, _ in receiver.spans()} == {s.span_id for s in spans}


def test_root_under_a_remote_parent_keeps_the_callers_trace(receiver: Receiver) -> None:
    receiver.start()
    parent = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    spans = build_spans(run_records(), parent=parent)
    exporter = OtlpExporter(f"{receiver.base_url}/v1/traces", timeout=5)
    assert exporter.export(spans) is True
    got = {span.span_id.hex(): span for _, span, _ in receiver.spans()}
    assert {s.trace_id.hex() for s in got.values()} == {parent[0]}
    assert got[ids.span_id(RUN, "run")].parent_span_id.hex() == parent[1]


# --------------------------------------------------------------------------- config


def test_from_env_none_without_endpoint_and_endpoint_rules() -> None:
    assert from_env({}) is None
    assert from_env({"OTEL_EXPORTER_OTLP_HEADERS": "a=b"}) is None
    base = from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
    assert base is not None and base.endpoint == "http://collector:4318/v1/traces"
    exact = from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector/custom/path",
        }
    )
    assert exact is not None and exact.endpoint == "https://collector/custom/path"
    assert exact.protocol == "http/protobuf"


def test_grpc_without_its_package_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make the package unimportable whatever is installed.
    monkeypatch.setitem(sys.modules, "grpc", None)
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    }
    with pytest.raises(OtlpConfigError, match=GRPC_PACKAGE) as info:
        from_env(env)
    assert info.value.variable == "OTEL_EXPORTER_OTLP_PROTOCOL"
    assert "http/protobuf" in str(info.value)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            },
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "x",
            },
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd",
            },
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ),
    ],
)
def test_bad_settings_name_their_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(OtlpConfigError) as info:
        from_env(env)
    assert info.value.variable == variable


# --------------------------------------------------------------------------- the service


async def test_tracing_service_delivers_every_span_after_the_collector_comes_back(
    receiver: Receiver, tmp_path: Any, sqlite_store_settings: Any
) -> None:
    """The collector is down during the run; spans wait in the store and all arrive,
    with the run's own ids, once it is back."""
    from pathlib import Path

    from loom_cli.app import load_run_request
    from loom_infra.client import LoomClient
    from loom_infra.natsserver import EmbeddedNats
    from loom_infra.settings import Settings
    from loom_services.executor import ExecutorService
    from loom_services.planner import PlannerService
    from loom_services.runtime import Stack
    from loom_services.toolrunner import ToolRunnerService
    from loom_services.tracing import TracingService

    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    settings = Settings(nats_url=server.url, store=sqlite_store_settings)
    tracing = TracingService(
        settings, exporter=OtlpExporter(f"{receiver.base_url}/v1/traces", timeout=1.0)
    )
    tracing.export_retry_s = 0.1
    stack = Stack(
        [ExecutorService(settings), PlannerService(settings), ToolRunnerService(settings), tracing],
        settings,
    )
    await stack.start()
    try:
        async with await LoomClient.connect(server.url) as client:
            example = Path(__file__).resolve().parents[2] / "examples" / "hello-dag.yaml"
            accepted = await client.submit(load_run_request(example, [], None))
            records = await client.wait(accepted.run_id, timeout=30)
            assert isinstance(records[-1].event, RunCompleted)
            expected = {s.span_id for s in build_spans(records)}
            # it did try while the collector was down
            await waiting.eventually(lambda: tracing.export_failures, "an export attempt", 20)
            receiver.start()  # the collector comes back
            await waiting.eventually(
                lambda: {span.span_id.hex() for _, span, _ in receiver.spans()} == expected,
                "every span at the collector",
                20,
                0.05,
            )
            trace_ids = {span.trace_id.hex() for _, span, _ in receiver.spans()}
            assert trace_ids == {ids.trace_id(accepted.run_id)}
            names = {span.name for _, span, _ in receiver.spans()}
            assert "invoke_workflow hello-dag" in names and "execute_tool concat" in names
    finally:
        await stack.close()
        server.stop()


# --------------------------------------------------------------------------- outcomes


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (400, "rejected"),  # the data is bad: retrying the same bytes cannot help
        (413, "rejected"),
        (415, "rejected"),
        (422, "rejected"),
        (401, "retry"),  # configuration: fix it and the same spans go through
        (403, "retry"),
        (404, "retry"),
        (429, "retry"),  # overloaded
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
    ],
)
def test_http_answers_are_told_apart(receiver: Receiver, status: int, outcome: str) -> None:
    receiver.answer = lambda request: (status, ExportTraceServiceResponse())
    receiver.start()
    spans = build_spans(run_records())
    exporter = OtlpExporter(f"{receiver.base_url}/v1/traces", timeout=5)
    result = exporter.send(spans)
    assert (result.outcome, result.sent) == (outcome, len(spans))
    assert f"HTTP {status}" in result.message
    assert exporter.export(spans) is False
    exporter.close()


def test_down_is_retry_and_partial_success_counts_as_delivered(receiver: Receiver) -> None:
    spans = build_spans(run_records())
    exporter = OtlpExporter(f"{receiver.base_url}/v1/traces", timeout=1)
    down = exporter.send(spans)
    assert down.outcome == "retry" and "ConnectError" in down.message
    partial = ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(rejected_spans=1, error_message="too old")
    )
    receiver.answer = lambda request: (200, partial)
    receiver.start()
    assert exporter.send(spans) == ExportResult("ok", "", len(spans))


def test_gzip_compression_and_unrepresentable_spans(receiver: Receiver) -> None:
    receiver.start()
    spans = build_spans(run_records())
    bad = msgspec.structs.replace(spans[1], span_id="not-hex-at-all!")
    exporter = from_env(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.base_url}/v1/traces",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        }
    )
    assert exporter is not None
    result = exporter.send([*spans, bad])
    assert (result.outcome, result.sent, result.dropped) == ("ok", len(spans), ("not-hex-at-all!",))
    headers, _ = receiver.requests[0]
    assert headers["content-encoding"] == "gzip"
    assert {span.span_id.hex() for _, span, _ in receiver.spans()} == {s.span_id for s in spans}
    # only unrepresentable spans: nothing is sent, and they are reported
    assert exporter.send([bad]) == ExportResult("ok", "nothing to send", 0, ("not-hex-at-all!",))


# --------------------------------------------------------------------------- gRPC


class GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace service on 127.0.0.1 that refuses (INVALID_ARGUMENT) any
    request holding a span named ``poison``."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(  # noqa: N802 - the generated service's method name
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        self.metadata.append(dict(context.invocation_metadata()))  # type: ignore[arg-type]
        names = {s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans}
        if "poison" in names:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a poison span")
        self.requests.append(request)
        return ExportTraceServiceResponse()

    def spans(self) -> list[Span]:
        return [
            s
            for r in self.requests
            for rs in r.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        ]


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver()
    yield r
    r.server.stop(grace=None)


def test_grpc_export_sends_ids_nesting_and_headers(grpc_receiver: GrpcReceiver) -> None:
    spans = build_spans(run_records())
    exporter = from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{grpc_receiver.port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_HEADERS": "X-Api-Key=s3cr3t",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        },
        timeout=5,
    )
    assert exporter is not None and exporter.protocol == "grpc"
    assert "s3cr3t" not in repr(exporter)
    assert exporter.send(spans) == ExportResult("ok", "", len(spans))
    assert grpc_receiver.metadata[0]["x-api-key"] == "s3cr3t"
    got = {s.span_id.hex(): s for s in grpc_receiver.spans()}
    assert set(got) == {s.span_id for s in spans}
    for mine in spans:
        theirs = got[mine.span_id]
        assert (theirs.name, theirs.parent_span_id.hex()) == (mine.name, mine.parent_span_id or "")
        assert theirs.trace_id.hex() == ids.trace_id(RUN)
    exporter.close()


def test_grpc_refusal_is_rejected_and_a_closed_port_is_retry(grpc_receiver: GrpcReceiver) -> None:
    spans = build_spans(run_records())
    poison = msgspec.structs.replace(spans[2], name="poison")
    exporter = OtlpExporter(f"127.0.0.1:{grpc_receiver.port}", protocol="grpc", insecure=True)
    refused = exporter.send([spans[0], poison])
    assert refused.outcome == "rejected" and "INVALID_ARGUMENT" in refused.message
    assert exporter.send(spans).ok
    exporter.close()
    with socket.socket() as reserved:  # bound, not listening: connection refused
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        down = OtlpExporter(f"http://127.0.0.1:{port}", protocol="grpc", timeout=2)
        result = down.send(spans)
        assert result.outcome == "retry" and "UNAVAILABLE" in result.message
        down.close()


def test_grpc_tls_settings_are_checked(tmp_path: Any) -> None:
    with pytest.raises(OtlpConfigError) as info:
        from_env(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "missing.pem"),
            }
        )
    assert info.value.variable == "OTEL_EXPORTER_OTLP_CERTIFICATE"
    with pytest.raises(OtlpConfigError) as info:
        from_env(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "maybe",
            }
        )
    assert info.value.variable == "OTEL_EXPORTER_OTLP_TRACES_INSECURE"
    secure = from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    )
    assert secure is not None and secure.endpoint == "collector:4317"  # no /v1/traces for gRPC
    secure.close()
