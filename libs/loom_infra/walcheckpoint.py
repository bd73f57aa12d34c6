"""The SQLite event store's WAL checkpoints, off the executor's event loop (issue 10).

SQLite copies its write-ahead log back into the database file (a checkpoint) inside the
commit that takes the log past 1,000 pages (``wal_autocheckpoint``). The executor commits
a SQLite batch on its event loop (~0.2 ms; a thread hand-off costs more), so every ~340
steps one commit took 1.7-2.8 ms instead of ~0.2 (measured, ~1 ms of it CPU: the copy,
then an fsync of the database file), and the loop, which runs every run's steps, waited.
In a sequential run that is a step over 3x the median each time: six of the twenty a
2,000-step run may have before its p99 is over 3x its p50.

Here the store's own connections never checkpoint (``wal_autocheckpoint=0``); a thread
with a connection of its own does, told every ``KICK_COMMITS`` commits (and at least
every ``KICK_S``). Python's sqlite3 releases the GIL while SQLite works, so the copy and
its fsync run on the other core while the loop goes on committing.

Why the loop still takes a small part: SQLite starts writing the log from its beginning
again only when a write transaction begins while every frame of the log is in the
database file. A checkpoint beside a writer that commits all the time never gets there
(the writer adds frames while it copies), and the log grew without bound (36 MB after
3,000 commits, measured). So once the log holds ``RESTART_FRAMES`` (SQLite's own 1,000)
or more, the next append first checkpoints on the loop what the thread's checkpoint left
(the few commits made meanwhile, one fsync: ~0.2 ms), and that append's transaction
starts the log over. A non-blocking lock keeps the two from checkpointing at once; the
loop never waits for the thread.

Durability is unchanged: every commit still syncs the log (its frames are the commit); a
checkpoint only moves committed pages into the database file, and SQLite redoes an
interrupted one from the log at the next open. Closing the store stops the thread; the
last connection's close checkpoints and removes the log, as before. A checkpoint that
fails is logged and tried again at the next kick; readers that hold old frames only make
a checkpoint partial, as they did an automatic one."""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Any

log = logging.getLogger("loom.store")

KICK_COMMITS = 100  # commits between two of the thread's checkpoints (~300 log pages)
KICK_S = 1.0  # and at least this often while commits trickle in
RESTART_FRAMES = 1000  # log pages at which the loop finishes a checkpoint (SQLite's default)


class WalCheckpointer:
    """Checkpoints one SQLite database's WAL in a thread of its own (see the module doc).
    ``take_over(pool)`` before the pool makes its first connection; ``before_append``
    and ``committed`` around each append; ``close`` before the pool closes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()  # one checkpoint at a time on ``_conn``
        self._kick = threading.Event()
        self._stopping = False
        self._commits = 0
        self._log_frames = 0  # the log's size at the thread's last checkpoint
        self.checkpoints = 0  # the thread's, for tests and benchmarks
        self.finished_on_loop = 0
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def take_over(self, pool: Any) -> None:
        """Make every connection ``pool`` (eventsourcing's ``SQLiteConnectionPool``)
        opens leave checkpoints to this object."""
        make = pool._create_connection

        def without_autocheckpoint() -> Any:
            conn = make()
            conn._sqlite_conn.execute("PRAGMA wal_autocheckpoint=0")
            return conn

        pool._create_connection = without_autocheckpoint

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def before_append(self) -> None:
        """On the writer, before its transaction: when the log has grown to
        ``RESTART_FRAMES``, checkpoint the little the thread's checkpoint left, so this
        append starts the log over. Never waits: if the thread is checkpointing, the
        next append does it."""
        if self._log_frames < RESTART_FRAMES or not self._lock.acquire(blocking=False):
            return
        try:
            self._checkpoint()
            self.finished_on_loop += 1
        except sqlite3.Error as exc:
            log.warning("WAL checkpoint of %s failed (tried again later): %r", self.path, exc)
        finally:
            self._log_frames = 0
            self._lock.release()

    def committed(self) -> None:
        self._commits += 1
        if self._commits >= KICK_COMMITS:
            self._commits = 0
            self._kick.set()

    def close(self) -> None:
        self._stopping = True
        self._kick.set()
        self._thread.join()
        self._conn.close()

    def _checkpoint(self) -> tuple[int, int, int]:
        busy, frames, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return busy, frames, copied

    def _run(self) -> None:
        while True:
            self._kick.wait(KICK_S)
            self._kick.clear()
            if self._stopping:
                return
            with self._lock:
                try:
                    _, frames, _ = self._checkpoint()
                    self.checkpoints += 1
                except sqlite3.Error as exc:
                    log.warning("WAL checkpoint of %s failed (tried again): %r", self.path, exc)
                    continue
            # read by the writer's thread: a stale value only moves its turn by one append
            self._log_frames = frames
