"""The span store on both engines: SQLite (a file in tmp_path) and a real PostgreSQL
(``pg_store_settings`` from conftest gives a fresh database per test)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from loom_core import ids
from loom_core.contracts import (
    EventRecord,
    Plan,
    PlanAccepted,
    RunCompleted,
    RunRequested,
    RunSummary,
    SpanRecord,
    StepCompleted,
    StepScheduled,
    StepStarted,
    ToolCallCompleted,
    ToolCallRequested,
    ToolStep,
)
from loom_core.spans import TraceBuilder
from loom_infra.settings import StoreSettings
from loom_infra.spanstore import SpanStore, open_span_store
from loom_infra.store import StoreError

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def ms(n: float) -> datetime:
    return T0 + timedelta(milliseconds=n)


@pytest.fixture(params=["sqlite", "postgres"])
def span_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    if request.param == "sqlite":
        return StoreSettings(kind="sqlite", data_dir=tmp_path / "data")
    return request.getfixturevalue("pg_store_settings")


@pytest.fixture
def store(span_settings: StoreSettings) -> SpanStore:
    s = open_span_store(span_settings)
    yield s
    s.close()


def span(
    name: str, start: float, end: float | None = None, run: str = "r1", **kw: object
) -> SpanRecord:
    return SpanRecord(
        trace_id=ids.trace_id(run),
        span_id=ids.span_id(run, name),
        run_id=run,
        name=name,
        start=ms(start),
        end=None if end is None else ms(end),
        **kw,  # type: ignore[arg-type]
    )


def run_events(run_id: str, n_steps: int = 2) -> list[EventRecord]:
    plan = Plan(steps=[ToolStep(id=f"s{i}", tool="echo") for i in range(n_steps)], name="wf")
    events: list[object] = [RunRequested(plan=plan), PlanAccepted(plan=plan)]
    for i in range(n_steps):
        sid, key = f"s{i}", ids.idempotency_key(run_id, f"s{i}", 1)
        events += [
            StepScheduled(step_id=sid),
            StepStarted(step_id=sid, attempt=1),
            ToolCallRequested(step_id=sid, attempt=1, tool="echo", input={}, idempotency_key=key),
            ToolCallCompleted(
                step_id=sid,
                attempt=1,
                idempotency_key=key,
                output=i,
                started_at=ms(10 * i + 1),
                finished_at=ms(10 * i + 5),
            ),
            StepCompleted(step_id=sid, output=i),
        ]
    events.append(RunCompleted(output=None))
    return [
        EventRecord(run_id=run_id, seq=n, at=ms(2 * n), event=e)  # type: ignore[arg-type]
        for n, e in enumerate(events, start=1)
    ]


# --------------------------------------------------------------------------- spans


def test_upsert_and_trace_round_trip_in_start_then_id_order(store: SpanStore) -> None:
    a = span("a", 5, 6, attributes={"k": {"nested": [1, "x"]}, "n": 1.5})
    b = span("b", 1, 9)
    c = span("c", 5)  # same start as a: span id breaks the tie
    other = span("z", 0, 1, run="r2")
    store.upsert([a, b, c, other])
    expected = sorted([a, b, c], key=lambda s: (s.start, s.span_id))
    assert store.trace("r1") == expected
    assert store.trace("r2") == [other]
    assert store.trace("missing") == []


def test_upsert_replaces_by_span_id_and_last_version_in_a_batch_wins(store: SpanStore) -> None:
    v1 = span("a", 1)
    v2 = msgspec.structs.replace(v1, end=ms(3), status="ok")
    v3 = msgspec.structs.replace(v2, status="error", status_message="boom")
    store.upsert([v1])
    store.upsert([v2, v3])
    assert store.trace("r1") == [v3]


def test_unexported_offers_each_changed_version_of_ended_spans(store: SpanStore) -> None:
    open_span = span("open", 0)
    done1, done2 = span("d1", 2, 3), span("d2", 1, 4)
    store.upsert([open_span, done1, done2])
    assert store.unexported(10) == [done2, done1]  # oldest first; open spans never
    assert store.unexported(1) == [done2]

    store.mark_exported([done2, done1])
    assert store.unexported(10) == []

    # an identical upsert (redelivery, refold) is not a change
    store.upsert([done1, done2])
    assert store.unexported(10) == []

    # a changed version must be exported again; so must a span that just ended
    done1b = msgspec.structs.replace(done1, attributes={"late": True})
    closed = msgspec.structs.replace(open_span, end=ms(9))
    store.upsert([done1b, closed])
    assert store.unexported(10) == [closed, done1b]

    # compare-and-set: marking the version that was exported leaves a newer one pending
    batch = store.unexported(10)
    done1c = msgspec.structs.replace(done1b, status="ok")
    store.upsert([done1c])  # lands between unexported() and mark_exported()
    store.mark_exported(batch)
    assert store.unexported(10) == [done1c]

    # bare span ids mark whatever is stored
    store.mark_exported([done1c.span_id])
    assert store.unexported(10) == []


def test_trace_builder_output_stored_incrementally_equals_the_rebuilt_trace(
    store: SpanStore,
) -> None:
    records = run_events("run-a", n_steps=3)
    builder = TraceBuilder("run-a")
    for rec in records:
        store.upsert(builder.apply(rec))
    assert store.trace("run-a") == sorted(builder.spans(), key=lambda s: (s.start, s.span_id))
    assert len(store.unexported(100)) == len(builder.spans())


def test_concurrent_writers_share_one_store(store: SpanStore) -> None:
    errors: list[BaseException] = []

    def write(t: int) -> None:
        try:
            for i in range(20):
                store.upsert([span(f"t{t}-{i}", i, i + 1, run=f"run-{t}")])
                store.record_events(f"run-{t}", run_events(f"run-{t}", 1)[i % 3 : i % 3 + 1])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert not errors
    assert all(len(store.trace(f"run-{t}")) == 20 for t in range(4))
    assert all(len(store.events(f"run-{t}")) == 3 for t in range(4))


# --------------------------------------------------------------------------- runs


def summary(run_id: str, status: str, start: float | None) -> RunSummary:
    return RunSummary(
        run_id=run_id, status=status, started_at=None if start is None else ms(start), name="wf"
    )


def test_runs_newest_first_filtered_by_status_and_limited(store: SpanStore) -> None:
    store.upsert_run(summary("old", "completed", 0))
    store.upsert_run(summary("mid", "running", 10))
    store.upsert_run(summary("new", "failed", 20))
    store.upsert_run(summary("unknown-start", "pending", None))
    assert [r.run_id for r in store.runs()] == ["new", "mid", "old", "unknown-start"]
    assert [r.run_id for r in store.runs(limit=2)] == ["new", "mid"]
    assert [r.run_id for r in store.runs(status="running")] == ["mid"]

    done = msgspec.structs.replace(
        summary("mid", "completed", 10),
        ended_at=ms(15),
        duration_ms=5.0,
        steps_total=2,
        steps_done=2,
    )
    store.upsert_run(done)
    assert store.runs(status="running") == []
    assert [r.run_id for r in store.runs(status="completed")] == ["mid", "old"]
    assert store.runs(status="completed")[0] == done


# --------------------------------------------------------------------------- events


def test_events_are_kept_once_per_seq_and_read_back_in_order(store: SpanStore) -> None:
    records = run_events("run-e", n_steps=2)
    store.record_events("run-e", records[5:])
    store.record_events("run-e", records[:7])  # overlaps: the kept copies stay
    store.record_events("run-e", records[3:4])
    assert store.events("run-e") == records
    assert store.events("nothing") == []


def test_events_of_another_run_are_refused(store: SpanStore) -> None:
    with pytest.raises(ValueError, match="another run"):
        store.record_events("run-x", run_events("run-y", 1))
    assert store.events("run-x") == [] and store.events("run-y") == []


def test_refold_after_restart_gives_the_same_trace(span_settings: StoreSettings) -> None:
    records = run_events("run-r", n_steps=2)
    builder = TraceBuilder("run-r")
    with open_span_store(span_settings) as first:
        for rec in records[:6]:
            first.record_events("run-r", [rec])
            first.upsert(builder.apply(rec))
    # restart: the service reopens the store and refolds what it kept
    with open_span_store(span_settings) as second:
        again = TraceBuilder("run-r")
        for rec in second.events("run-r"):
            again.apply(rec)
        for rec in records[6:]:
            second.record_events("run-r", [rec])
            second.upsert(again.apply(rec))
            builder.apply(rec)
        assert again.spans() == builder.spans()
        assert second.trace("run-r") == sorted(builder.spans(), key=lambda s: (s.start, s.span_id))
        second.upsert_run(again.summary)
        assert second.runs() == [builder.summary]
        assert builder.summary.status == "completed"


# --------------------------------------------------------------------------- save


def test_save_keeps_events_spans_and_summary_together(store: SpanStore) -> None:
    records = run_events("run-s", n_steps=1)
    builder = TraceBuilder("run-s")
    changed = [s for rec in records for s in builder.apply(rec)]
    store.save("run-s", records, changed, builder.summary)
    assert store.events("run-s") == records
    assert store.trace("run-s") == sorted(builder.spans(), key=lambda s: (s.start, s.span_id))
    assert store.runs() == [builder.summary]


def test_save_is_one_transaction(store: SpanStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import loom_infra.spanstore as spanstore

    records = run_events("run-t", n_steps=1)
    builder = TraceBuilder("run-t")
    changed = [s for rec in records for s in builder.apply(rec)]
    # the last statement of the transaction fails: the first two must not stay
    monkeypatch.setattr(spanstore, "_UPSERT_RUN", "INSERT INTO no_such_table VALUES (?, ?, ?, ?)")
    with pytest.raises(StoreError) as info:
        store.save("run-t", records, changed, builder.summary)
    assert info.value.operation == "save"
    monkeypatch.undo()
    assert store.events("run-t") == []
    assert store.trace("run-t") == []
    assert store.runs() == []
    with pytest.raises(ValueError, match="another run"):
        store.save("run-x", records, changed)


# --------------------------------------------------------------------------- lifecycle


def test_closed_store_says_so(store: SpanStore) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed") as info:
        store.trace("r1")
    assert info.value.operation == "trace"


def test_sqlite_file_lives_in_data_dir(tmp_path: Path) -> None:
    settings = StoreSettings(kind="sqlite", data_dir=tmp_path / "nested" / "dir")
    with open_span_store(settings) as s:
        s.upsert([span("a", 0, 1)])
    assert (tmp_path / "nested" / "dir" / "traces.db").is_file()


def test_postgres_store_reconnects_after_losing_its_connection(
    pg_store_settings: StoreSettings,
) -> None:
    import psycopg

    assert pg_store_settings.postgres_url
    with open_span_store(pg_store_settings) as s:
        s.upsert([span("a", 0, 1)])
        # The server drops the session (restart, failover, idle kill).
        with psycopg.connect(pg_store_settings.postgres_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        s.upsert([span("b", 2, 3)])  # reopened and retried, no error
        assert [x.name for x in s.trace("r1")] == ["a", "b"]
