"""Service settings, read once from the environment.

Variables (all optional unless noted):

- ``LOOM_NATS_URL``: NATS server, default ``nats://127.0.0.1:4222``.
- ``LOOM_STORE``: ``sqlite`` (default, embedded) or ``postgres``.
- ``LOOM_DATA_DIR``: directory for the SQLite files (``events.db``, ``toolcalls.db``,
  ``memory.db``), default ``.loom`` (relative to the working directory).
- ``LOOM_POSTGRES_URL``: required when ``LOOM_STORE=postgres``. Accepted forms (libpq URIs):

  - ``postgresql://user:password@host:5432/dbname`` (TCP; the port defaults to 5432)
  - ``postgresql://user@host/dbname`` (no password in the URL: trust auth, ``PGPASSWORD`` or
    ``~/.pgpass`` supply it)
  - ``postgresql://user:@/dbname?host=/path/to/socket/dir`` (unix socket: ``host`` names
    the *directory* holding ``.s.PGSQL.<port>``; this is what the ``pgserver`` wheel gives)
  - any of the above with extra libpq parameters as query items, e.g.
    ``?sslmode=require&application_name=loom-executor``.

  ``postgres://`` is accepted as a synonym of ``postgresql://``. Percent-encode special
  characters in the user name and password (``@`` is ``%40``, ``:`` is ``%3A``).
- ``LOOM_MAX_PAYLOAD``: largest message in bytes, default 262144.
- ``LOOM_HTTP_ALLOW_PRIVATE``: comma list of hosts or CIDRs the HTTP tool may reach even
  though they are private/loopback addresses; default empty (none).
- ``LOOM_MODEL``: litellm model name; unset means no model (explicit plans only).

Secrets: the password of ``LOOM_POSTGRES_URL`` (and any in ``LOOM_NATS_URL``) never
appears in ``repr``/``str`` of these objects; use :func:`redact_url` when logging a URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast
from urllib.parse import urlsplit, urlunsplit

StoreKind = Literal["sqlite", "postgres"]

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_DATA_DIR = ".loom"
DEFAULT_MAX_PAYLOAD = 262_144
POSTGRES_URL_FORM = "postgresql://user:password@host:port/dbname"


class SettingsError(ValueError):
    """A setting is missing or malformed. ``variable`` names the environment variable."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


def redact_url(url: str | None) -> str | None:
    """``url`` with its password replaced by ``***`` (safe to log or show)."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:
        return "<unparseable url>"
    if "@" not in netloc:
        return url
    userinfo, _, hostport = netloc.rpartition("@")
    user, sep, _password = userinfo.partition(":")
    if not sep:
        return url
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


@dataclass(frozen=True)
class StoreSettings:
    kind: StoreKind
    data_dir: Path
    postgres_url: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("sqlite", "postgres"):
            raise SettingsError("LOOM_STORE", f"must be 'sqlite' or 'postgres', got {self.kind!r}")
        if self.kind == "postgres":
            if not self.postgres_url:
                raise SettingsError(
                    "LOOM_POSTGRES_URL",
                    f"required when LOOM_STORE=postgres; set it to {POSTGRES_URL_FORM} "
                    "(or postgresql://user:@/dbname?host=/socket/dir for a unix socket)",
                )
            scheme = self.postgres_url.split("://", 1)[0] if "://" in self.postgres_url else ""
            if scheme not in ("postgresql", "postgres"):
                raise SettingsError(
                    "LOOM_POSTGRES_URL",
                    f"must be a URI starting with postgresql://, like {POSTGRES_URL_FORM}; "
                    f"got {redact_url(self.postgres_url)!r}",
                )

    def __repr__(self) -> str:
        return (
            f"StoreSettings(kind={self.kind!r}, data_dir={str(self.data_dir)!r}, "
            f"postgres_url={redact_url(self.postgres_url)!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class Settings:
    nats_url: str = field(repr=False)
    store: StoreSettings
    max_payload: int = DEFAULT_MAX_PAYLOAD
    http_allow_private: tuple[str, ...] = ()
    model: str | None = None
    # Python modules whose ``register(registry)`` adds tools (LOOM_TOOL_MODULES, commas)
    tool_modules: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"Settings(nats_url={redact_url(self.nats_url)!r}, store={self.store!r}, "
            f"max_payload={self.max_payload!r}, "
            f"http_allow_private={self.http_allow_private!r}, model={self.model!r}, "
            f"tool_modules={self.tool_modules!r})"
        )

    __str__ = __repr__


def _get(env: Mapping[str, str], name: str) -> str | None:
    """The stripped value, or None when unset or blank (blank means 'use the default')."""
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def store_settings_from_env(env: Mapping[str, str] = os.environ) -> StoreSettings:
    kind = (_get(env, "LOOM_STORE") or "sqlite").lower()
    if kind not in ("sqlite", "postgres"):
        raise SettingsError("LOOM_STORE", f"must be 'sqlite' or 'postgres', got {kind!r}")
    return StoreSettings(
        kind=cast(StoreKind, kind),
        data_dir=Path(_get(env, "LOOM_DATA_DIR") or DEFAULT_DATA_DIR),
        postgres_url=_get(env, "LOOM_POSTGRES_URL"),
    )


def settings_from_env(env: Mapping[str, str] = os.environ) -> Settings:
    raw_payload = _get(env, "LOOM_MAX_PAYLOAD")
    max_payload = DEFAULT_MAX_PAYLOAD
    if raw_payload is not None:
        try:
            max_payload = int(raw_payload)
        except ValueError:
            raise SettingsError(
                "LOOM_MAX_PAYLOAD", f"must be a whole number of bytes, got {raw_payload!r}"
            ) from None
        if max_payload <= 0:
            raise SettingsError("LOOM_MAX_PAYLOAD", f"must be positive, got {max_payload}")
    allow = _get(env, "LOOM_HTTP_ALLOW_PRIVATE") or ""
    modules = _get(env, "LOOM_TOOL_MODULES") or ""
    return Settings(
        nats_url=_get(env, "LOOM_NATS_URL") or DEFAULT_NATS_URL,
        store=store_settings_from_env(env),
        max_payload=max_payload,
        http_allow_private=tuple(item.strip() for item in allow.split(",") if item.strip()),
        model=_get(env, "LOOM_MODEL"),
        tool_modules=tuple(m.strip() for m in modules.split(",") if m.strip()),
    )
