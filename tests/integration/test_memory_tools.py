"""Memory as tools through the real stack (nats-server with per-service credentials,
SQLite, Qdrant local mode, the five services): plans call memory_* tools, the tool-runner
asks the memory service over its declared route, and the memory service acts as the run's
stored principal, from the verified JWT, never from the plan's text."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from waiting import eventually  # type: ignore[import-not-found]

from loom_core import codec, subjects
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
from loom_infra.settings import AuthSettings, EmbedderSettings, Settings, StoreSettings
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
    async with LocalStack(settings, nats_port=-1, read_models="inline") as s:
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


async def test_loom_memory_and_knowledge_on_the_command_line(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from loom_cli.app import app

    monkeypatch.setenv("LOOM_NKEY_SEED_FILE", str(stack.seed_file("operator")))

    def cli(*args: str) -> Any:
        return CliRunner().invoke(app, [*args, "--nats", stack.url])

    async def ok(*args: str) -> Any:
        result = await asyncio.to_thread(cli, *args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    as_carol = ("--user", "carol", "--tenant", "acme")
    added = await ok("memory", "add", "carol owns a red bike", "--category", "facts", *as_carol)
    assert (await ok("memory", "search", "bike", *as_carol))[0]["id"] == added["id"]
    assert (await ok("memory", "search", "bike", "--user", "dave", "--tenant", "acme")) == []
    assert (await ok("memory", "show", added["id"], *as_carol))["text"] == "carol owns a red bike"
    assert (await ok("memory", "stats", *as_carol))["categories"] == {"facts": 1}
    dump = tmp_path / "carol.json"
    result = await asyncio.to_thread(cli, "memory", "export", "--out", str(dump), *as_carol)
    assert result.exit_code == 0, result.output
    assert (await ok("memory", "import", str(dump), "--user", "erin", "--tenant", "acme")) == {
        "imported": 1
    }
    listed = await ok("memory", "list", "--user", "erin", "--tenant", "acme")
    assert [m["text"] for m in listed["memories"]] == ["carol owns a red bike"]
    assert (await ok("memory", "inspect", "carol", "--tenant", "acme"))["stats"]["user"] == 1
    v1 = await ok("memory", "working", "set", '{"todo": ["a"]}', "--expected-version", "0",
                  *as_carol)  # fmt: skip
    assert v1["version"] == 1
    stale = await asyncio.to_thread(
        cli, "memory", "working", "set", "{}", "--expected-version", "0", *as_carol
    )
    assert stale.exit_code == 1 and "conflict" in stale.output and "Traceback" not in stale.output
    assert (await ok("memory", "working", "get", *as_carol))["doc"] == {"todo": ["a"]}

    page = tmp_path / "guide.html"
    page.write_text("<h1>Bikes</h1><p>Red bikes are fast.</p>")
    assert (await ok("knowledge", "add", "guides", str(page), "--tenant", "acme"))["chunks"] == 1
    assert (await ok("knowledge", "add", "guides", str(page), "--tenant", "acme"))["unchanged"]
    hits = await ok("knowledge", "search", "guides", "fast bikes", "--tenant", "acme")
    assert hits[0]["source"] == "guide.html"
    assert await ok("knowledge", "list", "--tenant", "acme") == {"collections": {"guides": 1}}
    assert await ok("knowledge", "delete", "guides", "--tenant", "acme") == {"deleted_chunks": 1}
    missing = await asyncio.to_thread(cli, "knowledge", "search", "guides", "x", "--tenant", "acme")
    assert missing.exit_code == 1 and "unknown_collection" in missing.output


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


async def test_hostile_memory_requests_get_typed_errors_and_the_service_stays_up(
    client: LoomClient,
) -> None:
    bob = Principal(user_id="bob", via="operator", tenant="acme")
    deep = (
        '{"type":"memory_request","op":"store","args":{"text":"a","metadata":{"d":'
        + ("[" * 5000 + "]" * 5000)
        + "}}}"
    )
    cases: list[tuple[bytes | MemoryRequest, str]] = [
        (deep.encode(), "invalid_message"),  # too deep to decode
        (MemoryRequest(op="store", args={"text": "a", "user_id": "alice"}, principal=bob),
         "invalid_input"),
        (MemoryRequest(op="store", args={"text": "a", "metadata": {"d": nested(40)}},
                       principal=bob), "too_deep"),
        (MemoryRequest(op="knowledge_search", args={"collection": "ghost", "query": "x"},
                       principal=bob), "unknown_collection"),
        (MemoryRequest(op="working_set", args={"doc": 1}, principal=bob), "invalid_input"),
        (b'{"type": "memory_request", "op": "drop_tables"}', "invalid_shape"),
    ]  # fmt: skip
    for request, code in cases:
        if isinstance(request, bytes):
            msg = await client.nc.request(subjects.API_MEMORY_OPERATOR, request, timeout=10)
            reply = codec.decode(msg.data, MemoryReply)
        else:
            reply = await bus.request(
                client.nc, subjects.API_MEMORY_OPERATOR, request, MemoryReply, timeout=10
            )
        assert reply.error is not None and reply.error.code == code, (code, reply)
    ok = await bus.request(
        client.nc,
        subjects.API_MEMORY_OPERATOR,
        MemoryRequest(op="store", args={"text": "still here"}, principal=bob),
        MemoryReply,
    )
    assert ok.error is None and ok.result["text"] == "still here"


async def test_runs_fill_their_users_threads_for_recall(
    client: LoomClient, issuer_key: rsa.RSAPrivateKey
) -> None:
    alice = token(issuer_key, "alice", ["staff"])
    for text in ("my dog is called Rex", "the weather is sunny", "book a table for two"):
        plan = Plan(steps=[ToolStep(id="e", tool="echo", input={"message": "{{ input.q }}"})])
        accepted = await client.submit(
            RunRequest(plan=plan, input={"q": text}, thread_id="chat-1"), token=alice
        )
        await client.wait(accepted.run_id, timeout=60)
    as_alice = Principal(user_id="alice", via="operator", tenant="acme")

    async def history() -> Any:
        reply = await bus.request(
            client.nc, subjects.API_MEMORY_OPERATOR,
            MemoryRequest(op="history", args={"thread_id": "chat-1"}, principal=as_alice),
            MemoryReply,
        )  # fmt: skip
        return reply.result if reply.result and reply.result["total"] == 6 else None

    assert len((await eventually(history, "six indexed messages"))["messages"]) == 6
    recall = step("r", "thread_recall", query="dog named Rex", thread_id="chat-1", top_k=1)
    out = await run_steps(client, alice, recall)
    (hit,) = out["r"]
    assert "Rex" in hit["text"] and len(hit["window"]) in (2, 3)
    # bob's recall over all his threads finds nothing of alice's
    bob = token(issuer_key, "bob", ["sales"])
    out = await run_steps(client, bob, step("r", "thread_recall", query="dog named Rex"))
    assert all("Rex" not in h["text"] for h in out["r"])


async def test_a_missing_model_is_a_typed_error_that_says_what_to_do(
    stack: LocalStack, client: LoomClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from loom_services.memory import MemoryService

    memory = next(s for s in stack.stack.services if isinstance(s, MemoryService))
    memory._store = None  # as on a fresh start
    # the settings the service was started with: the model where there is none
    missing = EmbedderSettings(spec="minilm", model_dir=tmp_path / "no-model")
    monkeypatch.setattr(memory, "settings", replace(memory.settings, embedder=missing))
    request = MemoryRequest(op="stats", principal=Principal(user_id="a", via="operator"))
    reply = await bus.request(client.nc, subjects.API_MEMORY_OPERATOR, request, MemoryReply)
    assert reply.error is not None and "LOOM_EMBED_MODEL_DIR" in reply.error.message
    # fixed (a restart with LOOM_EMBEDDER=hash): the next request works
    monkeypatch.setattr(
        memory, "settings", replace(memory.settings, embedder=EmbedderSettings("hash"))
    )
    reply = await bus.request(client.nc, subjects.API_MEMORY_OPERATOR, request, MemoryReply)
    assert reply.error is None and reply.result["user"] == 0
