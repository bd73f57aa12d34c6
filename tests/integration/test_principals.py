"""Principals through the real stack (nats-server + SQLite + the five services): a run acts
for the user of the verified JWT sent with its submission, and for nobody a request body,
a plan or a forged token names. Keys are made here with ``cryptography``."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import nats.errors
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from loom_core.contracts import (
    Plan,
    Principal,
    RunCompleted,
    RunRequest,
    RunRequested,
    SubmitRejected,
    SubRunRequested,
    SubRunStep,
    ToolStep,
)
from loom_infra.client import LoomClient, LoomError
from loom_infra.settings import AuthSettings, Settings, StoreSettings
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

ISSUER = "https://id.example.test"
AUDIENCE = "agentloom"
NOOP = Plan(steps=[ToolStep(id="a", tool="noop")])


def settings(store: StoreSettings, auth: AuthSettings | None = None) -> Settings:
    # the URL is replaced by the embedded server's
    return Settings(nats_url="nats://127.0.0.1:4222", store=store, auth=auth or AuthSettings())


@pytest.fixture(scope="module")
def issuer_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: Any, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "sub": "alice",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now + 600,
        "jti": "t-1",
        "roles": ["analyst"],
        "permissions": ["runs:submit"],
        "tenant": "acme",
        **overrides,
    }
    return jwt.encode(claims, key, algorithm="RS256")


@pytest.fixture
async def stack(
    tmp_path: Path, sqlite_store_settings: StoreSettings, issuer_key: rsa.RSAPrivateKey
) -> AsyncIterator[LocalStack]:
    """A stack (with NATS credentials) that verifies tokens of ISSUER and accepts no
    anonymous run."""
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(
        issuer_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    auth = AuthSettings(issuer=ISSUER, audience=AUDIENCE, public_key_file=key_file)
    async with LocalStack(settings(sqlite_store_settings, auth), nats_port=-1) as s:
        yield s


@pytest.fixture
async def client(stack: LocalStack) -> AsyncIterator[LoomClient]:
    async with await stack.client() as c:  # the operator: submits and reads
        yield c


async def first_event(client: LoomClient, run_id: str) -> RunRequested:
    records = await client.events(run_id)
    assert isinstance(records[0].event, RunRequested)
    return records[0].event


async def test_a_run_acts_for_the_user_of_its_token(
    stack: LocalStack, client: LoomClient, issuer_key: rsa.RSAPrivateKey
) -> None:
    # submitted by the submit-only `client` identity, on its own subject
    async with await stack.client("client") as submitter:
        assert submitter.via == "client"
        accepted = await submitter.submit(RunRequest(plan=NOOP), token=token(issuer_key))
        # posing as the operator: the server drops the publish (bounded by the timeout)
        submitter.via = "operator"
        with pytest.raises(nats.errors.TimeoutError):
            await submitter.submit(RunRequest(plan=NOOP, run_id="posing"), timeout=1)
    assert await client.events("posing") == []
    records = await client.wait(accepted.run_id, timeout=30)
    assert isinstance(records[-1].event, RunCompleted)
    assert (await first_event(client, accepted.run_id)).principal == Principal(
        user_id="alice",
        via="client",
        roles=["analyst"],
        permissions=["runs:submit"],
        tenant="acme",
        issuer=ISSUER,
        token_id="t-1",
    )
    spans = await client.trace(accepted.run_id, rebuild=True)
    root = next(s for s in spans if s.attributes.get("gen_ai.operation.name") == "invoke_workflow")
    assert (root.attributes["enduser.id"], root.attributes["loom.tenant"]) == ("alice", "acme")


def _unsigned(claims: dict[str, Any]) -> str:
    def b64(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


async def test_bad_or_missing_tokens_are_refused_and_nothing_is_stored(
    client: LoomClient, issuer_key: rsa.RSAPrivateKey
) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    cases = {
        "expired": (token(issuer_key, exp=now - 3600), "token_expired"),
        "unsigned": (
            _unsigned({"sub": "admin", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}),
            "token_invalid",
        ),
        "stranger": (token(stranger, sub="admin", roles=["admin"]), "token_invalid"),
        "wrong-issuer": (token(issuer_key, iss="https://evil.test"), "token_invalid"),
        "no-token": (None, "not_authenticated"),
    }
    for run_id, (tok, code) in cases.items():
        with pytest.raises(LoomError) as caught:
            await client.submit(RunRequest(plan=NOOP, run_id=run_id), token=tok)
        assert caught.value.error.code == code, (run_id, caught.value.error)
        if tok:
            assert tok not in caught.value.error.message
        assert await client.events(run_id) == [], run_id  # nothing stored


async def test_a_body_or_plan_naming_another_user_changes_nothing(
    client: LoomClient, issuer_key: rsa.RSAPrivateKey
) -> None:
    alice = token(issuer_key)
    # a `principal` in the body is not a field of a run request: refused, not believed
    body = {
        "type": "run_request",
        "run_id": "squat",
        "plan": {"type": "plan", "steps": [{"kind": "tool", "id": "a", "tool": "noop"}]},
        "principal": {"type": "principal", "user_id": "admin", "via": "operator",
                      "roles": ["admin"]},
    }  # fmt: skip
    reply = await client.submit_raw(json.dumps(body).encode(), token=alice)
    assert isinstance(reply, SubmitRejected) and "principal" in reply.error.message
    assert await client.events("squat") == []
    # input, labels and the plan may say whatever they like about users
    request = RunRequest(
        plan=Plan(
            name="as admin",
            steps=[
                ToolStep(
                    id="a", tool="echo", input={"message": {"user_id": "admin", "roles": ["admin"]}}
                )
            ],
        ),
        input={"user_id": "admin", "principal": {"user_id": "admin"}, "tenant": "other"},
        labels={"user": "admin", "tenant": "other"},
    )
    accepted = await client.submit(request, token=alice)
    records = await client.wait(accepted.run_id, timeout=30)
    assert isinstance(records[-1].event, RunCompleted)
    principal = (await first_event(client, accepted.run_id)).principal
    assert principal is not None
    assert (principal.user_id, principal.roles, principal.tenant) == ("alice", ["analyst"], "acme")


async def test_a_sub_run_acts_for_its_parent_user(
    client: LoomClient, issuer_key: rsa.RSAPrivateKey
) -> None:
    plan = Plan(steps=[SubRunStep(id="child", plan=NOOP)])
    accepted = await client.submit(RunRequest(plan=plan), token=token(issuer_key, sub="bob"))
    records = await client.wait(accepted.run_id, timeout=30)
    assert isinstance(records[-1].event, RunCompleted)
    child_id = next(r.event.child_run_id for r in records if isinstance(r.event, SubRunRequested))
    parent = (await first_event(client, accepted.run_id)).principal
    child = (await first_event(client, child_id)).principal
    assert parent is not None and child is not None
    assert (parent.user_id, parent.via) == ("bob", "operator")
    assert child == Principal(**{**_fields(parent), "via": "executor"})


def _fields(principal: Principal) -> dict[str, Any]:
    return {name: getattr(principal, name) for name in principal.__struct_fields__}


async def test_an_open_stack_runs_anonymous_submissions(
    sqlite_store_settings: StoreSettings,
) -> None:
    """No issuer configured (the embedded default): every run is the anonymous principal,
    with no roles and no permissions, and a token is refused rather than ignored."""
    stack = LocalStack(settings(sqlite_store_settings), nats_port=-1)
    async with stack, await stack.client() as client:
        accepted = await client.submit(RunRequest(plan=NOOP))
        principal = (await first_event(client, accepted.run_id)).principal
        assert principal == Principal(user_id="anonymous", via="operator", anonymous=True)
        with pytest.raises(LoomError) as caught:
            await client.submit(RunRequest(plan=NOOP), token="a.b.c")
        assert caught.value.error.code == "token_invalid"


async def test_a_token_tenant_on_the_platforms_subject_routes_as_before(
    client: LoomClient, issuer_key: rsa.RSAPrivateKey
) -> None:
    """Tenants (loom_core.tenancy) change nothing for a single-tenant stack whose tokens
    name tenants: the run keeps the token's tenant in its principal (memory scoping),
    but it is the platform's run (not vouched for by a tenant's NATS user), so its
    wait hears the plain signal subject and it is listed as the default tenant's."""
    from loom_cli.app import load_run_request

    examples = Path(__file__).resolve().parents[2] / "examples"
    request = load_run_request(examples / "wait-event.yaml", [], None)
    accepted = await client.submit(request, token=token(issuer_key))
    requested = await first_event(client, accepted.run_id)
    assert requested.principal is not None
    assert (requested.principal.tenant, requested.principal.tenant_verified) == ("acme", False)
    async for record in client.follow(accepted.run_id, timeout=30):
        if record.kind == "event_wait_started":
            break
    await client.signal("payment", "A-17", {"amount": 5})
    records = await client.wait(accepted.run_id, timeout=30)
    assert records[-1].event == RunCompleted(output="order A-17 paid 5")
