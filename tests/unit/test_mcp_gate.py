"""The MCP HTTP endpoint's bearer gate and run ownership (loom_services.mcp_server),
without servers: who may call, and whose runs a caller sees."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from loom_core.contracts import Principal
from loom_infra.auth import AuthError, PrincipalResolver
from loom_infra.settings import AuthSettings
from loom_services.mcp_server import BearerGate, Caller


def gate(**auth: object) -> BearerGate:
    return BearerGate(app=None, resolver=PrincipalResolver(AuthSettings(**auth)))  # type: ignore[arg-type]


def test_no_token_is_anonymous_only_where_the_stack_allows_it(tmp_path: Path) -> None:
    who = gate().authenticate({})
    assert who.principal is not None and who.principal.anonymous and who.token is None
    key = tmp_path / "k.pem"
    key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    strict = gate(anonymous=False, issuer="https://i", audience="a", public_key_file=key)
    with pytest.raises(AuthError) as err:
        strict.authenticate({})
    assert err.value.error.code == "not_authenticated"


@pytest.mark.parametrize(
    "header", ["Basic abc", "Bearer", "Bearer not.a.jwt", "bearer " + "x" * 9000]
)
def test_bad_authorization_headers_are_refused(header: str) -> None:
    with pytest.raises(AuthError) as err:
        gate().authenticate({"Authorization": header})
    assert err.value.error.code == "token_invalid"


ALICE = Principal(user_id="alice", via="client", issuer="i", tenant="t")
BOB = Principal(user_id="bob", via="client", issuer="i", tenant="t")
ROOT = Principal(user_id="root", via="client", issuer="i", roles=["admin"])
ANON = Principal(user_id="anonymous", via="client", anonymous=True)


def test_ownership() -> None:
    assert Caller(ALICE, "t").owns(ALICE)
    assert not Caller(ALICE, "t").owns(BOB)
    assert not Caller(ALICE, "t").owns(ANON) and not Caller(ANON, None).owns(ALICE)
    assert Caller(ANON, None).owns(ANON)
    assert Caller(ROOT, "t").owns(BOB) and Caller(ROOT, "t").owns(None)
    assert not Caller(ALICE, "t").owns(None)  # a run stored before principals
    assert Caller(None, None, local=True).owns(BOB)  # stdio: the process's own identity
    other_tenant = Principal(user_id="alice", via="client", issuer="i", tenant="u")
    assert not Caller(ALICE, "t").owns(other_tenant)
