"""Memory as tools through the real stack (nats-server with per-service credentials,
SQLite, Qdrant local mode, the five services): plans call memory_* tools, the tool-runner
asks the memory service over its declared route, and the memory service acts as the run's
stored principal, from the verified JWT, never from the plan's text."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from loom_core import subjects
from loom_core.contracts import (
    MemoryReply,
    MemoryRequest,
    Plan,
    PlanRejected,
    Principal,
    RunRequest,
    StepCompleted,
    StepFailed,
    ToolStep,
)
from loom_infra import bus
from loom_infra.client import LoomClient
from loom_infra.settings import AuthSettings, Settings, StoreSettings
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

ISSUER = "https://id.example.test"
AUDIENCE = "agentloom"


@pytest.fixture(scope="module")
def issuer_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: Any, user: str, roles: list[str]) -> str:
    now = int(time.time())
    claims = {"sub": user, "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600, "jti": user,
              "roles": roles, "permissions": ["runs:submit"], "tenant": "acme"}  # fmt: skip
    return jwt.encode(claims, key, algorithm="RS256")


@pytest.fixture
async def stack(
    tmp_path: Path,
    sqlite_store_settings: StoreSettings,
    issuer_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[LocalStack]:
    monkeypatch.setenv("LOOM_EMBEDDER", "hash")  # speed; the model has its own test
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(
        issuer_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    auth = AuthSettings(issuer=ISSUER, audience=AUDIENCE, public_key_file=key_file)
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=sqlite_store_settings, auth=auth)
    async with LocalStack(settings, nats_port=-1) as s:
        yield s


@pytest.fixture
async def client(stack: LocalStack) -> AsyncIterator[LoomClient]:
    async with await stack.client() as c:
        yield c


async def run_steps(client: LoomClient, tok: str, *steps: ToolStep) -> dict[str, Any]:
    accepted = await client.submit(RunRequest(plan=Plan(steps=list(steps))), token=tok)
    records = await client.wait(accepted.run_id, timeout=60)
    out: dict[str, Any] = {}
    for r in records:
        if isinstance(r.event, StepCompleted):
            out[r.event.step_id] = r.event.output
        elif isinstance(r.event, StepFailed):
            out[r.event.step_id] = r.event.error
        elif isinstance(r.event, PlanRejected):
            out["rejected"] = r.event.issues
    return out


def step(id: str, tool: str, **inp: Any) -> ToolStep:
    return ToolStep(id=id, tool=tool, input=inp, on_error="continue")


async def test_plans_use_memory_as_their_own_user_only(
    client: LoomClient, issuer_key: rsa.RSAPrivateKey
) -> None:
    alice = token(issuer_key, "alice", ["staff"])
    bob = token(issuer_key, "bob", ["sales"])
    admin = token(issuer_key, "root", ["admin"])
    out = await run_steps(
        client,
        alice,
        ToolStep(id="s", tool="memory_store", input={"text": "alice drinks green tea"}),
        ToolStep(id="f", tool="memory_search", input={"query": "green tea"}, depends_on=["s"]),
        ToolStep(id="w", tool="working_memory_set",
                 input={"doc": {"mood": "happy"}, "expected_version": 0}),
    )  # fmt: skip
    assert [m["text"] for m in out["f"]] == ["alice drinks green tea"]
    assert out["w"]["version"] == 1
    memory_id = out["s"]["id"]

    await run_steps(client, admin, ToolStep(
        id="g", tool="memory_store",
        input={"text": "sales playbook: tea", "scope": "global", "roles": ["sales"]}))  # fmt: skip
    out = await run_steps(
        client,
        bob,
        step("f", "memory_search", query="tea", limit=10),
        step("g", "memory_get", memory_id=memory_id),
        step("d", "memory_delete", memory_id=memory_id),
        step("w", "working_memory_get"),
        step("i", "memory_inspect", user_id="alice"),
    )
    # a plan naming another user: the inputs are strict, the field does not exist
    forged = await run_steps(client, bob, step("x", "memory_search", query="t", user_id="alice"))
    assert "user_id" in str(forged.get("rejected") or forged.get("x"))
    assert [m["text"] for m in out["f"]] == ["sales playbook: tea"]
    assert out["g"].code == "not_found" and out["d"].code == "not_found"
    assert out["w"]["version"] == 0
    assert out["i"].code == "forbidden"

    out = await run_steps(
        client, admin, ToolStep(id="i", tool="memory_inspect", input={"user_id": "alice"})
    )
    assert [m["text"] for m in out["i"]["memories"]] == ["alice drinks green tea"]


async def test_knowledge_tools_and_the_operator_route(
    client: LoomClient, issuer_key: rsa.RSAPrivateKey
) -> None:
    admin = token(issuer_key, "root", ["admin"])
    doc = "# Office\n\nThe office is in Oslo.\n\n# Hours\n\nOpen from nine to five."
    out = await run_steps(
        client,
        admin,
        ToolStep(id="a", tool="knowledge_add",
                 input={"collection": "hr", "source": "office.md", "content": doc,
                        "content_type": "markdown"}),
        ToolStep(id="q", tool="knowledge_search",
                 input={"collection": "hr", "query": "where is the office Oslo"},
                 depends_on=["a"]),
        ToolStep(id="u", tool="knowledge_search", input={"collection": "nope", "query": "x"}),
    )  # fmt: skip
    assert out["q"][0]["source"] == "office.md" and "score" in out["q"][0]
    assert out["u"].code == "unknown_collection"

    # the operator names the principal it acts as (the CLI's `--user`)
    as_alice = Principal(user_id="alice", via="operator", tenant="acme", roles=["staff"])
    reply = await bus.request(
        client.nc,
        subjects.API_MEMORY_OPERATOR,
        MemoryRequest(op="knowledge_list", principal=as_alice),
        MemoryReply,
    )
    assert reply.result == {"collections": {"hr": 1}}
    reply = await bus.request(
        client.nc,
        subjects.API_MEMORY_OPERATOR,
        MemoryRequest(op="store", args={"text": "x" * 100_000}, principal=as_alice),
        MemoryReply,
    )
    assert reply.error is not None and reply.error.code == "too_large"
    # the operator may not use the tool route (NATS permissions): it never answers
    with pytest.raises(TimeoutError):
        await bus.request(
            client.nc,
            subjects.API_MEMORY_TOOL,
            MemoryRequest(op="stats", run_id="any"),
            MemoryReply,
            timeout=1,
        )
