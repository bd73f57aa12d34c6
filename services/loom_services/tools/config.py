"""The tools configuration file (``LOOM_TOOLS_CONFIG``, YAML or JSON): MCP servers,
per-tool metadata and the circuit breakers' settings. Written by the operator, never by a
plan. Example::

    mcp_servers:
      time:                       # its tools are `time.<tool>` in the catalog
        command: mcp-server-time  # stdio: a command, its args and env
        args: ["--local-timezone", "UTC"]
        env: {TZ_API_KEY: "${secret:TZ_API_KEY}"}
        timeout_s: 10
        tools:                    # optional: metadata, and tools known before it is up
          get_current_time: {idempotent: true, category: time}
      search:
        url: http://search.internal:8000/mcp   # streamable HTTP
        headers: {Authorization: "Bearer ${secret:SEARCH_TOKEN}"}
    tools:                        # metadata for built-in and module tools
      http_request: {category: network, requires_auth: true}
    breakers: {threshold: 5, cooldown_s: 30}

``${secret:NAME}`` is replaced by the secret source's value (``loom_infra.secret_source``)
when the server is started or connected, never earlier: the value is in no file, event
or log. Every mistake is a :class:`SettingsError` naming its path in the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loom_core.errors import LoomError
from loom_infra.settings import SettingsError
from loom_services.tools.breakers import BreakerSettings

ENV_VAR = "LOOM_TOOLS_CONFIG"
SERVER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
SECRET_REF = re.compile(r"\$\{secret:([A-Za-z_][A-Za-z0-9_]{0,63})\}")
MAX_CONFIG_BYTES = 1_000_000


@dataclass(frozen=True)
class ToolMetaConfig:
    """What the operator says about one tool (None: keep the tool's own value)."""

    category: str | None = None
    requires_auth: bool | None = None
    admin_only: bool | None = None
    idempotent: bool | None = None
    timeout_s: float | None = None
    description: str | None = None


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 30.0  # a call's default limit
    connect_timeout_s: float = 15.0
    ping_interval_s: float = 5.0  # how soon a silent death is noticed
    reconnect_max_s: float = 30.0  # back-off ceiling between reconnects
    tools: Mapping[str, ToolMetaConfig] = field(default_factory=dict)

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "http"


@dataclass(frozen=True)
class ToolsConfig:
    mcp_servers: tuple[McpServerConfig, ...] = ()
    tools: Mapping[str, ToolMetaConfig] = field(default_factory=dict)
    breakers: BreakerSettings = field(default_factory=BreakerSettings)


def load_tools_config(path: Path | None) -> ToolsConfig:
    """The configuration in ``path`` (``Settings.tools_config``: LOOM_TOOLS_CONFIG); an
    empty one when None."""
    if path is None:
        return ToolsConfig()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SettingsError(ENV_VAR, f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise SettingsError(ENV_VAR, f"{path} is over {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(data) if path.suffix == ".json" else yaml.safe_load(data)
    except (ValueError, yaml.YAMLError) as exc:
        raise SettingsError(ENV_VAR, f"{path} is not valid YAML/JSON: {exc}") from exc
    return parse_tools_config(raw or {}, str(path))


def parse_tools_config(raw: Any, where: str = "tools config") -> ToolsConfig:
    top = _mapping(raw, where, "$", {"mcp_servers", "tools", "breakers"})
    servers = []
    for name, body in _mapping(top.get("mcp_servers", {}), where, "$.mcp_servers").items():
        servers.append(_server(name, body, where))
    tools = {
        str(name): _meta(body, where, f"$.tools.{name}")
        for name, body in _mapping(top.get("tools", {}), where, "$.tools").items()
    }
    b = _mapping(top.get("breakers", {}), where, "$.breakers", {"threshold", "cooldown_s"})
    breakers = BreakerSettings(
        threshold=_number(b.get("threshold", 5), where, "$.breakers.threshold", int, 1),
        cooldown_s=_number(b.get("cooldown_s", 30.0), where, "$.breakers.cooldown_s", float, 0),
    )
    return ToolsConfig(mcp_servers=tuple(servers), tools=tools, breakers=breakers)


_SERVER_KEYS = {
    "command",
    "args",
    "env",
    "cwd",
    "url",
    "headers",
    "timeout_s",
    "connect_timeout_s",
    "ping_interval_s",
    "reconnect_max_s",
    "tools",
}


def _server(name: Any, body: Any, where: str) -> McpServerConfig:
    path = f"$.mcp_servers.{name}"
    if not isinstance(name, str) or not SERVER_NAME.match(name):
        raise SettingsError(
            where, f"{path}: a server name is a letter then letters, digits, '_' or '-'"
        )
    b = _mapping(body, where, path, _SERVER_KEYS)
    command, url = b.get("command"), b.get("url")
    if (command is None) == (url is None):
        raise SettingsError(where, f"{path}: give exactly one of `command` (stdio) or `url`")
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        raise SettingsError(where, f"{path}.url: an http:// or https:// URL")
    if command is not None and not (isinstance(command, str) and command):
        raise SettingsError(where, f"{path}.command: a program name or path")
    args = b.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SettingsError(where, f"{path}.args: a list of strings")
    tools = {
        str(t): _meta(v, where, f"{path}.tools.{t}")
        for t, v in _mapping(b.get("tools", {}), where, f"{path}.tools").items()
    }
    return McpServerConfig(
        name=name,
        command=command,
        args=tuple(args),
        env=_strings(b.get("env", {}), where, f"{path}.env"),
        cwd=b.get("cwd"),
        url=url,
        headers=_strings(b.get("headers", {}), where, f"{path}.headers"),
        timeout_s=_number(b.get("timeout_s", 30.0), where, f"{path}.timeout_s", float, 0.001),
        connect_timeout_s=_number(
            b.get("connect_timeout_s", 15.0), where, f"{path}.connect_timeout_s", float, 0.001
        ),
        ping_interval_s=_number(
            b.get("ping_interval_s", 5.0), where, f"{path}.ping_interval_s", float, 0.05
        ),
        reconnect_max_s=_number(
            b.get("reconnect_max_s", 30.0), where, f"{path}.reconnect_max_s", float, 0.05
        ),
        tools=tools,
    )


def _meta(body: Any, where: str, path: str) -> ToolMetaConfig:
    keys = {"category", "requires_auth", "admin_only", "idempotent", "timeout_s", "description"}
    b = _mapping(body, where, path, keys)
    for flag in ("requires_auth", "admin_only", "idempotent"):
        if flag in b and not isinstance(b[flag], bool):
            raise SettingsError(where, f"{path}.{flag}: true or false")
    for text in ("category", "description"):
        if text in b and not isinstance(b[text], str):
            raise SettingsError(where, f"{path}.{text}: a string")
    timeout = b.get("timeout_s")
    return ToolMetaConfig(
        category=b.get("category"),
        requires_auth=b.get("requires_auth"),
        admin_only=b.get("admin_only"),
        idempotent=b.get("idempotent"),
        timeout_s=None if timeout is None else _number(timeout, where, f"{path}.timeout_s", float),
        description=b.get("description"),
    )


def _mapping(value: Any, where: str, path: str, allowed: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SettingsError(where, f"{path}: expected a mapping")
    if allowed is not None:
        unknown = sorted(set(map(str, value)) - allowed)
        if unknown:
            raise SettingsError(
                where, f"{path}: unknown key {unknown[0]!r}; expected one of {sorted(allowed)}"
            )
    return value


def _strings(value: Any, where: str, path: str) -> dict[str, str]:
    m = _mapping(value, where, path)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
        raise SettingsError(where, f"{path}: a mapping of strings to strings")
    return dict(m)


def _number(value: Any, where: str, path: str, kind: type, minimum: float = 0.001) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise SettingsError(where, f"{path}: a number >= {minimum}")
    return kind(value)


class MissingSecret(LoomError):
    code = "secret_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def with_secrets(values: Mapping[str, str], lookup: Callable[[str], str | None]) -> dict[str, str]:
    """``values`` with each ``${secret:NAME}`` replaced by its value from ``lookup``;
    raises :class:`MissingSecret` naming the first secret that is not defined."""

    def one(m: re.Match[str]) -> str:
        value = lookup(m.group(1))
        if value is None:
            raise MissingSecret(m.group(1))
        return value

    return {k: SECRET_REF.sub(one, v) for k, v in values.items()}
