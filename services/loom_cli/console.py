"""``loom console``: the web console (``loom_console``) on 127.0.0.1, as the operator
identity this CLI uses; ``loom up`` starts it too (``--no-console`` leaves it out)."""

from __future__ import annotations

import asyncio
import signal

import typer

from loom_cli.common import ExitCode, TokenOpt, UrlOpt, connect, fail
from loom_cli.control import operator
from loom_cli.render import stderr
from loom_infra.settings import json_depth_from_env, payload_limit_from_env

DEFAULT_PORT = 8484  # loom_console.server.DEFAULT_PORT, without importing the web stack

HostOpt = typer.Option(
    "127.0.0.1",
    "--host",
    help="address to listen on; anything but loopback lets others act as the operator",
)
AllowHostOpt = typer.Option(
    [], "--allow-host", help="another name the browser may use for this server (repeatable)"
)


def console_port_busy(port: int, exc: OSError) -> typer.Exit:
    return fail(
        f"the console cannot listen on port {port} ({exc.strerror or exc}): pick another "
        "with --console-port / --port (0: any free port)",
        ExitCode.UNAVAILABLE,
    )


def console(
    port: int = typer.Option(DEFAULT_PORT, "--port", "-p", help="HTTP port (0: any free one)"),
    host: str = HostOpt,
    allow_host: list[str] = AllowHostOpt,
    token: str = TokenOpt,
    url: str = UrlOpt,
) -> None:
    """Serve the web console for runs: list, follow, resume, fork, diff, submit.

    It reads only through the same NATS routes as this CLI, with the operator key
    (LOOM_NKEY_SEED_FILE, or the one `loom up` wrote), and prints the address to open.
    Runs submitted from it act for the user of LOOM_TOKEN, as `loom run` does."""
    from loom_console.server import ConsoleServer

    async def main() -> None:
        async with await connect(url) as client:
            client.token = token or None  # the principal runs submitted here act for
            try:
                server = ConsoleServer(
                    client, host, port, tuple(allow_host), by=operator(),
                    max_json_depth=json_depth_from_env(), max_payload=payload_limit_from_env(),
                )  # fmt: skip
                await server.start()
            except OSError as exc:
                raise console_port_busy(port, exc) from None
            stderr.print(f"[green]console[/]: {server.url}  (Ctrl-C to stop)", soft_wrap=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await stop.wait()
            finally:
                await server.stop()

    asyncio.run(main())


def register(app: typer.Typer) -> None:
    app.command()(console)
