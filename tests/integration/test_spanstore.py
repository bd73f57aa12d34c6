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
    ErrorInfo,
    EventRecord,
    Plan,
    PlanAccepted,
    RunCompleted,
    RunFailed,
    RunRequested,
    RunSummary,
    SpanRecord,
    StepCompleted,
    StepFailed,
    StepScheduled,
    StepStarted,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolStep,
)
from loom_core.spans import TraceBuilder, build_spans
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


# --------------------------------------------------------------------------- queries
# Three runs an hour and a day apart, built from events by the real TraceBuilder, plus
# synthetic model-call spans carrying GenAI usage attributes (no model calls exist yet).

HOUR = 3600_000.0
DAY = 24 * HOUR


def tool_run(
    run_id: str, t0: float, steps: list[tuple[str, str, float, str | None]]
) -> list[EventRecord]:
    """Events of a run whose tool steps run one after another: (step, tool, tool call
    duration in ms, error code or None). A step lasts its call + 2 ms; a failed step
    fails the run."""
    plan = Plan(steps=[ToolStep(id=sid, tool=tool) for sid, tool, _, _ in steps], name="q")
    out: list[tuple[float, object]] = [(t0, RunRequested(plan=plan)), (t0, PlanAccepted(plan=plan))]
    t = t0 + 1
    error = None
    for sid, tool, dur, code in steps:
        key = ids.idempotency_key(run_id, sid, 1)
        out += [
            (t, StepScheduled(step_id=sid)),
            (t, StepStarted(step_id=sid, attempt=1)),
            (
                t,
                ToolCallRequested(step_id=sid, attempt=1, tool=tool, input={}, idempotency_key=key),
            ),
        ]
        if code is None:
            out.append(
                (
                    t + dur + 2,
                    ToolCallCompleted(
                        step_id=sid,
                        attempt=1,
                        idempotency_key=key,
                        output=1,
                        started_at=ms(t + 1),
                        finished_at=ms(t + 1 + dur),
                    ),
                )
            )
            out.append((t + dur + 2, StepCompleted(step_id=sid, output=1)))
        else:
            error = ErrorInfo(code=code, message=f"{code} from {tool}")
            out.append(
                (
                    t + dur + 2,
                    ToolCallFailed(
                        step_id=sid,
                        attempt=1,
                        idempotency_key=key,
                        error=error,
                        started_at=ms(t + 1),
                        finished_at=ms(t + 1 + dur),
                    ),
                )
            )
            out.append((t + dur + 2, StepFailed(step_id=sid, error=error)))
        t += dur + 2
    out.append((t, RunFailed(error=error) if error else RunCompleted(output=None)))
    return [
        EventRecord(run_id=run_id, seq=n, at=ms(at), event=e)  # type: ignore[arg-type]
        for n, (at, e) in enumerate(out, start=1)
    ]


def model_span(
    run: str,
    name: str,
    start: float,
    dur: float,
    model: str,
    tokens: tuple[int, int],
    cost: float,
    status: str = "ok",
) -> SpanRecord:
    return SpanRecord(
        trace_id=ids.trace_id(run),
        span_id=ids.span_id(run, "model", name),
        run_id=run,
        name=f"chat {model}",
        start=ms(start),
        end=ms(start + dur),
        parent_span_id=ids.span_id(run, "plan"),
        status=status,  # type: ignore[arg-type]
        kind="client",
        attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "test",
            "gen_ai.request.model": model,
            "gen_ai.usage.input_tokens": tokens[0],
            "gen_ai.usage.output_tokens": tokens[1],
            "loom.cost_usd": cost,
        },
    )


def store_run(store: SpanStore, records: list[EventRecord]) -> TraceBuilder:
    builder = TraceBuilder(records[0].run_id)
    changed = [s for rec in records for s in builder.apply(rec)]
    store.save(records[0].run_id, records, changed, builder.summary)
    return builder


@pytest.fixture
def three_runs(store: SpanStore) -> SpanStore:
    store_run(store, tool_run("r-ok", 0, [("a", "http_get", 10, None), ("b", "echo", 30, None)]))
    store_run(store, tool_run("r-fail", HOUR, [("a", "http_get", 50, "http_503")]))
    store_run(store, tool_run("r-model", DAY, [("c", "echo", 5, None)]))
    store.upsert(
        [
            model_span("r-model", "m1", DAY + 100, 200, "gpt-x", (100, 20), 0.01),
            model_span("r-model", "m2", DAY + 300, 100, "claude", (50, 5), 0.002),
            model_span("r-fail", "m1", HOUR + 100, 40, "gpt-x", (10, 1), 0.001, status="error"),
            # an open call (in flight) counts nowhere
            msgspec.structs.replace(
                model_span("r-fail", "m2", HOUR + 200, 1, "gpt-x", (999, 999), 9.0), end=None
            ),
        ]
    )
    return store


def test_traces_filtered_by_status_time_tool_model_and_error(three_runs: SpanStore) -> None:
    store = three_runs

    def ids_of(**kw: object) -> list[str]:
        return [r.run_id for r in store.traces(**kw)]  # type: ignore[arg-type]

    assert ids_of() == ["r-model", "r-fail", "r-ok"]
    assert ids_of(status="failed") == ["r-fail"]
    assert ids_of(status="completed") == ["r-model", "r-ok"]
    assert ids_of(since=ms(HOUR / 2)) == ["r-model", "r-fail"]
    assert ids_of(until=ms(HOUR)) == ["r-ok"]  # until is exclusive
    assert ids_of(since=ms(HOUR), until=ms(HOUR + 0.001)) == ["r-fail"]  # since inclusive
    assert ids_of(tool="http_get") == ["r-fail", "r-ok"]
    assert ids_of(tool="echo") == ["r-model", "r-ok"]
    assert ids_of(model="gpt-x") == ["r-model", "r-fail"]
    assert ids_of(model="claude") == ["r-model"]
    assert ids_of(error="http_503") == ["r-fail"]
    assert ids_of(error="nope") == []
    assert ids_of(tool="http_get", status="completed") == ["r-ok"]
    assert ids_of(limit=1) == ["r-model"]
    failed = store.traces(status="failed")[0]
    assert (failed.status, failed.steps_done, failed.duration_ms) == ("failed", 1, 53.0)
    # runs() is the unfiltered list
    assert [r.run_id for r in store.runs(status="completed")] == ["r-model", "r-ok"]


def test_slowest_steps_by_duration_tool_and_time(three_runs: SpanStore) -> None:
    store = three_runs

    def slow(**kw: object) -> list[tuple[str, str, float]]:
        return [
            (s.run_id, s.attributes["loom.step.id"], (s.end - s.start).total_seconds() * 1000)
            for s in store.slowest_steps(**kw)  # type: ignore[arg-type, operator]
        ]

    assert slow() == [
        ("r-fail", "a", 52.0),
        ("r-ok", "b", 32.0),
        ("r-ok", "a", 12.0),
        ("r-model", "c", 7.0),
    ]
    assert slow(limit=2) == [("r-fail", "a", 52.0), ("r-ok", "b", 32.0)]
    assert slow(tool="http_get") == [("r-fail", "a", 52.0), ("r-ok", "a", 12.0)]
    assert slow(since=ms(HOUR)) == [("r-fail", "a", 52.0), ("r-model", "c", 7.0)]
    assert slow(until=ms(HOUR), tool="echo") == [("r-ok", "b", 32.0)]
    assert all(s.name.startswith("step ") for s in store.slowest_steps())


def test_usage_by_tool_model_run_and_time_bucket(three_runs: SpanStore) -> None:
    store = three_runs

    def table(by: str, **kw: object) -> list[tuple[object, ...]]:
        return [
            (
                r.key,
                r.calls,
                r.errors,
                r.runs,
                r.total_ms,
                r.avg_ms,
                r.max_ms,
                r.input_tokens,
                r.output_tokens,
                round(r.cost_usd, 6),
            )
            for r in store.usage(by, **kw)  # type: ignore[arg-type]
        ]

    assert table("tool") == [
        ("echo", 2, 0, 2, 35.0, 17.5, 30.0, 0, 0, 0.0),
        ("http_get", 2, 1, 2, 60.0, 30.0, 50.0, 0, 0, 0.0),
    ]
    assert table("model") == [
        ("gpt-x", 2, 1, 2, 240.0, 120.0, 200.0, 110, 21, 0.011),
        ("claude", 1, 0, 1, 100.0, 100.0, 100.0, 50, 5, 0.002),
    ]
    assert [(k, calls, tokens) for k, calls, _, _, _, _, _, tokens, _, _ in table("run")] == [
        ("r-model", 3, 150),
        ("r-fail", 2, 10),
        ("r-ok", 2, 0),
    ]
    t0 = ms(0)
    assert [(k, calls) for k, calls, *_ in table("hour")] == [
        (t0.isoformat(), 2),
        ((t0 + timedelta(hours=1)).isoformat(), 2),
        ((t0 + timedelta(days=1)).isoformat(), 3),
    ]
    midnight = t0.replace(hour=0)
    assert [(k, calls, cost) for k, calls, *_, cost in table("day")] == [
        (midnight.isoformat(), 4, 0.001),
        ((midnight + timedelta(days=1)).isoformat(), 3, 0.012),
    ]
    assert [(k, calls) for k, calls, *_ in table("minute", until=ms(HOUR))] == [(t0.isoformat(), 2)]
    assert [k for k, *_ in table("tool", since=ms(HOUR))] == ["echo", "http_get"]
    assert table("model", since=ms(DAY), until=ms(DAY + 250)) == [
        ("gpt-x", 1, 0, 1, 200.0, 200.0, 200.0, 100, 20, 0.01)
    ]
    assert store.usage("tool", limit=1)[0].key == "echo"
    with pytest.raises(ValueError, match="must be one of"):
        store.usage("week")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- rebuild


def test_replace_trace_reports_differences_and_queues_everything_again(store: SpanStore) -> None:
    records = run_events("run-x", n_steps=2)
    builder = store_run(store, records[:5])  # stored while the run was going
    store.mark_exported(store.unexported(100))
    rebuilt = TraceBuilder("run-x")
    for rec in records[:5]:
        rebuilt.apply(rec)
    # the same spans: nothing differs, yet every span is offered for export again
    assert store.replace_trace("run-x", rebuilt.spans(), rebuilt.summary) == 0
    assert {s.span_id for s in store.unexported(100)} == {
        s.span_id for s in builder.spans() if s.end is not None
    }
    # a stale span (from an older builder) is removed; changed versions are counted
    store.upsert([span("stale", 0, 1, run="run-x")])
    full = TraceBuilder("run-x")
    for rec in records:
        full.apply(rec)
    before = {s.span_id: s for s in store.trace("run-x")}
    expected_changes = 1 + sum(1 for s in full.spans() if before.get(s.span_id) != s)
    assert expected_changes > 1
    assert store.replace_trace("run-x", full.spans(), full.summary, records) == expected_changes
    assert store.trace("run-x") == sorted(full.spans(), key=lambda s: (s.start, s.span_id))
    assert store.events("run-x") == records
    assert store.runs() == [full.summary]
    with pytest.raises(ValueError, match="another run"):
        store.replace_trace("run-y", full.spans())


def test_run_ids_page_in_id_order_within_a_time_window(store: SpanStore) -> None:
    for run_id, start in (("d", 3), ("b", 1), ("a", 0), ("c", 2)):
        store.upsert_run(summary(run_id, "completed", start))
    assert store.run_ids(limit=2) == ["a", "b"]
    assert store.run_ids(after="b", limit=2) == ["c", "d"]
    assert store.run_ids(after="d") == []
    assert store.run_ids(since=ms(1), until=ms(3)) == ["b", "c"]


# --------------------------------------------------------------------------- export failures


def test_a_span_refused_max_attempts_times_is_given_up(store: SpanStore) -> None:
    bad, good = span("bad", 1, 2), span("good", 2, 3)
    store.upsert([bad, good])
    assert store.record_export_rejection([bad], max_attempts=3) == []
    assert store.record_export_rejection([bad], max_attempts=3) == []
    assert store.unexported(10) == [bad, good]  # still pending after two refusals
    assert store.record_export_rejection([bad], max_attempts=3) == [bad.span_id]
    assert store.unexported(10) == [good]  # the queue is no longer blocked
    assert store.export_failed() == [bad]
    # refusing an older version does not count against the current one
    good2 = msgspec.structs.replace(good, status="ok")
    store.upsert([good2])
    assert store.record_export_rejection([good], max_attempts=1) == []
    assert store.unexported(10) == [good2]
    # a new version of a given-up span is pending again, with fresh attempts
    bad2 = msgspec.structs.replace(bad, status="error")
    store.upsert([bad2])
    assert store.export_failed() == []
    assert store.unexported(10) == [bad2, good2]
    assert store.record_export_rejection([bad2], max_attempts=2) == []
    # spans that cannot be represented at all are given up at once
    store.mark_export_failed([good2])
    assert store.export_failed() == [good2]
    assert store.unexported(10) == [bad2]
    assert store.record_export_rejection([], max_attempts=1) == []


# --------------------------------------------------------------------------- migration

_OLD_SPANS = """
CREATE TABLE loom_trace_spans (
    span_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, trace_id TEXT NOT NULL,
    start_us BIGINT NOT NULL, ended INTEGER NOT NULL, exported INTEGER NOT NULL DEFAULT 0,
    data {blob} NOT NULL
)
"""


def test_a_store_written_before_the_query_columns_is_upgraded(
    span_settings: StoreSettings,
) -> None:
    """The first span store had no derived columns: opening it adds and fills them."""
    from loom_core import codec

    records = tool_run("old", 0, [("a", "http_get", 10, None)])
    spans = TraceBuilder("old")
    for rec in records:
        spans.apply(rec)
    old = spans.spans()
    rows = [
        (s.span_id, s.run_id, s.trace_id, int(s.start.timestamp() * 1e6), 1, 1, codec.encode(s))
        for s in old
    ]
    insert = "INSERT INTO loom_trace_spans VALUES (?, ?, ?, ?, ?, ?, ?)"
    if span_settings.kind == "sqlite":
        import sqlite3

        span_settings.data_dir.mkdir(parents=True)
        with sqlite3.connect(span_settings.data_dir / "traces.db") as conn:
            conn.execute(_OLD_SPANS.format(blob="BLOB"))
            conn.executemany(insert, rows)
    else:
        import psycopg

        assert span_settings.postgres_url
        with psycopg.connect(span_settings.postgres_url, autocommit=True) as conn:
            conn.execute(_OLD_SPANS.format(blob="BYTEA"))
            conn.cursor().executemany(insert.replace("?", "%s"), rows)
    with open_span_store(span_settings) as store:
        assert store.trace("old") == sorted(old, key=lambda s: (s.start, s.span_id))
        assert store.unexported() == []  # their export state is kept
        assert [s.attributes["loom.step.id"] for s in store.slowest_steps()] == ["a"]
        assert [(r.key, r.calls) for r in store.usage("tool")] == [("http_get", 1)]
    with open_span_store(span_settings) as again:  # opening twice is harmless
        assert len(again.trace("old")) == len(old)


def test_the_unused_trace_id_index_of_an_older_store_is_dropped(
    span_settings: StoreSettings,
) -> None:
    """It served no query and cost every span write (issue 10): a store that has it loses
    it when opened, and keeps its spans."""
    with open_span_store(span_settings) as store:
        store.save("r1", run_events("r1"), build_spans(run_events("r1")))
    create = "CREATE INDEX loom_trace_spans_trace ON loom_trace_spans (trace_id)"
    if span_settings.kind == "sqlite":
        import sqlite3

        path = span_settings.data_dir / "traces.db"
        with sqlite3.connect(path) as conn:
            conn.execute(create)

        def indexes() -> set[str]:
            with sqlite3.connect(path) as conn:
                return {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    else:
        import psycopg

        assert span_settings.postgres_url
        url = span_settings.postgres_url
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(create)

        def indexes() -> set[str]:
            with psycopg.connect(url, autocommit=True) as conn:
                return {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes")}

    assert "loom_trace_spans_trace" in indexes()
    with open_span_store(span_settings) as store:
        assert len(store.trace("r1")) == len(build_spans(run_events("r1")))
    assert "loom_trace_spans_trace" not in indexes()
    assert "loom_trace_spans_run" in indexes()
