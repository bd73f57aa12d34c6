"""agentloom as an MCP server, driven by the MCP SDK's own client against the real stack
(nats-server, SQLite, the five services): ``loom mcp`` over stdio (a subprocess, like an
MCP host starts it) and ``loom mcp --http`` over streamable HTTP with bearer JWTs
verified as the executor verifies them (the run's principal is the caller; one user
cannot see another's runs; no token or a bad one is a 401)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from tests.integration.conftest import make_settings
from tests.mcp_servers.fixtures import free_port, wait_listening

from loom_infra.settings import AuthSettings, StoreSettings
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

LOOM = str(Path(sys.executable).with_name("loom"))
ISSUER, AUDIENCE = "https://id.example.test", "agentloom"
ECHO_PLAN = {
    "steps": [{"kind": "tool", "id": "say", "tool": "echo", "input": {"message": "{{ input.x }}"}}],
    "output": {"said": "{{ steps.say.output.message }}"},
}
APPROVAL_PLAN = {
    "steps": [{"kind": "approval", "id": "ok", "label": "go", "schema": {"type": "boolean"}}],
    "output": {"approved": "{{ steps.ok.output }}"},
}


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    return result.structured_content


def error_text(result: Any) -> str:
    assert result.is_error, result.structured_content
    return "\n".join(c.text for c in result.content if c.type == "text")


@pytest.fixture(scope="module")
def issuer_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: Any, sub: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600, **claims}
    return jwt.encode(body, key, algorithm="RS256")


@pytest.fixture
async def stack(
    tmp_path: Path, sqlite_store_settings: StoreSettings, issuer_key: rsa.RSAPrivateKey
) -> AsyncIterator[tuple[LocalStack, dict[str, str]]]:
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(
        issuer_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    # tokens are verified, and an operator-side caller without one runs as anonymous
    auth = AuthSettings(issuer=ISSUER, audience=AUDIENCE, public_key_file=key_file, anonymous=True)
    async with LocalStack(make_settings(sqlite_store_settings, auth=auth), nats_port=-1) as s:
        env = {
            **os.environ,
            "LOOM_NATS_URL": s.url,
            "LOOM_NKEY_SEED_FILE": str(s.seed_file("operator")),
            "LOOM_AUTH_ISSUER": ISSUER,
            "LOOM_AUTH_AUDIENCE": AUDIENCE,
            "LOOM_AUTH_PUBLIC_KEY_FILE": str(key_file),
        }
        yield s, env


async def test_stdio_server_submits_a_run_and_reads_it(stack) -> None:
    _, env = stack
    params = StdioServerParameters(command=LOOM, args=["mcp"], env=env)
    async with Client(params, mode="legacy") as mcp:
        names = {t.name for t in (await mcp.list_tools()).tools}
        assert names == {
            "submit_run", "get_run", "list_runs", "describe_run", "resume_run",
            "cancel_run", "fork_run", "run_trace",
        }  # fmt: skip
        done = structured(
            await mcp.call_tool(
                "submit_run", {"plan": ECHO_PLAN, "input": {"x": "hi"}, "wait_s": 30}
            )
        )
        assert (done["status"], done["output"]) == ("completed", {"said": "hi"})
        run_id = done["run_id"]
        got = structured(await mcp.call_tool("get_run", {"run_id": run_id}))
        assert got["status"] == "completed" and got["output"] == {"said": "hi"}
        listed = structured(await mcp.call_tool("list_runs", {"limit": 10}))
        assert run_id in [r["run_id"] for r in listed["runs"]]
        stats = structured(await mcp.call_tool("describe_run", {"run_id": run_id}))
        assert stats["stats"]["status"] == "completed"
        trace = structured(await mcp.call_tool("run_trace", {"run_id": run_id}))
        assert any(s["name"].startswith("execute_tool echo") for s in trace["spans"])
        fork = structured(
            await mcp.call_tool(
                "fork_run", {"run_id": run_id, "from_step": "say", "input": {"x": "again"}}
            )
        )
        assert fork["forked_from"] == run_id and fork["run_id"] != run_id

        # a suspension answered through MCP
        waiting = structured(
            await mcp.call_tool("submit_run", {"plan": APPROVAL_PLAN, "wait_s": 2})
        )
        assert waiting["status"] == "running"
        bad = await mcp.call_tool(
            "resume_run", {"run_id": waiting["run_id"], "data": "yes", "label": "go"}
        )
        assert "boolean" in error_text(bad) or "invalid" in error_text(bad)
        structured(
            await mcp.call_tool(
                "resume_run", {"run_id": waiting["run_id"], "data": True, "label": "go"}
            )
        )
        # and one cancelled
        other = structured(await mcp.call_tool("submit_run", {"plan": APPROVAL_PLAN}))
        cancelled = structured(
            await mcp.call_tool("cancel_run", {"run_id": other["run_id"], "reason": "test"})
        )
        assert cancelled["run_id"] == other["run_id"]

        # hostile or careless input: typed errors, the server keeps serving
        assert "invalid_request" in error_text(
            await mcp.call_tool("submit_run", {"plan": {"steps": "nope"}})
        )
        assert "not_found" in error_text(await mcp.call_tool("get_run", {"run_id": "run-nope"}))
        assert "no_model_configured" in json.dumps(
            structured(await mcp.call_tool("submit_run", {"request": "hello", "wait_s": 20}))
        )
        resumed = structured(await mcp.call_tool("get_run", {"run_id": waiting["run_id"]}))
        assert resumed["status"] in ("running", "completed")


@pytest.fixture
def http_server(stack) -> Iterator[str]:
    _, env = stack
    port = free_port()
    proc = subprocess.Popen(
        [LOOM, "mcp", "--http", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(10)


def http_client(url: str, bearer: str | None) -> Client:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    transport = streamable_http_client(url, http_client=create_mcp_http_client(headers=headers))
    return Client(transport, mode="legacy")


async def test_http_server_authenticates_and_scopes_runs(
    stack, http_server: str, issuer_key: rsa.RSAPrivateKey
) -> None:
    local, _ = stack
    await wait_listening(int(http_server.rsplit(":", 1)[1].split("/")[0]))
    alice, bob = token(issuer_key, "alice"), token(issuer_key, "bob")
    async with http_client(http_server, alice) as mcp:
        done = structured(
            await mcp.call_tool(
                "submit_run", {"plan": ECHO_PLAN, "input": {"x": "from alice"}, "wait_s": 30}
            )
        )
        assert done["output"] == {"said": "from alice"}
        run_id = done["run_id"]
    # the run acts for alice: the executor verified the token passed along
    async with await local.client() as client:
        first = (await client.events(run_id))[0].event
        assert (first.principal.user_id, first.principal.issuer) == ("alice", ISSUER)
    async with http_client(http_server, bob) as mcp:
        assert "not_found" in error_text(await mcp.call_tool("get_run", {"run_id": run_id}))
        mine = structured(await mcp.call_tool("list_runs", {}))
        assert run_id not in [r["run_id"] for r in mine["runs"]]
    admin = token(issuer_key, "root", roles=["admin"])
    async with http_client(http_server, admin) as mcp:
        assert structured(await mcp.call_tool("get_run", {"run_id": run_id}))["status"]

    # no token where tokens are required (LOOM_AUTH_ISSUER set, anonymous not allowed),
    # a forged or a malformed one: 401 with the reason, before any MCP handling
    async with httpx.AsyncClient() as raw:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        missing = await raw.post(http_server, json=body)
        assert missing.status_code == 401 and missing.json()["error"] == "not_authenticated"
        forged = token(rsa.generate_private_key(public_exponent=65537, key_size=2048), "eve")
        bad = await raw.post(http_server, json=body, headers={"Authorization": f"Bearer {forged}"})
        assert bad.status_code == 401 and "signature" in bad.json()["message"]
        junk = await raw.post(http_server, json=body, headers={"Authorization": "Basic x"})
        assert junk.status_code == 401 and junk.json()["error"] == "token_invalid"
