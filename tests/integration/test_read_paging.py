"""Run lists and traces are read a page at a time, from the store too (issue 9.4).

Reproduced on main first:
- ``loom.api.runs`` answered one list of up to 10,000 summaries: 5,000 runs of ~400
  bytes each made a 2 MB reply, refused as ``reply_too_large`` (and ``client.runs``
  returned ``[]`` without a word). Now runs come in pages by an opaque keyset cursor.
- ``loom.api.trace`` loaded the run's whole trace for every page and sliced it in
  memory: a trace with one undecodable span at its end could not serve even its first
  page (``store_error``). Now a page reads only its rows (a keyset range).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loom_cli.app import app
from loom_core import codec, subjects
from loom_core.contracts import (
    RunsQuery,
    RunsReply,
    RunSummary,
    SpanRecord,
    TraceQuery,
    TraceReply,
    TracesQuery,
    TracesReply,
)
from loom_infra import bus, paging
from loom_infra.client import LoomClient, LoomError
from loom_infra.settings import StoreSettings
from loom_infra.spanstore import SpanStore, open_span_store, run_key, span_key
from loom_services.stack import LocalStack
from loom_services.tracing import TracingService

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def span_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        settings = StoreSettings(kind="sqlite", data_dir=tmp_path / "data")
    else:
        settings = request.getfixturevalue("pg_store_settings")
    store = open_span_store(settings)
    yield store
    store.close()


def spans_of(run_id: str, n: int, note: int = 100) -> list[SpanRecord]:
    """``n`` spans, three sharing each start (the keyset breaks ties by span id)."""
    return [
        SpanRecord(
            trace_id="0" * 32,
            span_id=f"{(i * 7919) % 100_003:016x}",  # ids not in start order
            run_id=run_id,
            name=f"step {i}",
            start=T0 + timedelta(milliseconds=i // 3),
            end=T0 + timedelta(seconds=10),
            attributes={"loom.note": "s" * note},
        )
        for i in range(n)
    ]


def summaries(n: int, name_bytes: int = 300, start: datetime = T0) -> list[RunSummary]:
    """``n`` runs, pairs sharing a start, every tenth with no known start."""
    return [
        RunSummary(
            run_id=f"run-{i:06d}",
            status="completed" if i % 3 else "failed",
            started_at=None if i % 10 == 9 else start + timedelta(seconds=i // 2),
            name="n" * name_bytes,
        )
        for i in range(n)
    ]


def corrupt(store: SpanStore, span_id: str) -> None:
    """Make one stored span undecodable (what a reader that loads it will trip on)."""
    sql = "UPDATE loom_trace_spans SET data = ? WHERE span_id = ?"
    store._call("corrupt", store._write, [(sql, [(b"not a span", span_id)])])


# --------------------------------------------------------------------------- the store


def test_trace_pages_read_only_their_rows(span_store: SpanStore) -> None:
    spans = spans_of("r", 1_000)
    span_store.upsert(spans)
    whole = span_store.trace("r")
    assert len(whole) == 1_000

    got, after = [], None
    while True:
        page = span_store.trace_page("r", after, 128)
        got.extend(page)
        if len(page) < 128:
            break
        after = span_key(page[-1])
    assert got == whole
    assert list(span_store.iter_trace("r", chunk=100)) == whole
    assert list(span_store.iter_trace("r", span_key(whole[499]), 64)) == whole[500:]

    corrupt(span_store, whole[-1].span_id)
    with pytest.raises(Exception, match="cannot be decoded"):
        span_store.trace("r")  # the whole trace cannot be loaded any more
    assert span_store.trace_page("r", None, 256) == whole[:256]  # a page still can


def test_runs_page_by_keyset_and_new_runs_do_not_shift_pages(span_store: SpanStore) -> None:
    span_store.upsert_runs(summaries(50))
    everything = span_store.runs(limit=1_000)
    assert len(everything) == 50
    assert [run_key(r) for r in everything] == sorted(map(run_key, everything), reverse=True)

    got, after = [], None
    while True:
        page = span_store.runs(limit=7, after=after)
        got.extend(page)
        if len(page) < 7:
            break
        after = run_key(page[-1])
        # runs that start meanwhile (newer than all) are not met by a later page
        span_store.upsert_run(
            RunSummary(
                run_id=f"new-{len(got)}", status="running", started_at=T0 + timedelta(days=1)
            )
        )
    assert got == everything

    failed = span_store.runs(limit=1_000, status="failed")
    assert failed and all(r.status == "failed" for r in failed)
    assert span_store.runs(limit=1_000, status=["failed", "running"]) == [
        r for r in span_store.runs(limit=1_000) if r.status in ("failed", "running")
    ]


def test_keyset_cursors_are_opaque_and_checked() -> None:
    cursor = paging.keyset_cursor(1_700_000_000_000_000, "run|with:odd/chars é")
    assert paging.parse_keyset_cursor(cursor) == (1_700_000_000_000_000, "run|with:odd/chars é")
    for bad in ("", "garbage", "k1.", "k1.!!!", paging.keyset_cursor(1, "x")[:-2] + "@@",
                "k1." + "eyJhIjoxfQ", "k1.WzEsMl0"):  # fmt: skip
        with pytest.raises(ValueError):
            paging.parse_keyset_cursor(bad)


# --------------------------------------------------------------------------- the service


def tracing_of(stack: LocalStack) -> TracingService:
    assert stack.stack is not None
    return next(s for s in stack.stack.services if isinstance(s, TracingService))


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


async def test_five_thousand_runs_list_in_pages_that_fit(
    client: LoomClient, stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracing = tracing_of(stack)
    runs = summaries(5_000, name_bytes=400)  # ~2.5 MB of summaries: over two replies
    await tracing.io(tracing.store.upsert_runs, runs)
    expected = await tracing.io(lambda: tracing.store.runs(limit=10_000))
    assert len(expected) == 5_000

    # one request for all of them: a bounded page and a cursor, never reply_too_large
    first = await bus.request(client.nc, subjects.API_RUNS, RunsQuery(limit=10_000), RunsReply)
    assert first.error is None, first.error
    assert 0 < len(first.runs) < 5_000 and first.next_after is not None
    assert len(codec.encode(first)) <= client.nc.max_payload

    # the client reads every page: the newest-first listing, each run once
    assert await client.runs(limit=10_000) == expected
    found, cursor = await client.runs_page(limit=1_234)
    assert found == expected[:1_234] and cursor is not None
    rest, end = await client.runs_page(limit=10_000, after=cursor)
    assert found + rest == expected and end is None

    # a status filter pages too
    failed, _ = await client.runs_page(limit=10_000, status="failed")
    assert failed == [r for r in expected if r.status == "failed"]

    # the traces query pages by the same cursor
    page = await bus.request(client.nc, subjects.API_TRACES, TracesQuery(limit=3), TracesReply)
    assert page.runs == expected[:3] and page.next_after is not None
    more = await bus.request(
        client.nc, subjects.API_TRACES, TracesQuery(limit=3, after=page.next_after), TracesReply
    )
    assert more.runs == expected[3:6]

    bad = await bus.request(client.nc, subjects.API_RUNS, RunsQuery(after="x"), RunsReply)
    assert bad.error is not None and (bad.error.code, bad.error.path) == ("bad_cursor", "$.after")
    with pytest.raises(LoomError, match="bad_cursor"):
        await client.runs(after="k1.nope")

    # the CLI: a page of N, then the command for the next page on stderr
    monkeypatch.setenv("LOOM_NKEY_SEED_FILE", str(stack.seed_file("operator")))
    shown = await asyncio.to_thread(cli, "runs", "--limit", "4", "-o", "jsonl", "--nats", stack.url)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert [codec.decode(line.encode(), RunSummary) for line in lines] == expected[:4]
    hint = shown.stderr.strip().splitlines()[-1]
    assert hint.startswith("more runs: loom runs --limit 4 --after ")
    next_cursor = hint.rsplit(" ", 1)[1]
    shown = await asyncio.to_thread(
        cli, "runs", "--limit", "4", "--after", next_cursor, "-o", "jsonl", "--nats", stack.url
    )
    assert shown.exit_code == 0, shown.output
    got = [codec.decode(line.encode(), RunSummary) for line in shown.stdout.splitlines()]
    assert got == expected[4:8]
    refused = await asyncio.to_thread(cli, "runs", "--after", "nope", "--nats", stack.url)
    assert refused.exit_code == 1 and "bad_cursor" in refused.output
    assert "Traceback" not in refused.output


async def test_a_trace_page_reads_only_its_rows(client: LoomClient, stack: LocalStack) -> None:
    tracing = tracing_of(stack)
    run_id = "long-trace"
    spans = spans_of(run_id, 5_000)
    summary = RunSummary(run_id=run_id, status="completed", started_at=T0)
    await tracing.io(tracing.store.replace_trace, run_id, spans, summary)
    stored = await tracing.io(tracing.store.trace, run_id)
    assert await client.trace(run_id) == stored

    # the last span undecodable: the whole trace cannot be loaded, yet its first pages
    # are served (each page reads a keyset range, not the trace)
    await tracing.io(corrupt, tracing.store, stored[-1].span_id)
    reply = await bus.request(
        client.nc, subjects.API_TRACE, TraceQuery(run_id=run_id, limit=1_000), TraceReply
    )
    assert reply.error is None, reply.error
    assert reply.spans == stored[:1_000] and reply.next_after is not None
    reply = await bus.request(
        client.nc,
        subjects.API_TRACE,
        TraceQuery(run_id=run_id, limit=1_000, after=reply.next_after),
        TraceReply,
    )
    assert reply.spans == stored[1_000:2_000]
    missing = await bus.request(
        client.nc, subjects.API_TRACE, TraceQuery(run_id="none"), TraceReply
    )
    assert missing.error is not None and missing.error.code == "not_found"
