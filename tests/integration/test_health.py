"""Health that means something, metrics, and client mistakes off the hot path (issue 9):
an HTTP /readyz that turns 503 with the reason when the relay stops, /metrics in the
Prometheus format, and a burst of bad submissions that never holds up a good one."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest
import waiting  # type: ignore[import-not-found]  # tests/integration on sys.path
from tests.integration.conftest import make_settings

from loom_core import codec, routes
from loom_core.contracts import (
    DeadLetter,
    ErrorInfo,
    Plan,
    RunCompleted,
    RunRequest,
    SubmitAccepted,
    SubmitRejected,
    ToolStep,
)
from loom_infra import bus, metrics
from loom_infra.settings import OpsSettings, StoreSettings
from loom_services.stack import LocalStack

BOUND_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), BOUND_S)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split(" ", 2)[1]), body


@pytest.fixture
async def observed(sqlite_store_settings: StoreSettings) -> AsyncIterator[LocalStack]:
    ops = OpsSettings(http_port=free_port(), ready_max_relay_lag=1, ready_stall_s=1)
    settings = make_settings(sqlite_store_settings, ops=ops, max_payload=64 * 1024)
    async with LocalStack(settings, nats_port=-1) as stack:
        yield stack


async def until_status(port: int, path: str, status: int) -> str:
    """The body of ``path`` once it answers ``status`` (the shared bounded wait)."""

    async def answer() -> tuple[str] | None:
        code, body = await get(port, path)
        return (body,) if code == status else None  # a tuple: an empty body is an answer

    (body,) = await waiting.eventually(answer, f"{path} answering {status}", BOUND_S, 0.1)
    return body


def one_step() -> RunRequest:
    return RunRequest(plan=Plan(steps=[ToolStep(id="a", tool="noop")]))


async def test_probes_and_metrics_over_http(observed: LocalStack) -> None:
    port = observed.settings.ops.http_port
    assert (await get(port, "/livez"))[0] == 200
    body = await until_status(port, "/readyz", 200)
    assert json.loads(body) == {"ready": True, "reasons": []}
    async with await observed.client() as client:
        accepted = await client.submit(one_step())
        events = await client.wait(accepted.run_id, timeout=BOUND_S)
        assert isinstance(events[-1].event, RunCompleted)
    code, text = await get(port, "/metrics")
    assert code == 200
    for series in (
        "loom_events_stored_total ",
        "loom_events_published_total ",
        "loom_relay_lag_events ",
        'loom_queue_depth{queue="writer",service="executor"} ',
        'loom_consumer_pending{consumer="planner",stream="LOOM_RUNS"} ',
        'loom_step_duration_seconds_bucket{outcome="completed",le="+Inf"} ',
        "loom_ready 1",
    ):
        assert series in text, series
    assert metrics.EVENTS_STORED.value() >= len(events)
    assert (await get(port, "/nope"))[0] == 404


async def test_readiness_says_when_the_relay_stops(observed: LocalStack) -> None:
    port = observed.settings.ops.http_port
    await until_status(port, "/readyz", 200)
    assert observed.stack is not None
    tasks = [t for c in observed.stack.contexts for t in c.tasks]
    (relay,) = [t for t in tasks if t.get_name() == "executor-relay"]
    relay.cancel()  # the relay is gone: stored events are no longer published
    async with await observed.client() as client:
        await client.submit(one_step())  # stored, never published
    reasons = json.loads(await until_status(port, "/readyz", 503))["reasons"]
    assert any("executor-relay" in r for r in reasons), reasons
    # a task that ended is also a liveness failure: waiting will not bring it back
    dead = json.loads(await until_status(port, "/livez", 503))["reasons"]
    assert any("executor-relay" in r for r in dead), dead
    assert not any("relay stuck" in r for r in dead), dead  # readiness-only checks stay out

    # and the stall, once the relay has sat on the unpublished run for LOOM_READY_STALL_S
    async def stuck() -> bool:
        reasons = json.loads((await get(port, "/readyz"))[1])["reasons"]
        return any("relay stuck at position" in r for r in reasons)

    await waiting.eventually(stuck, "readyz naming the stuck relay", BOUND_S, 0.2)
    assert "loom_ready 0" in (await get(port, "/metrics"))[1]


async def test_a_burst_of_bad_submissions_never_holds_up_good_ones(
    sqlite_store_settings: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_REJECTS_MAX_MSGS", "100")  # read by provisioning
    settings = make_settings(sqlite_store_settings, max_payload=64 * 1024)
    async with LocalStack(settings, nats_port=-1) as stack, await stack.client() as client:
        loop = asyncio.get_running_loop()
        latencies: list[float] = []

        async def good() -> SubmitAccepted:
            started = loop.time()
            accepted = await client.submit(one_step(), timeout=BOUND_S)
            latencies.append(loop.time() - started)
            return accepted

        async def bad(i: int) -> object:
            return await client.submit_raw(b'{"plan": {"steps": [' + str(i).encode(), BOUND_S)

        results = await asyncio.gather(*(bad(i) for i in range(500)), *(good() for _ in range(20)))
        rejected, accepted = results[:500], results[500:]
        assert all(isinstance(r, SubmitRejected) for r in rejected)
        assert {r.error.code for r in rejected} == {"malformed_json"}  # type: ignore[union-attr]
        assert all(isinstance(a, SubmitAccepted) for a in accepted)
        assert max(latencies) < 5.0, latencies
        for a in accepted:
            events = await client.wait(a.run_id, timeout=BOUND_S)  # type: ignore[union-attr]
            assert isinstance(events[-1].event, RunCompleted)

        # recorded apart from poison, bounded by the stream's limit
        async def recorded() -> int:
            info = await client.js.stream_info(bus.REJECTS_STREAM)
            return info.state.messages

        async def all_recorded() -> bool:
            return await recorded() >= 100

        await waiting.eventually(all_recorded, "100 rejections recorded", BOUND_S, 0.1)
        info = await client.js.stream_info(bus.REJECTS_STREAM)
        assert info.config.max_msgs == 100 and info.state.messages == 100
        last = await client.js.get_last_msg(
            bus.REJECTS_STREAM, routes.REJECTED.subject(service="executor")
        )
        letter = codec.decode(last.data, DeadLetter)
        assert letter.error.code == "malformed_json"
        assert len(letter.payload) <= bus.REJECT_PAYLOAD_LIMIT
        dlq = await client.js.stream_info("LOOM_DLQ")
        assert dlq.state.messages == 0  # no typo among the poison


async def test_a_full_reject_record_drops_and_counts_instead_of_waiting(
    observed: LocalStack,
) -> None:
    assert observed.stack is not None
    js = observed.stack.contexts[0].js
    recorder = bus.RejectRecorder(js, "executor-test", maxsize=5)  # its task not running
    before = metrics.REJECTS_DROPPED.value(service="executor-test")
    error = ErrorInfo(code="malformed_json", message="not valid JSON")
    kept = [recorder.offer("loom.submit.client", error, b"{") for _ in range(12)]
    assert kept == [True] * 5 + [False] * 7  # never blocks: the answer was sent already
    assert metrics.REJECTS_DROPPED.value(service="executor-test") - before == 7
    assert recorder.dropped == 7
