"""Service side of tenancy (loom_core.tenancy): who is asking, and what they may see.

The tenant of a request is the tenant token of the subject it arrived on, which the
NATS server lets only that tenant's users publish on; a plain subject is the platform
(``None``: every tenant). A run's tenant is its stored principal's. Whatever is not the
caller's is answered exactly as if it did not exist, so a tenant cannot probe another's
run ids (``hidden``).
"""

from __future__ import annotations

import msgspec
from nats.aio.msg import Msg

from loom_core import subjects, tenancy
from loom_core.contracts import ErrorInfo, EventRecord, Principal, RunRequested
from loom_core.executor import RunState
from loom_infra import auth


def caller(msg: Msg) -> str | None:
    """The tenant asking (None: the platform)."""
    return tenancy.split(msg.subject)[0]


def tenant_of(principal: Principal | None) -> str:
    """A run's tenant (``tenancy.run_tenant``); a run stored before principals, or
    submitted by the platform, is the default tenant's."""
    return tenancy.run_tenant(principal)


def run_tenant(state: RunState) -> str:
    return tenant_of(state.principal)


def hidden(msg: Msg, state: RunState) -> bool:
    """Whether ``state``'s run must look absent to the sender of ``msg``."""
    return not tenancy.may_see(caller(msg), run_tenant(state))


def submitter(resolver: auth.PrincipalResolver, msg: Msg) -> Principal:
    """Who a submission acts for: the principal of the plain subject and the token,
    bound to the subject's tenant. A token naming another tenant is refused
    (``tenant_mismatch``); one naming none (or ``default``) takes the subject's."""
    tenant, plain = tenancy.split(msg.subject)
    return bind(resolver.resolve(plain, msg.headers), tenant)


def bind(principal: Principal, tenant: str | None) -> Principal:
    """``principal`` (resolved from a token) bound to ``tenant``, the tenant of the
    subject it came on (None: the platform, unchanged): shared by submit and every other
    request whose principal a tenant's user names (schedules)."""
    if tenant is None:
        return principal
    if principal.tenant not in (tenancy.DEFAULT_TENANT, tenant):
        raise auth.AuthError(
            "tenant_mismatch",
            f"the bearer token is for tenant {principal.tenant!r} but was sent with the "
            f"credentials of tenant {tenant!r}: use that tenant's credentials or token",
        )
    return msgspec.structs.replace(principal, tenant=tenant, tenant_verified=True)


def hidden_history(msg: Msg, records: list[EventRecord]) -> bool:
    """Like ``hidden``, for a run read from the store (its first event names its principal)."""
    first = records[0].event if records else None
    principal = first.principal if isinstance(first, RunRequested) else None
    return not tenancy.may_see(caller(msg), tenant_of(principal))


def id_taken(run_id: str) -> ErrorInfo:
    """The refusal of a run id another tenant's run has: nothing about that run."""
    return ErrorInfo(
        code="run_id_taken",
        message=f"the run id '{run_id}' cannot be used; submit with another run id (or none)",
        path="$.run_id",
    )


def progress_subject(state: RunState) -> str:
    """Where a run's live progress goes: its tenant's twin, which only its users hear."""
    return tenancy.scoped(subjects.progress(state.run_id), run_tenant(state))
