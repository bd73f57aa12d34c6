"""``loom mcp``: serve agentloom to other agents over MCP (loom_services.mcp_server).

``loom mcp`` speaks stdio (an MCP host starts it as a subprocess); ``loom mcp --http
PORT`` serves streamable HTTP at ``/mcp`` with bearer-token authentication. Logs go to
stderr only: on stdio, stdout is the protocol.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import anyio
import typer

from loom_cli.common import TokenOpt, UrlOpt, fail
from loom_infra.auth import PrincipalResolver
from loom_infra.client import LoomClient
from loom_infra.settings import SettingsError, settings_from_env


def mcp(
    http: int = typer.Option(
        None, "--http", min=1, max=65535, help="serve streamable HTTP on this port (default: stdio)"
    ),  # noqa: E501
    host: str = typer.Option("127.0.0.1", "--host", help="HTTP address to listen on"),
    identity: str = typer.Option(
        "operator", "--identity", help="NATS identity: operator, or client (submit only)"
    ),  # noqa: E501
    token: str = TokenOpt,
    url: str = UrlOpt,
) -> None:
    """Serve agentloom over MCP: submit runs, read status, output and traces, list, resume,
    cancel and fork them. stdio by default; --http PORT for streamable HTTP."""
    from loom_services.mcp_server import SharedClient, build_server, http_app

    if identity not in ("operator", "client"):
        raise fail("--identity is operator or client")
    try:
        settings = settings_from_env()
    except SettingsError as exc:
        raise fail(str(exc)) from None
    if url:
        settings = dataclasses.replace(settings, nats_url=url)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)

    async def factory() -> LoomClient:
        seed = settings.seed_file_for(identity)
        return await LoomClient.connect(settings.nats_url, seed=seed, identity=identity)

    shared = SharedClient(factory)
    server = build_server(shared, local_token=None if http else token)

    async def main() -> None:
        try:
            if http is None:
                await server.run_stdio_async()
                return
            import uvicorn

            try:
                resolver = PrincipalResolver(settings.auth)
            except SettingsError as exc:
                raise fail(str(exc)) from None
            app = http_app(server, resolver, host=host)
            config = uvicorn.Config(app, host=host, port=http, log_level="warning")
            sys.stderr.write(f"agentloom MCP server at http://{host}:{http}/mcp\n")
            await uvicorn.Server(config).serve()
        finally:
            await shared.close()

    anyio.run(main)


def register(app: typer.Typer) -> None:
    app.command("mcp")(mcp)
