"""Who may use which tool: catalog metadata checked against the run's principal.

Pure (no I/O): the planner calls :func:`check_tool_access` with the plan, the catalog
(``ToolSpec`` per name) and the principal the executor recorded for the run; a plan
naming a tool its principal may not use is refused before anything runs, each refusal a
``tool_forbidden`` issue at the step's ``tool`` path saying what would allow it.

Rules (docs/decisions.md, "Tool access is checked at plan acceptance"):
- ``requires_auth``: the principal must be a verified user (not anonymous).
- ``admin_only``: the principal has the role ``admin``, or the run was submitted with
  the operator's NATS identity (``via == "operator"``), which controls the stack anyway.
- ``category``: a token may narrow a user to categories with permissions
  ``tools:<category>`` (or ``tools:*``); a principal with no ``tools:`` permission at
  all is not narrowed.
A run stored before principals existed (``None``) is treated as anonymous.
"""

from __future__ import annotations

from collections.abc import Mapping

from loom_core.contracts import Plan, PlanIssue, Principal, ToolSpec
from loom_core.validation import tool_uses

ADMIN_ROLE = "admin"
OPERATOR_VIA = "operator"
CATEGORY_PREFIX = "tools:"


def tool_refusal(spec: ToolSpec, principal: Principal | None) -> str | None:
    """Why ``principal`` may not use the tool ``spec`` describes (None: it may)."""
    anonymous = principal is None or principal.anonymous
    who = "an anonymous caller" if principal is None or anonymous else f"user {principal.user_id!r}"
    if spec.requires_auth and anonymous:
        return (
            f"tool {spec.name!r} requires an authenticated user and the run is {who}; "
            "submit with an `Authorization: Bearer <JWT>` header"
        )
    if spec.admin_only and not (
        principal is not None and (ADMIN_ROLE in principal.roles or principal.via == OPERATOR_VIA)
    ):
        return (
            f"tool {spec.name!r} is for administrators and {who} has no {ADMIN_ROLE!r} "
            "role; ask an administrator to run it"
        )
    scopes = [
        p for p in (principal.permissions if principal else []) if p.startswith(CATEGORY_PREFIX)
    ]
    allowed = {p.removeprefix(CATEGORY_PREFIX) for p in scopes}
    if scopes and "*" not in allowed and spec.category not in allowed:
        return (
            f"tool {spec.name!r} is in category {spec.category!r} and the token limits "
            f"{who} to tool categories {sorted(allowed)}; use a token with the permission "
            f"'{CATEGORY_PREFIX}{spec.category}'"
        )
    return None


def check_tool_access(
    plan: Plan,
    tools: Mapping[str, ToolSpec],
    principal: Principal | None,
    path: str = "$.plan",
) -> list[PlanIssue]:
    issues = []
    for where, name in tool_uses(plan, path):
        spec = tools.get(name)
        if spec is None:
            continue  # unknown tools are validation's issue
        why = tool_refusal(spec, principal)
        if why is not None:
            issues.append(PlanIssue(code="tool_forbidden", path=where, message=why))
    return issues
