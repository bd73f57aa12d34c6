"""Who a run acts for: its principal, from a verified JWT and the identity that submitted.

A submitter names its user with a NATS header ``Authorization: Bearer <JWT>`` on the
submit request (``loom.submit.{via}``). The executor verifies the token against the
issuer's public keys from the configuration (a PEM file and/or a local JWKS file; no
network fetch), with an explicit list of asymmetric algorithms (never ``none``, never
HS*: a public key must never double as an HMAC secret), and requires ``exp``, ``iss``,
``aud`` and ``sub``. ``via`` is the NATS identity that submitted, read from the subject
(the server's permissions let each identity publish only on its own suffix).

The principal is never read from a request body or a plan. Without a token the run is
the anonymous principal (no roles, no permissions) if the stack allows it, otherwise it
is refused ``not_authenticated``. A bad token is refused, never downgraded to anonymous.
The token itself is never stored, logged or echoed; refusals name what was wrong.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import jwt.exceptions as jwt_errors
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from loom_core import routes, subjects
from loom_core.contracts import ErrorInfo, Principal
from loom_core.errors import LoomError
from loom_infra.settings import AuthSettings, SettingsError

log = logging.getLogger("loom.auth")

HEADER = subjects.AUTHORIZATION
HEADER_PATH = f"headers.{HEADER}"
ANONYMOUS_USER = "anonymous"
DEFAULT_TENANT = "default"
ENGINE = "executor"  # ``via`` of runs the engine makes (sub-runs, forks)
MAX_TOKEN_CHARS = 8192  # a token is a header: bounded like everything else
MAX_CLAIM_ITEMS = 256
MIN_RSA_BITS = 2048

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_CLAIM_TYPE_ERRORS = {
    jwt_errors.InvalidSubjectError: "sub",
    jwt_errors.InvalidJTIError: "jti",
    jwt_errors.InvalidIssuedAtError: "iat",
}


class AuthError(LoomError):
    """A refused submission: ``error`` is the typed ErrorInfo sent back to the submitter.
    Codes: ``not_authenticated``, ``token_expired``, ``token_invalid``,
    ``not_authorized`` (a subject naming no identity that may submit), ``unavailable``."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.error = ErrorInfo(code=code, message=message, path=HEADER_PATH, retryable=retryable)


def _invalid(why: str) -> AuthError:
    return AuthError("token_invalid", f"the bearer token was refused: {why}")


def anonymous(via: str) -> Principal:
    return Principal(user_id=ANONYMOUS_USER, via=via, tenant=DEFAULT_TENANT, anonymous=True)


def inherit(principal: Principal | None, via: str = ENGINE) -> Principal | None:
    """The principal of a run the engine makes from another (a sub-run, a fork): the same
    user, roles, permissions and tenant, submitted ``via`` the engine. A run stored before
    principals existed has none, and neither does what is made from it."""
    if principal is None:
        return None
    return msgspec.structs.replace(principal, via=via)


def submitter(subject: str) -> str:
    """The identity a submit subject names (``loom.submit.{via}``), if it may submit."""
    prefix, _, via = subject.rpartition(".")
    if prefix != subjects.PREFIX + ".submit" or via not in routes.SUBMIT.publishers:
        raise AuthError(
            "not_authorized",
            f"runs are submitted on {subjects.submit('client')} or "
            f"{subjects.submit('operator')} (your own identity), not on {subject}",
        )
    return via


def bearer_token(headers: Mapping[str, str] | None) -> str | None:
    """The token of the ``Authorization: Bearer`` header (name matched in any case)."""
    value = next((v for k, v in (headers or {}).items() if k.lower() == HEADER.lower()), None)
    if value is None or not value.strip():
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _invalid(f"the {HEADER} header must be `Bearer <JWT>`")
    return token.strip()


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class _Key:
    key: PublicKey
    kid: str | None = None
    alg: str | None = None  # a JWK may pin its algorithm


def _fits(alg: str, key: PublicKey) -> bool:
    """Whether ``alg`` is the algorithm family of ``key`` (chosen from the key, never
    from the token: RFC 8725 section 2.1)."""
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if alg in _CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _CURVES[alg]
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def _checked(key: Any, where: str) -> PublicKey:
    if not isinstance(key, PublicKey):
        raise ValueError(f"{where}: {type(key).__name__} is not an RSA, EC or Ed25519/448 key")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"{where}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS}")
    return key


def _load_pem(path: Path) -> list[_Key]:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError:
        raise ValueError(
            f"{path}: not a PEM public key (a private key does not belong here)"
        ) from None
    return [_Key(_checked(key, str(path)))]


def _load_jwks(path: Path) -> list[_Key]:
    doc = json.loads(path.read_text())
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f'{path}: a JWKS document is {{"keys": [...]}} with at least one key')
    keys = []
    for i, entry in enumerate(entries):
        where = f"{path} keys[{i}]"
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP"):
            raise ValueError(f"{where}: only RSA, EC and OKP public keys (no symmetric `oct`)")
        if "d" in entry:
            raise ValueError(f"{where}: holds a private key; publish only the public part")
        if entry.get("use", "sig") != "sig":
            continue  # an encryption key is not for verifying signatures
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWKError as exc:
            raise ValueError(f"{where}: {exc}") from None
        keys.append(_Key(_checked(jwk.key, where), entry.get("kid"), entry.get("alg")))
    if not keys:
        raise ValueError(f"{path}: no signing key (every key has `use` other than `sig`)")
    return keys


class _KeyFile:
    """One configured key file, re-read when it changes (key rotation without restart)."""

    def __init__(self, path: Path, loader: Any) -> None:
        self.path, self.loader = path, loader
        self.stamp: int | None = None
        self.keys: list[_Key] = []
        self.refresh()

    def refresh(self) -> list[_Key]:
        stamp = os.stat(self.path).st_mtime_ns
        if stamp != self.stamp:
            self.keys, self.stamp = self.loader(self.path), stamp
        return self.keys


# --------------------------------------------------------------------------- resolver


class PrincipalResolver:
    """Turns a submit request's subject and headers into the run's principal."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.files: list[_KeyFile] = []
        for path, loader, variable in (
            (settings.public_key_file, _load_pem, "LOOM_AUTH_PUBLIC_KEY_FILE"),
            (settings.jwks_file, _load_jwks, "LOOM_AUTH_JWKS_FILE"),
        ):
            if path is None:
                continue
            try:
                self.files.append(_KeyFile(path, loader))
            except (OSError, ValueError) as exc:  # refuse to start with unusable keys
                raise SettingsError(variable, str(exc)) from None

    def resolve(self, subject: str, headers: Mapping[str, str] | None) -> Principal:
        via = submitter(subject)
        token = bearer_token(headers)
        if token is None:
            if self.settings.allow_anonymous:
                return anonymous(via)
            raise AuthError(
                "not_authenticated",
                f"this stack accepts only authenticated runs: send the header `{HEADER}: "
                "Bearer <JWT>` with a token of its issuer (loom run --token / LOOM_TOKEN)",
            )
        if not self.settings.enabled:
            raise _invalid("this stack verifies no tokens (LOOM_AUTH_ISSUER is not set)")
        return self.verify(token, via)

    def verify(self, token: str, via: str) -> Principal:
        """The principal of a valid token; AuthError naming what is wrong otherwise."""
        s = self.settings
        if len(token) > MAX_TOKEN_CHARS:
            raise _invalid(f"longer than {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _invalid("malformed (not header.payload.signature in base64url JSON)") from None
        alg = header.get("alg")
        if alg not in s.algorithms:
            if alg is None or (isinstance(alg, str) and alg.lower() == "none"):
                why = "unsigned (alg none or no alg)"
            else:
                why = f"algorithm {str(alg)[:32]!r}"
            raise _invalid(f"{why} is not accepted; accepted: {', '.join(s.algorithms)}")
        key = self._key_for(header.get("kid"), alg)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[a for a in s.algorithms if _fits(a, key.key)],
                issuer=s.issuer,
                audience=s.audience,
                leeway=s.leeway_s,
                options={
                    "require": ["exp", "iss", "aud", "sub"],
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(
                "token_expired", "the bearer token has expired (exp); get a new one"
            ) from None
        except jwt.ImmatureSignatureError:
            raise _invalid("not valid yet (nbf or iat is in the future)") from None
        except jwt.InvalidIssuerError:
            raise _invalid(f"wrong issuer (iss); this stack accepts {s.issuer!r}") from None
        except jwt.InvalidAudienceError:
            raise _invalid(f"wrong audience (aud); this stack is {s.audience!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"the claim {exc.claim!r} is missing") from None
        except jwt.InvalidSignatureError:
            raise _invalid("bad signature: not signed by a key of the issuer") from None
        except tuple(_CLAIM_TYPE_ERRORS) as exc:
            claim = _CLAIM_TYPE_ERRORS[type(exc)]
            raise _invalid(f"the claim {claim!r} has the wrong type") from None
        except jwt.InvalidTokenError as exc:  # anything else malformed: name the kind only
            raise _invalid(type(exc).__name__) from None
        return self._principal(claims, via)

    def _key_for(self, kid: object, alg: str) -> _Key:
        try:
            keys = [k for f in self.files for k in f.refresh()]
        except (OSError, ValueError) as exc:
            # fail closed: a key file removed or broken by a rotation verifies nothing
            log.error("issuer keys unreadable: %s", exc)
            raise AuthError(
                "unavailable", "the issuer keys cannot be read; retry later", retryable=True
            ) from None
        if kid is not None:
            candidates = [k for k in keys if k.kid == kid] or [k for k in keys if k.kid is None]
            if not candidates:
                raise _invalid(f"no configured key has the key id (kid) {str(kid)[:64]!r}")
        else:
            candidates = [k for k in keys if k.kid is None] or keys
        usable = [k for k in candidates if _fits(alg, k.key) and k.alg in (None, alg)]
        if not usable:
            raise _invalid(f"algorithm {alg!r} does not fit the issuer's key")
        if len(usable) > 1:
            raise _invalid("several keys fit and the token names none (kid)")
        return usable[0]

    def _principal(self, claims: dict[str, Any], via: str) -> Principal:
        s = self.settings
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise _invalid("the claim 'sub' must be a string of 1-256 characters")
        tenant = _claim(claims, s.tenant_claim)
        if tenant is not None and (not isinstance(tenant, str) or not tenant):
            raise _invalid(f"the claim {s.tenant_claim!r} must be a non-empty string")
        jti = claims.get("jti")
        return Principal(
            user_id=sub,
            via=via,
            roles=_names(claims, s.roles_claim),
            permissions=_names(claims, s.permissions_claim),
            tenant=tenant or DEFAULT_TENANT,
            issuer=claims["iss"],
            token_id=jti if isinstance(jti, str) else None,
        )


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name, or by dotted path into nested objects (``realm_access.roles``)."""
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _names(claims: Mapping[str, Any], name: str) -> list[str]:
    """A list-of-strings claim; a space-separated string (OAuth ``scope`` style) too."""
    value = _claim(claims, name)
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"the claim {name!r} must be a list of strings")
    if len(value) > MAX_CLAIM_ITEMS:
        raise _invalid(f"the claim {name!r} has more than {MAX_CLAIM_ITEMS} entries")
    return sorted(set(value))
