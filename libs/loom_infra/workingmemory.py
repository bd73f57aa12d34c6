"""Working memory: one document per user or per thread, changed by compare-and-set on a
version and stored as events.

Each update is a row ``(key, version, doc, at, by)`` with ``(key, version)`` the primary
key: writing version N+1 succeeds for exactly one writer; every other writer that read
version N gets a :class:`Conflict` naming the current version and retries from there (or
reports it). This is the same optimistic concurrency the run store uses, so it holds
across processes (SQLite WAL with a busy timeout; PostgreSQL). The rows are the history:
any earlier version can be read back (time travel) and nothing is overwritten.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loom_core.errors import LoomError

SCHEMA = """
CREATE TABLE IF NOT EXISTS working_memory (
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    doc TEXT NOT NULL,
    schema TEXT,
    at TEXT NOT NULL,
    by TEXT NOT NULL,
    PRIMARY KEY (key, version)
)
"""


class Conflict(LoomError):
    code = "conflict"

    def __init__(self, key: str, expected: int, current: int) -> None:
        super().__init__(
            f"working memory {key!r} is at version {current}, not {expected}: read it again "
            "and retry the update on the current version"
        )
        self.key = key
        self.expected = expected
        self.current = current


@dataclass(frozen=True)
class Version:
    key: str
    version: int
    doc: Any
    schema: Any
    at: str
    by: str


class WorkingMemoryStore:
    """SQLite (default) or PostgreSQL (``dsn``). Safe for many processes at once."""

    def __init__(self, path: Path | None = None, dsn: str | None = None) -> None:
        self.dsn = dsn
        self.local = threading.local()
        if dsn is None:
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            self.path = path
            self.param = "?"
        else:
            self.param = "%s"
        with self._conn() as conn:
            conn.execute(SCHEMA)
            if dsn is None:
                conn.commit()

    def _conn(self):
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            return _Reuse(conn)
        if self.dsn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
        else:
            import psycopg

            conn = psycopg.connect(self.dsn, autocommit=True)
        self.local.conn = conn
        return _Reuse(conn)

    def close(self) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()
            self.local.conn = None

    def current(self, key: str) -> Version | None:
        return self.at(key, None)

    def at(self, key: str, version: int | None) -> Version | None:
        p = self.param
        with self._conn() as conn:
            if version is None:
                sql = f"SELECT key, version, doc, schema, at, by FROM working_memory WHERE key = {p} ORDER BY version DESC LIMIT 1"  # noqa: S608, E501
                row = conn.execute(sql, (key,)).fetchone()
            else:
                sql = f"SELECT key, version, doc, schema, at, by FROM working_memory WHERE key = {p} AND version = {p}"  # noqa: S608, E501
                row = conn.execute(sql, (key, version)).fetchone()
        return _version(row)

    def history(self, key: str, after: int = 0, limit: int = 100) -> list[Version]:
        p = self.param
        sql = f"SELECT key, version, doc, schema, at, by FROM working_memory WHERE key = {p} AND version > {p} ORDER BY version LIMIT {p}"  # noqa: S608, E501
        with self._conn() as conn:
            rows = conn.execute(sql, (key, after, limit)).fetchall()
        return [v for v in map(_version, rows) if v is not None]

    def update(self, key: str, expected: int, doc: Any, by: str, schema: Any = None) -> Version:
        """Append version ``expected + 1``; :class:`Conflict` if someone else did first.
        ``expected`` 0 means "no document yet". The schema carries over when not given."""
        p = self.param
        at = datetime.now(UTC).isoformat()
        with self._conn() as conn:
            if schema is None and expected > 0:
                prev = self.at(key, expected)
                schema = prev.schema if prev else None
            try:
                # one statement: inserted only if the current version is the expected one;
                # two writers racing past the check collide on the primary key instead
                cur = conn.execute(
                    f"INSERT INTO working_memory (key, version, doc, schema, at, by) SELECT {p}, {p}, {p}, {p}, {p}, {p} WHERE COALESCE((SELECT MAX(version) FROM working_memory WHERE key = {p}), 0) = {p}",  # noqa: S608, E501
                    (
                        key,
                        expected + 1,
                        json.dumps(doc),
                        None if schema is None else json.dumps(schema),
                        at,
                        by,
                        key,
                        expected,
                    ),
                )
                inserted = cur.rowcount == 1
            except Exception as exc:
                if not _is_duplicate(exc):
                    raise
                inserted = False
            if not inserted:
                latest = self.current(key)
                raise Conflict(key, expected, latest.version if latest else 0)
        return Version(key, expected + 1, doc, schema, at, by)


class _Reuse:
    """A thread's connection as a context manager that does not close it."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def __enter__(self):
        return self.conn

    def __exit__(self, *exc) -> None:
        return None


def _is_duplicate(exc: Exception) -> bool:
    if isinstance(exc, sqlite3.IntegrityError):
        return True
    return type(exc).__name__ == "UniqueViolation"


def _version(row) -> Version | None:
    if row is None:
        return None
    key, version, doc, schema, at, by = row
    return Version(
        key,
        int(version),
        json.loads(doc),
        None if schema is None else json.loads(schema),
        str(at),
        by,
    )
