"""Service settings, read once from the environment.

This module is the only one that reads the environment (tests/unit/test_settings_only.py),
when a process starts, never at import. Every variable, in one table:
docs/configuration.md. The main ones (all optional unless noted):

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
- ``LOOM_MAX_STEP_INPUT_BYTES``, ``LOOM_MAX_STEP_OUTPUT_BYTES``: largest rendered step
  input / step output, default 131072 each (see :func:`size_limits_from_env`).
- ``LOOM_MAX_REASON_BYTES``, ``LOOM_MAX_RESUME_DATA_BYTES``,
  ``LOOM_MAX_SIGNAL_PAYLOAD_BYTES``: largest control/resume text, resume data and
  external event payload, default 4096, 131072, 65536 (see
  :func:`message_limits_from_env`).
- ``LOOM_MAX_FOREACH_ITEMS``, ``LOOM_MAX_FOREACH_CONCURRENCY``,
  ``LOOM_MAX_PARALLEL_BRANCHES``, ``LOOM_MAX_LOOP_ITERATIONS``: fan-out caps per step,
  default 10000, 64, 64, 10000 (see :func:`caps_from_env`).
- ``LOOM_BLOB_THRESHOLD_BYTES`` (65536), ``LOOM_BLOB_MAX_RESOLVED_BYTES`` (64 MiB),
  ``LOOM_BLOB_MAX_BYTES`` (256 MiB), ``LOOM_BLOB_BUCKET_MAX_BYTES`` (4 GiB),
  ``LOOM_BLOB_MAX_AGE_DAYS`` (30): big values by reference (see :class:`BlobSettings`).
- ``LOOM_HTTP_ALLOW_PRIVATE``: comma list of hosts or CIDRs the HTTP tool may reach even
  though they are private/loopback addresses; default empty (none).
- ``LOOM_MODEL``: litellm model name; unset means no model (explicit plans only).
- ``LOOM_MODELS_FILE``: a YAML file of named models with fallbacks, retries, timeouts
  and prices (``loom_services.models``); wins over ``LOOM_MODEL``.
- ``LOOM_SECRET_<NAME>`` and ``LOOM_SECRETS_DIR`` (a file per name): the secrets the
  tool-runner resolves for ``{{ secrets.NAME }}`` (``loom_infra.secret_source``).
- ``LOOM_AUTH_*``: how the executor verifies the JWT a submitter sends (see
  :class:`AuthSettings` and ``loom_infra.auth``).
- ``LOOM_NKEY_SEED_FILE``: the nkey seed this process connects to NATS with (one
  identity per process: a Kubernetes pod mounts its service's seed here; the CLI uses the
  ``operator`` seed). Unset: ``{LOOM_CREDS_DIR}/<identity>.nk`` when that file exists,
  else no credentials (only an insecure server accepts that).
- ``LOOM_CREDS_DIR``: directory of per-identity seeds ``<identity>.nk`` that ``loom up``
  generates and its services use, default ``{LOOM_DATA_DIR}/creds``.
- ``LOOM_TENANTS``: comma list of tenants (besides ``default``) whose NATS users
  (``client@<tenant>``, ``operator@<tenant>``) ``loom up`` generates and admits
  (``loom_core.tenancy``); default none: one tenant, as before.
- ``LOOM_TENANT``: the tenant this CLI or client acts in (it connects as
  ``operator@<tenant>`` with ``{LOOM_CREDS_DIR}/operator@<tenant>.nk`` unless
  ``LOOM_NKEY_SEED_FILE`` names the seed); default: the platform's own operator.
- ``LOOM_QUOTAS_FILE``: YAML of per-tenant and per-queue limits (concurrent runs,
  submission rate, tool/model call rate; ``loom_core.quotas``); default: no limits.
- ``LOOM_INSECURE``: ``1``/``true`` runs ``loom up`` with no NATS authentication at all
  (development only; loudly logged) and makes every process connect without credentials.
- ``LOOM_READ_MODELS``: ``process`` (default) runs the read models (tracing, memory) of
  ``loom up`` / ``LocalStack`` each in a child process of its own; ``inline`` runs them in
  the stack's process with the other services (see :func:`read_models_from_env`).
- ``LOOM_READ_MODELS_NICE``: the CPU priority (``nice``, 0-19, default 10) those child
  processes run at: below the services that run the steps, so a read model's fold
  takes what they leave idle (see :func:`read_models_nice_from_env`).
- ``LOOM_DIRECT_DISPATCH``: ``true`` (default) lets the tool-runner start a call from the
  relay's publish and the executor take a result from the tool-runner's publish, before
  their streams deliver them; the stream copies stay the durable fallback. ``false``:
  streams only.

Secrets: the password of ``LOOM_POSTGRES_URL`` (and any in ``LOOM_NATS_URL``) never
appears in ``repr``/``str`` of these objects; use :func:`redact_url` when logging a URL.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, cast
from urllib.parse import urlsplit, urlunsplit

from loom_core import blobs as blob_refs
from loom_core import caps as fanout
from loom_core import message_limits as msg_limits
from loom_core import partitions, tenancy
from loom_core.contracts import Caps, SizeLimits
from loom_core.errors import LoomError
from loom_core.limits import DEFAULT_MAX_DEPTH, MAX_DEPTH_SETTING, depth_limit
from loom_core.sizes import DEFAULT_LIMITS, STEP_INPUT_SETTING, STEP_OUTPUT_SETTING
from loom_core.spans import DEFAULT_IO_LIMIT, TraceOptions

StoreKind = Literal["sqlite", "postgres"]

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_DATA_DIR = ".loom"
DEFAULT_MAX_PAYLOAD = 262_144
POSTGRES_URL_FORM = "postgresql://user:password@host:port/dbname"


class SettingsError(LoomError, ValueError):
    """A setting is missing or malformed. ``variable`` names the environment variable."""

    code = "invalid_setting"

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable
        self.details = {"variable": variable}


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
    # LOOM_SNAPSHOTS_KEPT: snapshots kept per run (older ones are deleted on each save),
    # so the snapshot store holds O(state) per run, not O(history x state)
    snapshots_kept: int = 2

    def __post_init__(self) -> None:
        if self.snapshots_kept < 1:
            raise SettingsError("LOOM_SNAPSHOTS_KEPT", f"must be >= 1, got {self.snapshots_kept}")
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


# Asymmetric only: never `none`, never HS* (a public key must not double as an HMAC secret).
AUTH_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                   "ES512", "EdDSA")  # fmt: skip


@dataclass(frozen=True)
class AuthSettings:
    """JWT verification of submissions (``loom_infra.auth``). Off when ``issuer`` is unset.

    - ``LOOM_AUTH_ISSUER``, ``LOOM_AUTH_AUDIENCE``: the ``iss`` and ``aud`` a token must
      carry (both required once either is set).
    - ``LOOM_AUTH_PUBLIC_KEY_FILE`` (a PEM public key) and/or ``LOOM_AUTH_JWKS_FILE`` (a
      local JWKS document, keys picked by ``kid``): at least one when the issuer is set.
    - ``LOOM_AUTH_ANONYMOUS``: ``true``/``false``, may a submission without a token run
      as the anonymous principal (no roles, no permissions)? Default: yes when no issuer
      is configured, no when one is.
    - ``LOOM_AUTH_ALGORITHMS``: comma list, default ``RS256,ES256,EdDSA``.
    - ``LOOM_AUTH_LEEWAY_S``: clock skew allowed on ``exp``/``nbf``/``iat``, default 30.
    - ``LOOM_AUTH_ROLES_CLAIM``, ``LOOM_AUTH_PERMISSIONS_CLAIM``, ``LOOM_AUTH_TENANT_CLAIM``:
      claim names (a dotted path reaches into objects, e.g. ``realm_access.roles``).
    """

    issuer: str | None = None
    audience: str | None = None
    public_key_file: Path | None = None
    jwks_file: Path | None = None
    anonymous: bool | None = None  # None: allowed exactly when no issuer is configured
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    leeway_s: float = 30.0
    roles_claim: str = "roles"
    permissions_claim: str = "permissions"
    tenant_claim: str = "tenant"

    def __post_init__(self) -> None:
        if self.issuer is None:
            if self.audience or self.public_key_file or self.jwks_file:
                raise SettingsError("LOOM_AUTH_ISSUER", "required with the other LOOM_AUTH_*")
            if self.anonymous is False:
                raise SettingsError(
                    "LOOM_AUTH_ANONYMOUS",
                    "false needs LOOM_AUTH_ISSUER set, or no submission could ever be accepted",
                )
            return
        if not self.audience:
            raise SettingsError("LOOM_AUTH_AUDIENCE", "required when LOOM_AUTH_ISSUER is set")
        if self.public_key_file is None and self.jwks_file is None:
            raise SettingsError(
                "LOOM_AUTH_PUBLIC_KEY_FILE",
                "(or LOOM_AUTH_JWKS_FILE) is required when LOOM_AUTH_ISSUER is set",
            )
        refused = [a for a in self.algorithms if a not in AUTH_ALGORITHMS]
        if refused or not self.algorithms:
            raise SettingsError(
                "LOOM_AUTH_ALGORITHMS",
                f"{refused or 'none'} not allowed; choose among {', '.join(AUTH_ALGORITHMS)}",
            )
        if not 0 <= self.leeway_s <= 300:
            raise SettingsError("LOOM_AUTH_LEEWAY_S", f"must be 0-300 s, got {self.leeway_s}")

    @property
    def enabled(self) -> bool:
        return self.issuer is not None

    @property
    def allow_anonymous(self) -> bool:
        return not self.enabled if self.anonymous is None else self.anonymous


# --- secrets for `{{ secrets.NAME }}` (loom_infra.secret_source; only the tool-runner
# reads them). Values never appear in repr.
SECRET_ENV_PREFIX = "LOOM_SECRET_"  # noqa: S105 (a variable prefix, not a secret)


@dataclass(frozen=True)
class SecretSettings:
    dir: Path | None = None  # LOOM_SECRETS_DIR: one file per name (a mounted k8s Secret)
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # NAME -> value

    def __repr__(self) -> str:
        where = str(self.dir) if self.dir else None
        return f"SecretSettings(dir={where!r}, env names={sorted(self.env)})"


def secret_settings_from_env(env: Mapping[str, str] = os.environ) -> SecretSettings:
    directory = _get(env, "LOOM_SECRETS_DIR")
    return SecretSettings(
        dir=Path(directory) if directory else None,
        # values as given (not stripped): a secret is exactly its bytes
        env={
            k[len(SECRET_ENV_PREFIX) :]: v
            for k, v in env.items()
            if k.startswith(SECRET_ENV_PREFIX)
        },
    )


# --- end of secrets


# --- health, metrics and stream retention (loom_infra.httpserver, bus.stream_configs)
@dataclass(frozen=True)
class OpsSettings:
    """- ``LOOM_HTTP_PORT``: the port of ``/livez``, ``/readyz``, ``/metrics``; 0 (the
      default) serves none (``loom up`` needs none; a Kubernetes pod sets it).
    - ``LOOM_HTTP_HOST``: the address it binds, default 127.0.0.1 (a pod sets 0.0.0.0).
    - ``LOOM_READY_MAX_RELAY_LAG``: stored events not yet published above which the
      executor is not ready, default 10000.
    - ``LOOM_READY_STALL_S``: seconds the relay (or the writer) may hold unpublished (or
      queued) work without moving before the executor is not ready, default 60.
    - ``LOOM_RUNS_MAX_AGE_DAYS`` (default 90: must exceed the longest timer or wait, whose
      message is held in LOOM_RUNS), ``LOOM_STREAM_MAX_BYTES`` (per stream, default 8 GiB),
      ``LOOM_REJECTS_MAX_MSGS`` (default 10000): retention of the streams provisioned.
    - ``LOOM_REJECTS_QUEUE``: rejections waiting to be recorded before new ones are dropped
      (counted and logged, never waited for), default 1000.
    - ``LOOM_STREAM_REPLICAS``: replicas of every stream and bucket provisioned, 1 (the
      default: one nats-server) to 5; 3 on a 3-node JetStream cluster. Provisioning only
      ever raises an existing stream's replicas (``bus.merge_stream``), so a process
      started without it never brings a stream back to 1.
    - ``LOOM_PARTITIONS``: the partitions LOOM_INBOX's subject transform spreads runs
      over (``partition_count_from_env``).
    - ``LOOM_RUNS_PERSIST`` (``async``): LOOM_RUNS' persistence when it is created;
      ``default`` fsyncs every event (a clustered stream with replicas).
    """

    http_port: int = 0
    http_host: str = "127.0.0.1"
    ready_max_relay_lag: int = 10_000
    ready_stall_s: float = 60.0
    runs_max_age_days: float = 90.0
    stream_max_bytes: int = 8 * 1024**3
    rejects_max_msgs: int = 10_000
    rejects_queue: int = 1000
    stream_replicas: int = 1
    partitions: int = partitions.DEFAULT_COUNT
    runs_persist: str = "async"

    def __post_init__(self) -> None:
        if self.runs_persist not in ("async", "default"):
            raise SettingsError(
                "LOOM_RUNS_PERSIST", f"must be 'async' or 'default', got {self.runs_persist!r}"
            )
        if not 1 <= self.stream_replicas <= 5:  # JetStream's own bounds
            raise SettingsError(
                "LOOM_STREAM_REPLICAS", f"must be 1 to 5, got {self.stream_replicas}"
            )


def ops_settings_from_env(env: Mapping[str, str] = os.environ) -> OpsSettings:
    def number(name: str, default: float, low: float) -> float:
        raw = _get(env, name)
        try:
            value = default if raw is None else float(raw)
        except ValueError:
            raise SettingsError(name, f"must be a number, got {raw!r}") from None
        if not value >= low:
            raise SettingsError(name, f"must be >= {low:g}, got {raw}")
        return value

    port = int(number("LOOM_HTTP_PORT", 0, 0))
    if port > 65535:
        raise SettingsError("LOOM_HTTP_PORT", f"must be 0-65535, got {port}")
    return OpsSettings(
        http_port=port,
        http_host=_get(env, "LOOM_HTTP_HOST") or "127.0.0.1",
        ready_max_relay_lag=int(number("LOOM_READY_MAX_RELAY_LAG", 10_000, 1)),
        ready_stall_s=number("LOOM_READY_STALL_S", 60.0, 1),
        runs_max_age_days=number("LOOM_RUNS_MAX_AGE_DAYS", 90.0, 1),
        stream_max_bytes=int(number("LOOM_STREAM_MAX_BYTES", 8 * 1024**3, 1024**2)),
        rejects_max_msgs=int(number("LOOM_REJECTS_MAX_MSGS", 10_000, 1)),
        rejects_queue=int(number("LOOM_REJECTS_QUEUE", 1000, 1)),
        stream_replicas=_whole(env, "LOOM_STREAM_REPLICAS", 1),
        partitions=partition_count_from_env(env),
        runs_persist=(_get(env, "LOOM_RUNS_PERSIST") or "async").lower(),
    )


# --- end of health, metrics and stream retention


# --- size limits of step inputs and outputs (loom_core.sizes): recorded in each run's
# run_requested by the executor, so a run keeps the limits it started with (replay).
@dataclass(frozen=True)
class DeliverySettings:
    """How messages are delivered and handled (issue 10; read here, nowhere else):

    - ``LOOM_ACK_WAIT_S`` (1): a fetched, unacked message goes to another consumer
      instance after this; live handlers keep theirs by heartbeats every third of it.
    - ``LOOM_HELD_ACK_WAIT_S`` (5): the same for held messages (timers, open waits).
    - ``LOOM_TOOL_ACK_WAIT_S`` (1): the tool-runner's requests.
    - ``LOOM_TOOL_CONCURRENCY`` (64): tool calls one runner process runs at once.
    - ``LOOM_RELAY_BATCH`` (512): events the standalone relay publishes per batch.
    - ``LOOM_LOCAL_TOOLS`` (unset: every pure built-in; empty: none) and
      ``LOOM_LOCAL_BUDGET`` (16): built-ins the executor answers in its batch
      (``loom_services.local_tools``).
    - ``LOOM_CONSUMER_CREATE_S`` (60): how long a consumer task keeps trying to
      create its consumer while JetStream does not answer (a cluster electing leaders
      after a lost node, a NATS rollout) before it gives up.
    - ``LOOM_LOG_LEVEL`` (``INFO``).

    The service runtime installs these in ``loom_infra.bus`` at start (``bus.configure``):
    consumers are made deep inside every service."""

    ack_wait_s: float = 1.0
    held_ack_wait_s: float = 5.0
    tool_ack_wait_s: float = 1.0
    tool_concurrency: int = 64
    relay_batch: int = 512
    local_tools: tuple[str, ...] | None = None
    local_budget: int = 16
    consumer_create_s: float = 60.0
    log_level: str = "INFO"


def delivery_settings_from_env(env: Mapping[str, str] = os.environ) -> DeliverySettings:
    def seconds(name: str, default: float) -> float:
        raw = _get(env, name)
        try:
            value = default if raw is None else float(raw)
        except ValueError:
            raise SettingsError(name, f"must be seconds, got {raw!r}") from None
        if not 0.01 <= value <= 3600:
            raise SettingsError(name, f"must be 0.01-3600 s, got {raw}")
        return value

    def count(name: str, default: int) -> int:
        value = _whole(env, name, default)
        if value < 1:
            raise SettingsError(name, f"must be >= 1, got {value}")
        return value

    budget = _whole(env, "LOOM_LOCAL_BUDGET", 16)
    if not 0 <= budget <= 10_000:  # 0: no local call (each crosses NATS)
        raise SettingsError("LOOM_LOCAL_BUDGET", f"must be 0-10000, got {budget}")
    raw_local = env.get("LOOM_LOCAL_TOOLS")  # set but empty means none: not _get
    local = None if raw_local is None else tuple(
        name.strip() for name in raw_local.split(",") if name.strip()
    )  # fmt: skip
    return DeliverySettings(
        ack_wait_s=seconds("LOOM_ACK_WAIT_S", 1.0),
        held_ack_wait_s=seconds("LOOM_HELD_ACK_WAIT_S", 5.0),
        tool_ack_wait_s=seconds("LOOM_TOOL_ACK_WAIT_S", 1.0),
        tool_concurrency=count("LOOM_TOOL_CONCURRENCY", 64),
        relay_batch=count("LOOM_RELAY_BATCH", 512),
        local_tools=local,
        local_budget=budget,
        consumer_create_s=seconds("LOOM_CONSUMER_CREATE_S", 60.0),
        log_level=log_level_from_env(env),
    )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level_from_env(env: Mapping[str, str] = os.environ) -> str:
    """``LOOM_LOG_LEVEL`` alone: logging is set up before the other settings are read
    (so that their errors are logged). One of ``LOG_LEVELS``, any case."""
    level = (_get(env, "LOOM_LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise SettingsError(
            "LOOM_LOG_LEVEL", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}"
        )
    return level


def size_limits_from_env(env: Mapping[str, str], max_payload: int) -> SizeLimits:
    """``LOOM_MAX_STEP_INPUT_BYTES`` / ``LOOM_MAX_STEP_OUTPUT_BYTES`` (default 128 KiB
    each): 1 KiB up to half the broker's max_payload (``max(1 MiB, 2 x
    LOOM_MAX_PAYLOAD)``, what the embedded server sets), so an event holding one such
    value always fits in a message."""
    ceiling = max(1024**2, 2 * max_payload) // 2
    values = []
    for name, default in ((STEP_INPUT_SETTING, DEFAULT_LIMITS.step_input_bytes),
                          (STEP_OUTPUT_SETTING, DEFAULT_LIMITS.step_output_bytes)):  # fmt: skip
        value = _whole(env, name, default)
        if not 1024 <= value <= ceiling:
            raise SettingsError(
                name, f"must be 1024-{ceiling} bytes (half the broker's max_payload), got {value}"
            )
        values.append(value)
    return SizeLimits(step_input_bytes=values[0], step_output_bytes=values[1])


# --- end of size limits


# --- limits on what enters a live run (loom_core.message_limits): checked at the edge
# (control, resume, signals), never recorded: a refused message never becomes an event.
def message_limits_from_env(
    env: Mapping[str, str], max_payload: int, max_depth: int = DEFAULT_MAX_DEPTH
) -> msg_limits.MessageLimits:
    """``LOOM_MAX_REASON_BYTES`` (default 4096, 256 up), ``LOOM_MAX_RESUME_DATA_BYTES``
    (131072) and ``LOOM_MAX_SIGNAL_PAYLOAD_BYTES`` (65536), 1024 up; each at most half
    the broker's max_payload (``max(1 MiB, 2 x LOOM_MAX_PAYLOAD)``)."""
    ceiling = max(1024**2, 2 * max_payload) // 2
    default = msg_limits.DEFAULT_MESSAGE_LIMITS
    values = []
    for name, fallback, floor in (
        (msg_limits.REASON_SETTING, default.reason_bytes, 256),
        (msg_limits.RESUME_DATA_SETTING, default.resume_data_bytes, 1024),
        (msg_limits.SIGNAL_PAYLOAD_SETTING, default.signal_payload_bytes, 1024),
    ):
        value = _whole(env, name, fallback)
        if not floor <= value <= ceiling:
            raise SettingsError(
                name,
                f"must be {floor}-{ceiling} bytes (half the broker's max_payload), got {value}",
            )
        values.append(value)
    reason, resume_data, signal_payload = values
    return msg_limits.MessageLimits(reason, resume_data, signal_payload, max_depth=max_depth)


# --- end of message limits


# --- fan-out caps (loom_core.caps): recorded in each run's run_requested by the executor,
# so a run keeps the caps it started with (replay). Each: 1 up to a ceiling that keeps a
# run loadable (a loop's is validation's MAX_LOOP_ITERATIONS).
_CAP_SETTINGS = (
    (fanout.ITEMS_SETTING, "foreach_items", 1_000_000),
    (fanout.CONCURRENCY_SETTING, "foreach_concurrency", 1024),
    (fanout.BRANCHES_SETTING, "parallel_branches", 1024),
    (fanout.ITERATIONS_SETTING, "loop_iterations", 100_000),
)


def caps_from_env(env: Mapping[str, str]) -> Caps:
    """``LOOM_MAX_FOREACH_ITEMS`` (default 10000), ``LOOM_MAX_FOREACH_CONCURRENCY`` (64),
    ``LOOM_MAX_PARALLEL_BRANCHES`` (64), ``LOOM_MAX_LOOP_ITERATIONS`` (10000)."""
    values: dict[str, int] = {}
    for name, attr, ceiling in _CAP_SETTINGS:
        value = _whole(env, name, getattr(fanout.DEFAULT_CAPS, attr))
        if not 1 <= value <= ceiling:
            raise SettingsError(name, f"must be 1-{ceiling}, got {value}")
        values[attr] = value
    return Caps(**values)


# --- end of fan-out caps


# --- blobs: big values by reference (loom_core.blobs, loom_infra.blobstore)
@dataclass(frozen=True)
class BlobSettings:
    """``threshold_bytes``: a tool output (or a client's input value) whose canonical JSON
    is larger is stored as a blob and carried by reference; ``max_resolved_bytes``: the
    most blob bytes the tool-runner puts back into one tool input; ``max_blob_bytes``:
    the largest single blob; ``bucket_max_bytes`` / ``max_age_s``: the bucket's bounds
    (set when it is created; an operator's later changes are kept)."""

    threshold_bytes: int = blob_refs.DEFAULT_THRESHOLD_BYTES
    max_resolved_bytes: int = blob_refs.DEFAULT_MAX_RESOLVED_BYTES
    max_blob_bytes: int = 256 * 1024**2
    bucket_max_bytes: int = 4 * 1024**3
    max_age_s: float = 30 * 86_400.0


def blob_settings_from_env(env: Mapping[str, str] = os.environ) -> BlobSettings:
    threshold = _whole(env, blob_refs.THRESHOLD_SETTING, blob_refs.DEFAULT_THRESHOLD_BYTES)
    # a reference must be much smaller than what it replaces, and the value it replaces
    # must fit in a step (loom_core.sizes: 128 KiB by default)
    if not 1024 <= threshold <= 512 * 1024:
        raise SettingsError(
            blob_refs.THRESHOLD_SETTING, f"must be 1024-524288 bytes, got {threshold}"
        )
    resolved = _whole(env, blob_refs.MAX_RESOLVED_SETTING, blob_refs.DEFAULT_MAX_RESOLVED_BYTES)
    biggest = _whole(env, "LOOM_BLOB_MAX_BYTES", BlobSettings.max_blob_bytes)
    bucket = _whole(env, "LOOM_BLOB_BUCKET_MAX_BYTES", BlobSettings.bucket_max_bytes)
    days = _whole(env, "LOOM_BLOB_MAX_AGE_DAYS", 30)
    for name, value in ((blob_refs.MAX_RESOLVED_SETTING, resolved),
                        ("LOOM_BLOB_MAX_BYTES", biggest), ("LOOM_BLOB_BUCKET_MAX_BYTES", bucket),
                        ("LOOM_BLOB_MAX_AGE_DAYS", days)):  # fmt: skip
        if value < 1:
            raise SettingsError(name, f"must be positive, got {value}")
    return BlobSettings(
        threshold_bytes=threshold,
        max_resolved_bytes=resolved,
        max_blob_bytes=biggest,
        bucket_max_bytes=bucket,
        max_age_s=days * 86_400.0,
    )


# --- end of blobs


@dataclass(frozen=True)
class ScheduleSettings:
    """Schedules (loom_services.schedules): ``max_per_tenant`` schedules per tenant
    (LOOM_SCHEDULES_MAX); a firing missed by at most ``grace_s`` still fires under
    catch-up ``none`` (LOOM_SCHEDULE_GRACE_S); catch-up ``all`` fires at most
    ``max_catch_up`` missed firings at once (LOOM_SCHEDULE_MAX_CATCH_UP)."""

    max_per_tenant: int = 1000
    grace_s: int = 60
    max_catch_up: int = 100


def schedule_settings_from_env(env: Mapping[str, str] = os.environ) -> ScheduleSettings:
    values = {
        "LOOM_SCHEDULES_MAX": _whole(env, "LOOM_SCHEDULES_MAX", ScheduleSettings.max_per_tenant),
        "LOOM_SCHEDULE_GRACE_S": _whole(env, "LOOM_SCHEDULE_GRACE_S", ScheduleSettings.grace_s),
        "LOOM_SCHEDULE_MAX_CATCH_UP": _whole(
            env, "LOOM_SCHEDULE_MAX_CATCH_UP", ScheduleSettings.max_catch_up
        ),
    }
    for name, value in values.items():
        if not 1 <= value <= 100_000:
            raise SettingsError(name, f"must be 1-100000, got {value}")
    return ScheduleSettings(*values.values())


# --- settings once read where they were used (issue 16: every variable is read in this
# module, when a process starts, and passed to the code that needs it; a bad value stops
# the start with a SettingsError naming the variable, never a later request or an import)


def partition_count_from_env(env: Mapping[str, str] = os.environ) -> int:
    """``LOOM_PARTITIONS``: how many partitions the runs are spread over (default
    ``loom_core.partitions.DEFAULT_COUNT``, 1 to ``MAX_COUNT``). Every executor replica
    and the provisioner must agree (``bus.PartitionCountChanged``)."""
    raw = _get(env, "LOOM_PARTITIONS")
    count = partitions.DEFAULT_COUNT if raw is None else int(raw) if raw.isdigit() else -1
    problem = partitions.check_count(count)
    if problem is not None:
        raise SettingsError("LOOM_PARTITIONS", f"{problem} (got {raw!r})")
    return count


DEFAULT_LEASE_S = 3.0
_REPLICA_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class PartitionSettings:
    """Executor replicas (``loom_infra.ownership``): ``count`` (LOOM_PARTITIONS),
    ``lease_s`` a replica's hold on a partition without renewing it
    (LOOM_PARTITION_LEASE_S, 1-300 s, default 3), ``replica`` this replica's name in the
    leases (LOOM_REPLICA_ID, default the host name; a subject token, at most 64)."""

    count: int = partitions.DEFAULT_COUNT
    lease_s: float = DEFAULT_LEASE_S
    replica: str = "executor"


def partition_settings_from_env(env: Mapping[str, str] = os.environ) -> PartitionSettings:
    raw = _get(env, "LOOM_PARTITION_LEASE_S")
    try:
        lease = DEFAULT_LEASE_S if raw is None else float(raw)
    except ValueError:
        lease = -1.0
    if not 1.0 <= lease <= 300.0:
        raise SettingsError(
            "LOOM_PARTITION_LEASE_S", f"must be a number of seconds between 1 and 300, got {raw!r}"
        )
    replica = _get(env, "LOOM_REPLICA_ID") or socket.gethostname()
    return PartitionSettings(
        count=partition_count_from_env(env),
        lease_s=lease,
        replica=_REPLICA_TOKEN.sub("_", replica)[:64],
    )


EMBEDDER_FORMS = "minilm (offline default), hash[:dim] or litellm:<model>:<dimensions>"


@dataclass(frozen=True)
class EmbedderSettings:
    """The memory service's embedder (``loom_infra.embedders``): ``spec`` (LOOM_EMBEDDER:
    ``minilm``, ``hash``, ``hash:<dim>``, ``litellm:<model>:<dim>``), ``model_dir``
    (LOOM_EMBED_MODEL_DIR: a folder with the MiniLM files; default the installed wheel),
    ``threads`` (LOOM_EMBED_THREADS, 1-256, default 1: BLAS threads for MiniLM)."""

    spec: str = "minilm"
    model_dir: Path | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.threads <= 256:
            raise SettingsError("LOOM_EMBED_THREADS", f"must be 1-256, got {self.threads}")
        kind, _, rest = self.spec.partition(":")
        if kind == "minilm" and not rest:
            return
        if kind == "hash" and (not rest or (rest.isdigit() and 1 <= int(rest) <= 4096)):
            return
        model, _, dim = rest.rpartition(":")
        if kind == "litellm" and model and dim.isdigit() and 1 <= int(dim) <= 65_536:
            return
        raise SettingsError(
            "LOOM_EMBEDDER",
            f"{self.spec!r} is not an embedder: use {EMBEDDER_FORMS}, "
            "e.g. litellm:text-embedding-3-small:1536",
        )


def embedder_settings_from_env(env: Mapping[str, str] = os.environ) -> EmbedderSettings:
    return EmbedderSettings(
        spec=_get(env, "LOOM_EMBEDDER") or "minilm",
        model_dir=_path(env, "LOOM_EMBED_MODEL_DIR"),
        threads=_whole(env, "LOOM_EMBED_THREADS", 1),
    )


_TRACE_TRUE = ("1", "true", "yes", "on")
_TRACE_FALSE = ("0", "false", "no", "off")


def trace_options_from_env(env: Mapping[str, str] = os.environ) -> TraceOptions:
    """The tracing service's span options: ``LOOM_TRACE_CAPTURE_IO`` (1/true/yes/on or
    0/false/no/off, default off: step inputs and outputs as span attributes, secrets
    redacted) and ``LOOM_TRACE_IO_LIMIT`` (bytes kept of each, >= 0, default 4096)."""
    raw = (_get(env, "LOOM_TRACE_CAPTURE_IO") or "0").lower()
    if raw not in _TRACE_TRUE + _TRACE_FALSE:
        raise SettingsError("LOOM_TRACE_CAPTURE_IO", f"must be 1 or 0 (true/false), got {raw!r}")
    raw_limit = _get(env, "LOOM_TRACE_IO_LIMIT")
    limit = DEFAULT_IO_LIMIT
    if raw_limit is not None:
        limit = int(raw_limit) if raw_limit.isdigit() else -1
        if limit < 0:
            raise SettingsError(
                "LOOM_TRACE_IO_LIMIT", f"must be a number of bytes >= 0, got {raw_limit!r}"
            )
    return TraceOptions(capture_io=raw in _TRACE_TRUE, io_limit=limit)


class OtlpConfigError(SettingsError):
    """An ``OTEL_EXPORTER_OTLP_*`` variable is malformed or asks for what is not installed.
    ``variable`` names it."""


OTLP_PROTOCOLS = ("http/protobuf", "grpc")


@dataclass(frozen=True)
class OtlpSettings:
    """Where the tracing service exports spans (``loom_infra.otlp``). ``headers`` may
    carry a collector's API key: never in repr.

    Read by the tracing service when it starts, not by ``settings_from_env``: the
    ``OTEL_*`` variables are shared with other software in a user's environment (e.g.
    ``OTEL_EXPORTER_OTLP_PROTOCOL=http/json``, which we do not support), and the CLI
    and the other services export nothing, so they must not refuse to start over them."""

    endpoint: str
    protocol: str = "http/protobuf"
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    compression: str = "none"
    insecure: bool | None = None
    certificate: str | None = None
    client_certificate: str | None = None
    client_key: str | None = None


def otlp_settings_from_env(env: Mapping[str, str] = os.environ) -> OtlpSettings | None:
    """The standard OpenTelemetry variables, or None when no endpoint is set.

    - ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``: the traces URL, used as is; otherwise
      ``OTEL_EXPORTER_OTLP_ENDPOINT`` (base URL; ``/v1/traces`` is appended for HTTP).
    - ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``: ``http/protobuf`` (default) or ``grpc``.
    - ``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS``: ``key=value,key2=value2`` (URL-encoded).
    - ``OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION``: ``gzip`` or ``none``.
    - ``OTEL_EXPORTER_OTLP_[TRACES_]INSECURE``: ``true`` for plaintext gRPC to an endpoint
      without a scheme (an ``http://`` endpoint is plaintext anyway).
    - ``OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE``, ``..._CLIENT_CERTIFICATE``,
      ``..._CLIENT_KEY``: PEM files for TLS (trusted CA; mutual TLS).
    The signal-specific variable wins over the general one."""
    from opentelemetry.util.re import parse_env_headers  # the SDK's own header syntax

    def get(name: str) -> tuple[str, str | None]:
        for var in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
            value = _get(env, var)
            if value:
                return var, value
        return f"OTEL_EXPORTER_OTLP_{name}", None

    protocol_var, protocol = get("PROTOCOL")
    protocol = (protocol or "http/protobuf").lower()
    if protocol not in OTLP_PROTOCOLS:
        raise OtlpConfigError(
            protocol_var,
            f"unsupported protocol {protocol!r}; use one of {', '.join(OTLP_PROTOCOLS)} "
            "(http/json is not supported)",
        )
    traces = _get(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base = _get(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
    if traces:
        endpoint_var, endpoint = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces
    elif base:
        endpoint_var = "OTEL_EXPORTER_OTLP_ENDPOINT"
        endpoint = base if protocol == "grpc" else f"{base.rstrip('/')}/v1/traces"
    else:
        return None
    if protocol == "http/protobuf" and not endpoint.startswith(("http://", "https://")):
        raise OtlpConfigError(
            endpoint_var,
            f"must be an http:// or https:// URL, got {endpoint!r} "
            "(e.g. http://otel-collector:4318)",
        )
    _, raw_headers = get("HEADERS")
    headers = dict(parse_env_headers(raw_headers or "", liberal=True))
    compression_var, compression = get("COMPRESSION")
    compression = (compression or "none").lower()
    if compression not in ("none", "gzip"):
        raise OtlpConfigError(compression_var, f"must be 'gzip' or 'none', got {compression!r}")
    insecure_var, raw_insecure = get("INSECURE")
    insecure: bool | None = None
    if raw_insecure is not None:
        if raw_insecure.lower() not in ("true", "false"):
            raise OtlpConfigError(insecure_var, f"must be 'true' or 'false', got {raw_insecure!r}")
        insecure = raw_insecure.lower() == "true"
    files: dict[str, str | None] = {}
    for name in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"):
        var, path = get(name)
        if path is not None and not Path(path).is_file():
            raise OtlpConfigError(var, f"no such file: {path!r}")
        files[name.lower()] = path
    return OtlpSettings(
        endpoint,
        protocol=protocol,
        headers=headers,
        compression=compression,
        insecure=insecure,
        certificate=files["certificate"],
        client_certificate=files["client_certificate"],
        client_key=files["client_key"],
    )


def tools_config_from_env(env: Mapping[str, str] = os.environ) -> Path | None:
    """``LOOM_TOOLS_CONFIG``: the tool-runner's YAML/JSON of MCP servers, tool metadata
    and breakers (``loom_services.tools.config``); unset: none. The file itself is read
    and checked when the tool-runner starts."""
    return _path(env, "LOOM_TOOLS_CONFIG")


def debug_from_env(env: Mapping[str, str] = os.environ) -> bool:
    """``LOOM_DEBUG=1``: the CLI shows tracebacks, as ``--debug`` does. Anything else
    (unset, 0) is off: a typo must not turn a user's terminal into stack dumps."""
    return _get(env, "LOOM_DEBUG") == "1"


def columns_from_env(env: Mapping[str, str] = os.environ) -> int | None:
    """``COLUMNS`` (the terminal convention, which rich reads too): when set, the CLI's
    tables use that width even when piped; otherwise piped tables are never cut."""
    raw = _get(env, "COLUMNS")
    return int(raw) if raw is not None and raw.isdigit() and int(raw) > 0 else None


def payload_limit_from_env(env: Mapping[str, str] = os.environ) -> int:
    """``LOOM_MAX_PAYLOAD``: the largest message in bytes (default 262144)."""
    raw = _get(env, "LOOM_MAX_PAYLOAD")
    if raw is None:
        return DEFAULT_MAX_PAYLOAD
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(
            "LOOM_MAX_PAYLOAD", f"must be a whole number of bytes, got {raw!r}"
        ) from None
    if value <= 0:
        raise SettingsError("LOOM_MAX_PAYLOAD", f"must be positive, got {value}")
    return value


def json_depth_from_env(env: Mapping[str, str] = os.environ) -> int:
    """``LOOM_MAX_JSON_DEPTH`` (1-200, default 64): the deepest JSON accepted."""
    return _depth(env)


READ_MODES = ("process", "inline")
ReadModelsMode = Literal["process", "inline"]


def check_read_models(value: str) -> ReadModelsMode:
    """``value`` as a read-models mode, or a SettingsError naming ``LOOM_READ_MODELS``."""
    mode = value.strip().lower()
    if mode not in READ_MODES:
        raise SettingsError(
            "LOOM_READ_MODELS",
            f"must be 'process' (tracing and memory each in a child process) or 'inline' "
            f"(in the stack's process), got {value!r}",
        )
    return cast(ReadModelsMode, mode)


def read_models_from_env(env: Mapping[str, str] = os.environ) -> ReadModelsMode:
    """``LOOM_READ_MODELS``: where the embedded stack (``loom up``, ``loom demo``,
    ``LocalStack``) runs its read models, tracing and memory: ``process`` (the default)
    each in a child process (``python -m loom_services.<name>``) so their folds never hold
    the event loop that runs the steps; ``inline`` in the stack's own process (one process
    to debug; what the test suite uses by default, a child costing its start-up)."""
    return check_read_models(_get(env, "LOOM_READ_MODELS") or "process")


READ_MODELS_NICE_DEFAULT = 10


def check_read_models_nice(value: object) -> int:
    """``value`` as the read models' niceness, or a SettingsError naming
    ``LOOM_READ_MODELS_NICE``. Not negative: raising a process's priority needs
    privileges, and a read model must never be favoured over the services that run the
    steps."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 19:
        raise SettingsError(
            "LOOM_READ_MODELS_NICE",
            f"must be a whole number from 0 (the services' own priority) to 19 (the "
            f"lowest), got {value!r}",
        )
    return value


def read_models_nice_from_env(env: Mapping[str, str] = os.environ) -> int:
    """``LOOM_READ_MODELS_NICE``: the ``nice`` value (0-19, default 10) of the embedded
    stack's read-model child processes (``LOOM_READ_MODELS=process``). Their folds come
    in bursts (tracing folds ~28 steps' events every 50 ms, 2-4 ms of CPU); at the
    services' own priority such a burst took a core from the executor, the tool-runner or
    nats-server, and most of a sequential run's slow steps (issue 10: p99 <= 3x p50) were
    those. At 10 the kernel gives them what the step path leaves idle; they are read
    models and may lag. 0 puts them level with the services."""
    raw = _get(env, "LOOM_READ_MODELS_NICE")
    if raw is None:
        return READ_MODELS_NICE_DEFAULT
    try:
        value: object = int(raw)
    except ValueError:
        value = raw
    return check_read_models_nice(value)


# --- end of settings once read where they were used


@dataclass(frozen=True)
class Settings:
    nats_url: str = field(repr=False)
    store: StoreSettings
    max_payload: int = DEFAULT_MAX_PAYLOAD
    http_allow_private: tuple[str, ...] = ()
    model: str | None = None
    # LOOM_MODELS_FILE: named models, fallbacks, prices (loom_services.models)
    models_file: Path | None = None
    # Python modules whose ``register(registry)`` adds tools (LOOM_TOOL_MODULES, commas)
    tool_modules: tuple[str, ...] = ()
    auth: AuthSettings = field(default_factory=AuthSettings)
    secrets: SecretSettings = field(default_factory=SecretSettings)
    # NATS credentials (loom_infra.credentials): see the module doc
    nkey_seed_file: Path | None = None
    creds_dir: Path | None = None
    insecure: bool = False
    # deepest JSON accepted in a run request (LOOM_MAX_JSON_DEPTH, 1-200)
    max_json_depth: int = DEFAULT_MAX_DEPTH
    ops: OpsSettings = field(default_factory=OpsSettings)  # health, metrics, retention
    size_limits: SizeLimits = DEFAULT_LIMITS  # step inputs/outputs (loom_core.sizes)
    caps: Caps = fanout.DEFAULT_CAPS  # fan-out: foreach, parallel, loop (loom_core.caps)
    blobs: BlobSettings = field(default_factory=BlobSettings)  # big values by reference
    # reasons, resume data, signal payloads (loom_core.message_limits)
    message_limits: msg_limits.MessageLimits = msg_limits.DEFAULT_MESSAGE_LIMITS
    schedules: ScheduleSettings = field(default_factory=ScheduleSettings)
    # tenants (loom_core.tenancy): those whose users this stack admits, and the one this
    # process acts in (None: the platform's own identities)
    tenants: tuple[str, ...] = ()
    tenant: str | None = None
    quotas_file: Path | None = None  # LOOM_QUOTAS_FILE (loom_core.quotas)
    # LOOM_DIRECT_DISPATCH (default true): tool requests are also sent to the tool-runners
    # just before their commit, and results straight to the run's writer; the streams stay
    # the durable path (docs/decisions.md, "Performance, sixth part")
    direct_dispatch: bool = True
    # ack waits, concurrency, local calls (a Settings made in code reads these from the
    # environment too: they always were environment settings)
    delivery: DeliverySettings = field(default_factory=lambda: delivery_settings_from_env())
    # the same holds for these (issue 16 moved their reads here from where they were used)
    partitions: PartitionSettings = field(default_factory=lambda: partition_settings_from_env())
    embedder: EmbedderSettings = field(default_factory=lambda: embedder_settings_from_env())
    # LOOM_QDRANT: a Qdrant server URL or a local folder; None: {data dir}/qdrant
    qdrant: str | None = field(default_factory=lambda: _get(os.environ, "LOOM_QDRANT"))
    trace: TraceOptions = field(default_factory=lambda: trace_options_from_env())
    tools_config: Path | None = field(default_factory=lambda: tools_config_from_env())
    # LOOM_READ_MODELS: tracing and memory of the embedded stack in child processes
    # (``process``) or in its own (``inline``); read_models_from_env
    read_models: ReadModelsMode = field(default_factory=lambda: read_models_from_env())
    # LOOM_READ_MODELS_NICE: those child processes' CPU priority; read_models_nice_from_env
    read_models_nice: int = field(default_factory=lambda: read_models_nice_from_env())

    def __post_init__(self) -> None:
        check_read_models(self.read_models)
        check_read_models_nice(self.read_models_nice)

    @property
    def credentials_dir(self) -> Path:
        return self.creds_dir if self.creds_dir is not None else self.store.data_dir / "creds"

    def seed_file_for(self, identity: str) -> Path | None:
        """The seed ``identity`` connects with: LOOM_NKEY_SEED_FILE (one identity per
        process), else its file in the credentials directory if there is one, else None
        (no credentials; always None in insecure mode)."""
        if self.insecure:
            return None
        if self.nkey_seed_file is not None:
            return self.nkey_seed_file
        candidate = self.credentials_dir / f"{identity}.nk"
        return candidate if candidate.is_file() else None

    def __repr__(self) -> str:
        return (
            f"Settings(nats_url={redact_url(self.nats_url)!r}, store={self.store!r}, "
            f"max_payload={self.max_payload!r}, "
            f"http_allow_private={self.http_allow_private!r}, model={self.model!r}, "
            f"tool_modules={self.tool_modules!r}, auth={self.auth!r}, "
            f"nkey_seed_file={self.nkey_seed_file!r}, creds_dir={self.creds_dir!r}, "
            f"insecure={self.insecure!r})"
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
        snapshots_kept=_whole(env, "LOOM_SNAPSHOTS_KEPT", 2),
    )


def _whole(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(name, f"must be a whole number, got {raw!r}") from None


def auth_settings_from_env(env: Mapping[str, str] = os.environ) -> AuthSettings:
    def path(name: str) -> Path | None:
        value = _get(env, name)
        return Path(value) if value else None

    anonymous = _get(env, "LOOM_AUTH_ANONYMOUS")
    if anonymous is not None and anonymous.lower() not in ("true", "false", "1", "0"):
        raise SettingsError("LOOM_AUTH_ANONYMOUS", f"must be true or false, got {anonymous!r}")
    leeway = _get(env, "LOOM_AUTH_LEEWAY_S") or "30"
    try:
        leeway_s = float(leeway)
    except ValueError:
        raise SettingsError("LOOM_AUTH_LEEWAY_S", f"must be seconds, got {leeway!r}") from None
    algorithms = _get(env, "LOOM_AUTH_ALGORITHMS") or "RS256,ES256,EdDSA"
    return AuthSettings(
        issuer=_get(env, "LOOM_AUTH_ISSUER"),
        audience=_get(env, "LOOM_AUTH_AUDIENCE"),
        public_key_file=path("LOOM_AUTH_PUBLIC_KEY_FILE"),
        jwks_file=path("LOOM_AUTH_JWKS_FILE"),
        anonymous=None if anonymous is None else anonymous.lower() in ("true", "1"),
        algorithms=tuple(a.strip() for a in algorithms.split(",") if a.strip()),
        leeway_s=leeway_s,
        roles_claim=_get(env, "LOOM_AUTH_ROLES_CLAIM") or "roles",
        permissions_claim=_get(env, "LOOM_AUTH_PERMISSIONS_CLAIM") or "permissions",
        tenant_claim=_get(env, "LOOM_AUTH_TENANT_CLAIM") or "tenant",
    )


def settings_from_env(env: Mapping[str, str] = os.environ) -> Settings:
    max_payload = payload_limit_from_env(env)
    allow = _get(env, "LOOM_HTTP_ALLOW_PRIVATE") or ""
    modules = _get(env, "LOOM_TOOL_MODULES") or ""
    size_limits = size_limits_from_env(env, max_payload)
    blobs = blob_settings_from_env(env)
    smallest = min(size_limits.step_input_bytes, size_limits.step_output_bytes)
    if _get(env, blob_refs.THRESHOLD_SETTING) is None and blobs.threshold_bytes > smallest // 2:
        # the default follows lowered step limits (a value must fit a step, by far)
        blobs = replace(blobs, threshold_bytes=smallest // 2)
    if blobs.threshold_bytes > smallest:  # a value between the two could go nowhere
        raise SettingsError(
            blob_refs.THRESHOLD_SETTING,
            f"must be at most the step limits ({smallest} bytes, LOOM_MAX_STEP_INPUT_BYTES "
            f"and LOOM_MAX_STEP_OUTPUT_BYTES), got {blobs.threshold_bytes}",
        )
    return Settings(
        nats_url=_get(env, "LOOM_NATS_URL") or DEFAULT_NATS_URL,
        store=store_settings_from_env(env),
        max_payload=max_payload,
        http_allow_private=tuple(item.strip() for item in allow.split(",") if item.strip()),
        model=_get(env, "LOOM_MODEL"),
        models_file=_path(env, "LOOM_MODELS_FILE"),
        tool_modules=tuple(m.strip() for m in modules.split(",") if m.strip()),
        auth=auth_settings_from_env(env),
        secrets=secret_settings_from_env(env),
        nkey_seed_file=_path(env, "LOOM_NKEY_SEED_FILE"),
        creds_dir=_path(env, "LOOM_CREDS_DIR"),
        insecure=_flag(env, "LOOM_INSECURE"),
        max_json_depth=_depth(env),
        ops=ops_settings_from_env(env),
        size_limits=size_limits,
        caps=caps_from_env(env),
        blobs=blobs,
        message_limits=message_limits_from_env(env, max_payload, _depth(env)),
        schedules=schedule_settings_from_env(env),
        tenants=_tenants(env),
        tenant=_tenant(env),
        quotas_file=_path(env, "LOOM_QUOTAS_FILE"),
        direct_dispatch=_flag(env, "LOOM_DIRECT_DISPATCH", default="true"),
        delivery=delivery_settings_from_env(env),
        partitions=partition_settings_from_env(env),
        embedder=embedder_settings_from_env(env),
        qdrant=_get(env, "LOOM_QDRANT"),
        trace=trace_options_from_env(env),
        tools_config=tools_config_from_env(env),
        read_models=read_models_from_env(env),
        read_models_nice=read_models_nice_from_env(env),
    )


def service_process_env(
    settings: Settings, seed_file: Path | None, base: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """``base`` (this process's environment) with the variables that make
    ``settings_from_env`` in a child service process (``python -m loom_services.<name>``,
    started by the embedded stack) give ``settings``, the settings its services run with,
    for what a read model and the service runtime use: NATS and its credentials, the
    store, the payload and step limits, health and retention, delivery, partitions,
    blobs, trace options, the embedder and Qdrant. The rest the child reads from the
    environment it inherits, as the stack's process did. The child serves no HTTP
    endpoint (the stack's process owns ``LOOM_HTTP_PORT``). ``seed_file``: the child's
    own identity's nkey seed. The tool-runner's secrets (``LOOM_SECRET_*``,
    ``LOOM_SECRETS_DIR``) are left out: a read model never resolves one."""
    store, ops, delivery, blobs = settings.store, settings.ops, settings.delivery, settings.blobs
    env = {
        "LOOM_NATS_URL": settings.nats_url,
        "LOOM_NKEY_SEED_FILE": "" if seed_file is None else str(seed_file),
        "LOOM_CREDS_DIR": str(settings.credentials_dir),
        "LOOM_INSECURE": "true" if settings.insecure else "false",
        "LOOM_STORE": store.kind,
        "LOOM_DATA_DIR": str(store.data_dir),
        "LOOM_POSTGRES_URL": store.postgres_url or "",
        "LOOM_SNAPSHOTS_KEPT": str(store.snapshots_kept),
        "LOOM_MAX_PAYLOAD": str(settings.max_payload),
        STEP_INPUT_SETTING: str(settings.size_limits.step_input_bytes),
        STEP_OUTPUT_SETTING: str(settings.size_limits.step_output_bytes),
        "LOOM_HTTP_PORT": "0",
        "LOOM_HTTP_HOST": ops.http_host,
        "LOOM_READY_MAX_RELAY_LAG": str(ops.ready_max_relay_lag),
        "LOOM_READY_STALL_S": repr(ops.ready_stall_s),
        "LOOM_RUNS_MAX_AGE_DAYS": repr(ops.runs_max_age_days),
        "LOOM_STREAM_MAX_BYTES": str(ops.stream_max_bytes),
        "LOOM_REJECTS_MAX_MSGS": str(ops.rejects_max_msgs),
        "LOOM_REJECTS_QUEUE": str(ops.rejects_queue),
        "LOOM_STREAM_REPLICAS": str(ops.stream_replicas),
        "LOOM_PARTITIONS": str(ops.partitions),
        "LOOM_RUNS_PERSIST": ops.runs_persist,
        "LOOM_PARTITION_LEASE_S": repr(settings.partitions.lease_s),
        "LOOM_REPLICA_ID": settings.partitions.replica,
        "LOOM_ACK_WAIT_S": repr(delivery.ack_wait_s),
        "LOOM_HELD_ACK_WAIT_S": repr(delivery.held_ack_wait_s),
        "LOOM_TOOL_ACK_WAIT_S": repr(delivery.tool_ack_wait_s),
        "LOOM_TOOL_CONCURRENCY": str(delivery.tool_concurrency),
        "LOOM_RELAY_BATCH": str(delivery.relay_batch),
        "LOOM_LOCAL_BUDGET": str(delivery.local_budget),
        "LOOM_CONSUMER_CREATE_S": repr(delivery.consumer_create_s),
        "LOOM_LOG_LEVEL": delivery.log_level,
        blob_refs.THRESHOLD_SETTING: str(blobs.threshold_bytes),
        blob_refs.MAX_RESOLVED_SETTING: str(blobs.max_resolved_bytes),
        "LOOM_BLOB_MAX_BYTES": str(blobs.max_blob_bytes),
        "LOOM_BLOB_BUCKET_MAX_BYTES": str(blobs.bucket_max_bytes),
        "LOOM_BLOB_MAX_AGE_DAYS": str(max(1, round(blobs.max_age_s / 86_400))),
        "LOOM_TRACE_CAPTURE_IO": "1" if settings.trace.capture_io else "0",
        "LOOM_TRACE_IO_LIMIT": str(settings.trace.io_limit),
        "LOOM_EMBEDDER": settings.embedder.spec,
        "LOOM_EMBED_MODEL_DIR": str(settings.embedder.model_dir or ""),
        "LOOM_EMBED_THREADS": str(settings.embedder.threads),
        "LOOM_QDRANT": settings.qdrant or "",
        "LOOM_READ_MODELS": settings.read_models,
        "LOOM_READ_MODELS_NICE": str(settings.read_models_nice),
    }
    child = {
        name: value
        for name, value in base.items()
        if not name.startswith("LOOM_SECRET") and name != "LOOM_LOCAL_TOOLS"
    }
    child.update(env)
    if delivery.local_tools is not None:  # unset means every pure built-in; empty, none
        child["LOOM_LOCAL_TOOLS"] = ",".join(delivery.local_tools)
    return child


def _tenants(env: Mapping[str, str]) -> tuple[str, ...]:
    names = [t.strip() for t in (_get(env, "LOOM_TENANTS") or "").split(",") if t.strip()]
    try:
        return tuple(dict.fromkeys(tenancy.check_tenant(t) for t in names))
    except tenancy.TenantError as exc:
        raise SettingsError("LOOM_TENANTS", str(exc)) from None


def _tenant(env: Mapping[str, str]) -> str | None:
    name = _get(env, "LOOM_TENANT")
    if name is None or name == tenancy.DEFAULT_TENANT:
        return None
    try:
        return tenancy.check_tenant(name)
    except tenancy.TenantError as exc:
        raise SettingsError("LOOM_TENANT", str(exc)) from None


def _depth(env: Mapping[str, str]) -> int:
    try:
        return depth_limit(env)
    except ValueError as exc:  # its message starts with the name, which ours adds
        message = str(exc).removeprefix(f"{MAX_DEPTH_SETTING} ")
        raise SettingsError(MAX_DEPTH_SETTING, message) from None


def _path(env: Mapping[str, str], name: str) -> Path | None:
    value = _get(env, name)
    return Path(value) if value else None


def _flag(env: Mapping[str, str], name: str, default: str = "false") -> bool:
    value = (_get(env, name) or default).lower()
    if value not in ("1", "true", "yes", "0", "false", "no"):
        raise SettingsError(name, f"must be 1/true/yes or 0/false/no, got {value!r}")
    return value in ("1", "true", "yes")
