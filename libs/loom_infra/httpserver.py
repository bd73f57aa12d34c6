"""The health and metrics endpoint of a service process: ``/livez``, ``/readyz``,
``/metrics``, over plain asyncio (no dependency, no thread).

Why HTTP: a Kubernetes ``httpGet`` probe costs the kubelet one request, where an exec
probe started a Python process (0.23 CPU-s) per probe; and readiness can now say what is
wrong, not only that a responder answered.

- ``/livez``: 200 while the event loop answers and no liveness check fails; 503 with
  the reasons when one does (a service task that ended: only a restart brings it back,
  so Kubernetes must restart the pod rather than leave it unready forever).
- ``/readyz``: 200 when every readiness check passes; otherwise 503 with a JSON body
  ``{"ready": false, "reasons": [...]}`` naming each failing check.
- ``/metrics``: the registry in the Prometheus text format; async collectors (JetStream
  consumer lag) run first, each bounded in time.

Requests are GET only, one per connection, with a bounded request head: this is a probe
endpoint, not a web server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from loom_infra import metrics

log = logging.getLogger("loom.http")

# A readiness check returns None when fine, else a reason naming what and where.
Check = Callable[[], Awaitable[str | None]]
Collector = Callable[[], Awaitable[None]]

HEAD_LIMIT = 8192
READ_TIMEOUT_S = 5.0
CHECK_TIMEOUT_S = 3.0


@dataclass
class HealthServer:
    host: str
    port: int
    checks: list[tuple[str, Check]] = field(default_factory=list)
    live_checks: list[tuple[str, Check]] = field(default_factory=list)
    collectors: list[Collector] = field(default_factory=list)
    registry: metrics.Registry = metrics.REGISTRY
    _server: asyncio.Server | None = None

    def add_check(self, name: str, check: Check, *, live: bool = False) -> None:
        """A readiness check; ``live``: also a liveness check (its failure is one a
        restart cures and waiting does not)."""
        self.checks.append((name, check))
        if live:
            self.live_checks.append((name, check))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sockets: Sequence = self._server.sockets or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]  # port 0 in tests: the one chosen
        log.info("health and metrics on http://%s:%s (/livez /readyz /metrics)", self.host,
                 self.port)  # fmt: skip

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def readiness(self) -> list[str]:
        """The reasons this process is not ready (empty: ready)."""
        reasons = await _failing(self.checks)
        metrics.READY.set(0 if reasons else 1)
        return reasons

    async def liveness(self) -> list[str]:
        """The reasons this process should be restarted (empty: live)."""
        return await _failing(self.live_checks)

    async def render_metrics(self) -> str:
        for collect in self.collectors:
            try:
                await asyncio.wait_for(collect(), CHECK_TIMEOUT_S)
            except Exception as exc:  # a scrape still answers with what it has
                log.debug("metrics collector failed: %r", exc)
        return self.registry.render()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError):
                return
            if len(head) > HEAD_LIMIT:
                await _send(writer, 431, "text/plain", "request head too large\n")
                return
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await _send(writer, 405, "text/plain", "GET only\n")
                return
            if path == "/livez":
                dead = await self.liveness()
                body = json.dumps({"live": not dead, "reasons": dead}) + "\n"
                await _send(writer, 503 if dead else 200, "application/json", body)
            elif path == "/readyz":
                reasons = await self.readiness()
                body = json.dumps({"ready": not reasons, "reasons": reasons}) + "\n"
                await _send(writer, 503 if reasons else 200, "application/json", body)
            elif path == "/metrics":
                text = await self.render_metrics()
                await _send(writer, 200, "text/plain; version=0.0.4; charset=utf-8", text)
            else:
                await _send(writer, 404, "text/plain", "try /livez, /readyz or /metrics\n")
        except Exception:  # a probe's failure must never reach the service
            log.exception("health endpoint failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _failing(checks: list[tuple[str, Check]]) -> list[str]:
    """Each failing check as ``name: reason``; a check that raises or does not answer in
    CHECK_TIMEOUT_S fails with that as its reason."""
    reasons: list[str] = []
    for name, check in checks:
        try:
            reason = await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
        except TimeoutError:
            reason = f"no answer within {CHECK_TIMEOUT_S:.0f}s"
        except Exception as exc:
            reason = f"check failed: {type(exc).__name__}: {exc}"
        if reason is not None:
            reasons.append(f"{name}: {reason}")
    return reasons


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}  # fmt: skip


async def _send(writer: asyncio.StreamWriter, status: int, kind: str, body: str) -> None:
    data = body.encode()
    writer.write(
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()
