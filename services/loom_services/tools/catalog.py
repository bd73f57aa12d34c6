"""The tool-runner's catalog: every tool source in layers, one way to call any of them.

Layers: built-in tools, module tools (``LOOM_TOOL_MODULES``), then each MCP server
(``LOOM_TOOLS_CONFIG``). A layer that is missing or down never takes the others with it:
a module that fails to import is a startup error (the operator named it), but an MCP
server that is down only marks its own tools unavailable.

Every call goes through the breakers (one per tool, one per MCP server), then to the
registry's :func:`execute_tool` or to the MCP server. What a call reports about breaker
transitions rides on its outcome (``ToolOutcome.breaker``) into the run's events.

:meth:`ToolCatalog.specs` is what the catalog route (``loom_tools`` KV) publishes: each
tool's schemas plus its source, metadata, availability and breaker state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from loom_core import codec, schemas
from loom_core.contracts import JSON, ErrorInfo, ToolSpec
from loom_infra.bus import tool_key as catalog_key
from loom_services.tools.breakers import Breakers, Transition, counts_as_failure
from loom_services.tools.config import ToolMetaConfig, ToolsConfig
from loom_services.tools.mcp_client import McpPool, McpServer
from loom_services.tools.registry import ToolContext, ToolOutcome, ToolRegistry, execute_tool

log = logging.getLogger("loom.tools")

# Categories of the built-ins (the operator can override any of them in the config).
BUILTIN_CATEGORIES = {
    "http_get": "network",
    "http_request": "network",
    "sleep": "control",
    "flaky": "testing",
}


@dataclasses.dataclass(frozen=True)
class CatalogOutcome:
    outcome: ToolOutcome
    breaker: list[dict[str, JSON]]


class ToolCatalog:
    def __init__(
        self,
        registry: ToolRegistry,
        config: ToolsConfig | None = None,
        secret: Callable[[str], str | None] = lambda _name: None,
        sources: dict[str, str] | None = None,
    ) -> None:
        self.registry = registry
        self.config = config or ToolsConfig()
        self.sources = sources or {}  # tool name -> "module:<name>" for module tools
        self.on_change: Callable[[], None] | None = None
        self.breakers = Breakers(self.config.breakers, on_change=self._breaker_changed)
        self.mcp = McpPool(self.config.mcp_servers, secret, on_change=self._server_changed)

    def start(self) -> None:
        self.mcp.start()

    async def close(self) -> None:
        await self.mcp.close()

    def _breaker_changed(self, _t: Transition) -> None:
        if self.on_change is not None:
            self.on_change()

    def _server_changed(self, _s: McpServer) -> None:
        if self.on_change is not None:
            self.on_change()

    # ------------------------------------------------------------------ queries

    def idempotent(self, name: str) -> bool:
        """Unknown tools count as idempotent: they only ever yield an error."""
        tool = self.registry.get(name)
        if tool is not None:
            meta = self.config.tools.get(name)
            return meta.idempotent if meta and meta.idempotent is not None else tool.idempotent
        found = self.mcp.find(name)
        return True if found is None else found[1].idempotent

    def names(self) -> list[str]:
        return sorted([*self.registry.names(), *(t.qualified for _, t in self.mcp.tools())])

    def specs(self) -> list[ToolSpec]:
        out = []
        for spec in self.registry.specs():
            meta = self.config.tools.get(spec.name) or ToolMetaConfig()
            out.append(
                msgspec.structs.replace(
                    spec,
                    source=self.sources.get(spec.name, "builtin"),
                    category=_pick(meta.category, BUILTIN_CATEGORIES.get(spec.name, "general")),
                    requires_auth=bool(meta.requires_auth),
                    admin_only=bool(meta.admin_only),
                    idempotent=self.idempotent(spec.name),
                    description=meta.description or spec.description,
                    timeout_s=meta.timeout_s or spec.timeout_s,
                    breaker=self.breakers.state(f"tool:{spec.name}"),
                )
            )
        for server, tool in self.mcp.tools():
            meta = (
                server.config.tools.get(tool.name)
                or self.config.tools.get(tool.qualified)
                or ToolMetaConfig()
            )
            available = server.available and tool.name in server.tools
            reason = ""
            if not available:
                reason = (
                    f"MCP server {server.name!r} is {server.state}"
                    + (f": {server.reason}" if server.reason else "")
                    if not server.available
                    else f"MCP server {server.name!r} does not list this tool"
                )
            out.append(
                msgspec.structs.replace(
                    tool.spec(),
                    source=f"mcp:{server.name}",
                    category=_pick(meta.category, "mcp"),
                    requires_auth=bool(meta.requires_auth),
                    admin_only=bool(meta.admin_only),
                    available=available,
                    unavailable_reason=reason,
                    breaker=_worst(
                        self.breakers.state(f"tool:{tool.qualified}"),
                        self.breakers.state(f"mcp:{server.name}"),
                    ),
                )
            )
        return sorted(out, key=lambda s: s.name)

    # -------------------------------------------------------------------- calls

    async def execute(
        self, name: str, raw_input: dict[str, JSON], ctx: ToolContext, timeout_s: float | None
    ) -> ToolOutcome:
        """Run one call through its breakers; transitions land in the outcome (see
        :func:`with_transitions`)."""
        found = None if name in self.registry else self.mcp.find(name)
        if found is None:  # a registry tool, or unknown (execute_tool says which)
            meta = self.config.tools.get(name)
            limit = timeout_s if timeout_s is not None else (meta.timeout_s if meta else None)

            async def run() -> ToolOutcome:
                return await execute_tool(self.registry, name, raw_input, ctx, limit)

            names: tuple[str, ...] = (f"tool:{name}",) if name in self.registry else ()
        else:
            server, tool = found

            async def run() -> ToolOutcome:
                problem = self._check_input(name, tool.input_schema, raw_input)
                if problem is not None:
                    return ToolOutcome(ok=False, error=problem)
                return await server.call(tool, raw_input, timeout_s or tool.timeout_s)

            names = (f"mcp:{server.name}", f"tool:{name}")
        if not names:
            return await run()
        result, transitions, refused = await self.breakers.call(
            names, run, lambda o, breaker: counts_as_failure(o.error, breaker)
        )
        outcome = ToolOutcome(ok=False, error=refused) if refused is not None else result
        return with_transitions(outcome, [t.as_json() for t in transitions])

    def _check_input(
        self, name: str, schema: dict[str, JSON], value: dict[str, JSON]
    ) -> ErrorInfo | None:
        if schemas.schema_problem(schema) is not None:
            return None  # the server's schema is broken: let the server judge
        found = schemas.problems(schema, value)
        if not found:
            return None
        text = schemas.listed(found)
        return ErrorInfo(
            code="invalid_input",
            message=f"invalid input for tool {name!r}: {text}; "
            f"see its input schema with `loom tools show {name}`",
            path=found[0][0],
            details={"problems": [list(p) for p in found]},
        )


def with_transitions(outcome: ToolOutcome, transitions: list[dict[str, JSON]]) -> ToolOutcome:
    """Breaker transitions ride on the outcome: a failure's ``error.details.breaker``; a
    success's ``breaker`` attribute (the tool-runner copies it into ``ToolResult``)."""
    if not transitions:
        return outcome
    if outcome.error is not None:
        details = {**outcome.error.details, "breaker": transitions}
        return dataclasses.replace(
            outcome, error=msgspec.structs.replace(outcome.error, details=details)
        )
    return BreakerOutcome(
        ok=outcome.ok,
        output=outcome.output,
        error=None,
        suspend=outcome.suspend,
        breaker=transitions,
    )


@dataclasses.dataclass(frozen=True)
class BreakerOutcome(ToolOutcome):
    breaker: list[dict[str, JSON]] = dataclasses.field(default_factory=list)


def transitions_of(outcome: ToolOutcome) -> list[dict[str, JSON]]:
    return list(getattr(outcome, "breaker", []) or [])


def _pick(value: str | None, default: str) -> str:
    return value if value else default


def _worst(*states: str) -> str:
    for state in ("open", "half_open"):
        if state in states:
            return state
    return "closed"


class CatalogPublisher:
    """Keeps the ``loom_tools`` KV bucket (the catalog route) current: everything at
    start, then again after each change (a server up or down, a breaker transition),
    coalesced so a burst of changes is one pass. Tools of a configured MCP server that
    were published before but are not listed now (the server is down at start) stay in
    the catalog, marked unavailable: plans naming them still validate, and their calls
    fail ``tool_unavailable`` (retryable) until the server is back."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._published: dict[str, bytes] = {}

    def publish(self, catalog: ToolCatalog) -> None:
        self._dirty.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._loop(catalog))

    async def _loop(self, catalog: ToolCatalog) -> None:
        while self._dirty.is_set():
            self._dirty.clear()
            try:
                await self.publish_now(catalog)
            except Exception as exc:  # the catalog is advisory; calls still work
                log.warning("could not publish the tool catalog: %r", exc)
                return

    async def publish_now(self, catalog: ToolCatalog) -> None:
        specs = {s.name: s for s in catalog.specs()}
        if not self._published:  # first pass: keep what a down server published before
            for name, spec in (await self._existing()).items():
                server = spec.source.removeprefix("mcp:")
                if name in specs or not spec.source.startswith("mcp:"):
                    continue
                if server in catalog.mcp.servers:
                    specs[name] = msgspec.structs.replace(
                        spec,
                        available=False,
                        unavailable_reason=f"MCP server {server!r} is not connected",
                    )
                else:  # no longer configured
                    await self.kv.delete(catalog_key(name))
        for name, spec in specs.items():
            data = codec.encode(spec)
            if self._published.get(name) != data:
                await self.kv.put(catalog_key(name), data)
                self._published[name] = data

    async def _existing(self) -> dict[str, ToolSpec]:
        try:
            keys = await self.kv.keys()
        except Exception:  # nats-py raises NoKeysError on an empty bucket
            return {}
        out = {}
        for key in keys:
            entry = await self.kv.get(key)
            if entry.value:
                try:
                    spec = codec.decode(entry.value, ToolSpec)
                except Exception:  # noqa: S112 - an unreadable entry is rewritten
                    continue
                out[spec.name] = spec
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
