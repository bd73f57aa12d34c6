"""Where the tracing service keeps what it derived: spans, run summaries, and the events
it folded them from; and the queries over them.

Design note
- One interface (:class:`SpanStore`), two engines: SQLite (``data_dir/traces.db``, WAL)
  and PostgreSQL (tables ``loom_trace_spans``, ``loom_trace_runs``,
  ``loom_trace_events``). The SQL is shared, queries included; only placeholders, the
  blob type and the connection handling differ.
- Rows hold the record as msgspec JSON (``data``) plus the columns queries filter, sort
  and aggregate on, all derived from the record (``_span_columns``): category (see
  ``loom_core.spans.span_category``), name, status, end and duration, tool, model, error
  type, token counts and cost. Times are integer microseconds since the epoch (UTC), so
  ordering and time buckets never depend on how an engine handles time zones. A store
  written by an older version gets the missing columns added and filled from ``data``
  when opened.
- Export bookkeeping: ``exported`` is 0 (pending), 1 (exported) or 2 (given up: the
  collector rejected the span ``max_attempts`` times, see
  :meth:`SpanStore.record_export_rejection`). An upsert that changes the stored JSON sets
  it back to 0 (an upsert with identical JSON changes nothing), so every *version* of a
  span gets exported at least once and a failed OTLP export is simply retried from
  :meth:`SpanStore.unexported` later. Open spans (no end) are never offered for export:
  OTLP has no way to update a span once sent.
- Marking is compare-and-set when given records: ``mark_exported(batch)`` marks a span
  only if its stored version is still the one that was exported, so a change that lands
  between ``unexported()`` and ``mark_exported()`` is not lost.
- Events: kept idempotently by (run_id, seq), so after a restart a run can be refolded,
  and a bulk rebuild needs nothing but this store.
- Synchronous (sqlite3 / psycopg 3); one connection per store guarded by a lock, so a
  store may be shared by threads (async callers use a thread pool). Engine errors become
  ``loom_infra.store.StoreError`` with ``retryable``. A lost PostgreSQL connection is
  reopened once and the call retried: every write here is idempotent.
"""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from loom_core import codec
from loom_core.contracts import EventRecord, RunSummary, SpanRecord, UsageRow
from loom_core.spans import span_category
from loom_infra.settings import StoreSettings, redact_url
from loom_infra.store import StoreError

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "USAGE_KEYS",
    "micros",
    "run_key",
    "span_key",
    "PostgresSpanStore",
    "SQLiteSpanStore",
    "SpanStore",
    "open_span_store",
]

SQLITE_FILE = "traces.db"
SQLITE_BUSY_TIMEOUT_S = 10.0
PG_CONNECT_TIMEOUT_S = 10

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_TEXT_MAX = 256  # filter columns hold short names; longer values are cut for the index

_span_decoder = msgspec.json.Decoder(SpanRecord)
_run_decoder = msgspec.json.Decoder(RunSummary)

UsageKey = Literal["tool", "model", "run", "minute", "hour", "day"]
# group key of a usage query -> its SQL expression (a fixed list: never user text)
USAGE_KEYS: dict[str, str] = {
    "tool": "tool",
    "model": "model",
    "run": "run_id",
    "minute": "(start_us / 60000000) * 60000000",
    "hour": "(start_us / 3600000000) * 3600000000",
    "day": "(start_us / 86400000000) * 86400000000",
}
_BUCKETS = frozenset({"minute", "hour", "day"})


def _us(value: datetime | None) -> int:
    """Microseconds since the epoch; naive times are taken as UTC; None (a run whose
    start is unknown) is 0 so it sorts after every real run in "newest first"."""
    if value is None:
        return 0
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _US


def _from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def micros(value: datetime | None) -> int:
    """A time as the store orders by it (microseconds since the epoch, UTC)."""
    return _us(value)


def span_key(span: SpanRecord) -> tuple[int, str]:
    """Where a span sits in its trace's order (start in microseconds, span id): the
    keyset a trace page continues after."""
    return _us(span.start), span.span_id


def run_key(summary: RunSummary) -> tuple[int, str]:
    """Where a run sits in the newest-first listing (start in microseconds, 0 when
    unknown; run id): the keyset a runs page continues after."""
    return _us(summary.started_at), summary.run_id


# ----------------------------------------------------------------------------- SQL
# Written with "?" placeholders; the PostgreSQL store rewrites them to "%s".

_TABLES = """
CREATE TABLE IF NOT EXISTS loom_trace_spans (
    span_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    start_us BIGINT NOT NULL,
    ended INTEGER NOT NULL,
    exported INTEGER NOT NULL DEFAULT 0,
    data {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS loom_trace_runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    started_us BIGINT NOT NULL,
    data {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS loom_trace_events (
    run_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    data {blob} NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""

# Columns derived from a span's JSON, added to loom_trace_spans (by ALTER TABLE on a
# store created before they existed, then filled from ``data``).
_DERIVED = (
    ("category", "TEXT"),
    ("name", "TEXT"),
    ("status", "TEXT"),
    ("end_us", "BIGINT"),
    ("dur_us", "BIGINT"),
    ("tool", "TEXT"),
    ("model", "TEXT"),
    ("error_type", "TEXT"),
    ("input_tokens", "BIGINT"),
    ("output_tokens", "BIGINT"),
    ("cost_usd", "DOUBLE PRECISION"),
)
_EXTRA_COLUMNS = (*_DERIVED, ("export_attempts", "INTEGER NOT NULL DEFAULT 0"))
_DERIVED_NAMES = tuple(name for name, _ in _DERIVED)

_INDEXES = """
CREATE INDEX IF NOT EXISTS loom_trace_spans_run ON loom_trace_spans (run_id, start_us, span_id);
CREATE INDEX IF NOT EXISTS loom_trace_spans_unexported ON loom_trace_spans (start_us, span_id)
    WHERE exported = 0 AND ended = 1;
CREATE INDEX IF NOT EXISTS loom_trace_spans_category ON loom_trace_spans (category, start_us);
CREATE INDEX IF NOT EXISTS loom_trace_spans_duration ON loom_trace_spans (category, dur_us)
    WHERE dur_us IS NOT NULL;
CREATE INDEX IF NOT EXISTS loom_trace_spans_tool ON loom_trace_spans (tool, run_id)
    WHERE tool IS NOT NULL;
CREATE INDEX IF NOT EXISTS loom_trace_spans_model ON loom_trace_spans (model, run_id)
    WHERE model IS NOT NULL;
CREATE INDEX IF NOT EXISTS loom_trace_spans_error ON loom_trace_spans (error_type, run_id)
    WHERE error_type IS NOT NULL;
CREATE INDEX IF NOT EXISTS loom_trace_runs_started ON loom_trace_runs (started_us, run_id);
CREATE INDEX IF NOT EXISTS loom_trace_runs_status
    ON loom_trace_runs (status, started_us, run_id);
CREATE INDEX IF NOT EXISTS loom_trace_runs_tenant ON loom_trace_runs (tenant, started_us, run_id);
DROP INDEX IF EXISTS loom_trace_spans_trace;
"""
# (loom_trace_spans_trace, on trace_id, served no query and cost every span write ~5% of
# the fold's store time: dropped from stores written before, issue 10)

_SPAN_COLUMNS = ("span_id", "run_id", "trace_id", "start_us", "ended", "data", *_DERIVED_NAMES)
_UPSERT_SPAN = f"""
INSERT INTO loom_trace_spans ({", ".join(_SPAN_COLUMNS)}, exported, export_attempts)
VALUES ({", ".join("?" for _ in _SPAN_COLUMNS)}, 0, 0)
ON CONFLICT (span_id) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in _SPAN_COLUMNS[1:])},
    exported = 0, export_attempts = 0
WHERE loom_trace_spans.data <> excluded.data
"""  # noqa: S608 - column names are constants of this module

_UPSERT_RUN = """
INSERT INTO loom_trace_runs (run_id, status, started_us, data, tenant) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (run_id) DO UPDATE SET
    status = excluded.status, started_us = excluded.started_us, data = excluded.data,
    tenant = excluded.tenant
"""
# A store written before tenants: every run in it is the default tenant's (a rebuild
# recomputes each summary, tenant included, from the run's events).
_ADD_RUN_TENANT = "ALTER TABLE loom_trace_runs ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'"
_RUN_TENANT = "SELECT tenant FROM loom_trace_runs WHERE run_id = ?"
# the spans of one tenant's runs (slowest steps, usage)
_OF_TENANT = "run_id IN (SELECT run_id FROM loom_trace_runs WHERE tenant = ?)"

_INSERT_EVENT = """
INSERT INTO loom_trace_events (run_id, seq, data) VALUES (?, ?, ?)
ON CONFLICT (run_id, seq) DO NOTHING
"""

_TRACE = "SELECT data FROM loom_trace_spans WHERE run_id = ? ORDER BY start_us, span_id"
# One page of a trace: keyset on the order above, served by loom_trace_spans_run.
_TRACE_PAGE = (
    "SELECT data FROM loom_trace_spans WHERE run_id = ? AND (start_us, span_id) > (?, ?) "
    "ORDER BY start_us, span_id LIMIT ?"
)
_TRACE_FIRST_PAGE = (
    "SELECT data FROM loom_trace_spans WHERE run_id = ? ORDER BY start_us, span_id LIMIT ?"
)
_TRACE_VERSIONS = "SELECT span_id, data FROM loom_trace_spans WHERE run_id = ?"
_DELETE_TRACE = "DELETE FROM loom_trace_spans WHERE run_id = ?"
_EVENTS = "SELECT data FROM loom_trace_events WHERE run_id = ? ORDER BY seq"
_UNEXPORTED = (
    "SELECT data FROM loom_trace_spans WHERE exported = 0 AND ended = 1 "
    "ORDER BY start_us, span_id LIMIT ?"
)
_EXPORT_FAILED = (
    "SELECT data FROM loom_trace_spans WHERE exported = 2 ORDER BY start_us, span_id LIMIT ?"
)
_MARK = "UPDATE loom_trace_spans SET exported = 1 WHERE span_id = ?"
_MARK_IF_SAME = "UPDATE loom_trace_spans SET exported = 1 WHERE span_id = ? AND data = ?"
_MARK_FAILED_IF_SAME = "UPDATE loom_trace_spans SET exported = 2 WHERE span_id = ? AND data = ?"
_REJECTED = """
UPDATE loom_trace_spans SET export_attempts = export_attempts + 1,
    exported = CASE WHEN export_attempts + 1 >= ? THEN 2 ELSE exported END
WHERE span_id = ? AND data = ? AND exported = 0
"""
_BACKFILL = (
    f"UPDATE loom_trace_spans SET {', '.join(f'{c} = ?' for c in _DERIVED_NAMES)} "  # noqa: S608
    "WHERE span_id = ?"
)


class _Where:
    """AND-ed conditions with their parameters; the SQL text is always constant pieces
    of this module, values only ever travel as parameters."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.params: list[Any] = []

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def time(self, column: str, since: datetime | None, until: datetime | None) -> None:
        if since is not None:
            self.add(f"{column} >= ?", _us(since))
        if until is not None:
            self.add(f"{column} < ?", _us(until))

    def sql(self) -> str:
        return " WHERE " + " AND ".join(self.clauses) if self.clauses else ""


# ----------------------------------------------------------------------------- interface


class SpanStore(ABC):
    """Spans, run summaries and events of the tracing service. All methods are
    synchronous and safe to call from several threads."""

    backend: str

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False

    # -- engine hooks
    @abstractmethod
    def _write(self, batches: Sequence[tuple[str, Sequence[tuple[Any, ...]]]]) -> None:
        """Run each (sql, rows) with executemany, all in one transaction."""

    @abstractmethod
    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Every row of a query."""

    def _read(self, sql: str, params: Sequence[Any]) -> list[bytes]:
        """The first column of every row of a query."""
        return [row[0] for row in self._rows(sql, params)]

    @abstractmethod
    def _close(self) -> None: ...

    # -- spans
    def upsert(self, spans: Sequence[SpanRecord]) -> None:
        """Store these span versions (by span id), in one transaction. A span whose JSON
        changed becomes unexported again."""
        rows = _span_rows(spans)
        if rows:
            self._call("upsert", self._write, [(_UPSERT_SPAN, rows)])

    def trace(self, run_id: str) -> list[SpanRecord]:
        """A run's spans, by start time then span id."""
        return self._decode(
            "trace", _span_decoder, self._call("trace", self._read, _TRACE, (run_id,))
        )

    def trace_page(
        self, run_id: str, after: tuple[int, str] | None = None, limit: int = 256
    ) -> list[SpanRecord]:
        """At most ``limit`` of a run's spans after the key ``after`` = (start in
        microseconds since the epoch, span id), in :meth:`trace` order. Reads only the
        rows of the page (an index range), however long the trace."""
        if after is None:
            rows = self._call("trace_page", self._read, _TRACE_FIRST_PAGE, (run_id, limit))
        else:
            params = (run_id, after[0], after[1], limit)
            rows = self._call("trace_page", self._read, _TRACE_PAGE, params)
        return self._decode("trace_page", _span_decoder, rows)

    def iter_trace(
        self, run_id: str, after: tuple[int, str] | None = None, chunk: int = 256
    ) -> Iterator[SpanRecord]:
        """A run's spans after ``after`` (see :meth:`trace_page`), read ``chunk`` at a
        time as they are consumed: a reader that stops early read one chunk past it."""
        while True:
            spans = self.trace_page(run_id, after, chunk)
            yield from spans
            if len(spans) < chunk:
                return
            after = span_key(spans[-1])

    def replace_trace(
        self,
        run_id: str,
        spans: Sequence[SpanRecord],
        summary: RunSummary | None = None,
        records: Sequence[EventRecord] = (),
    ) -> int:
        """Make ``spans`` the run's whole trace (a rebuild), in one transaction: spans
        not among them are deleted, and every span is pending export again (a rebuild
        re-exports). ``records`` are kept as by :meth:`record_events`. Returns how many
        spans differ from what was stored (added, removed or changed)."""
        rows = _span_rows(spans)
        if any(row[1] != run_id for row in rows):
            raise ValueError(
                f"replace_trace of run {run_id!r} was given spans of another run; "
                "a trace is replaced one run at a time"
            )
        event_rows = _event_rows(run_id, records)

        def replace() -> int:
            stored = {sid: bytes(data) for sid, data in self._rows(_TRACE_VERSIONS, (run_id,))}
            new = {row[0]: row[5] for row in rows}
            changed = len(stored.keys() - new.keys()) + sum(
                1 for sid, data in new.items() if stored.get(sid) != data
            )
            batches: list[tuple[str, Sequence[tuple[Any, ...]]]] = [(_DELETE_TRACE, [(run_id,)])]
            if rows:
                batches.append((_UPSERT_SPAN, rows))
            if event_rows:
                batches.append((_INSERT_EVENT, event_rows))
            if summary is not None:
                batches.append((_UPSERT_RUN, [_run_row(summary)]))
            self._write(batches)
            return changed

        return self._call("replace_trace", replace)

    # -- export bookkeeping
    def unexported(self, limit: int = 512) -> list[SpanRecord]:
        """Ended spans whose current version has not been marked exported (nor given
        up), oldest first."""
        rows = self._call("unexported", self._read, _UNEXPORTED, (limit,))
        return self._decode("unexported", _span_decoder, rows)

    def mark_exported(self, spans: Iterable[SpanRecord | str]) -> None:
        """Mark spans exported. Give the records that were exported (compare-and-set: a
        span changed since is left unexported) or bare span ids (whatever is stored)."""
        by_id: list[tuple[Any, ...]] = []
        if_same: list[tuple[Any, ...]] = []
        for item in spans:
            if isinstance(item, SpanRecord):
                if_same.append((item.span_id, codec.encode(item)))
            else:
                by_id.append((item,))
        batches = [(sql, rows) for sql, rows in ((_MARK, by_id), (_MARK_IF_SAME, if_same)) if rows]
        if batches:
            self._call("mark_exported", self._write, batches)

    def mark_export_failed(self, spans: Iterable[SpanRecord]) -> None:
        """Give up exporting these span versions (e.g. they cannot be represented in
        OTLP); a later change of a span makes it pending again."""
        rows = [(s.span_id, codec.encode(s)) for s in spans]
        if rows:
            self._call("mark_export_failed", self._write, [(_MARK_FAILED_IF_SAME, rows)])

    def record_export_rejection(self, spans: Sequence[SpanRecord], max_attempts: int) -> list[str]:
        """The collector refused these span versions for good (not "unavailable"):
        count one more attempt for each, and give up on those refused ``max_attempts``
        times (``exported`` = 2). Returns the ids of the spans given up now."""
        if not spans:
            return []
        rows = [(max_attempts, s.span_id, codec.encode(s)) for s in spans]
        span_ids = [s.span_id for s in spans]
        marks = ", ".join("?" for _ in span_ids)
        given_up_sql = (
            f"SELECT span_id FROM loom_trace_spans WHERE exported = 2 AND span_id IN ({marks})"  # noqa: S608
        )

        def record() -> list[str]:
            self._write([(_REJECTED, rows)])
            return [row[0] for row in self._rows(given_up_sql, span_ids)]

        return self._call("record_export_rejection", record)

    def export_failed(self, limit: int = 100) -> list[SpanRecord]:
        """Spans whose export was given up, oldest first."""
        rows = self._call("export_failed", self._read, _EXPORT_FAILED, (limit,))
        return self._decode("export_failed", _span_decoder, rows)

    # -- runs
    def upsert_run(self, summary: RunSummary) -> None:
        self._call("upsert_run", self._write, [(_UPSERT_RUN, [_run_row(summary)])])

    def upsert_runs(self, summaries: Sequence[RunSummary]) -> None:
        """Store many run summaries in one transaction (imports, benchmarks)."""
        if summaries:
            rows = [_run_row(s) for s in summaries]
            self._call("upsert_runs", self._write, [(_UPSERT_RUN, rows)])

    def runs(
        self,
        limit: int = 50,
        status: str | Sequence[str] | None = None,
        after: tuple[int, str] | None = None,
        tenant: str | None = None,
    ) -> list[RunSummary]:
        """Run summaries, newest first (by start time, then run id descending),
        optionally only with one status (or any of several), only those after the key
        ``after`` (see :func:`run_key`): a page of a stable listing."""
        return self.traces(status=status, limit=limit, after=after, tenant=tenant)

    def run_ids(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[str]:
        """Ids of runs started in [since, until), in id order after ``after`` (paging)."""
        where = _Where()
        where.time("started_us", since, until)
        if after is not None:
            where.add("run_id > ?", after)
        sql = f"SELECT run_id FROM loom_trace_runs{where.sql()} ORDER BY run_id LIMIT ?"  # noqa: S608
        rows = self._call("run_ids", self._rows, sql, (*where.params, limit))
        return [row[0] for row in rows]

    # -- queries
    def traces(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        status: str | Sequence[str] | None = None,
        tool: str | None = None,
        model: str | None = None,
        error: str | None = None,
        limit: int = 50,
        after: tuple[int, str] | None = None,
        tenant: str | None = None,
    ) -> list[RunSummary]:
        """Runs newest first (by start, then run id descending), filtered: started in
        [since, until), with this status (or one of these), with a span naming ``tool``
        / ``model``, with a span whose ``error.type`` is ``error``; only those after the
        key ``after`` (:func:`run_key` of the last run of the previous page). The key
        is unique and never changes for a run, so pages neither repeat nor skip a run
        however many runs start meanwhile."""
        where = _Where()
        where.time("started_us", since, until)
        if tenant is not None:  # None: every tenant's (the platform)
            where.add("tenant = ?", tenant)
        if isinstance(status, str):
            where.add("status = ?", status)
        elif status is not None:
            statuses = list(dict.fromkeys(status))
            marks = ", ".join("?" for _ in statuses)
            where.add(f"status IN ({marks})", *statuses)
        if after is not None:
            where.add("(started_us, run_id) < (?, ?)", after[0], after[1])
        for column, value in (("tool", tool), ("model", model), ("error_type", error)):
            if value is not None:
                where.add(
                    f"run_id IN (SELECT run_id FROM loom_trace_spans WHERE {column} = ?)",  # noqa: S608 - a constant column
                    value[:_TEXT_MAX],
                )
        sql = (
            f"SELECT data FROM loom_trace_runs{where.sql()} "  # noqa: S608
            "ORDER BY started_us DESC, run_id DESC LIMIT ?"
        )
        rows = self._call("traces", self._read, sql, (*where.params, limit))
        return self._decode("traces", _run_decoder, rows)

    def slowest_steps(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        tool: str | None = None,
        limit: int = 10,
        tenant: str | None = None,
    ) -> list[SpanRecord]:
        """The ``limit`` longest ended step spans that started in [since, until),
        optionally only steps calling ``tool``; longest first."""
        where = _Where()
        where.add("category = ?", "step")
        where.add("dur_us IS NOT NULL")
        where.time("start_us", since, until)
        if tool is not None:
            where.add("tool = ?", tool[:_TEXT_MAX])
        if tenant is not None:
            where.add(_OF_TENANT, tenant)
        sql = (
            f"SELECT data FROM loom_trace_spans{where.sql()} "  # noqa: S608
            "ORDER BY dur_us DESC, span_id LIMIT ?"
        )
        rows = self._call("slowest_steps", self._read, sql, (*where.params, limit))
        return self._decode("slowest_steps", _span_decoder, rows)

    def usage(
        self,
        by: UsageKey = "tool",
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
        tenant: str | None = None,
    ) -> list[UsageRow]:
        """Ended tool and model calls (spans of category ``tool`` / ``model``) that
        started in [since, until), grouped by tool, model, run, or UTC time bucket:
        counts, errors, distinct runs, durations, and the sums of the spans'
        ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens`` and
        ``loom.cost_usd``. Buckets come oldest first, other groups by most calls."""
        key = USAGE_KEYS.get(by)
        if key is None:
            raise ValueError(f"usage: 'by' must be one of {', '.join(USAGE_KEYS)}, got {by!r}")
        where = _Where()
        where.add("category IN ('tool', 'model')")
        where.add("ended = 1")
        if by not in _BUCKETS:
            where.add(f"{key} IS NOT NULL")
        where.time("start_us", since, until)
        if tenant is not None:
            where.add(_OF_TENANT, tenant)
        order = "k" if by in _BUCKETS else "COUNT(*) DESC, k"
        sql = (
            f"SELECT {key} AS k, COUNT(*), "  # noqa: S608 - key is one of USAGE_KEYS
            "SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END), COUNT(DISTINCT run_id), "
            "SUM(dur_us), MAX(dur_us), SUM(input_tokens), SUM(output_tokens), SUM(cost_usd) "
            f"FROM loom_trace_spans{where.sql()} GROUP BY {key} ORDER BY {order} LIMIT ?"
        )
        rows = self._call("usage", self._rows, sql, (*where.params, limit))
        out = []
        for k, calls, errors, runs, total_us, max_us, tokens_in, tokens_out, cost in rows:
            calls = int(calls)
            total_ms = float(total_us or 0) / 1000.0
            out.append(
                UsageRow(
                    key=_from_us(int(k)).isoformat() if by in _BUCKETS else str(k),
                    calls=calls,
                    errors=int(errors or 0),
                    runs=int(runs or 0),
                    total_ms=total_ms,
                    avg_ms=total_ms / calls if calls else 0.0,
                    max_ms=float(max_us or 0) / 1000.0,
                    input_tokens=int(tokens_in or 0),
                    output_tokens=int(tokens_out or 0),
                    cost_usd=float(cost or 0.0),
                )
            )
        return out

    def run_tenant(self, run_id: str) -> str | None:
        """The tenant of a run the read model holds (None: it holds no such run)."""
        rows = self._call("run_tenant", self._rows, _RUN_TENANT, (run_id,))
        return str(rows[0][0]) if rows else None

    # -- events
    def record_events(self, run_id: str, records: Sequence[EventRecord]) -> None:
        """Keep these events of ``run_id``; ones already kept (same seq) are ignored."""
        rows = _event_rows(run_id, records)
        if rows:
            self._call("record_events", self._write, [(_INSERT_EVENT, rows)])

    def events(self, run_id: str) -> list[EventRecord]:
        """The run's kept events in seq order (upcast to the current schema)."""
        rows = self._call("events", self._read, _EVENTS, (run_id,))
        try:
            return [codec.decode_event(bytes(row)) for row in rows]
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as exc:
            raise self._undecodable("events", "event", exc) from exc

    # -- all at once
    def save(
        self,
        run_id: str,
        records: Sequence[EventRecord],
        spans: Sequence[SpanRecord],
        summary: RunSummary | None = None,
    ) -> None:
        """``record_events`` + ``upsert`` + ``upsert_run`` in ONE transaction. Prefer it
        when folding: kept events and the spans derived from them can then never
        disagree after a crash (events kept but their span changes lost would leave
        stale spans that a refold does not re-report)."""
        batches: list[tuple[str, Sequence[tuple[Any, ...]]]] = []
        if event_rows := _event_rows(run_id, records):
            batches.append((_INSERT_EVENT, event_rows))
        if span_rows := _span_rows(spans):
            batches.append((_UPSERT_SPAN, span_rows))
        if summary is not None:
            batches.append((_UPSERT_RUN, [_run_row(summary)]))
        if batches:
            self._call("save", self._write, batches)

    # -- lifecycle
    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close()

    def __enter__(self) -> SpanStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers
    def _call(self, operation: str, fn: Any, *args: Any) -> Any:
        with self._lock:
            if self._closed:
                raise StoreError(
                    f"{operation}: this {type(self).__name__} is closed; open a new one",
                    operation=operation,
                    backend=self.backend,
                )
            with self._translated(operation):
                return fn(*args)

    @abstractmethod
    def _translated(self, operation: str) -> AbstractContextManager[None]:
        """Turns the engine's exceptions into StoreError."""

    def _decode(
        self, operation: str, decoder: msgspec.json.Decoder[Any], rows: list[bytes]
    ) -> list[Any]:
        try:
            return [decoder.decode(row) for row in rows]
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise self._undecodable(operation, "record", exc) from exc

    def _undecodable(self, operation: str, what: str, exc: Exception) -> StoreError:
        return StoreError(
            f"{operation}: a stored {what} cannot be decoded ({exc}); it was written by an "
            "incompatible version — the trace store is derived data: delete it and let the "
            "tracing service rebuild it from the runs' events",
            operation=operation,
            backend=self.backend,
        )


def _migrate(
    columns: set[str],
    execute: Callable[[str, Sequence[Any]], Any],
    query: Callable[[str, Sequence[Any]], list[tuple[Any, ...]]],
) -> None:
    """Add the columns a store written by an older version lacks and fill the derived
    ones from each row's JSON (they are all functions of it)."""
    missing = [(name, sql_type) for name, sql_type in _EXTRA_COLUMNS if name not in columns]
    if not missing:
        return
    for name, sql_type in missing:
        execute(f"ALTER TABLE loom_trace_spans ADD COLUMN {name} {sql_type}", ())
    for span_id, data in query("SELECT span_id, data FROM loom_trace_spans", ()):
        span = _span_decoder.decode(bytes(data))
        execute(_BACKFILL, (*_span_columns(span), span_id))


def _text(value: Any) -> str | None:
    return value[:_TEXT_MAX] if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    return float(value) if isinstance(value, int | float) else None


def _span_columns(s: SpanRecord) -> tuple[Any, ...]:
    """The derived columns of a span, in ``_DERIVED`` order."""
    attrs = s.attributes
    end_us = _us(s.end) if s.end is not None else None
    return (
        span_category(s),
        s.name[:_TEXT_MAX],
        s.status,
        end_us,
        end_us - _us(s.start) if end_us is not None else None,
        _text(attrs.get("gen_ai.tool.name")) or _text(attrs.get("loom.step.tool")),
        _text(attrs.get("gen_ai.request.model")),
        _text(attrs.get("error.type")),
        _int(attrs.get("gen_ai.usage.input_tokens")),
        _int(attrs.get("gen_ai.usage.output_tokens")),
        _float(attrs.get("loom.cost_usd")),
    )


def _span_rows(spans: Sequence[SpanRecord]) -> list[tuple[Any, ...]]:
    latest = {s.span_id: s for s in spans}  # last version wins within a batch
    return [
        (
            s.span_id,
            s.run_id,
            s.trace_id,
            _us(s.start),
            int(s.end is not None),
            codec.encode(s),
            *_span_columns(s),
        )
        for s in latest.values()
    ]


def _event_rows(run_id: str, records: Sequence[EventRecord]) -> list[tuple[Any, ...]]:
    for r in records:
        if r.run_id != run_id:
            raise ValueError(
                f"events of run {run_id!r} were given event {r.event_id} of another run; "
                "group events by run before recording them"
            )
    return [(r.run_id, r.seq, codec.encode(r)) for r in records]


def _run_row(summary: RunSummary) -> tuple[Any, ...]:
    return (
        summary.run_id, summary.status, _us(summary.started_at), codec.encode(summary),
        summary.tenant,
    )  # fmt: skip


# ----------------------------------------------------------------------------- SQLite


class SQLiteSpanStore(SpanStore):
    backend = "sqlite"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        with self._translated("open"):
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one call is one
            # transaction and nothing is left open between calls.
            self._conn = sqlite3.connect(
                self.path,
                timeout=SQLITE_BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                # Derived data: NORMAL in WAL survives a process crash; a power loss can
                # drop the last commits, which the service rebuilds from events.
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.executescript(_TABLES.format(blob="BLOB"))
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    columns = {
                        row[1] for row in self._conn.execute("PRAGMA table_info(loom_trace_spans)")
                    }
                    _migrate(columns, self._conn.execute, self._query)
                    run_columns = {
                        row[1] for row in self._conn.execute("PRAGMA table_info(loom_trace_runs)")
                    }
                    if "tenant" not in run_columns:
                        self._conn.execute(_ADD_RUN_TENANT)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
                self._conn.executescript(_INDEXES)
            except BaseException:
                self._conn.close()
                raise

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    def _write(self, batches: Sequence[tuple[str, Sequence[tuple[Any, ...]]]]) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in batches:
                conn.executemany(sql, rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, tuple(params)).fetchall()

    def _close(self) -> None:
        self._conn.close()

    @contextmanager
    def _translated(self, operation: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            retryable = isinstance(exc, sqlite3.OperationalError)
            raise StoreError(
                f"{operation} failed on sqlite ({self.path}): {type(exc).__name__}: {exc}"
                + (
                    " (the database is locked or unavailable; retry later)"
                    if retryable
                    else " (check LOOM_DATA_DIR and the file's permissions)"
                ),
                operation=operation,
                backend="sqlite",
                retryable=retryable,
            ) from exc


# ----------------------------------------------------------------------------- PostgreSQL

_PG_COLUMNS = (
    "SELECT column_name FROM information_schema.columns "
    "WHERE table_schema = current_schema() AND table_name = 'loom_trace_spans'"
)
_PG_RUN_COLUMNS = _PG_COLUMNS.replace("loom_trace_spans", "loom_trace_runs")


class PostgresSpanStore(SpanStore):
    backend = "postgres"

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url
        with self._translated("open"):
            self._conn = self._connect()
            try:
                with self._conn.transaction():
                    # Two services starting on a fresh database would race on CREATE
                    # TABLE IF NOT EXISTS (a unique violation in pg_type): serialise.
                    self._conn.execute("SELECT pg_advisory_xact_lock(hashtext('loom_trace'))")
                    for statement in _TABLES.format(blob="BYTEA").split(";"):
                        if statement.strip():
                            self._conn.execute(statement)
                    columns = {row[0] for row in self._conn.execute(_PG_COLUMNS).fetchall()}
                    _migrate(columns, self._execute, self._query)
                    run_columns = {row[0] for row in self._conn.execute(_PG_RUN_COLUMNS)}
                    if "tenant" not in run_columns:
                        self._conn.execute(_ADD_RUN_TENANT)
                    for statement in _INDEXES.split(";"):
                        if statement.strip():
                            self._conn.execute(statement)
            except BaseException:
                self._conn.close()
                raise

    def _execute(self, sql: str, params: Sequence[Any]) -> None:
        self._conn.execute(_pg(sql), tuple(params))

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._conn.execute(_pg(sql), tuple(params)).fetchall()

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg

        return psycopg.connect(self._url, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S)

    def _with_reconnect(self, fn: Any) -> Any:
        import psycopg

        try:
            return fn()
        except psycopg.OperationalError:
            if not self._conn.closed and not self._conn.broken:
                raise
            # The server restarted or the connection dropped: reopen once and retry
            # (every operation here is idempotent).
            self._conn.close()
            self._conn = self._connect()
            return fn()

    def _write(self, batches: Sequence[tuple[str, Sequence[tuple[Any, ...]]]]) -> None:
        def run() -> None:
            with self._conn.transaction(), self._conn.cursor() as cur:
                for sql, rows in batches:
                    cur.executemany(_pg(sql), rows)

        self._with_reconnect(run)

    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        def run() -> list[tuple[Any, ...]]:
            return self._conn.execute(_pg(sql), tuple(params)).fetchall()

        return self._with_reconnect(run)

    def _close(self) -> None:
        self._conn.close()

    @contextmanager
    def _translated(self, operation: str) -> Iterator[None]:
        import psycopg

        try:
            yield
        except psycopg.Error as exc:
            retryable = isinstance(exc, psycopg.OperationalError)
            message = str(exc)
            password = _password_of(self._url)
            if password:
                message = message.replace(password, "***")
            raise StoreError(
                f"{operation} failed on PostgreSQL at {redact_url(self._url)!r}: "
                f"{type(exc).__name__}: {message}"
                + (
                    " (the server is unavailable or overloaded; retry later)"
                    if retryable
                    else " (check LOOM_POSTGRES_URL and the database's state)"
                ),
                operation=operation,
                backend="postgres",
                retryable=retryable,
            ) from None


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


def _password_of(url: str) -> str | None:
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


# ----------------------------------------------------------------------------- opening


def open_span_store(settings: StoreSettings) -> SpanStore:
    """The span store the settings name: ``data_dir/traces.db`` for SQLite, the
    ``loom_trace_*`` tables of ``postgres_url`` for PostgreSQL."""
    if settings.kind == "sqlite":
        data_dir = Path(settings.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        return SQLiteSpanStore(data_dir / SQLITE_FILE)
    if settings.kind == "postgres":
        if not settings.postgres_url:
            raise ValueError(
                "LOOM_POSTGRES_URL is required when LOOM_STORE=postgres "
                "(postgresql://user:password@host:port/dbname)"
            )
        return PostgresSpanStore(settings.postgres_url)
    raise ValueError(f"LOOM_STORE must be 'sqlite' or 'postgres', got {settings.kind!r}")
