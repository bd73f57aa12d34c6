"""MCP servers as a tool source, against real servers: the demo server (tests/mcp_servers)
over stdio and streamable HTTP, and the published ``mcp-server-time`` over stdio.
Failure paths: a server that never starts, one that dies mid-call (idempotent or not),
``is_error``, output violating its schema, a hang past the timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from tests.integration.waiting import eventually
from tests.mcp_servers.fixtures import demo_http, demo_stdio, free_port, time_stdio, wait_listening

from loom_services.tools import ToolContext, default_registry
from loom_services.tools.catalog import ToolCatalog, transitions_of
from loom_services.tools.config import parse_tools_config

pytestmark = pytest.mark.integration


def ctx(key: str = "k") -> ToolContext:
    return ToolContext(idempotency_key=key, run_id="r", step_id="s", attempt=1)


@pytest.fixture
async def make_catalog() -> AsyncIterator[Callable[..., Any]]:
    made: list[ToolCatalog] = []

    async def make(raw: dict[str, Any], secrets: dict[str, str] | None = None) -> ToolCatalog:
        catalog = ToolCatalog(default_registry(), parse_tools_config(raw), (secrets or {}).get)
        catalog.start()
        made.append(catalog)
        return catalog

    yield make
    for catalog in made:
        await catalog.close()


async def up(catalog: ToolCatalog, server: str, bound_s: float = 20.0) -> None:
    async def probe() -> bool:
        return catalog.mcp.servers[server].available

    await eventually(probe, f"MCP server {server} up", bound_s)


async def test_stdio_tools_join_the_catalog_and_answer(make_catalog, tmp_path: Path) -> None:
    catalog = await make_catalog({"mcp_servers": {"demo": demo_stdio(), "time": time_stdio()}})
    await up(catalog, "demo")
    await up(catalog, "time")
    specs = {s.name: s for s in catalog.specs()}
    assert specs["time.get_current_time"].source == "mcp:time"
    assert specs["time.get_current_time"].input_schema["required"] == ["timezone"]
    assert specs["time.get_current_time"].idempotent  # from its readOnly/idempotent hints
    assert specs["demo.add"].output_schema["properties"]["total"]["type"] == "integer"
    assert not specs["demo.bump"].idempotent  # no hint: not idempotent
    assert specs["echo"].source == "builtin" and specs["echo"].available

    out = await catalog.execute("time.get_current_time", {"timezone": "UTC"}, ctx(), None)
    assert out.ok and out.output["timezone"] == "UTC" and "datetime" in out.output
    out = await catalog.execute("demo.add", {"a": 2, "b": 40}, ctx(), None)
    assert out.ok and out.output == {"total": 42}
    # no output schema: the text content, and the blocks
    assert specs["demo.plain"].output_schema["required"] == ["text", "content"]
    out = await catalog.execute("demo.plain", {"name": "ada"}, ctx(), None)
    assert out.ok and out.output["text"] == "hello ada"
    assert out.output["content"] == [{"type": "text", "text": "hello ada"}]
    # built-ins keep working beside MCP tools
    out = await catalog.execute("echo", {"message": "hi"}, ctx(), None)
    assert out.ok and out.output == {"message": "hi"}


async def test_streamable_http_server_with_secret_header(make_catalog) -> None:
    port = free_port()
    with demo_http(port):
        await wait_listening(port)
        catalog = await make_catalog(
            {
                "mcp_servers": {
                    "web": {
                        "url": f"http://127.0.0.1:{port}/mcp",
                        "headers": {"Authorization": "Bearer ${secret:WEB_TOKEN}"},
                    }
                }
            },
            {"WEB_TOKEN": "tok-123456789"},
        )
        await up(catalog, "web")
        out = await catalog.execute("web.add", {"a": 1, "b": 2}, ctx(), None)
        assert out.ok and out.output == {"total": 3}


async def test_bad_results_are_typed_errors(make_catalog) -> None:
    catalog = await make_catalog({"mcp_servers": {"demo": demo_stdio()}})
    await up(catalog, "demo")
    out = await catalog.execute("demo.boom", {"reason": "x"}, ctx(), None)
    assert out.error.code == "tool_error" and out.error.details["is_error"]
    out = await catalog.execute("demo.liar", {}, ctx(), None)
    assert out.error.code == "invalid_output", out.error
    out = await catalog.execute("demo.hang", {"seconds": 30}, ctx(), 0.3)
    assert out.error.code == "timeout" and out.error.retryable
    out = await catalog.execute("demo.add", {"a": "two", "b": 1}, ctx(), None)
    assert out.error.code == "invalid_input" and out.error.path == "$.a"
    out = await catalog.execute("demo.nope", {}, ctx(), None)
    assert out.error.code == "unknown_tool"
    # the server is still fine after all of that
    assert (await catalog.execute("demo.add", {"a": 1, "b": 1}, ctx(), None)).ok


async def test_a_server_that_never_starts_leaves_the_rest_working(make_catalog) -> None:
    catalog = await make_catalog(
        {
            "mcp_servers": {
                "ghost": {
                    "command": "/nonexistent/mcp-server",
                    "tools": {"lookup": {"idempotent": True}},
                },
                "demo": demo_stdio(),
            }
        }
    )
    await up(catalog, "demo")

    async def down() -> bool:
        return catalog.mcp.servers["ghost"].state == "down"

    await eventually(down, "ghost marked down")
    specs = {s.name: s for s in catalog.specs()}
    assert not specs["ghost.lookup"].available
    assert "ghost" in specs["ghost.lookup"].unavailable_reason
    out = await catalog.execute("ghost.lookup", {}, ctx(), None)
    assert out.error.code == "tool_unavailable" and out.error.retryable
    assert (await catalog.execute("demo.add", {"a": 1, "b": 1}, ctx(), None)).ok
    assert (await catalog.execute("echo", {"message": 1}, ctx(), None)).ok


async def test_a_server_that_dies_mid_call_is_reconnected(make_catalog, tmp_path: Path) -> None:
    counter = tmp_path / "bumps"
    catalog = await make_catalog(
        {
            "mcp_servers": {
                "demo": demo_stdio(env={"DEMO_COUNTER_FILE": str(counter)}, ping_interval_s=0.2)
            },
            "breakers": {"threshold": 50},
        }
    )
    await up(catalog, "demo")
    # idempotent (read-only hint) tool whose server dies: retryable tool_unavailable
    out = await catalog.execute("demo.die", {}, ctx(), None)
    assert out.error.code == "ambiguous_outcome"  # `die` has no hint: not idempotent
    await up(catalog, "demo")  # reconnected in the background
    assert catalog.mcp.servers["demo"].connects == 2

    # a non-idempotent call whose server dies after acting: never run again
    Path(str(counter) + ".die").touch()
    out = await catalog.execute("demo.bump", {"label": "once"}, ctx(), None)
    assert out.error.code == "ambiguous_outcome" and not out.error.retryable
    assert counter.read_text() == "once\n"
    Path(str(counter) + ".die").unlink()
    await up(catalog, "demo")
    # while it was down, calls failed at once and retryably (nothing was sent)
    assert (await catalog.execute("demo.add", {"a": 1, "b": 2}, ctx(), None)).ok


async def test_tool_unavailable_while_down_then_back(make_catalog) -> None:
    port = free_port()
    catalog = await make_catalog(
        {
            "mcp_servers": {
                "web": {
                    "url": f"http://127.0.0.1:{port}/mcp",
                    "reconnect_max_s": 0.2,
                    "ping_interval_s": 0.2,
                    "tools": {"add": {"idempotent": True}},
                }
            }
        }
    )

    async def down() -> bool:
        return catalog.mcp.servers["web"].state == "down"

    await eventually(down, "web marked down")
    out = await catalog.execute("web.add", {"a": 1, "b": 2}, ctx(), None)
    assert out.error.code == "tool_unavailable"
    with demo_http(port) as proc:
        await up(catalog, "web")
        assert (await catalog.execute("web.add", {"a": 1, "b": 2}, ctx(), None)).ok
        proc.kill()
        proc.wait()
        await eventually(down, "web marked down after its process died")
        out = await catalog.execute("web.add", {"a": 1, "b": 2}, ctx(), None)
        assert out.error.code == "tool_unavailable" and out.error.retryable


async def test_breaker_opens_and_closes(make_catalog, tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    catalog = await make_catalog(
        {
            "mcp_servers": {"demo": demo_stdio(env={"DEMO_FAIL_FILE": str(flag)})},
            "breakers": {"threshold": 3, "cooldown_s": 0.3},
        }
    )
    await up(catalog, "demo")
    codes, seen = [], []
    for _ in range(4):
        out = await catalog.execute("demo.fragile", {}, ctx(), None)
        codes.append(out.error.code)
        seen += out.error.details.get("breaker", [])
    assert codes == ["tool_error"] * 3 + ["circuit_open"]
    assert [(t["breaker"], t["to"]) for t in seen] == [("tool:demo.fragile", "open")]
    assert {s.name: s for s in catalog.specs()}["demo.fragile"].breaker == "open"
    # siblings on the same server are not affected (the server's breaker stays closed)
    assert (await catalog.execute("demo.add", {"a": 1, "b": 1}, ctx(), None)).ok
    flag.unlink()
    await asyncio.sleep(0.35)  # the cool-down itself is what is tested here
    out = await catalog.execute("demo.fragile", {}, ctx(), None)
    assert out.ok
    assert [t["to"] for t in transitions_of(out)] == ["half_open", "closed"]
    assert {s.name: s for s in catalog.specs()}["demo.fragile"].breaker == "closed"


async def test_stdio_env_from_the_secret_source(make_catalog, caplog) -> None:
    catalog = await make_catalog(
        {
            "mcp_servers": {
                "demo": demo_stdio(env={"DEMO_TOKEN": "${secret:DEMO_TOKEN}"}),
                "nosecret": demo_stdio(env={"DEMO_TOKEN": "${secret:NOT_DEFINED}"}),
            }
        },
        {"DEMO_TOKEN": "s3cr3t-value-123"},
    )
    await up(catalog, "demo")
    out = await catalog.execute("demo.has_token", {}, ctx(), None)
    assert out.ok and out.output == {"result": True}  # a bool return has a wrapped schema

    async def refused() -> bool:
        return catalog.mcp.servers["nosecret"].state == "down"

    await eventually(refused, "a server whose secret is missing marked down")
    reason = catalog.mcp.servers["nosecret"].reason
    assert "NOT_DEFINED" in reason and "not defined" in reason
    assert "s3cr3t-value-123" not in caplog.text
    assert all("s3cr3t" not in repr(s) for s in catalog.specs())
