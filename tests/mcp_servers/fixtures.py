"""Starting the test MCP servers: the demo server over stdio (a config entry) or over
streamable HTTP (a real uvicorn process on a free port), and mcp-server-time."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEMO = Path(__file__).with_name("demo_server.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_stdio(**extra: object) -> dict[str, object]:
    return {"command": sys.executable, "args": [str(DEMO)], **extra}


def time_stdio(**extra: object) -> dict[str, object]:
    # the published server (mcp-server-time==2026.10.19), run from this interpreter
    return {
        "command": sys.executable,
        "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"],
        **extra,
    }


async def wait_listening(port: int, bound_s: float = 20.0) -> None:
    async with asyncio.timeout(bound_s):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)  # the polling interval of a bounded wait
                continue
            writer.close()
            return


@contextmanager
def demo_http(port: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    import os

    proc = subprocess.Popen(
        [sys.executable, str(DEMO), "http", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
