"""Everything readable is read in pages that always fit one NATS message (issue 9.4).

A run whose events total ~2 MB (over the broker's 1 MiB max_payload) is read whole by
``client.events()``, ``loom show -o jsonl``, ``loom replay`` and ``loom describe``; a
trace of thousands of fat spans is read page by page and equals the store; and no page,
whatever the sizes, exceeds its byte budget."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from typer.testing import CliRunner

from loom_cli.app import app
from loom_core import codec, subjects
from loom_core.contracts import (
    EventRecord,
    ForeachStep,
    Plan,
    RunCompleted,
    RunEventsQuery,
    RunEventsReply,
    RunRequest,
    RunSummary,
    SpanRecord,
    ToolStep,
    TraceQuery,
    TraceReply,
)
from loom_infra import bus, paging
from loom_infra.client import LoomClient
from loom_services.stack import LocalStack
from loom_services.tracing import TracingService

BOUND_S = 60.0
BLOB = 20_000  # bytes of each echo's message: each element's events carry it a few times
ELEMENTS = 40


# --------------------------------------------------------------------------- budget


@pytest.mark.parametrize("max_payload", [4_096, 65_536, 1_048_576])
def test_a_page_never_exceeds_its_budget(max_payload: int) -> None:
    rng = random.Random(max_payload)
    cap = paging.budget(max_payload)
    sizes = [rng.choice([1, 50, 900, cap // 3, cap - 10]) for _ in range(3_000)]
    start, pages = 0, 0
    while start < len(sizes):
        page = paging.fill(sizes[start:], lambda n: n, limit=500, max_payload=max_payload)
        assert page.items and page.too_large is None
        assert len(page.items) <= 500
        assert sum(n + 1 for n in page.items) <= cap or len(page.items) == 1
        assert page.more == (start + len(page.items) < len(sizes))
        start += len(page.items)
        pages += 1
    assert start == len(sizes) and pages > 1


def test_one_item_over_the_budget_goes_alone_and_one_over_the_message_is_refused() -> None:
    max_payload = 1024 * 1024
    big = paging.budget(max_payload) + 100  # over a page, under the message
    page = paging.fill([big, 10], lambda n: n, limit=100, max_payload=max_payload)
    assert (page.items, page.more) == ([big], True)
    page = paging.fill([10, big], lambda n: n, limit=100, max_payload=max_payload)
    assert (page.items, page.more) == ([10], True)  # the big one starts the next page
    huge = max_payload  # can never travel
    page = paging.fill([huge, 10], lambda n: n, limit=100, max_payload=max_payload)
    assert page.items == [] and page.too_large == (huge, huge + 1)


def test_an_encoded_reply_of_a_full_page_fits_the_message() -> None:
    """The envelope (type, run id, cursor) fits in what the budget leaves."""
    max_payload = 64 * 1024
    at = datetime(2025, 1, 1, tzinfo=UTC)
    run_id = "r" * 200
    records = [
        EventRecord(run_id=run_id, seq=n, at=at, event=RunCompleted(output="x" * 3_000))
        for n in range(1, 200)
    ]
    page = paging.fill(
        records, lambda r: len(codec.encode(r)), limit=1_000, max_payload=max_payload
    )
    assert page.more and len(page.items) > 1
    reply = RunEventsReply(run_id=run_id, events=page.items, next_after_seq=page.items[-1].seq)
    assert len(codec.encode(reply)) <= max_payload


# --------------------------------------------------------------------------- events


BIG_RUN = Plan(
    name="big",
    steps=[
        ForeachStep(
            id="fe",
            items=list(range(ELEMENTS)),
            concurrency=8,
            output="{{ index }}",  # the step's own output stays small
            do=[ToolStep(id="say", tool="echo", input={"message": "{{ input.blob }}"})],
        )
    ],
    output="done",
)


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


async def raw_pages(client: LoomClient, run_id: str) -> list[bytes]:
    """Every reply of the events query, as the bytes that crossed NATS."""
    pages: list[bytes] = []
    after: int | None = 0
    while after is not None:
        query = RunEventsQuery(run_id=run_id, after_seq=after, limit=5_000)
        msg = await client.nc.request(subjects.API_RUN_EVENTS, codec.encode(query), timeout=10)
        pages.append(msg.data)
        reply = codec.decode(msg.data, RunEventsReply)
        assert reply.error is None, reply.error
        after = reply.next_after_seq
    return pages


async def test_a_run_of_megabytes_of_events_is_read_whole(
    client: LoomClient, stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    accepted = await client.submit(RunRequest(plan=BIG_RUN, input={"blob": "b" * BLOB}))
    run_id = accepted.run_id
    ended = await client.wait(run_id, timeout=BOUND_S)
    assert isinstance(ended[-1].event, RunCompleted), ended[-1].event

    records = await client.events(run_id)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert [codec.encode(r) for r in records] == [codec.encode(r) for r in ended]
    total = sum(len(codec.encode(r)) for r in records)
    max_payload = client.nc.max_payload
    assert total > 1.5 * max_payload, total  # more than one reply could ever carry

    pages = await raw_pages(client, run_id)
    assert len(pages) >= 2
    assert all(len(p) <= paging.budget(max_payload) + paging.envelope(max_payload) for p in pages)
    assert all(len(p) <= max_payload for p in pages)

    # a count limit pages too, and a short page is not the end
    reply = await bus.request(
        client.nc, subjects.API_RUN_EVENTS, RunEventsQuery(run_id=run_id, limit=3), RunEventsReply
    )
    assert [r.seq for r in reply.events] == [1, 2, 3] and reply.next_after_seq == 3

    # the CLI, with the operator's key
    monkeypatch.setenv("LOOM_NKEY_SEED_FILE", str(stack.seed_file("operator")))
    shown = await asyncio.to_thread(cli, "show", run_id, "-o", "jsonl", "--nats", stack.url)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert [codec.decode_event(line.encode()) for line in lines] == records

    replayed = await asyncio.to_thread(cli, "replay", run_id, "--nats", stack.url)
    assert replayed.exit_code == 0, replayed.output
    assert f"identical: {len(records)} events" in replayed.stdout

    described = await asyncio.to_thread(cli, "describe", run_id, "-o", "json", "--nats", stack.url)
    assert described.exit_code == 0, described.output
    assert json.loads(described.stdout)["status"] == "completed"

    state = await asyncio.to_thread(cli, "state", run_id, "--nats", stack.url)
    assert state.exit_code == 0, state.output


async def test_an_unknown_run_reads_as_empty(client: LoomClient) -> None:
    assert await client.events("no-such-run") == []


# --------------------------------------------------------------------------- traces


def tracing_of(stack: LocalStack) -> TracingService:
    assert stack.stack is not None
    return next(s for s in stack.stack.services if isinstance(s, TracingService))


def fat_spans(run_id: str, n: int) -> list[SpanRecord]:
    """``n`` spans of ~1 KB each, several sharing a start (the cursor breaks ties by id)."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    return [
        SpanRecord(
            trace_id="0" * 32,
            span_id=f"{i:016x}",
            run_id=run_id,
            name=f"step {i}",
            start=start + timedelta(milliseconds=i // 3),
            end=start + timedelta(seconds=1),
            attributes={"loom.note": "s" * 1_000},
        )
        for i in range(n)
    ]


async def test_a_trace_of_thousands_of_spans_reads_page_by_page(
    client: LoomClient, stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracing = tracing_of(stack)
    run_id = "paged-trace"
    spans = fat_spans(run_id, 3_000)  # ~3.4 MB: over three times one reply
    summary = RunSummary(run_id=run_id, status="completed", started_at=spans[0].start)
    await tracing.io(tracing.store.replace_trace, run_id, spans, summary)
    stored = await tracing.io(tracing.store.trace, run_id)
    assert len(stored) == 3_000

    assert await client.trace(run_id) == stored

    # by hand: each page fits, the cursor moves, small limits page by count
    pages, after, got = 0, "", []
    while True:
        reply = await bus.request(
            client.nc, subjects.API_TRACE, TraceQuery(run_id=run_id, after=after, limit=700),
            TraceReply,
        )  # fmt: skip
        assert reply.error is None, reply.error
        assert len(reply.spans) <= 700
        assert len(codec.encode(reply)) <= client.nc.max_payload
        got.extend(reply.spans)
        pages += 1
        if reply.next_after is None:
            break
        after = reply.next_after
    assert got == stored and pages >= 5

    refused = await bus.request(
        client.nc, subjects.API_TRACE, TraceQuery(run_id=run_id, after="not a cursor"), TraceReply
    )
    assert refused.error is not None and refused.spans == []
    assert (refused.error.code, refused.error.path) == ("bad_cursor", "$.after")

    monkeypatch.setenv("LOOM_NKEY_SEED_FILE", str(stack.seed_file("operator")))
    shown = await asyncio.to_thread(cli, "trace", run_id, "-o", "jsonl", "--nats", stack.url)
    assert shown.exit_code == 0, shown.output
    assert [codec.decode(line.encode(), SpanRecord) for line in shown.stdout.splitlines()] == (
        stored
    )
