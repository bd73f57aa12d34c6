"""Running the console: uvicorn in the caller's event loop (``loom console`` and ``loom
up``), on 127.0.0.1 unless told otherwise, on a free port when asked for port 0."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn

from loom_console.app import DEFAULT_HOSTS, Console, build_app
from loom_core.limits import DEFAULT_MAX_DEPTH
from loom_infra.client import LoomClient
from loom_infra.settings import DEFAULT_MAX_PAYLOAD

DEFAULT_PORT = 8484


class _Server(uvicorn.Server):
    """uvicorn inside someone else's process: the caller (``loom up``, ``loom console``,
    a test) owns SIGINT and SIGTERM and stops the console itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ConsoleServer:
    """``async with ConsoleServer(client) as s: print(s.url)``: serving until the block
    ends. The client stays the caller's (opened and closed by it)."""

    def __init__(
        self,
        client: LoomClient,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        allow_hosts: tuple[str, ...] = (),
        by: str = "console",
        max_json_depth: int = DEFAULT_MAX_DEPTH,  # LOOM_MAX_JSON_DEPTH (Settings)
        max_payload: int = DEFAULT_MAX_PAYLOAD,  # LOOM_MAX_PAYLOAD (Settings)
    ) -> None:
        hosts = DEFAULT_HOSTS | {host.lower()} | {h.lower() for h in allow_hosts}
        self.app, self.console = build_app(
            client, hosts=frozenset(hosts), by=by,
            max_json_depth=max_json_depth, max_payload=max_payload,
        )  # fmt: skip
        self.host, self.port = host, port
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))  # here, so a busy port is the caller's error
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=2,
        )  # fmt: skip
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:  # bounded by the task: it ends on a start failure
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)  # uvicorn has no started event; a startup poll

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 5)
        if self._socket is not None:
            self._socket.close()

    async def __aenter__(self) -> ConsoleServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


__all__ = ["ConsoleServer", "Console", "DEFAULT_PORT"]
