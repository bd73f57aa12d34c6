"""The tracing service through the whole stack (real nats-server, both stores): span
trees of real runs (a retried step, a foreach, a cancelled step), the submitter's W3C
trace context, the query subjects and the CLI on top of them, and OTLP delivery when
the collector is down, then back, then refusing one span.

Synchronisation: on the run's events (followed with a bound) or on a read model polled
until a condition holds, within a bound; never on a fixed sleep."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import typer
import waiting  # type: ignore[import-not-found]  # tests/integration on sys.path
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from rich.console import Console
from typer.testing import CliRunner

from loom_cli import traces as traces_cli
from loom_cli.render import span_tree
from loom_core import codec, ids, subjects
from loom_core.contracts import (
    ApprovalStep,
    DeadLetter,
    EventRecord,
    ForeachStep,
    Plan,
    RebuildTracesQuery,
    RebuildTracesReply,
    RetryPolicy,
    RunCompleted,
    RunRequest,
    SlowestStepsQuery,
    SlowestStepsReply,
    SpanRecord,
    SubmitAccepted,
    ToolCallRequested,
    ToolStep,
    TracesQuery,
    TracesReply,
    UsageQuery,
    UsageReply,
)
from loom_core.spans import TraceOptions, build_spans, span_category
from loom_infra import bus
from loom_infra.client import LoomClient
from loom_infra.natsserver import EmbeddedNats
from loom_infra.otlp import OtlpExporter
from loom_infra.settings import Settings, StoreSettings, trace_options_from_env
from loom_services.executor import ExecutorService
from loom_services.planner import PlannerService
from loom_services.runtime import Stack
from loom_services.stack import LocalStack
from loom_services.toolrunner import ToolRunnerService
from loom_services.tracing import TracingService

pytestmark = pytest.mark.integration

BOUND_S = 15.0  # no wait below may take longer than this
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"
T = TypeVar("T")


# --------------------------------------------------------------------------- helpers


async def until(check: Callable[[], Any], what: str) -> Any:
    """``check`` (sync or async) until it returns something truthy (the shared bounded
    wait, within BOUND_S)."""
    return await waiting.eventually(check, what, BOUND_S)


async def ask(client: LoomClient, subject: str, query: object, reply_type: type[T]) -> T:
    return await bus.request(client.nc, subject, query, reply_type, timeout=10)


async def folded(client: LoomClient, run_id: str) -> None:
    """Wait until the tracing service has folded the run's terminal event (its summary,
    saved in the same transaction as the spans, shows a final status)."""

    async def done() -> bool:
        reply = await ask(client, subjects.API_TRACES, TracesQuery(limit=100), TracesReply)
        return any(
            r.run_id == run_id and r.status in ("completed", "failed", "cancelled", "rejected")
            for r in reply.runs
        )

    await until(done, f"the trace of {run_id}")


async def submit(client: LoomClient, request: RunRequest, traceparent: str | None = None) -> str:
    headers = {subjects.TRACEPARENT: traceparent} if traceparent else None
    msg = await client.nc.request(
        subjects.submit("operator"), codec.encode(request), timeout=10, headers=headers
    )
    reply = codec.decode(msg.data, SubmitAccepted)
    return reply.run_id


async def wait_for_event(
    client: LoomClient, run_id: str, match: Callable[[EventRecord], bool]
) -> EventRecord:
    return await waiting.first(client, run_id, match, BOUND_S)


def children(spans: list[SpanRecord], parent: SpanRecord) -> list[SpanRecord]:
    return sorted(
        (s for s in spans if s.parent_span_id == parent.span_id), key=lambda s: (s.start, s.name)
    )


def by_step(spans: list[SpanRecord]) -> dict[str, SpanRecord]:
    return {
        s.attributes["loom.step.id"]: s  # type: ignore[misc]
        for s in spans
        if span_category(s) in ("step", "scope")
    }


def tracing_of(stack: LocalStack) -> TracingService:
    assert stack.stack is not None
    return next(s for s in stack.stack.services if isinstance(s, TracingService))


# --------------------------------------------------------------------------- span trees


TREE = Plan(
    name="tree",
    steps=[
        ToolStep(
            id="call",
            tool="flaky",
            input={"fail_times": 1, "value": 7},
            retry=RetryPolicy(max_attempts=2, initial_delay_s=0.01),
        ),
        ForeachStep(
            id="fe",
            items=[2, 3],
            do=[ToolStep(id="sq", tool="math", input={"op": "mul", "a": "{{ item }}", "b": 2})],
        ),
        ToolStep(id="nap", tool="sleep", input={"seconds": 30}, depends_on=["call", "fe"]),
    ],
)


async def test_a_runs_tree_shows_retries_foreach_nesting_and_cancellation(
    client: LoomClient, stack: LocalStack
) -> None:
    run_id = await submit(client, RunRequest(plan=TREE), f"00-{TRACE}-{CALLER}-01")
    await wait_for_event(
        client,
        run_id,
        lambda r: isinstance(r.event, ToolCallRequested) and r.event.step_id == "nap",
    )
    await client.control(run_id, "cancel", by="tester", reason="enough")
    records = await client.wait(run_id, timeout=BOUND_S)
    await folded(client, run_id)
    spans = await client.trace(run_id)

    # the submitter's trace continues into the run
    assert {s.trace_id for s in spans} == {TRACE}
    root = next(s for s in spans if s.span_id == ids.span_id(run_id, "run"))
    assert (root.name, root.parent_span_id, root.status) == (
        "invoke_workflow tree",
        CALLER,
        "unset",
    )
    assert root.attributes["loom.run.status"] == "cancelled"
    assert [e.name for e in root.events] == ["cancel_requested", "cancelled"]

    steps = by_step(spans)
    assert [c.name for c in children(spans, root) if span_category(c) == "step"] == [
        "step call",
        "step fe",
        "step nap",
    ]
    # the retried step: each attempt its own span, the backoff a wait between them
    call = steps["call"]
    assert [(c.name, c.status) for c in children(spans, call)] == [
        ("attempt 1", "error"),
        ("wait retry", "unset"),
        ("attempt 2", "ok"),
    ]
    first, wait, second = children(spans, call)
    assert [(t.name, t.attributes["error.type"]) for t in children(spans, first)] == [
        ("execute_tool flaky", "flaky")
    ]
    assert wait.attributes["loom.retry.delay_s"] == 0.01 and wait.end is not None
    assert wait.end <= second.start
    assert [t.name for t in children(spans, second)] == ["execute_tool flaky"]

    # the foreach: element scopes under the step, the body's steps under their element
    fe = steps["fe"]
    assert fe.attributes["loom.foreach.count"] == 2
    assert sorted(c.name for c in children(spans, fe)) == ["item 0", "item 1"]
    for k in ("0", "1"):
        item, sq = steps[f"fe/{k}"], steps[f"fe/{k}/sq"]
        assert item.parent_span_id == fe.span_id and sq.parent_span_id == item.span_id
        assert sq.name == "step sq" and sq.status == "ok"
        (attempt,) = children(spans, sq)
        assert [t.name for t in children(spans, attempt)] == ["execute_tool math"]

    # the cancelled step: status unset, why in an event, its call stopped
    nap = steps["nap"]
    assert (nap.status, nap.attributes["loom.step.status"]) == ("unset", "cancelled")
    assert [e.name for e in nap.events] == ["cancelled"]
    assert "tester" in str(nap.events[0].attributes["loom.cancel.reason"])
    (attempt,) = children(spans, nap)
    (tool,) = children(spans, attempt)
    assert (tool.name, tool.attributes["loom.tool.cancelled"]) == ("execute_tool sleep", True)
    assert all(s.end is not None for s in spans)

    # live equals a rebuild from the executor's events, and from the service's own
    live = sorted(spans, key=lambda s: s.span_id)
    assert sorted(build_spans(records), key=lambda s: s.span_id) == live
    rebuilt = await client.trace(run_id, rebuild=True)
    assert sorted(rebuilt, key=lambda s: s.span_id) == live
    reply = await ask(
        client,
        subjects.API_TRACES_REBUILD,
        RebuildTracesQuery(run_ids=[run_id]),
        RebuildTracesReply,
    )
    assert (reply.runs, reply.spans, reply.changed, reply.error) == (1, len(spans), 0, None)

    # `loom trace RUN` renders the nesting
    console = Console(record=True, width=200)
    console.print(span_tree(spans))
    lines = console.export_text().splitlines()
    depth = {
        name: next(len(line) - len(line.lstrip("│├└─ ")) for line in lines if name in line)
        for name in ("step fe", "item 0", "step sq", "execute_tool math")
    }
    assert depth["step fe"] < depth["item 0"] < depth["step sq"] < depth["execute_tool math"]


async def test_time_waiting_for_a_person_is_a_span(client: LoomClient) -> None:
    plan = Plan(
        steps=[
            ApprovalStep(id="ok", label="approve", payload={"amount": 5}),
            ToolStep(id="after", tool="echo", input={"message": "{{ steps.ok.output }}"}),
        ]
    )
    run_id = await submit(client, RunRequest(plan=plan))
    suspended = await wait_for_event(client, run_id, lambda r: r.kind == "step_suspended")
    reply = await client.resume(run_id, {"yes": True}, label="approve", by="ann")
    assert reply.ok, reply.error
    records = await client.wait(run_id, timeout=BOUND_S)
    await folded(client, run_id)
    spans = await client.trace(run_id)
    step = by_step(spans)["ok"]
    (wait,) = children(spans, step)
    resumed = next(r for r in records if r.kind == "step_resumed")
    assert (wait.name, wait.start, wait.end, wait.status) == (
        "wait suspension",
        suspended.at,
        resumed.at,
        "ok",
    )
    assert wait.attributes["loom.suspension.label"] == "approve"
    assert wait.attributes["loom.suspension.resumed_by"] == "ann"
    assert sorted(spans, key=lambda s: s.span_id) == sorted(
        build_spans(records), key=lambda s: s.span_id
    )


# --------------------------------------------------------------------------- queries and CLI


def cli(url: str, *args: str) -> Any:
    """Run a `loom` trace command (in a worker thread: it runs its own event loop) and
    decode its JSON output."""
    app = typer.Typer()
    traces_cli.register(app)
    result = CliRunner().invoke(app, [*args, "--nats", url, "-o", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def test_queries_and_cli_over_several_runs(
    client: LoomClient, stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    began = datetime.now(UTC) - timedelta(seconds=1)
    ok = await submit(
        client,
        RunRequest(plan=Plan(steps=[ToolStep(id="hi", tool="echo", input={"message": "hi"})])),
    )
    bad = await submit(
        client,
        RunRequest(plan=Plan(steps=[ToolStep(id="f", tool="flaky", input={"fail_times": 5})])),
    )
    odd = await submit(
        client,
        RunRequest(
            plan=Plan(steps=[ToolStep(id="m", tool="math", input={"op": "add", "a": 1, "b": 2})])
        ),
        traceparent="garbage",
    )
    for run_id in (ok, bad, odd):
        await client.wait(run_id, timeout=BOUND_S)
        await folded(client, run_id)

    async def runs(**kw: Any) -> list[str]:
        reply = await ask(client, subjects.API_TRACES, TracesQuery(**kw), TracesReply)
        assert reply.error is None
        return sorted(r.run_id for r in reply.runs)

    assert await runs(status="failed") == [bad]
    assert await runs(tool="flaky") == [bad]
    assert await runs(error="flaky") == [bad]
    assert await runs(tool="echo") == [ok]
    assert await runs(since=began) == sorted([ok, bad, odd])
    assert await runs(until=began) == []

    # an invalid traceparent header is ignored (the run's own trace) and kept
    spans = await client.trace(odd)
    assert {s.trace_id for s in spans} == {ids.trace_id(odd)}
    root = next(s for s in spans if s.span_id == ids.span_id(odd, "run"))
    assert root.parent_span_id is None
    assert root.attributes["loom.traceparent_invalid"] == "garbage"

    slow = await ask(client, subjects.API_TRACES_SLOWEST, SlowestStepsQuery(), SlowestStepsReply)
    assert sorted(s.attributes["loom.step.id"] for s in slow.spans) == ["f", "hi", "m"]
    durations = [s.end - s.start for s in slow.spans if s.end]
    assert durations == sorted(durations, reverse=True)
    only_math = await ask(
        client, subjects.API_TRACES_SLOWEST, SlowestStepsQuery(tool="math"), SlowestStepsReply
    )
    assert [s.run_id for s in only_math.spans] == [odd]

    usage = await ask(client, subjects.API_TRACES_USAGE, UsageQuery(by="tool"), UsageReply)
    assert {(r.key, r.calls, r.errors) for r in usage.rows} == {
        ("echo", 1, 0),
        ("flaky", 1, 1),
        ("math", 1, 0),
    }
    hourly = await ask(client, subjects.API_TRACES_USAGE, UsageQuery(by="hour"), UsageReply)
    assert sum(r.calls for r in hourly.rows) == 3

    refused = await ask(client, subjects.API_TRACES, TracesQuery(limit=0), TracesReply)
    assert refused.error is not None and refused.error.code == "invalid_query"
    garbled = await client.nc.request(subjects.API_TRACES_USAGE, b"{not json", timeout=5)
    assert codec.decode(garbled.data, UsageReply).error.code == "malformed_json"  # type: ignore[union-attr]

    # spans too many bytes for one NATS message are read in pages (issue 9.4), never refused
    big = [
        SpanRecord(
            trace_id=ids.trace_id("huge"),
            span_id=ids.span_id("huge", str(i)),
            run_id="huge",
            name="big",
            start=began,
            end=began,
            attributes={"blob": "x" * 400_000},
        )
        for i in range(3)
    ]
    await asyncio.to_thread(tracing_of(stack).store.upsert, big)
    assert [s.span_id for s in await client.trace("huge")] == sorted(s.span_id for s in big)

    # the same through the CLI
    url = stack.url
    monkeypatch.setenv("LOOM_NKEY_SEED_FILE", str(stack.seed_file("operator")))  # its key
    found = await asyncio.to_thread(cli, url, "traces", "--status", "failed", "--since", "1h")
    assert [r["run_id"] for r in found] == [bad]
    rows = await asyncio.to_thread(cli, url, "usage", "--by", "tool", "--since", "1h")
    assert {r["key"] for r in rows} == {"echo", "flaky", "math"}
    slowest = await asyncio.to_thread(cli, url, "slowest", "--tool", "math")
    assert [s["run_id"] for s in slowest] == [odd]
    totals = await asyncio.to_thread(cli, url, "rebuild-traces", "--since", "1h", "--page", "2")
    assert (totals["runs"], totals["changed"]) == (3, 0)  # two pages; rebuild equals live


# --------------------------------------------------------------------------- export


class Collector:
    """An OTLP/HTTP receiver that can be down (bound, not listening) and refuses (400)
    any request holding a span named ``refuse``."""

    def __init__(self, refuse: str) -> None:
        self.spans: list[Any] = []
        self.refusals = 0
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                spans = [
                    s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans
                ]
                if any(s.name == refuse for s in spans):
                    collector.refusals += 1
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                collector.spans.extend(spans)
                body = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.server.server_activate()
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()

    def count(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.spans:
            out[s.span_id.hex()] = out.get(s.span_id.hex(), 0) + 1
        return out


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector(refuse="step refuse")
    yield c
    c.stop()


@pytest.fixture
async def export_stack(
    tmp_path: Path, sqlite_store_settings: StoreSettings, collector: Collector
) -> AsyncIterator[tuple[LoomClient, TracingService, EmbeddedNats]]:
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    settings = Settings(nats_url=server.url, store=sqlite_store_settings)
    tracing = TracingService(
        settings,
        exporter=OtlpExporter(collector.url, timeout=1.0),
        options=TraceOptions(capture_io=True, io_limit=200),
    )
    tracing.export_retry_s = 0.05
    tracing.export_max_attempts = 2
    services = [ExecutorService(settings), PlannerService(settings), ToolRunnerService(settings)]
    stack = Stack([*services, tracing], settings)
    await stack.start()
    try:
        async with await LoomClient.connect(server.url) as client:
            await client.wait_ready(["executor", "planner", "toolrunner", "tracing"])
            yield client, tracing, server
    finally:
        await stack.close()
        server.stop()


def _str(value: AnyValue) -> str:
    return value.string_value


async def test_down_collector_gets_every_span_later_and_a_refused_one_is_given_up(
    export_stack: tuple[LoomClient, TracingService, EmbeddedNats], collector: Collector
) -> None:
    client, tracing, _ = export_stack
    secret = "sk-abcdefghijklmnopqrstuvwxyz"
    plan = Plan(
        steps=[
            ToolStep(
                id="secret", tool="echo", input={"message": {"text": "hi", "api_key": secret}}
            ),
            ToolStep(id="refuse", tool="echo", input={"message": "x" * 500}),
        ]
    )
    run_id = await submit(client, RunRequest(plan=plan))
    records = await client.wait(run_id, timeout=BOUND_S)
    assert isinstance(records[-1].event, RunCompleted)
    live = build_spans(records, options=tracing.options)
    refused = next(s for s in live if s.name == "step refuse")
    expected = {s.span_id for s in live} - {refused.span_id}

    await folded(client, run_id)
    await until(lambda: tracing.export_failures > 0, "an export attempt while it is down")
    collector.start()  # back, but it refuses one span for good
    await until(lambda: tracing.export_given_up == 1, "the refused span to be given up")

    async def nothing_unexported() -> bool:
        return not await asyncio.to_thread(tracing.store.unexported)

    await until(nothing_unexported, "nothing left to export")
    assert set(collector.count()) == expected
    assert collector.refusals >= tracing.export_max_attempts
    failed = await asyncio.to_thread(tracing.store.export_failed)
    assert [s.span_id for s in failed] == [refused.span_id]
    # the final version of every span arrived (with the run's own ids and times)
    final = {s.span_id.hex(): s for s in collector.spans}
    for mine in live:
        if mine.span_id in expected:
            assert final[mine.span_id].name == mine.name
            assert final[mine.span_id].end_time_unix_nano == int(mine.end.timestamp() * 1e6) * 1000

    # the refusal is in the dead-letter stream, with the span
    letter = await client.js.get_last_msg(subjects.DLQ_STREAM, subjects.dead_letter("tracing"))
    dead = codec.decode(letter.data, DeadLetter)
    assert dead.error.code == "export_rejected" and refused.span_id in dead.payload

    # inputs and outputs were captured, secrets redacted, long values truncated
    got = {s.span_id.hex(): s for s in collector.spans}
    step = got[ids.span_id(run_id, "step", "secret")]
    attrs = {a.key: _str(a.value) for a in step.attributes}
    assert '"api_key":"[redacted]"' in attrs["loom.step.input"] and secret not in str(step)
    assert refused.span_id not in got  # never delivered
    stored = {s.span_id: s for s in await asyncio.to_thread(tracing.store.trace, run_id)}
    assert str(stored[refused.span_id].attributes["loom.step.input"]).endswith("bytes]")

    # stored == live == rebuilt; a rebuild sends every span again (a backend dedupes by id)
    assert sorted(stored.values(), key=lambda s: s.span_id) == sorted(live, key=lambda s: s.span_id)
    reply = await ask(
        client,
        subjects.API_TRACES_REBUILD,
        RebuildTracesQuery(run_ids=[run_id]),
        RebuildTracesReply,
    )
    assert (reply.runs, reply.changed) == (1, 0)
    await until(
        lambda: all(n == 2 for n in collector.count().values()), "every span exported again"
    )
    await until(lambda: tracing.export_given_up == 2, "the refused span given up again")

    # the queue was never blocked: a later run's spans all arrive
    after = await submit(client, RunRequest(plan=Plan(steps=[ToolStep(id="late", tool="noop")])))
    later = build_spans(await client.wait(after, timeout=BOUND_S), options=tracing.options)
    await until(
        lambda: {s.span_id for s in later} <= set(collector.count()), "the later run's spans"
    )


def test_capture_options_come_from_the_environment() -> None:
    assert trace_options_from_env({}) == TraceOptions()
    assert trace_options_from_env({"LOOM_TRACE_CAPTURE_IO": "1", "LOOM_TRACE_IO_LIMIT": "64"}) == (
        TraceOptions(capture_io=True, io_limit=64)
    )
    assert trace_options_from_env({"LOOM_TRACE_CAPTURE_IO": "true"}).capture_io is True
    assert trace_options_from_env({"LOOM_TRACE_CAPTURE_IO": "off"}).capture_io is False
    for env, variable in (
        ({"LOOM_TRACE_CAPTURE_IO": "maybe"}, "LOOM_TRACE_CAPTURE_IO"),
        ({"LOOM_TRACE_IO_LIMIT": "-1"}, "LOOM_TRACE_IO_LIMIT"),
        ({"LOOM_TRACE_IO_LIMIT": "lots"}, "LOOM_TRACE_IO_LIMIT"),
    ):
        with pytest.raises(ValueError) as info:
            trace_options_from_env(env)
        assert getattr(info.value, "variable", None) == variable


def test_cli_times() -> None:
    now = datetime(2026, 11, 2, 12, tzinfo=UTC)
    parse = traces_cli.parse_when
    assert parse("1h", now) == now - timedelta(hours=1)
    assert parse("1h30m", now) == now - timedelta(minutes=90)
    assert parse("2d ago", now) == now - timedelta(days=2)
    assert parse("1w", now) == now - timedelta(weeks=1)
    assert parse("90s", now) == now - timedelta(seconds=90)
    assert parse("now", now) == now
    assert parse("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse("2026-11-02T09:00:00+01:00", now) == datetime(2026, 11, 2, 8, tzinfo=UTC)
    assert parse("2026-11-02T09:00:00", now) == datetime(2026, 11, 2, 9, tzinfo=UTC)
    for bad in ("yesterday", "15", "1x", ""):
        with pytest.raises(typer.BadParameter, match="not a time"):
            parse(bad, now)


async def test_a_trace_read_right_after_a_run_ends_has_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fold lingers between small batches (many steps share a fetch and a commit);
    a trace asked for meanwhile is caught up from the executor's store first, so it
    holds every step of a run that just ended, not the steps folded before the linger.
    The linger is made 30 s here, so only the catch-up can have folded them."""
    import loom_services.tracing as tracing_module

    monkeypatch.setattr(tracing_module, "FOLD_LINGER_S", 30.0)
    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=StoreSettings(kind="sqlite", data_dir=tmp_path / "data"),
    )
    chain = Plan(
        steps=[
            ToolStep(id=f"s{i}", tool="noop", depends_on=[f"s{i - 1}"] if i else [])
            for i in range(8)
        ]
    )
    async with (
        LocalStack(settings, nats_port=-1, read_models="inline") as local,
        await local.client() as client,
    ):
        accepted = await client.submit(RunRequest(plan=chain))
        await client.wait(accepted.run_id, timeout=BOUND_S)
        spans = await client.trace(accepted.run_id)
    tools = [s for s in spans if s.name == "execute_tool noop"]
    assert len(tools) == 8 and all(s.end is not None for s in tools), [s.name for s in spans]
