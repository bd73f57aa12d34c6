"""MCP servers as a tool source: one long-lived connection per configured server.

Design notes
- Each server has a supervisor task (:meth:`McpServer.run`): connect (stdio: start the
  command with its env; streamable HTTP: the URL with its headers; ``${secret:NAME}``
  resolved right then), list the tools, mark the server ``up``, list them again every
  ``ping_interval_s`` (the heartbeat; a changed listing updates the catalog). When the
  connection breaks (process died, no answer to the heartbeat, a call saw the transport
  close) mark it ``down`` and reconnect with capped exponential back-off. A server down
  at start is the same loop: the rest of the stack starts anyway.
- While a server is down its tools fail at once with ``tool_unavailable`` (retryable):
  nothing was sent, so retrying is safe for every tool.
- A call that was *sent* and then lost its connection is different: the server may have
  acted. An idempotent tool answers ``tool_unavailable`` (retry is harmless); a
  non-idempotent one answers ``ambiguous_outcome`` (not retryable), the same rule the
  tool-runner's ledger applies to a runner that died mid-call: never run it twice.
- Idempotency comes from the tools configuration, else from the server's own
  annotations (``idempotentHint`` or ``readOnlyHint``), else false.
- ``is_error`` results are ``tool_error`` (with the server's text, truncated); output
  that breaks the tool's declared output schema is ``invalid_output``; a call past its
  limit is ``timeout`` (retryable).
- Output: ``structuredContent`` when the tool declares an output schema; otherwise
  ``{"text": <its text blocks joined>, "content": [<blocks>]}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import mcp_types
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from loom_core.contracts import JSON, ErrorInfo, ToolSpec
from loom_services.tools.config import McpServerConfig, MissingSecret, with_secrets
from loom_services.tools.registry import ToolOutcome

log = logging.getLogger("loom.mcp")

MAX_ERROR_TEXT = 500
TEXT_OUTPUT_SCHEMA: dict[str, JSON] = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "description": "the tool's text content, joined"},
        "content": {"type": "array", "description": "the tool's content blocks"},
    },
    "required": ["text", "content"],
}


class _Broken(Exception):
    """The connection to the server is gone."""


@dataclass
class McpTool:
    server: str
    name: str  # the server's own name for it
    description: str
    input_schema: dict[str, JSON]
    output_schema: dict[str, JSON] | None
    idempotent: bool
    timeout_s: float

    @property
    def qualified(self) -> str:
        return f"{self.server}.{self.name}"

    def spec(self) -> ToolSpec:
        return ToolSpec(
            name=self.qualified,
            description=self.description,
            input_schema=self.input_schema,
            output_schema=self.output_schema or TEXT_OUTPUT_SCHEMA,
            idempotent=self.idempotent,
            timeout_s=self.timeout_s,
        )


class McpServer:
    """One configured server: its connection, its tools, its state."""

    def __init__(
        self,
        config: McpServerConfig,
        secret: Callable[[str], str | None],
        on_change: Callable[[McpServer], None] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self._secret = secret
        self.on_change = on_change
        self.state = "connecting"
        self.reason = ""
        self.tools: dict[str, McpTool] = {}
        self._client: Client | None = None
        self._broken = asyncio.Event()
        self._session_over = asyncio.Event()  # set when the current connection ends
        self.connects = 0

    # ----------------------------------------------------------------- supervision

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            # The session runs in a task of its own: when the transport fails, the SDK's
            # task group cancels its host task, and that must not be this loop.
            session = asyncio.ensure_future(self._session(stop))
            try:
                await session
                delay = 0.1
            except asyncio.CancelledError:
                if _being_cancelled():
                    session.cancel()
                    raise
                self._down("the connection was lost")
            except BaseException as exc:  # anyio may wrap in an ExceptionGroup
                self._down(_describe(exc))
            finally:
                self._session_over.set()  # calls still waiting on this session end
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # back-off, or stop
                    await stop.wait()
            delay = min(delay * 2, self.config.reconnect_max_s)
        self._client = None

    async def _session(self, stop: asyncio.Event) -> None:
        client = self._make_client()
        async with asyncio.timeout(self.config.connect_timeout_s):
            await client.__aenter__()
        try:
            listing = await asyncio.wait_for(
                self._list_tools(client), self.config.connect_timeout_s
            )
            self.tools = listing
            self._session_over = asyncio.Event()
            self._client = client
            self._broken.clear()
            self.connects += 1
            self.state, self.reason = "up", ""
            log.info("MCP server %r up with %d tools", self.name, len(listing))
            self._changed()
            await self._watch(client, stop)
        finally:
            self._client = None
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(5):
                    await client.__aexit__(None, None, None)
        if not stop.is_set():
            raise _Broken("the connection closed")

    async def _watch(self, client: Client, stop: asyncio.Event) -> None:
        """Return when the connection must be remade (or the service stops)."""
        while not stop.is_set() and not self._broken.is_set():
            waiters = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._broken.wait()),
            ]
            _, pending = await asyncio.wait(waiters, timeout=self.config.ping_interval_s)
            for w in pending:
                w.cancel()
            if stop.is_set() or self._broken.is_set():
                return
            try:  # a listing is the heartbeat (ping is deprecated in 2026-07-28 MCP)
                listing = await asyncio.wait_for(
                    self._list_tools(client), self.config.connect_timeout_s
                )
            except Exception as exc:
                raise _Broken(f"no answer to a tool listing: {_describe(exc)}") from exc
            if listing.keys() != self.tools.keys() or any(
                listing[n].spec() != self.tools[n].spec() for n in listing
            ):
                self.tools = listing
                self._changed()

    def _make_client(self) -> Client:
        c = self.config
        if c.command:
            env = with_secrets(c.env, self._secret)
            params = StdioServerParameters(
                command=c.command,
                args=list(c.args),
                # the child's PATH, passed through and nothing else of ours (no secret of
                # this process leaks into a server's environment; test_settings_only.py)
                env={"PATH": os.environ.get("PATH", ""), **env},
                cwd=c.cwd,
            )
            transport: Any = stdio_client(params, errlog=_stderr_sink())
        else:
            assert c.url is not None
            http = create_mcp_http_client(headers=with_secrets(c.headers, self._secret))
            transport = streamable_http_client(c.url, http_client=http)
        return Client(transport, mode="legacy", cache=None)

    async def _list_tools(self, client: Client) -> dict[str, McpTool]:
        tools: dict[str, McpTool] = {}
        cursor: str | None = None
        for _ in range(100):  # pages: bounded
            page = await client.session.list_tools(
                params=mcp_types.PaginatedRequestParams(cursor=cursor)
            )
            for t in page.tools:
                tools[t.name] = self._tool(t)
            cursor = page.next_cursor
            if not cursor:
                break
        # tools the operator declared but the server does not list stay unavailable
        return tools

    def _tool(self, t: mcp_types.Tool) -> McpTool:
        meta = self.config.tools.get(t.name)
        hints = t.annotations
        idempotent = bool(hints and (hints.idempotent_hint or hints.read_only_hint))
        if meta is not None and meta.idempotent is not None:
            idempotent = meta.idempotent
        timeout = meta.timeout_s if meta is not None and meta.timeout_s else None
        description = (meta.description if meta and meta.description else None) or (
            t.description or t.title or ""
        )
        return McpTool(
            server=self.name,
            name=t.name,
            description=description,
            input_schema=dict(t.input_schema),
            output_schema=dict(t.output_schema) if t.output_schema else None,
            idempotent=idempotent,
            timeout_s=timeout or self.config.timeout_s,
        )

    def _down(self, reason: str) -> None:
        was = self.state
        self.state, self.reason = "down", reason
        if was != "down":
            log.warning(
                "MCP server %r is down: %s; reconnecting in the background", self.name, reason
            )
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    @property
    def available(self) -> bool:
        return self.state == "up" and self._client is not None

    # ----------------------------------------------------------------------- calls

    def declared(self) -> dict[str, McpTool]:
        """Tools known now: listed by the server, or declared in the configuration
        (those have no schema until the server lists them)."""
        known = dict(self.tools)
        for name, meta in self.config.tools.items():
            if name not in known:
                known[name] = McpTool(
                    server=self.name,
                    name=name,
                    description=meta.description or f"(not listed yet by MCP server {self.name!r})",
                    input_schema={"type": "object"},
                    output_schema=None,
                    idempotent=bool(meta.idempotent),
                    timeout_s=meta.timeout_s or self.config.timeout_s,
                )
        return known

    def unavailable(self, tool: str) -> ToolOutcome:
        why = self.reason or self.state
        return ToolOutcome(
            ok=False,
            error=ErrorInfo(
                code="tool_unavailable",
                message=f"MCP server {self.name!r} is not connected ({why}), so "
                f"'{self.name}.{tool}' was not called; it is reconnected in the background "
                "and a retry of the step will reach it once it is back",
                retryable=True,
                details={"server": self.name, "state": self.state},
            ),
        )

    async def call(self, tool: McpTool, arguments: dict[str, JSON], limit: float) -> ToolOutcome:
        client = self._client
        if client is None or not self.available:
            return self.unavailable(tool.name)
        qualified = tool.qualified
        over = self._session_over
        try:
            async with asyncio.timeout(limit) as deadline:
                result = await _unless(
                    client.session.call_tool(tool.name, arguments, read_timeout_seconds=limit),
                    over,
                )
        except _Broken:
            return self._lost(tool, "the connection was lost during the call")
        except TimeoutError:
            if deadline.expired():
                return _fail(
                    "timeout",
                    f"MCP tool {qualified!r} did not answer within {limit:g} s; raise the "
                    "step's timeout_s if it needs longer",
                    retryable=True,
                    details={"timeout_s": limit, "server": self.name},
                )
            return self._lost(tool, "the request timed out in transport")
        except RuntimeError as exc:  # the SDK's output-schema check
            text = str(exc)
            if "structured content" in text or "Invalid schema" in text:
                return _fail(
                    "invalid_output",
                    f"MCP tool {qualified!r} returned output that does not match its "
                    f"declared output schema: {text[:MAX_ERROR_TEXT]}; this is a bug in the "
                    f"server {self.name!r}",
                    details={"server": self.name},
                )
            return self._lost(tool, _describe(exc))
        except MCPError as exc:
            if exc.error.code == mcp_types.CONNECTION_CLOSED:
                return self._lost(tool, "the connection closed during the call")
            return _fail(
                "tool_error",
                f"MCP server {self.name!r} refused '{tool.name}': "
                f"{exc.error.message[:MAX_ERROR_TEXT]}",
                details={"server": self.name, "mcp_code": exc.error.code},
            )
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as exc:
            return self._lost(tool, _describe(exc))
        if result.is_error:
            return _fail(
                "tool_error",
                f"MCP tool {qualified!r} reported an error: "
                f"{_text(result.content)[:MAX_ERROR_TEXT] or '(no text)'}",
                details={"server": self.name, "is_error": True},
            )
        if tool.output_schema:
            return ToolOutcome(ok=True, output=result.structured_content)
        blocks = [b.model_dump(mode="json", exclude_none=True) for b in result.content]
        return ToolOutcome(ok=True, output={"text": _text(result.content), "content": blocks})

    def _lost(self, tool: McpTool, why: str) -> ToolOutcome:
        """The call was sent and the connection broke: whether it acted is unknown."""
        self._broken.set()
        self._down(why)
        if tool.idempotent:
            return self.unavailable(tool.name)
        return _fail(
            "ambiguous_outcome",
            f"MCP server {self.name!r} went away during '{tool.qualified}' ({why}); the "
            "tool is not idempotent, so it was not called again. Check its effect by hand.",
            details={"server": self.name},
        )


class McpPool:
    """Every configured server, started together; a server that is down stops nothing."""

    def __init__(
        self,
        configs: tuple[McpServerConfig, ...],
        secret: Callable[[str], str | None],
        on_change: Callable[[McpServer], None] | None = None,
    ) -> None:
        self.servers = {c.name: McpServer(c, secret, on_change) for c in configs}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for server in self.servers.values():
            self._tasks.append(asyncio.ensure_future(server.run(self._stop)))

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 10)
        self._tasks.clear()

    def find(self, qualified: str) -> tuple[McpServer, McpTool] | None:
        server_name, dot, tool_name = qualified.partition(".")
        server = self.servers.get(server_name) if dot else None
        if server is None:
            return None
        tool = server.declared().get(tool_name)
        return None if tool is None else (server, tool)

    def tools(self) -> list[tuple[McpServer, McpTool]]:
        return [(s, t) for s in self.servers.values() for t in s.declared().values()]


async def _unless(call: Any, over: asyncio.Event) -> Any:
    """``await call``, or raise :class:`_Broken` if ``over`` is set first (the
    connection it was sent on ended: its answer will never come)."""
    work = asyncio.ensure_future(call)
    ended = asyncio.ensure_future(over.wait())
    try:
        done, _ = await asyncio.wait({work, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in (work, ended):
            if not f.done():
                f.cancel()
    if work in done and not work.cancelled():  # cancelled: by the SDK's dying session
        return work.result()
    raise _Broken("the connection ended")


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _fail(code: str, message: str, **kw: Any) -> ToolOutcome:
    return ToolOutcome(ok=False, error=ErrorInfo(code=code, message=message, **kw))


def _text(content: list[Any]) -> str:
    return "\n".join(b.text for b in content if getattr(b, "type", None) == "text")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MissingSecret):
        return f"secret {exc.name!r} named in its configuration is not defined"
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions[:3])
    text = str(exc)[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _stderr_sink() -> Any:
    """A stdio server's stderr: our stderr in debug, else discarded (servers log a lot,
    and a log line must not pass a secret from its environment)."""
    if log.isEnabledFor(logging.DEBUG):
        import sys

        return sys.stderr
    return open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
