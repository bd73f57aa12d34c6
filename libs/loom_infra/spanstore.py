"""Where the tracing service keeps what it derived: spans, run summaries, and the events
it folded them from.

Design note
- One interface (:class:`SpanStore`), two engines: SQLite (``data_dir/traces.db``, WAL)
  and PostgreSQL (tables ``loom_trace_spans``, ``loom_trace_runs``,
  ``loom_trace_events``). The SQL is shared; only placeholders, the blob type and the
  connection handling differ.
- Rows hold the record as msgspec JSON (``data``) plus the columns queries filter and
  sort on. Times are integer microseconds since the epoch (UTC), so ordering never
  depends on how an engine compares time zones.
- Export bookkeeping: a span row has ``exported`` = 0 until :meth:`SpanStore.mark_exported`;
  an upsert that changes the stored JSON sets it back to 0 (an upsert with identical JSON
  changes nothing), so every *version* of a span gets exported at least once and a failed
  OTLP export is simply retried from :meth:`SpanStore.unexported` later. Open spans (no
  end) are never offered for export: OTLP has no way to update a span once sent.
- Marking is compare-and-set when given records: ``mark_exported(batch)`` marks a span
  only if its stored version is still the one that was exported, so a change that lands
  between ``unexported()`` and ``mark_exported()`` is not lost.
- Events: kept idempotently by (run_id, seq), so after a restart a run can be refolded.
- Synchronous (sqlite3 / psycopg 3); one connection per store guarded by a lock, so a
  store may be shared by threads (async callers use ``asyncio.to_thread``). Engine errors
  become ``loom_infra.store.StoreError`` with ``retryable``. A lost PostgreSQL connection
  is reopened once and the call retried: every write here is idempotent.
"""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from loom_core import codec
from loom_core.contracts import EventRecord, RunSummary, SpanRecord
from loom_infra.settings import StoreSettings, redact_url
from loom_infra.store import StoreError

if TYPE_CHECKING:
    import psycopg

__all__ = [
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

_span_decoder = msgspec.json.Decoder(SpanRecord)
_run_decoder = msgspec.json.Decoder(RunSummary)


def _us(value: datetime | None) -> int:
    """Microseconds since the epoch; naive times are taken as UTC; None (a run whose
    start is unknown) is 0 so it sorts after every real run in "newest first"."""
    if value is None:
        return 0
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _US


# ----------------------------------------------------------------------------- SQL
# Written with "?" placeholders; the PostgreSQL store rewrites them to "%s".

_SCHEMA = """
CREATE TABLE IF NOT EXISTS loom_trace_spans (
    span_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    start_us BIGINT NOT NULL,
    ended INTEGER NOT NULL,
    exported INTEGER NOT NULL DEFAULT 0,
    data {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS loom_trace_spans_run ON loom_trace_spans (run_id, start_us, span_id);
CREATE INDEX IF NOT EXISTS loom_trace_spans_trace ON loom_trace_spans (trace_id);
CREATE INDEX IF NOT EXISTS loom_trace_spans_unexported ON loom_trace_spans (start_us, span_id)
    WHERE exported = 0 AND ended = 1;
CREATE TABLE IF NOT EXISTS loom_trace_runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    started_us BIGINT NOT NULL,
    data {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS loom_trace_runs_started ON loom_trace_runs (started_us, run_id);
CREATE INDEX IF NOT EXISTS loom_trace_runs_status
    ON loom_trace_runs (status, started_us, run_id);
CREATE TABLE IF NOT EXISTS loom_trace_events (
    run_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    data {blob} NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""

_UPSERT_SPAN = """
INSERT INTO loom_trace_spans (span_id, run_id, trace_id, start_us, ended, exported, data)
VALUES (?, ?, ?, ?, ?, 0, ?)
ON CONFLICT (span_id) DO UPDATE SET
    run_id = excluded.run_id, trace_id = excluded.trace_id, start_us = excluded.start_us,
    ended = excluded.ended, exported = 0, data = excluded.data
WHERE loom_trace_spans.data <> excluded.data
"""

_UPSERT_RUN = """
INSERT INTO loom_trace_runs (run_id, status, started_us, data) VALUES (?, ?, ?, ?)
ON CONFLICT (run_id) DO UPDATE SET
    status = excluded.status, started_us = excluded.started_us, data = excluded.data
"""

_INSERT_EVENT = """
INSERT INTO loom_trace_events (run_id, seq, data) VALUES (?, ?, ?)
ON CONFLICT (run_id, seq) DO NOTHING
"""

_TRACE = "SELECT data FROM loom_trace_spans WHERE run_id = ? ORDER BY start_us, span_id"
_RUNS = "SELECT data FROM loom_trace_runs ORDER BY started_us DESC, run_id DESC LIMIT ?"
_RUNS_BY_STATUS = (
    "SELECT data FROM loom_trace_runs WHERE status = ? "
    "ORDER BY started_us DESC, run_id DESC LIMIT ?"
)
_EVENTS = "SELECT data FROM loom_trace_events WHERE run_id = ? ORDER BY seq"
_UNEXPORTED = (
    "SELECT data FROM loom_trace_spans WHERE exported = 0 AND ended = 1 "
    "ORDER BY start_us, span_id LIMIT ?"
)
_MARK = "UPDATE loom_trace_spans SET exported = 1 WHERE span_id = ?"
_MARK_IF_SAME = "UPDATE loom_trace_spans SET exported = 1 WHERE span_id = ? AND data = ?"


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
    def _read(self, sql: str, params: tuple[Any, ...]) -> list[bytes]:
        """The first column of every row of a query."""

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

    def unexported(self, limit: int = 512) -> list[SpanRecord]:
        """Ended spans whose current version has not been marked exported, oldest first."""
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

    # -- runs
    def upsert_run(self, summary: RunSummary) -> None:
        self._call("upsert_run", self._write, [(_UPSERT_RUN, [_run_row(summary)])])

    def runs(self, limit: int = 50, status: str | None = None) -> list[RunSummary]:
        """Run summaries, newest first (by start time), optionally only one status."""
        if status is None:
            rows = self._call("runs", self._read, _RUNS, (limit,))
        else:
            rows = self._call("runs", self._read, _RUNS_BY_STATUS, (status, limit))
        return self._decode("runs", _run_decoder, rows)

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


def _span_rows(spans: Sequence[SpanRecord]) -> list[tuple[Any, ...]]:
    latest = {s.span_id: s for s in spans}  # last version wins within a batch
    return [
        (s.span_id, s.run_id, s.trace_id, _us(s.start), int(s.end is not None), codec.encode(s))
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
    return (summary.run_id, summary.status, _us(summary.started_at), codec.encode(summary))


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
                self._conn.executescript(_SCHEMA.format(blob="BLOB"))
            except BaseException:
                self._conn.close()
                raise

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

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[bytes]:
        return [row[0] for row in self._conn.execute(sql, params)]

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
                    for statement in _SCHEMA.format(blob="BYTEA").split(";"):
                        if statement.strip():
                            self._conn.execute(statement)
            except BaseException:
                self._conn.close()
                raise

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

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[bytes]:
        def run() -> list[bytes]:
            return [row[0] for row in self._conn.execute(_pg(sql), params).fetchall()]

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
