"""One stack per data directory: an exclusive lock on ``{data_dir}/.lock``.

A second ``loom up`` on the same ``--data-dir`` used to start, share the SQLite files and
run a second nats-server on the same JetStream store (issue 9): two executors writing one
run, two servers corrupting one stream store. ``DataDirLock`` takes ``flock(LOCK_EX |
LOCK_NB)`` on the lock file and keeps the descriptor open for the life of the stack.

Why flock: the kernel drops the lock when the descriptor closes, and so when the process
ends in any way (exit, exception, ``kill -9``, OOM): no stale lock to clean up, no
"is that pid still alive?" guesswork. The file itself stays (deleting it would let a
process that opened the old file and one that creates a new one both hold "the" lock);
it holds the owner's pid, host and start time, for the refusal message only.

What a later change must keep true:
- the descriptor is opened close-on-exec (Python's default), so a child such as
  nats-server does not hold the lock; the embedded nats-server dies with its parent
  (``PR_SET_PDEATHSIG``), so it never outlives the lock either;
- only whole stacks take it (``LocalStack`` with its embedded nats-server). Services
  run as separate processes on one data dir (the SQLite files support that) must not;
- flock is per host: on a network file system it may be emulated or ignored, so the
  data dir of ``loom up`` belongs on a local disk.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loom_core.contracts import ErrorInfo
from loom_core.errors import LoomError

__all__ = ["LOCK_FILE", "DataDirLock", "DataDirLocked"]

LOCK_FILE = ".lock"


class DataDirLocked(LoomError):
    """The data dir is held by another stack (``code`` ``data_dir_locked``), or cannot be
    used for the lock at all (``data_dir_unusable``). ``error`` is the typed form."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


class DataDirLock:
    """``with DataDirLock(data_dir):`` (or ``acquire()`` / ``release()``)."""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DataDirLock:
        """Take the lock now or raise DataDirLocked (never waits)."""
        if self._fd is not None:
            return self
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DataDirLocked(ErrorInfo(
                code="data_dir_unusable",
                message=f"cannot create the lock file {self.path}: {exc.strerror or exc}; "
                "check that the data dir (--data-dir / LOOM_DATA_DIR) is a writable "
                "directory",
                details={"data_dir": str(self.data_dir)},
            )) from None  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: someone holds it
            holder = _read_holder(fd)
            os.close(fd)
            raise DataDirLocked(self._refusal(holder)) from None
        # ours: say who we are, for the next one's message (the lock is what counts)
        with suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_me()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (idempotent). Ending the process does it too."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with suppress(OSError):
                os.ftruncate(fd, 0)  # nobody's any more
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _refusal(self, holder: dict[str, Any]) -> ErrorInfo:
        pid, host = holder.get("pid"), holder.get("host")
        who = f"pid {pid}" if pid else "another process"
        if host and host != socket.gethostname():
            who += f" on host {host}"
        since = f" since {holder['since']}" if holder.get("since") else ""
        return ErrorInfo(
            code="data_dir_locked",
            message=f"data dir {self.data_dir} is in use by another loom stack ({who}"
            f"{since}); stop that one first (Ctrl-C in its terminal, or kill {pid or 'it'}),"
            " or give this one its own --data-dir / LOOM_DATA_DIR",
            path=str(self.path),
            details={"data_dir": str(self.data_dir), "pid": pid, "host": host},
        )


def _me() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _read_holder(fd: int) -> dict[str, Any]:
    """What the holder wrote about itself; {} if nothing readable (it may be between
    taking the lock and writing, or the file is from an older version)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
