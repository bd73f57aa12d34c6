"""JWT verification of submissions (``loom_infra.auth``): pure, no servers. Keys are made
here with ``cryptography``; tokens with PyJWT, or by hand for the forgeries PyJWT refuses
to produce (``alg: none``, HS256 keyed with the issuer's public key)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from loom_core.contracts import Principal
from loom_infra import auth
from loom_infra.settings import AuthSettings, SettingsError, auth_settings_from_env

ISSUER = "https://id.example.test"
AUDIENCE = "agentloom"
SUBMIT = "loom.submit.client"


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(private: Any, kid: str | None, **extra: str) -> dict[str, Any]:
    doc = json.loads(_public_jwk_json(private))
    if kid is not None:
        doc["kid"] = kid
    doc.update(extra)
    return doc


def _public_jwk_json(private: Any) -> str:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        return jwt.algorithms.RSAAlgorithm.to_jwk(public)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return jwt.algorithms.ECAlgorithm.to_jwk(public)
    return jwt.algorithms.OKPAlgorithm.to_jwk(public)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "sub": "alice",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now + 600,
        "iat": now,
        "jti": "tok-1",
        "roles": ["analyst", "admin"],
        "permissions": ["runs:submit"],
        "tenant": "acme",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(private: Any, alg: str = "RS256", kid: str | None = None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**overrides), private, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], body: dict[str, Any], sign: Any = None) -> str:
    head = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    return f"{head}.{b64(sign(head.encode())) if sign else ''}"


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture
def pem_file(tmp_path: Path, rsa_private: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "issuer.pem"
    path.write_bytes(pem(rsa_private))
    return path


def resolver(**settings: Any) -> auth.PrincipalResolver:
    values: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE}
    values.update(settings)
    return auth.PrincipalResolver(AuthSettings(**values))


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def refused(r: auth.PrincipalResolver, tok: str | None, subject: str = SUBMIT) -> auth.AuthError:
    with pytest.raises(auth.AuthError) as caught:
        r.resolve(subject, bearer(tok) if tok is not None else None)
    error = caught.value.error
    assert error.path == "headers.Authorization"
    if tok:
        assert tok not in error.message  # never echo the token
    return caught.value


# --------------------------------------------------------------------------- valid tokens


def test_a_valid_rs256_token_gives_its_user_roles_permissions_and_tenant(
    pem_file: Path, rsa_private: rsa.RSAPrivateKey
) -> None:
    principal = resolver(public_key_file=pem_file).resolve(SUBMIT, bearer(token(rsa_private)))
    assert principal == Principal(
        user_id="alice",
        via="client",
        roles=["admin", "analyst"],
        permissions=["runs:submit"],
        tenant="acme",
        anonymous=False,
        issuer=ISSUER,
        token_id="tok-1",
    )


def test_a_valid_eddsa_token_from_a_jwks_file(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk(key, "ed-1")]}))
    tok = token(key, alg="EdDSA", kid="ed-1", tenant=None, roles="reader writer")
    principal = resolver(jwks_file=jwks).resolve("loom.submit.operator", bearer(tok))
    assert (principal.user_id, principal.via) == ("alice", "operator")
    assert principal.roles == ["reader", "writer"]  # a space-separated claim works too
    assert principal.tenant == auth.DEFAULT_TENANT


def test_es256_and_a_dotted_claim_path(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pem"
    path.write_bytes(pem(key))
    tok = token(key, alg="ES256", roles=None, realm_access={"roles": ["ops"]})
    r = resolver(public_key_file=path, roles_claim="realm_access.roles")
    assert r.resolve(SUBMIT, bearer(tok)).roles == ["ops"]


def test_jwks_with_several_keys_picks_the_token_kid(tmp_path: Path) -> None:
    keys = {kid: rsa_key() for kid in ("k1", "k2", "k3")}
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk(k, kid) for kid, k in keys.items()]}))
    r = resolver(jwks_file=jwks)
    for kid, key in keys.items():
        assert r.resolve(SUBMIT, bearer(token(key, kid=kid, sub=kid))).user_id == kid
    # signed by k1 but claiming to be k2: k2 verifies it, and the signature fails
    assert "bad signature" in refused(r, token(keys["k1"], kid="k2")).error.message
    assert "key id" in refused(r, token(keys["k1"], kid="k9")).error.message
    assert "names none" in refused(r, token(keys["k1"])).error.message


def test_a_rotated_jwks_file_is_read_again(tmp_path: Path) -> None:
    old, new = rsa_key(), rsa_key()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk(old, "old")]}))
    r = resolver(jwks_file=jwks)
    assert r.resolve(SUBMIT, bearer(token(old, kid="old"))).user_id == "alice"
    jwks.write_text(json.dumps({"keys": [jwk(new, "new")]}))
    stat = jwks.stat()
    os.utime(jwks, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a later write
    assert r.resolve(SUBMIT, bearer(token(new, kid="new"))).user_id == "alice"
    refused(r, token(old, kid="old"))  # the retired key verifies nothing any more
    jwks.unlink()
    error = refused(r, token(new, kid="new")).error
    assert (error.code, error.retryable) == ("unavailable", True)  # fail closed


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def r(pem_file: Path) -> auth.PrincipalResolver:
    return resolver(public_key_file=pem_file)


def test_an_expired_token(r: auth.PrincipalResolver, rsa_private: rsa.RSAPrivateKey) -> None:
    tok = token(rsa_private, exp=int(time.time()) - 3600)
    assert refused(r, tok).error.code == "token_expired"


def test_a_token_not_yet_valid(r: auth.PrincipalResolver, rsa_private: rsa.RSAPrivateKey) -> None:
    error = refused(r, token(rsa_private, nbf=int(time.time()) + 3600)).error
    assert error.code == "token_invalid" and "not valid yet" in error.message


def test_a_little_clock_skew_is_allowed(
    r: auth.PrincipalResolver, rsa_private: rsa.RSAPrivateKey
) -> None:
    tok = token(rsa_private, exp=int(time.time()) - 5)  # within the 30 s leeway
    assert r.resolve(SUBMIT, bearer(tok)).user_id == "alice"


def test_a_token_signed_by_another_key(r: auth.PrincipalResolver) -> None:
    error = refused(r, token(rsa_key())).error
    assert error.code == "token_invalid" and "bad signature" in error.message


@pytest.mark.parametrize(
    ("overrides", "what"),
    [
        ({"iss": "https://evil.example"}, "wrong issuer"),
        ({"aud": "another-service"}, "wrong audience"),
        ({"sub": None}, "'sub'"),
        ({"exp": None}, "'exp'"),
        ({"aud": None}, "'aud'"),
        ({"sub": ""}, "'sub'"),
        ({"sub": 5}, "'sub'"),
        ({"roles": {"admin": True}}, "'roles'"),
        ({"tenant": 7}, "'tenant'"),
    ],
)
def test_claims_that_are_wrong_or_missing(
    r: auth.PrincipalResolver, rsa_private: rsa.RSAPrivateKey, overrides: Any, what: str
) -> None:
    error = refused(r, token(rsa_private, **overrides)).error
    assert error.code == "token_invalid" and what in error.message, error.message


def test_an_unsigned_alg_none_token(r: auth.PrincipalResolver) -> None:
    tok = handmade({"alg": "none", "typ": "JWT"}, claims(sub="admin"))
    error = refused(r, tok).error
    assert error.code == "token_invalid" and "unsigned" in error.message


def test_hs256_keyed_with_the_public_key_bytes(
    r: auth.PrincipalResolver, rsa_private: rsa.RSAPrivateKey
) -> None:
    """The classic confusion: the issuer's public key is public, so an HMAC with it as
    the secret is forgeable by anyone. HS* is never accepted."""
    public = pem(rsa_private)
    tok = handmade(
        {"alg": "HS256", "typ": "JWT"},
        claims(sub="admin", roles=["admin"]),
        lambda data: hmac.new(public, data, hashlib.sha256).digest(),
    )
    error = refused(r, tok).error
    assert error.code == "token_invalid" and "'HS256'" in error.message


def test_an_algorithm_that_does_not_fit_the_key(r: auth.PrincipalResolver) -> None:
    tok = token(ec.generate_private_key(ec.SECP256R1()), alg="ES256")
    assert "does not fit" in refused(r, tok).error.message


@pytest.mark.parametrize(
    "tok", ["garbage", "a.b.c", "e30.e30.", handmade({"alg": "RS256"}, {})[:-1] + "!!", "x" * 9000]
)
def test_malformed_tokens(r: auth.PrincipalResolver, tok: str) -> None:
    assert refused(r, tok).error.code == "token_invalid"


def test_a_header_that_is_not_bearer(r: auth.PrincipalResolver) -> None:
    with pytest.raises(auth.AuthError) as caught:
        r.resolve(SUBMIT, {"Authorization": "Basic YWxpY2U6cHc="})
    assert "Bearer" in caught.value.error.message
    assert "YWxpY2U6cHc=" not in caught.value.error.message


# --------------------------------------------------------------------------- no token


def test_without_a_token_anonymous_only_when_allowed(pem_file: Path) -> None:
    assert refused(resolver(public_key_file=pem_file), None).error.code == "not_authenticated"
    allowed = resolver(public_key_file=pem_file, anonymous=True)
    assert allowed.resolve(SUBMIT, {}) == auth.anonymous("client")
    # a stack with no issuer: everyone is anonymous, and a token is an error, not ignored
    open_stack = auth.PrincipalResolver(AuthSettings())
    principal = open_stack.resolve("loom.submit.operator", None)
    assert principal.anonymous and (principal.roles, principal.permissions) == ([], [])
    assert "verifies no tokens" in refused(open_stack, "a.b.c").error.message


@pytest.mark.parametrize(
    "subject", ["loom.submit", "loom.submit.executor", "loom.submit.admin", "loom.other.client"]
)
def test_only_the_submitting_identities_may_submit(subject: str) -> None:
    with pytest.raises(auth.AuthError) as caught:
        auth.PrincipalResolver(AuthSettings()).resolve(subject, None)
    assert caught.value.error.code == "not_authorized"


def test_inherit_keeps_the_user_and_marks_the_engine() -> None:
    user = Principal(user_id="alice", via="client", roles=["a"], tenant="acme", issuer=ISSUER)
    child = auth.inherit(user)
    assert child is not None and child.via == "executor"
    assert (child.user_id, child.roles, child.tenant, child.issuer) == (
        "alice",
        ["a"],
        "acme",
        ISSUER,
    )
    assert auth.inherit(None) is None


# --------------------------------------------------------------------------- configuration


def test_settings_refuse_what_would_weaken_verification(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    with pytest.raises(SettingsError, match="LOOM_AUTH_AUDIENCE"):
        AuthSettings(issuer=ISSUER, public_key_file=key)
    with pytest.raises(SettingsError, match="LOOM_AUTH_PUBLIC_KEY_FILE"):
        AuthSettings(issuer=ISSUER, audience=AUDIENCE)
    for algorithms in (("HS256",), ("none",), ()):
        with pytest.raises(SettingsError, match="LOOM_AUTH_ALGORITHMS"):
            AuthSettings(issuer=ISSUER, audience=AUDIENCE, public_key_file=key,
                         algorithms=algorithms)  # fmt: skip
    with pytest.raises(SettingsError, match="LOOM_AUTH_ANONYMOUS"):
        AuthSettings(anonymous=False)


def test_settings_from_env(tmp_path: Path) -> None:
    env = {
        "LOOM_AUTH_ISSUER": ISSUER,
        "LOOM_AUTH_AUDIENCE": AUDIENCE,
        "LOOM_AUTH_JWKS_FILE": str(tmp_path / "jwks.json"),
        "LOOM_AUTH_ALGORITHMS": "ES256, EdDSA",
        "LOOM_AUTH_TENANT_CLAIM": "org",
    }
    s = auth_settings_from_env(env)
    assert (s.enabled, s.allow_anonymous, s.algorithms, s.tenant_claim) == (
        True, False, ("ES256", "EdDSA"), "org",
    )  # fmt: skip
    assert auth_settings_from_env({**env, "LOOM_AUTH_ANONYMOUS": "true"}).allow_anonymous
    assert auth_settings_from_env({}).allow_anonymous  # nothing configured: anonymous
    with pytest.raises(SettingsError, match="LOOM_AUTH_ANONYMOUS"):
        auth_settings_from_env({**env, "LOOM_AUTH_ANONYMOUS": "maybe"})


def test_unusable_key_files_stop_the_start(tmp_path: Path, rsa_private: rsa.RSAPrivateKey) -> None:
    private_pem = tmp_path / "private.pem"
    private_pem.write_bytes(
        rsa_private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    short = tmp_path / "short.pem"
    short.write_bytes(pem(rsa_key(1024)))
    oct_jwks = tmp_path / "oct.json"
    oct_jwks.write_text(json.dumps({"keys": [{"kty": "oct", "k": b64(b"secret")}]}))
    private_jwks = tmp_path / "private.json"
    private_doc = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_private))
    private_jwks.write_text(json.dumps({"keys": [private_doc]}))
    cases = [
        ({"public_key_file": private_pem}, "PEM public key"),
        ({"public_key_file": short}, "1024 bits"),
        ({"public_key_file": tmp_path / "missing.pem"}, "missing.pem"),
        ({"jwks_file": oct_jwks}, "symmetric"),
        ({"jwks_file": private_jwks}, "private key"),
    ]
    for settings, what in cases:
        with pytest.raises(SettingsError, match=what):
            resolver(**settings)
