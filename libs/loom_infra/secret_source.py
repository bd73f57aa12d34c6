"""The tool-runner's secret source: where ``{{ secrets.NAME }}`` gets its value.

Design notes
- Two places, read only by the tool-runner (``loom_core.secrets`` has the rules):
  - environment variables ``LOOM_SECRET_<NAME>`` (read once, through
    ``loom_infra.settings``); they win, so an operator can override a mounted file;
  - a directory (``LOOM_SECRETS_DIR``) with one file per name, which is how Kubernetes
    mounts a Secret. A file is read at each use, so a rotated Secret takes effect without
    a restart. One trailing newline is dropped (``echo value > NAME`` writes one).
- Names are ``[A-Za-z_][A-Za-z0-9_]{0,63}``: no path can be formed from one, and the
  ``..data`` links Kubernetes adds are never names.
- Files are bounded (:data:`MAX_SECRET_BYTES`) and must be UTF-8; otherwise the call
  fails with ``secret_unreadable`` (the message names the secret, never a value).
- Every value handed out is remembered by :data:`LOG_SCRUBBER`, which masks it in every
  log record of the process (a record factory: it also covers tracebacks). That is a
  safety net; no code logs a resolved value on purpose.
"""

from __future__ import annotations

import logging
import threading
import traceback
from pathlib import Path
from typing import Any

from loom_core.contracts import ErrorInfo
from loom_core.secrets import MIN_SCRUB_LENGTH, SecretReferenceError, is_secret_name, scrub_str
from loom_infra.settings import SecretSettings

MAX_SECRET_BYTES = 64 * 1024
MAX_REMEMBERED = 10_000


class LogScrubber:
    """Masks remembered values in every log record created in this process."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._forms: list[str] = []
        self._lock = threading.Lock()
        self._installed = False

    def remember(self, value: str) -> None:
        if len(value) < MIN_SCRUB_LENGTH or value in self._values:
            return
        with self._lock:
            if len(self._values) < MAX_REMEMBERED:
                self._values.add(value)
                self._forms = sorted(self._values, key=len, reverse=True)

    def install(self) -> None:
        """Wrap the log record factory (once per process)."""
        with self._lock:
            if self._installed:
                return
            previous = logging.getLogRecordFactory()

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                if self._forms:
                    self._scrub(record)
                return record

            logging.setLogRecordFactory(factory)
            self._installed = True

    def scrub(self, text: str) -> str:
        forms = self._forms
        return scrub_str(text, forms) if forms else text

    def _scrub(self, record: logging.LogRecord) -> None:
        forms = self._forms
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: logging reports it itself
            return
        if any(form in message for form in forms):
            record.msg, record.args = self.scrub(message), ()
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            if any(form in text for form in forms):
                # formatters use exc_text when it is set
                record.exc_text = self.scrub(text)


LOG_SCRUBBER = LogScrubber()


class SecretSource:
    """``get(name)``: the secret's value, or None when it is not defined."""

    def __init__(self, settings: SecretSettings, scrubber: LogScrubber = LOG_SCRUBBER) -> None:
        self._env = dict(settings.env)
        self._dir = settings.dir
        self._scrubber = scrubber
        scrubber.install()

    def get(self, name: str) -> str | None:
        if not is_secret_name(name):
            return None
        value = self._env.get(name)
        if value is None and self._dir is not None:
            value = self._read(name, self._dir / name)
        if value is not None:
            self._scrubber.remember(value)
        return value

    def _read(self, name: str, path: Path) -> str | None:
        try:
            with path.open("rb") as file:
                data = file.read(MAX_SECRET_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _unreadable(name, f"the file could not be read ({type(exc).__name__})") from None
        if len(data) > MAX_SECRET_BYTES:
            raise _unreadable(name, f"the file is larger than {MAX_SECRET_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _unreadable(name, "the file is not UTF-8 text") from None
        return text[:-1] if text.endswith("\n") else text


def _unreadable(name: str, why: str) -> SecretReferenceError:
    return SecretReferenceError(
        ErrorInfo(
            code="secret_unreadable",
            message=f"secret {name!r} in LOOM_SECRETS_DIR: {why}",
            details={"secret": name},
        )
    )
