"""Tenants: whose a run is, told by the subject the server let the caller publish on.

A tenant other than ``default`` speaks only through its own NATS users
(``client@<tenant>``, ``operator@<tenant>``, see ``loom_infra.credentials``), whose
permissions allow only the *tenant twins* of the routes marked ``tenant_scoped`` in
``loom_core.routes``: ``loom.submit.client`` becomes ``loom.t.<tenant>.submit.client``,
``loom.control`` becomes ``loom.t.<tenant>.control``. The server refuses any other
subject, so the tenant token in a subject is as trustworthy as the NATS identity that
published it (core NATS carries no sender identity; the subject does).

A plain subject (no ``loom.t.`` prefix) comes from the platform's own identities (the
services, and the ``client``/``operator`` of the single-tenant default): the platform
sees every tenant's runs, as it did before tenants existed.

Pure: no I/O.
"""

from __future__ import annotations

import re

from loom_core import subjects
from loom_core.contracts import Principal
from loom_core.errors import LoomError

DEFAULT_TENANT = "default"
PLATFORM = None  # the caller of a plain subject: sees every tenant
ROLES = ("client", "operator")  # the identities a tenant gets
TWIN_TOKEN = "t"  # noqa: S105 - a subject token, not a secret; loom.t.<tenant>.<rest of the plain subject>
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_USER_SEP = "@"


class TenantError(LoomError, ValueError):
    """A tenant name or tenant user name that cannot be used (the message says why)."""

    code = "invalid_tenant"


def check_tenant(name: str) -> str:
    """``name`` if it can be a tenant (a subject token and a file name), else TenantError."""
    if not isinstance(name, str) or not _TENANT.fullmatch(name):
        raise TenantError(
            f"tenant {str(name)[:60]!r} is not a tenant name: 1-40 characters of a-z, 0-9, "
            "'_' and '-', starting with a letter or digit"
        )
    if name == DEFAULT_TENANT:
        raise TenantError(
            "tenant 'default' is the platform's own: it uses the plain `client` and "
            "`operator` credentials"
        )
    return name


def user(role: str, tenant: str) -> str:
    """The NATS identity of ``role`` (client or operator) in ``tenant``."""
    if role not in ROLES:
        raise TenantError(f"a tenant has only {' and '.join(ROLES)} users, not {role!r}")
    return f"{role}{_USER_SEP}{check_tenant(tenant)}"


def parse_user(identity: str) -> tuple[str, str] | None:
    """``(role, tenant)`` of a tenant user's identity, None for a platform identity."""
    role, sep, tenant = identity.partition(_USER_SEP)
    if not sep:
        return None
    return role, tenant


def twin(pattern: str, tenant: str = "{tenant}") -> str:
    """The tenant twin of a plain subject or pattern (``loom.x`` -> ``loom.t.<tenant>.x``)."""
    head, _, rest = pattern.partition(".")
    assert head == subjects.PREFIX, pattern
    return f"{subjects.PREFIX}.{TWIN_TOKEN}.{tenant}.{rest}"


def scoped(subject: str, tenant: str | None) -> str:
    """The subject ``tenant`` uses for the plain ``subject`` (itself for the platform)."""
    if tenant is None or tenant == DEFAULT_TENANT:
        return subject
    return twin(subject, tenant)


def split(subject: str) -> tuple[str | None, str]:
    """``(tenant, plain subject)`` of a received subject: the tenant is None (the
    platform) on a plain subject."""
    parts = subject.split(".", 3)
    if len(parts) == 4 and parts[0] == subjects.PREFIX and parts[1] == TWIN_TOKEN:
        return parts[2], f"{subjects.PREFIX}.{parts[3]}"
    return None, subject


def run_tenant(principal: Principal | None) -> str:
    """Whose a run is for isolation, quotas and routing: its principal's tenant when the
    NATS identity that submitted it vouched for it, else the default tenant (the
    platform's runs, whatever tenant claim their token made: that claim still scopes
    their memory, as before tenants)."""
    if principal is not None and principal.tenant_verified:
        return principal.tenant
    return DEFAULT_TENANT


def may_see(caller: str | None, owner: str) -> bool:
    """Whether a caller of tenant ``caller`` (None: the platform) may read or act on a
    thing of tenant ``owner``."""
    return caller is None or caller == owner


def letter_owner(subject: str) -> tuple[str | None, str | None]:
    """Whose a dead letter is, from the subject its message came on: ``(tenant, None)``
    for a tenant's twin subject (what its users sent), ``(None, run_id)`` for a run's
    event or inbox subject (the run's tenant's: look the run up), ``(None, None)`` for
    anything else (the platform's only)."""
    tenant, plain = split(subject)
    if tenant is not None:
        return tenant, None
    parts = plain.split(".")
    if len(parts) < 4 or parts[0] != subjects.PREFIX or not all(parts):
        return None, None
    if parts[1] == "run" and len(parts) == 4:  # loom.run.<run>.<event>
        return None, parts[2]
    if parts[1] == "inbox" and len(parts) == 4:  # loom.inbox.<run>.<source>, as published
        return None, parts[2]
    if parts[1] == "inbox" and len(parts) == 5 and parts[2].isdigit():  # as stored
        return None, parts[3]
    return None, None
