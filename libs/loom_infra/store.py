"""Storage adapters on the ``eventsourcing`` library: SQLite (embedded) and PostgreSQL.

Design note
- Three purposes, three stores, each opened on its own so a service opens only what it
  uses: run events (:class:`EventStore`, written only by the executor), tool-call claims
  (:class:`ToolCallLedger`, tool-runner) and memory threads (:class:`ThreadStore`, memory).
- SQLite: one database file per purpose under ``data_dir`` (``events.db``,
  ``toolcalls.db``, ``memory.db``) so separate OS processes never contend for one file's
  write lock. The library switches file databases to WAL itself; we give every
  connection a busy timeout (``SQLITE_LOCK_TIMEOUT_S``) so a writer in another process
  makes us wait, not fail. Never ``VACUUM`` ``events.db``: its notification ids are
  SQLite's implicit rowids, which VACUUM may renumber.
- PostgreSQL: one database, distinct tables (``loom_events`` + ``loom_events_tracking``,
  ``loom_toolcalls``, ``loom_threads``). The library takes an EXCLUSIVE lock on
  ``loom_events`` per append so notification ids are issued in commit order: a reader
  tailing ``read_notifications`` never passes a row that commits later with a lower id.
  Ids are strictly increasing but may have holes after a failed append (a sequence is not
  transactional), so readers page with "ids > last seen", never by counting.
- Originator ids are text (run ids, idempotency keys and thread ids are strings).
- The unique (originator_id, version) key is the only lock we need: a run's ``seq`` is
  its version (optimistic concurrency, ``ConcurrencyConflict``), a ledger claim is
  "insert version 1", and a thread entry's idempotency marker is "insert version 1 of a
  marker stream" in the same statement as the entry itself.
- ``eventsourcing`` is synchronous, so these classes are too; async callers use
  ``asyncio.to_thread``. Library exceptions never leave this module: they become
  :class:`StoreError` (with ``retryable``) or :class:`ConcurrencyConflict`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from eventsourcing.domain import EventSourcingError
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    ConnectionPoolClosedError,
    ConnectionUnavailableError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    StoredEvent,
    Tracking,
    TrackingRecorder,
)
from eventsourcing.sqlite import (
    SQLiteAggregateRecorder,
    SQLiteApplicationRecorder,
    SQLiteDatastore,
    SQLiteTrackingRecorder,
)

from loom_core import codec
from loom_core.contracts import EventRecord, ThreadEntry
from loom_core.errors import LoomError
from loom_infra.settings import StoreSettings, redact_url
from loom_infra.walcheckpoint import WalCheckpointer

if TYPE_CHECKING:
    from eventsourcing.postgres import PostgresDatastore

__all__ = [
    "ConcurrencyConflict",
    "EventStore",
    "LedgerEntry",
    "StoreError",
    "Stores",
    "ThreadStore",
    "ToolCallLedger",
    "open_event_store",
    "open_stores",
    "open_thread_store",
    "open_tool_ledger",
]

# Seconds a SQLite connection waits for another process's write lock (busy timeout),
# and that a thread waits for the in-process writer connection.
SQLITE_LOCK_TIMEOUT_S = 30
# PostgreSQL: wait for a pooled connection / a table lock; kill sessions idle in a
# transaction (a stuck holder of the events-table lock would stall every executor).
PG_CONNECT_TIMEOUT_S = 10
PG_LOCK_TIMEOUT_S = 5
PG_IDLE_IN_TRANSACTION_TIMEOUT_S = 10
PG_POOL_SIZE = 2
PG_MAX_OVERFLOW = 8

EVENTS_TABLE = "loom_events"
EVENTS_TRACKING_TABLE = "loom_events_tracking"
TOOLCALLS_TABLE = "loom_toolcalls"
THREADS_TABLE = "loom_threads"
SNAPSHOTS_TABLE = "loom_snapshots"
SQLITE_FILES = {
    "events": "events.db",
    "toolcalls": "toolcalls.db",
    "threads": "memory.db",
    "snapshots": "snapshots.db",
}
# snapshots.db holds only a cache of the fold (issue 10):
# - 16 KB pages: a snapshot is one blob of 0.1-10 MB, and SQLite handles a quarter of the
#   pages it would in 4 KB ones (a 300 KB save: ~0.6 ms of CPU against ~1.0);
# - its commits need no fsync (``synchronous=NORMAL``, see ``_on_every_connection``);
# - a checkpoint every 256 pages: the 4 MB of log between two, as with 4 KB pages.
SQLITE_PAGE_SIZES = {"snapshots": 16384}
SQLITE_PRAGMAS = {"snapshots": ("PRAGMA synchronous=NORMAL", "PRAGMA wal_autocheckpoint=256")}

# Marker streams that make ThreadStore.append idempotent live in the threads table;
# thread ids may not start with this prefix.
_MARKER_PREFIX = "~seen~"
_THREAD_APPEND_ATTEMPTS = 1000
_RESERVED_TRACKING_NAME = "__migration__"  # used by the library itself

Backend = Literal["sqlite", "postgres"]


# --------------------------------------------------------------------------- errors


class StoreError(LoomError):
    """A storage operation failed. ``retryable`` is True when trying again later may
    succeed (database unavailable, lock timeout, connection lost)."""

    code = "store_error"

    def __init__(
        self, message: str, *, operation: str, backend: str, retryable: bool = False
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.backend = backend
        self.retryable = retryable


class ConcurrencyConflict(StoreError):
    """Some (run_id, seq) of an append already exists: another writer got there first, or
    this batch was stored before. Nothing of the batch was stored. ``run_ids`` are the
    runs whose positions were taken; reload them before deciding again."""

    def __init__(self, run_ids: Sequence[str], *, backend: str) -> None:
        self.run_ids = tuple(run_ids)
        super().__init__(
            f"events already stored at these positions for run(s) {', '.join(self.run_ids)}: "
            "another writer appended first (only one executor may own a run) or the batch "
            "was already stored; nothing of this batch was stored — reload the runs' "
            "streams and decide again",
            operation="append",
            backend=backend,
            retryable=False,
        )


def _is_library_error(exc: BaseException) -> bool:
    if isinstance(exc, EventSourcingError | sqlite3.Error | OSError):
        return True
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.Error)


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | InterfaceError | TimeoutError | sqlite3.OperationalError):
        return True
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.OperationalError)


@contextmanager
def _translated(operation: str, backend: str) -> Iterator[None]:
    """Turn library exceptions into StoreError; let ours (and programming errors) through."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        if not _is_library_error(exc):
            raise
        retryable = _is_retryable(exc)
        hint = (
            "the database is unavailable, locked or overloaded; retry later"
            if retryable
            else "check the store settings (LOOM_STORE, LOOM_DATA_DIR, LOOM_POSTGRES_URL) "
            "and the database's state"
        )
        raise StoreError(
            f"{operation} failed on {backend}: {type(exc).__name__}: {exc} ({hint})",
            operation=operation,
            backend=backend,
            retryable=retryable,
        ) from exc


def _decode_error(operation: str, backend: str, what: str, exc: Exception) -> StoreError:
    return StoreError(
        f"{operation}: stored {what} cannot be decoded ({exc}); it was written by an "
        "incompatible version — add an upcaster in loom_core.codec",
        operation=operation,
        backend=backend,
    )


# --------------------------------------------------------------------------- opening


class _Closable:
    def __init__(self, backend: Backend, close: Callable[[], None]) -> None:
        self._backend: Backend = backend
        self._close = close
        self._closed = False

    @property
    def backend(self) -> Backend:
        return self._backend

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise StoreError(
                f"{operation}: this {type(self).__name__} is closed; open a new one",
                operation=operation,
                backend=self._backend,
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SCHEMA_LOCK = 0x6C6F6F6D  # "loom": the advisory lock key held while tables are created
SCHEMA_LOCK_WAIT_S = 60


def _create_tables(recorder: Any, *extra: Any) -> None:
    """Create ``recorder``'s tables (if missing), then run ``extra`` statements (SQL,
    idempotent: ``CREATE OR REPLACE``) under the same schema lock."""
    # PostgreSQL: several executors starting at once on an empty database would each run
    # the library's CREATE TYPE / CREATE TABLE statements, and the catalog refuses the
    # concurrent ones ("tuple concurrently updated", not a unique violation): one start
    # failed. A session advisory lock, on a connection of its own (the library runs its
    # statements over its pool, in several transactions), makes them take turns; the
    # later ones find everything in place. Closing that connection releases the lock
    # whatever happens. SQLite: two processes opening a fresh file can both try to
    # create a table or the tracking migration row; the loser sees a unique violation,
    # and a second attempt finds everything in place.
    with _schema_lock(recorder):
        for attempt in range(3):
            try:
                recorder.create_table()
                break
            except IntegrityError:
                if attempt == 2:
                    raise
        if extra:
            with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
                for statement in extra:
                    curs.execute(statement)


@contextmanager
def _schema_lock(recorder: Any) -> Iterator[None]:
    pool = getattr(getattr(recorder, "datastore", None), "pool", None)
    if pool is None or not hasattr(pool, "kwargs"):  # SQLite: its own file lock serializes
        yield
        return
    import psycopg

    with psycopg.connect(**{"connect_timeout": PG_CONNECT_TIMEOUT_S, **_pg_params(pool)},
                         autocommit=True) as conn:  # fmt: skip
        # bounded: a holder stuck for a minute ends this start with the server's error
        conn.execute(f"SET lock_timeout = '{SCHEMA_LOCK_WAIT_S}s'")
        conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        try:
            yield
        finally:
            with suppress(psycopg.Error):  # closing the connection releases it too
                conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))


def _ensure_wal(path: Path, page_size: int | None = None) -> None:
    """Switch a database file to WAL before eventsourcing opens it. The switch needs an
    exclusive lock that SQLite's busy timeout does not cover, so two processes opening a
    new file at once would see "database is locked" inside the library's pool (which
    then stays wedged); here the loser just retries (bounded: start-up only). WAL mode
    is stored in the file, so the library then finds it already set. ``page_size``
    applies to a new file only (a WAL file keeps the size it was made with)."""
    for attempt in range(1, 51):
        try:
            with closing(sqlite3.connect(path, timeout=10)) as conn:
                if page_size is not None:
                    conn.execute(f"PRAGMA page_size={int(page_size)}")
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 50:
                raise
            time.sleep(0.02 * min(attempt, 10))


def _sqlite_datastore(settings: StoreSettings, purpose: str) -> SQLiteDatastore:
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    _ensure_wal(data_dir / SQLITE_FILES[purpose], SQLITE_PAGE_SIZES.get(purpose))
    datastore = SQLiteDatastore(
        str(data_dir / SQLITE_FILES[purpose]),
        lock_timeout=SQLITE_LOCK_TIMEOUT_S,
        pool_timeout=float(SQLITE_LOCK_TIMEOUT_S),
        originator_id_type="text",
    )
    pragmas = SQLITE_PRAGMAS.get(purpose)
    if pragmas:
        _on_every_connection(datastore, pragmas)
    return datastore


def _on_every_connection(datastore: SQLiteDatastore, pragmas: tuple[str, ...]) -> None:
    """Run ``pragmas`` on each connection ``datastore``'s pool makes (they are settings of
    a connection, not of the file).

    ``synchronous=NORMAL`` is for a cache only: in WAL mode a commit then writes the log
    without an fsync (the log is synced at checkpoints), and a power loss may lose the
    newest commits but never leaves the file inconsistent. A snapshot is taken after
    the events it folds are durable, so losing one costs a longer fold, never a fact
    (issue 10: a 300 KB snapshot's fsync, every 200 steps of a long run, queued the next
    append's fsync behind it on the same disk)."""
    pool = datastore.pool
    create = pool._create_connection

    def create_set() -> Any:
        connection = create()
        for pragma in pragmas:
            connection._sqlite_conn.execute(pragma)
        return connection

    pool._create_connection = create_set  # type: ignore[method-assign]  # one pool's connections, not the class's


def _postgres_datastore(settings: StoreSettings) -> PostgresDatastore:
    import psycopg
    from eventsourcing.postgres import PostgresDatastore
    from psycopg.conninfo import conninfo_to_dict

    url = settings.postgres_url or ""
    try:
        params: dict[str, Any] = dict(conninfo_to_dict(url))
    except psycopg.Error as exc:
        message = str(exc)
        password = _password_of(url)
        if password:
            message = message.replace(password, "***")
        raise StoreError(
            f"LOOM_POSTGRES_URL {redact_url(url)!r} is not a valid PostgreSQL URI: {message}. "
            "Use postgresql://user:password@host:port/dbname (see loom_infra.settings)",
            operation="open",
            backend="postgres",
        ) from None

    # Connect once up front: a wrong host, database or password fails here at once with
    # the server's own message, instead of as a pool timeout on the first query.
    try:
        psycopg.connect(**{"connect_timeout": PG_CONNECT_TIMEOUT_S, **params}).close()
    except psycopg.Error as exc:
        raise StoreError(
            f"cannot connect to PostgreSQL at {redact_url(url)!r}: {exc}".strip()
            + " — check LOOM_POSTGRES_URL and that the server is running",
            operation="open",
            backend="postgres",
            retryable=isinstance(exc, psycopg.OperationalError),
        ) from None

    named = {key: params.pop(key, None) for key in ("dbname", "host", "port", "user", "password")}
    datastore = PostgresDatastore(
        dbname=named["dbname"],
        host=named["host"],
        port=named["port"],
        user=named["user"],
        password=named["password"],
        connect_timeout=PG_CONNECT_TIMEOUT_S,
        idle_in_transaction_session_timeout=PG_IDLE_IN_TRANSACTION_TIMEOUT_S,
        pool_size=PG_POOL_SIZE,
        max_overflow=PG_MAX_OVERFLOW,
        lock_timeout=PG_LOCK_TIMEOUT_S,
        originator_id_type="text",
    )
    # Extra libpq parameters of the URL (sslmode, application_name, ...): the library's
    # constructor only takes the five above; its pool has not connected yet.
    kwargs = datastore.pool.kwargs
    if params and isinstance(kwargs, dict):
        kwargs.update(params)
    return datastore


def _password_of(url: str) -> str | None:
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


@contextmanager
def _closing_on_error(datastore: Any) -> Iterator[None]:
    """Close ``datastore`` (anything with ``close()``) if the block raises."""
    try:
        yield
    except BaseException:
        datastore.close()
        raise


def open_event_store(settings: StoreSettings) -> EventStore:
    """Open (creating tables if needed) the run-event store."""
    with _translated("open event store", settings.kind):
        if settings.kind == "sqlite":
            sqlite_ds = _sqlite_datastore(settings, "events")
            # the executor commits on its event loop: WAL checkpoints go to a thread
            with _closing_on_error(sqlite_ds):
                checkpointer = WalCheckpointer(sqlite_ds.pool.db_name)
                checkpointer.take_over(sqlite_ds.pool)

            def close() -> None:
                checkpointer.close()
                close_held_writer(sqlite_ds.pool)
                sqlite_ds.close()

            with _closing_on_error(_Closer(close)):
                app: ApplicationRecorder = SQLiteApplicationRecorder(
                    sqlite_ds, events_table_name=EVENTS_TABLE
                )
                tracking: TrackingRecorder = SQLiteTrackingRecorder(sqlite_ds)
                _create_tables(app)
                _create_tables(tracking)
            return EventStore(
                app, tracking, backend="sqlite", close=close, checkpointer=checkpointer
            )

        from eventsourcing.postgres import PostgresApplicationRecorder, PostgresTrackingRecorder

        pg_ds = _postgres_datastore(settings)
        with _closing_on_error(pg_ds):
            app = PostgresApplicationRecorder(pg_ds, events_table_name=EVENTS_TABLE)
            tracking = PostgresTrackingRecorder(pg_ds, tracking_table_name=EVENTS_TRACKING_TABLE)
            _create_tables(app, _pg_append_function(app))
            _create_tables(tracking)
        return EventStore(app, tracking, backend="postgres", close=pg_ds.close)


def _open_aggregate_recorder(
    settings: StoreSettings, purpose: str, table: str
) -> tuple[AggregateRecorder, Callable[[], None]]:
    if settings.kind == "sqlite":
        sqlite_ds = _sqlite_datastore(settings, purpose)
        with _closing_on_error(sqlite_ds):
            recorder: AggregateRecorder = SQLiteAggregateRecorder(
                sqlite_ds, events_table_name=table
            )
            _create_tables(recorder)
        return recorder, sqlite_ds.close

    from eventsourcing.postgres import PostgresAggregateRecorder

    pg_ds = _postgres_datastore(settings)
    with _closing_on_error(pg_ds):
        recorder = PostgresAggregateRecorder(pg_ds, events_table_name=table)
        _create_tables(recorder)
    return recorder, pg_ds.close


@dataclass(frozen=True)
class _Closer:
    close: Callable[[], None]


def open_snapshot_store(settings: StoreSettings) -> SnapshotStore:
    """Open (creating tables if needed) the run-state snapshots."""
    with _translated("open snapshot store", settings.kind):
        recorder, close = _open_aggregate_recorder(settings, "snapshots", SNAPSHOTS_TABLE)
        with _closing_on_error(_Closer(close)):
            if settings.kind == "postgres":
                _vacuum_like_any_table(recorder)
        return SnapshotStore(
            recorder, backend=settings.kind, close=close, keep=settings.snapshots_kept
        )


def _vacuum_like_any_table(recorder: Any) -> None:
    """The library creates its tables with autovacuum all but off (a threshold of 100M
    dead rows: an event table never deletes). Snapshots are deleted on every save, so
    without vacuum their space (TOAST chunks) would never be reused and the table would
    grow with history after all. The table holds a few rows per run: vacuum it as soon
    as a few are dead (its TOAST table, where the bodies are, inherits the settings)."""
    from psycopg.sql import SQL, Identifier

    schema = recorder.datastore.schema
    table = SQL("{}.{}").format(Identifier(schema), Identifier(SNAPSHOTS_TABLE))
    wanted = {"autovacuum_vacuum_threshold=10", "autovacuum_vacuum_scale_factor=0"}
    with recorder.datastore.transaction(commit=True) as curs:
        curs.execute(
            "SELECT c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            (schema, SNAPSHOTS_TABLE),
        )
        row = curs.fetchone()
        if not wanted <= set((row["reloptions"] if row else None) or []):
            curs.execute(  # only when needed: ALTER TABLE takes a lock
                SQL(
                    "ALTER TABLE {} SET (autovacuum_vacuum_threshold = 10, "
                    "autovacuum_vacuum_scale_factor = 0)"
                ).format(table)
            )


def open_tool_ledger(settings: StoreSettings) -> ToolCallLedger:
    """Open (creating tables if needed) the tool-call ledger."""
    with _translated("open tool ledger", settings.kind):
        recorder, close = _open_aggregate_recorder(settings, "toolcalls", TOOLCALLS_TABLE)
        return ToolCallLedger(recorder, backend=settings.kind, close=close)


def open_thread_store(settings: StoreSettings) -> ThreadStore:
    """Open (creating tables if needed) the memory-thread store."""
    with _translated("open thread store", settings.kind):
        recorder, close = _open_aggregate_recorder(settings, "threads", THREADS_TABLE)
        return ThreadStore(recorder, backend=settings.kind, close=close)


class Stores:
    """The three stores, each opened on first use (a service opens only what it uses)."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._events: EventStore | None = None
        self._toolcalls: ToolCallLedger | None = None
        self._threads: ThreadStore | None = None

    @property
    def events(self) -> EventStore:
        with self._lock:
            if self._events is None:
                self._events = open_event_store(self.settings)
            return self._events

    @property
    def toolcalls(self) -> ToolCallLedger:
        with self._lock:
            if self._toolcalls is None:
                self._toolcalls = open_tool_ledger(self.settings)
            return self._toolcalls

    @property
    def threads(self) -> ThreadStore:
        with self._lock:
            if self._threads is None:
                self._threads = open_thread_store(self.settings)
            return self._threads

    def close(self) -> None:
        with self._lock:
            opened = [s for s in (self._events, self._toolcalls, self._threads) if s is not None]
            self._events = self._toolcalls = self._threads = None
        for store in opened:
            store.close()

    def __enter__(self) -> Stores:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_stores(settings: StoreSettings) -> Stores:
    return Stores(settings)


# --------------------------------------------------------------------------- events


def _insert_events(recorder: Any, stored: list[StoredEvent]) -> Sequence[int] | None:
    """Insert with the recorder's own table lock, in the library's order of ids.

    PostgreSQL: one round trip, a call of our function (``_pg_append_function``) that
    sets the lock timeout, takes the lock, inserts and returns the ids, as one statement
    in autocommit mode: its implicit transaction commits (``synchronous_commit`` on)
    before the server answers. It was three (``BEGIN; SET LOCAL; LOCK``, the INSERT,
    ``COMMIT``) and five before that (issue 10). An error rolls the statement's
    transaction back on the server: no ROLLBACK to send, no connection left inside a
    transaction, never a silent rollback of a COMMIT.

    NOT the library's ``insert_events``: it pipelines the insert, and a batch of a few
    hundred KB deadlocks the client and the server while the server holds the EXCLUSIVE
    lock on the events table, stopping every executor (psycopg issue #685); one plain
    execute never does. No NOTIFY: nothing LISTENs (the relay is woken by the executor,
    and polls for other writers), and a NOTIFY costs a global lock at every commit. The
    rows go as four parallel arrays, the bytes in binary, not as the library's array of
    a composite type, which psycopg dumps as text, one regex escape per field (60 % of
    the CPU of a 50-run batch's append, issue 10, perf4)."""
    if isinstance(recorder, SQLiteApplicationRecorder):
        return _sqlite_insert(recorder, stored)
    if type(recorder).__module__ != "eventsourcing.postgres":
        return recorder.insert_events(stored)
    with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
        curs.execute(_pg_append(recorder), _pg_columns(stored), prepare=True)
        return [row["ids"] for row in curs.fetchall()]


def _pg_columns(stored: list[StoredEvent]) -> tuple[list[Any], ...]:
    return (
        [e.originator_id for e in stored],
        [e.originator_version for e in stored],
        [e.topic for e in stored],
        [e.state for e in stored],
    )


def _pg_params(pool: Any) -> dict[str, Any]:
    """The connection parameters of a PostgreSQL pool, for a connection of our own (the
    pool's row factory is the library's)."""
    return {k: v for k, v in dict(pool.kwargs).items() if k != "row_factory"}


class _LoopWriter:
    """The PostgreSQL append's own connection, driven by the event loop that awaits it
    (``EventStore.append_on_loop``): the same statement as ``_insert_events`` (one call
    of the append function, autocommit, prepared), so the same lock, ids and errors.

    Made at the first append and again after any error that may have left it unusable
    (or when another loop awaits it: a connection belongs to the loop it was made on).
    Its connect is bounded as the pool's is (``PG_CONNECT_TIMEOUT_S``). One append at a
    time (the connection's own lock): the executor has one writer loop anyway."""

    def __init__(self, recorder: Any) -> None:
        self._recorder = recorder
        self._params = _pg_params(recorder.datastore.pool)
        self._conn: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def insert(self, stored: list[StoredEvent]) -> list[int]:
        import psycopg

        conn = await self._connection()
        try:
            cursor = await conn.execute(_pg_append(self._recorder), _pg_columns(stored),
                                        prepare=True)  # fmt: skip
            return [row[0] for row in await cursor.fetchall()]
        except psycopg.IntegrityError as exc:
            # the library's, as its own insert raises it (``_sqlite_insert`` likewise); the
            # connection is as it was (autocommit: the statement's transaction is over)
            raise IntegrityError(exc) from exc
        except BaseException:
            self.close()  # anything else, a cancel included, may have left it mid-way
            raise

    async def _connection(self) -> Any:
        import psycopg

        loop = asyncio.get_running_loop()
        if self._conn is not None and (self._loop is not loop or self._conn.closed):
            self.close()
        if self._conn is None:
            conn = await psycopg.AsyncConnection.connect(
                autocommit=True, **{"connect_timeout": PG_CONNECT_TIMEOUT_S, **self._params}
            )
            if self._conn is None:
                self._conn, self._loop = conn, loop
            else:  # another append connected meanwhile: one connection, not two
                await conn.close()
        return self._conn

    def close(self) -> None:
        """Closed at once, from any thread or loop (the socket; nothing is in flight that
        a caller still awaits, or that caller gets the connection's error)."""
        conn, self._conn, self._loop = self._conn, None, None
        if conn is not None:
            conn.pgconn.finish()


def _sqlite_insert(recorder: SQLiteApplicationRecorder, stored: list[StoredEvent]) -> list[int]:
    """The library's SQLite insert (``BEGIN``, one INSERT per event taking its rowid as
    the notification id, ``COMMIT``; rolled back on any error), without its five nested
    context managers and wrappers around the raw connection and cursor: those cost about
    as much CPU as the inserts themselves, on every commit of the executor's writer,
    which runs on the event loop (issue 10, hopcpu). Errors are the library's, as there:
    ``IntegrityError`` for a position taken (a ``ConcurrencyConflict``), the rest
    translated by ``_translated``.

    It writes on a connection of its own, opened by the pool (so set up as every pool
    connection is: WAL, the lock timeout, no autocheckpoint) and kept for the store's
    life, under the pool's writer lock, which every other writer of the database (the
    relay's position) takes through the pool: still one writer at a time. Taking and
    giving back a pool connection cost ~15 us of the loop's CPU per commit (a Python
    semaphore and condition, timeouts computed four times: issue 10, stackcpu). An
    in-memory database (the pool's readers and writers exclude each other) goes through
    the pool as before."""
    pool = recorder.datastore.pool
    if pool._mutually_exclusive_read_write:
        conn = pool.get_connection(is_writer=True)
        try:
            return _sqlite_inserted(conn._sqlite_conn, recorder, stored)
        finally:
            pool.put_connection(conn)
    lock = pool._writer_lock
    if not lock.acquire(timeout=pool.pool_timeout):
        raise ConnectionUnavailableError("Timed out waiting for return of writer")
    try:
        writer = _held_writer(pool)
        return _sqlite_inserted(writer, recorder, stored)
    finally:
        lock.release()


def _held_writer(pool: Any) -> sqlite3.Connection:
    """The writer connection ``_sqlite_insert`` keeps on ``pool`` (opened at first use,
    closed by ``close_held_writer``). Called under the pool's writer lock."""
    held = getattr(pool, "_loom_writer", None)
    if held is None:
        if pool._closed:
            raise ConnectionPoolClosedError("Pool is closed")
        held = pool._loom_writer = pool._create_connection()
    raw: sqlite3.Connection = held._sqlite_conn
    return raw


def close_held_writer(pool: Any) -> None:
    """Close the writer connection ``_sqlite_insert`` kept on ``pool``, if any."""
    with pool._writer_lock:
        held = pool.__dict__.pop("_loom_writer", None)
        if held is not None:
            held.close()


def _sqlite_inserted(
    raw: sqlite3.Connection, recorder: SQLiteApplicationRecorder, stored: list[StoredEvent]
) -> list[int]:
    try:
        cursor = raw.cursor()
        try:
            cursor.execute("BEGIN")
            statement = recorder.insert_events_statement
            ids: list[int] = []
            for event in stored:
                cursor.execute(
                    statement,
                    (event.originator_id, event.originator_version, event.topic, event.state),
                )
                ids.append(cursor.lastrowid)  # type: ignore[arg-type]  # set by the INSERT
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            cursor.close()
    except sqlite3.IntegrityError as exc:
        raise IntegrityError(exc) from exc
    return ids


def _pg_names(recorder: Any) -> dict[str, Any]:
    """The identifiers the append function's SQL is built with."""
    from psycopg.sql import Identifier

    return {
        "schema": Identifier(recorder.datastore.schema),
        "function": Identifier(f"loom_append_{recorder.events_table_name}"),
        "id_type": Identifier(recorder.datastore.originator_id_type),
        "table": Identifier(recorder.events_table_name),
    }


def _pg_append_function(recorder: Any) -> Any:
    """The function ``_insert_events`` calls: the recorder's own lock statements (``SET
    LOCAL lock_timeout``, ``LOCK TABLE ... IN EXCLUSIVE MODE``: the lock a writer of an
    older version also takes, which keeps notification ids commit-ordered for the
    relay's tailing reader), then the INSERT of four column arrays. ``CREATE OR
    REPLACE`` at every open, under the schema lock: an upgrade replaces it."""
    from psycopg.sql import SQL

    return SQL(
        "CREATE OR REPLACE FUNCTION {schema}.{function}("
        "p_ids {id_type}[], p_versions bigint[], p_topics text[], p_states bytea[]) "
        "RETURNS TABLE (ids bigint) LANGUAGE plpgsql AS $BODY$ BEGIN "
        "{lock}; "
        "RETURN QUERY INSERT INTO {schema}.{table} AS t "
        "(originator_id, originator_version, topic, state) "
        "SELECT * FROM unnest(p_ids, p_versions, p_topics, p_states) "
        "RETURNING t.notification_id; "
        "END; $BODY$"
    ).format(lock=SQL("; ").join(recorder.lock_table_statements), **_pg_names(recorder))


def _pg_append(recorder: Any) -> Any:
    """The call of the append function (built once per recorder)."""
    statement = getattr(recorder, "_loom_append", None)
    if statement is None:
        from psycopg.sql import SQL

        statement = SQL(
            "SELECT ids FROM {schema}.{function}(%s::{id_type}[], %s::bigint[], "
            "%s::text[], %b::bytea[])"
        ).format(**_pg_names(recorder))
        recorder._loom_append = statement
    return statement


class EventStore(_Closable):
    """Run event streams. ``originator_id`` = run id, version = ``seq``, topic = the event
    kind, state = the encoded :class:`EventRecord`. The executor is the only writer."""

    def __init__(
        self,
        recorder: ApplicationRecorder,
        tracking: TrackingRecorder,
        *,
        backend: Backend,
        close: Callable[[], None],
        checkpointer: WalCheckpointer | None = None,
    ) -> None:
        super().__init__(backend, close)
        self._recorder = recorder
        self._tracking = tracking
        self.checkpointer = checkpointer  # SQLite: the WAL's checkpoints, off the writer
        self._loop_writer: _LoopWriter | None = None  # PostgreSQL: ``append_on_loop``'s

    def append(self, records: Sequence[EventRecord]) -> list[int]:
        """Store all ``records`` (of one or many runs) in one transaction and return their
        notification ids, in the order given. Raises ConcurrencyConflict (storing nothing)
        if any (run_id, seq) exists already."""
        self._check_open("append")
        if not records:
            return []
        stored = self._stored(records)
        with self._appending(records):
            if self.checkpointer is not None:
                self.checkpointer.before_append()
            ids = _insert_events(self._recorder, stored)
            if self.checkpointer is not None:
                self.checkpointer.committed()
        return self._checked_ids(ids, records)

    async def append_on_loop(self, records: Sequence[EventRecord]) -> list[int]:
        """``append``, awaited on the caller's event loop: on PostgreSQL the one statement
        goes on a connection of the loop's own (``_LoopWriter``), so the commit costs no
        hand-off to a pool thread and back (0.2-0.3 ms of a busy machine's wake-ups and GIL
        passes per append, issue 10); on SQLite it is ``append`` itself, run in place on the
        loop (a local commit costs less than a thread's hand-off). Same errors as
        ``append``."""
        self._check_open("append")
        if self._backend != "postgres" or not records:
            return self.append(records)
        stored = self._stored(records)
        if self._loop_writer is None:
            self._loop_writer = _LoopWriter(self._recorder)
        with self._appending(records):
            ids = await self._loop_writer.insert(stored)
        return self._checked_ids(ids, records)

    @contextmanager
    def _appending(self, records: Sequence[EventRecord]) -> Iterator[None]:
        """An append's errors as both append paths raise them: a clash with stored events
        as ``ConcurrencyConflict`` naming the runs, the rest as ``_translated`` does."""
        with _translated("append", self._backend):
            try:
                yield
            except IntegrityError:
                conflicted = self._conflicting_runs(records)
                raise ConcurrencyConflict(conflicted, backend=self._backend) from None

    def close(self) -> None:
        if self._loop_writer is not None:
            self._loop_writer.close()
        super().close()

    def _checked_ids(self, ids: Sequence[int] | None, records: Sequence[EventRecord]) -> list[int]:
        if ids is None or len(ids) != len(records):
            raise StoreError(
                f"append: the recorder returned {ids!r} notification ids for {len(records)} events",
                operation="append",
                backend=self._backend,
            )
        return list(ids)

    def _stored(self, records: Sequence[EventRecord]) -> list[StoredEvent]:
        """The rows of ``records``, each checked to have a position of its own."""
        seen: set[tuple[str, int]] = set()
        for record in records:
            key = (record.run_id, record.seq)
            if record.seq < 1:
                raise StoreError(
                    f"append: seq must be >= 1, got {record.seq} for run {record.run_id!r}",
                    operation="append",
                    backend=self._backend,
                )
            if key in seen:
                raise StoreError(
                    f"append: run {record.run_id!r} seq {record.seq} appears twice in one "
                    "batch; each event needs its own position",
                    operation="append",
                    backend=self._backend,
                )
            seen.add(key)
        return [
            StoredEvent(
                originator_id=r.run_id,
                originator_version=r.seq,
                topic=r.kind,
                state=codec.encode(r),
            )
            for r in records
        ]

    def _conflicting_runs(self, records: Sequence[EventRecord]) -> list[str]:
        wanted: dict[str, set[int]] = {}
        for record in records:
            wanted.setdefault(record.run_id, set()).add(record.seq)
        conflicted = []
        for run_id, seqs in wanted.items():
            rows = self._recorder.select_events(run_id, gt=min(seqs) - 1, lte=max(seqs))
            if any(row.originator_version in seqs for row in rows):
                conflicted.append(run_id)
        # The rows that clashed cannot vanish, so this is empty only if the clash was
        # of some other kind; then every run in the batch is suspect.
        return conflicted or list(wanted)

    def load(self, run_id: str, after_seq: int = 0, limit: int | None = None) -> list[EventRecord]:
        """Events of ``run_id`` with ``seq > after_seq``, ascending, at most ``limit``."""
        self._check_open("load")
        with _translated("load", self._backend):
            rows = self._recorder.select_events(
                run_id, gt=after_seq if after_seq > 0 else None, limit=limit
            )
        return [self._decode(row.state, "load") for row in rows]

    def last_seq(self, run_id: str) -> int:
        """The run's highest seq, 0 when it has no events (one indexed row read)."""
        self._check_open("last_seq")
        with _translated("last_seq", self._backend):
            rows = self._recorder.select_events(run_id, desc=True, limit=1)
        return rows[0].originator_version if rows else 0

    def read_notifications(self, after: int, limit: int) -> list[tuple[int, EventRecord]]:
        """Up to ``limit`` events of all runs with notification id > ``after``, in id order."""
        self._check_open("read_notifications")
        with _translated("read_notifications", self._backend):
            rows = self._recorder.select_notifications(
                start=after, limit=limit, inclusive_of_start=False
            )
        return [(row.id, self._decode(row.state, "read_notifications")) for row in rows]

    def max_notification_id(self) -> int:
        self._check_open("max_notification_id")
        with _translated("max_notification_id", self._backend):
            return self._recorder.max_notification_id() or 0

    def position(self, name: str) -> int:
        """The notification id the consumer ``name`` recorded last, 0 when none."""
        self._check_open("position")
        self._check_tracking_name(name, "position")
        with _translated("position", self._backend):
            return self._tracking.max_tracking_id(name) or 0

    def set_position(self, name: str, notification_id: int) -> None:
        """Record that ``name`` processed everything up to ``notification_id``. A value not
        above the recorded one is ignored: the position never moves backwards."""
        self._check_open("set_position")
        self._check_tracking_name(name, "set_position")
        # The library's single-row upsert only updates when the id grows; it reports
        # "not updated" as an IntegrityError, which is our no-op.
        with _translated("set_position", self._backend), suppress(IntegrityError):
            self._tracking.insert_tracking(Tracking(name, notification_id))

    def _check_tracking_name(self, name: str, operation: str) -> None:
        if not name or name == _RESERVED_TRACKING_NAME:
            raise StoreError(
                f"{operation}: tracking name must be non-empty and not "
                f"{_RESERVED_TRACKING_NAME!r}, got {name!r}",
                operation=operation,
                backend=self._backend,
            )

    def _decode(self, state: bytes, operation: str) -> EventRecord:
        try:
            return codec.decode_event(state)
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as exc:
            raise _decode_error(operation, self._backend, "event", exc) from exc


# --------------------------------------------------------------------------- tool calls


class _Claim(msgspec.Struct, frozen=True):
    owner: str
    claimed_at: datetime


_claim_decoder = msgspec.json.Decoder(_Claim)


@dataclass(frozen=True)
class LedgerEntry:
    key: str
    status: Literal["claimed", "finished"]
    owner: str
    claimed_at: datetime
    result: bytes | None


class SnapshotStore(_Closable):
    """Snapshots of a run's folded state, so loading a long run costs the events after
    the last snapshot, not its whole history. Version = the run's ``seq`` it was taken
    at; a snapshot is only a cache: losing one just means folding more events.

    Only the newest ``keep`` snapshots of a run are kept (``LOOM_SNAPSHOTS_KEPT``): each
    save deletes the older ones in the same transaction, so the store holds O(state) per
    run, not O(history x state) (a 100k-item foreach once left 234 full snapshots, 3.3
    GB). Loading reads only the newest; the others are spares in case it is unreadable.
    The delete is "older than the keep-th newest", so a save that crashed before pruning
    is caught up by the next one."""

    def __init__(
        self,
        recorder: AggregateRecorder,
        *,
        backend: Backend,
        close: Callable[[], None],
        keep: int = 2,
    ) -> None:
        super().__init__(backend, close)
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self._recorder = recorder
        self._keep = keep
        self._save_sql, self._taken_sql = _snapshot_statements(recorder, backend)

    @property
    def keep(self) -> int:
        return self._keep

    def save(self, run_id: str, seq: int, state: bytes) -> None:
        """Store the snapshot of ``run_id`` at ``seq`` (a second save at the same seq is a
        no-op) and delete the run's snapshots older than the newest ``keep``."""
        self._check_open("save snapshot")
        datastore = self._recorder.datastore  # type: ignore[attr-defined]  # both recorders have it; their base does not declare it
        insert, prune = self._save_sql
        with (
            _translated("save snapshot", self._backend),
            datastore.transaction(commit=True) as curs,
        ):
            curs.execute(insert, (run_id, seq, "snapshot", bytes(state)))
            curs.execute(prune, (run_id, run_id, self._keep - 1))

    def latest(self, run_id: str) -> tuple[int, bytes] | None:
        self._check_open("load snapshot")
        with _translated("load snapshot", self._backend):
            rows = self._recorder.select_events(run_id, desc=True, limit=1)
        return (rows[0].originator_version, bytes(rows[0].state)) if rows else None

    def taken(self, run_id: str) -> list[int]:
        """The seqs of the run's stored snapshots, ascending (their bodies are not read)."""
        self._check_open("list snapshots")
        datastore = self._recorder.datastore  # type: ignore[attr-defined]  # both recorders have it; their base does not declare it
        with (
            _translated("list snapshots", self._backend),
            datastore.transaction(commit=False) as curs,
        ):
            curs.execute(self._taken_sql, (run_id,))
            return [row["originator_version"] for row in curs.fetchall()]


def _snapshot_statements(recorder: Any, backend: Backend) -> tuple[tuple[Any, Any], Any]:
    """(insert, prune) and list statements on the snapshot table. The prune deletes
    every version below the keep-th newest (an empty subquery, fewer snapshots than
    ``keep``, compares as NULL and deletes nothing)."""
    insert = (
        "INSERT INTO {t} (originator_id, originator_version, topic, state) "
        "VALUES ({p}, {p}, {p}, {p}) ON CONFLICT DO NOTHING"
    )
    prune = (
        "DELETE FROM {t} WHERE originator_id = {p} AND originator_version < ("
        "SELECT originator_version FROM {t} WHERE originator_id = {p} "
        "ORDER BY originator_version DESC LIMIT 1 OFFSET {p})"
    )
    taken = "SELECT originator_version FROM {t} WHERE originator_id = {p} ORDER BY 1"
    if backend == "sqlite":
        # the table name is our constant, not input; SQLite has no identifier quoting API
        def sqlite(text: str) -> str:
            return text.format(t=f'"{SNAPSHOTS_TABLE}"', p="?")

        return (sqlite(insert), sqlite(prune)), sqlite(taken)

    from psycopg.sql import SQL, Identifier

    table = SQL("{}.{}").format(Identifier(recorder.datastore.schema), Identifier(SNAPSHOTS_TABLE))

    def pg(text: str) -> Any:
        return SQL(text.replace("{p}", "%s")).format(t=table)

    return (pg(insert), pg(prune)), pg(taken)


class ToolCallLedger(_Closable):
    """Exactly-once claims of tool calls by idempotency key: version 1 of the key's stream
    is the claim (the unique key makes exactly one claimer win, across processes), version
    2 is the result."""

    def __init__(
        self, recorder: AggregateRecorder, *, backend: Backend, close: Callable[[], None]
    ) -> None:
        super().__init__(backend, close)
        self._recorder = recorder

    def claim(self, key: str, owner: str, at: datetime) -> bool:
        """True if this caller claimed ``key`` now; False if it was claimed before."""
        self._check_open("claim")
        state = codec.encode(_Claim(owner=owner, claimed_at=at))
        with _translated("claim", self._backend):
            try:
                self._recorder.insert_events([StoredEvent(key, 1, "claimed", state)])
            except IntegrityError:
                return False
        return True

    def finish(self, key: str, result: bytes) -> None:
        """Record the result of a claimed call. A second finish is a no-op (the first
        result stays)."""
        self._check_open("finish")
        with _translated("finish", self._backend):
            if not self._recorder.select_events(key, lte=1, limit=1):
                raise StoreError(
                    f"finish: tool call {key!r} was never claimed; claim it before "
                    "recording its result",
                    operation="finish",
                    backend=self._backend,
                )
            try:
                self._recorder.insert_events([StoredEvent(key, 2, "finished", bytes(result))])
            except IntegrityError:
                return

    def record(self, key: str, owner: str, at: datetime, result: bytes) -> bool:
        """Claim and finish in one transaction, for idempotent tools that ran without a
        prior claim (running twice is harmless for them; one commit instead of two).
        False when the key already had a claim: the first recorder's result stands."""
        self._check_open("record")
        claim = codec.encode(_Claim(owner=owner, claimed_at=at))
        with _translated("record", self._backend):
            try:
                self._recorder.insert_events(
                    [
                        StoredEvent(key, 1, "claimed", claim),
                        StoredEvent(key, 2, "finished", bytes(result)),
                    ]
                )
            except IntegrityError:
                return False
        return True

    def record_many(self, entries: Sequence[tuple[str, str, datetime, bytes]]) -> None:
        """``record`` for many (key, owner, at, result) in one transaction; when a key
        already had a claim, each is recorded alone (the first result stands)."""
        self._check_open("record")
        stored = []
        for key, owner, at, result in entries:
            claim = codec.encode(_Claim(owner=owner, claimed_at=at))
            stored += [
                StoredEvent(key, 1, "claimed", claim),
                StoredEvent(key, 2, "finished", bytes(result)),
            ]
        with _translated("record", self._backend):
            try:
                self._recorder.insert_events(stored)
                return
            except IntegrityError:
                pass
        for key, owner, at, result in entries:
            self.record(key, owner, at, result)

    def get(self, key: str) -> LedgerEntry | None:
        self._check_open("get")
        with _translated("get", self._backend):
            rows = self._recorder.select_events(key, limit=2)
        if not rows:
            return None
        try:
            claim = _claim_decoder.decode(rows[0].state)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise _decode_error("get", self._backend, "tool-call claim", exc) from exc
        finished = len(rows) > 1
        return LedgerEntry(
            key=key,
            status="finished" if finished else "claimed",
            owner=claim.owner,
            claimed_at=claim.claimed_at,
            result=bytes(rows[1].state) if finished else None,
        )


# --------------------------------------------------------------------------- threads


def _marker_id(thread_id: str, source_event_id: str) -> str:
    # Length-prefixed so that no two (thread, source) pairs share a marker.
    return f"{_MARKER_PREFIX}{len(thread_id)}:{thread_id}:{source_event_id}"


class ThreadStore(_Closable):
    """Memory threads: each thread is a stream of ThreadEntry, one version per entry.
    An append stores the entry together with a marker stream keyed by
    (thread, source_event_id) in one statement, so a redelivered entry is refused by the
    marker's unique key, and a concurrent writer's entry by the version's."""

    def __init__(
        self, recorder: AggregateRecorder, *, backend: Backend, close: Callable[[], None]
    ) -> None:
        super().__init__(backend, close)
        self._recorder = recorder

    def append(self, thread_id: str, entry: ThreadEntry) -> bool:
        """Append ``entry`` as the thread's next entry. False (nothing stored) if an entry
        with the same ``source_event_id`` is already in the thread."""
        self._check_open("thread append")
        if not thread_id or thread_id.startswith(_MARKER_PREFIX):
            raise StoreError(
                f"thread append: thread id must be non-empty and not start with "
                f"{_MARKER_PREFIX!r}, got {thread_id!r}",
                operation="thread append",
                backend=self._backend,
            )
        marker = _marker_id(thread_id, entry.source_event_id)
        state = codec.encode(entry)
        with _translated("thread append", self._backend):
            for _ in range(_THREAD_APPEND_ATTEMPTS):
                last = self._recorder.select_events(thread_id, desc=True, limit=1)
                version = last[0].originator_version + 1 if last else 1
                try:
                    self._recorder.insert_events(
                        [
                            StoredEvent(marker, 1, "thread_entry_seen", str(version).encode()),
                            StoredEvent(thread_id, version, "thread_entry", state),
                        ]
                    )
                    return True
                except IntegrityError:
                    if self._recorder.select_events(marker, limit=1):
                        return False
                    # Another writer took this version: read the new end and try again.
                    # Each lost race means someone else's append succeeded.
        raise StoreError(
            f"thread append: gave up on thread {thread_id!r} after "
            f"{_THREAD_APPEND_ATTEMPTS} version conflicts; too many concurrent writers",
            operation="thread append",
            backend=self._backend,
            retryable=True,
        )

    def position(self, thread_id: str, source_event_id: str) -> int | None:
        """The 0-based position in its thread of the entry appended for
        ``source_event_id`` (None: no such entry). Positions are assigned by the
        append's optimistic concurrency, so every reader and replica agrees on them."""
        self._check_open("thread position")
        with _translated("thread position", self._backend):
            rows = self._recorder.select_events(_marker_id(thread_id, source_event_id), limit=1)
        return int(rows[0].state.decode()) - 1 if rows else None

    def list(self, thread_id: str) -> list[ThreadEntry]:
        self._check_open("thread list")
        with _translated("thread list", self._backend):
            rows = self._recorder.select_events(thread_id)
        try:
            return [codec.decode(row.state, ThreadEntry) for row in rows]
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise _decode_error("thread list", self._backend, "thread entry", exc) from exc
