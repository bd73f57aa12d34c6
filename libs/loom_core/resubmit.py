"""Submitting a run again: the dedupe key, and a repeat that is not the same request.

- **The run id is the dedupe key.** ``loom.submit`` is a NATS request/reply, not a
  JetStream publish, so the broker dedupes nothing. A client that sets ``run_id`` can
  repeat a submission whose answer it lost; the repeat is answered ``existing: true``
  and starts nothing.
- **``Nats-Msg-Id`` is honoured as well**, for clients whose NATS library sets it
  habitually: a request without ``run_id`` but with the header gets a run id derived
  from (tenant, user, header), so the same submitter repeating the same header reaches
  the same run, for as long as the run is stored (no time window, unlike JetStream's).
  Two submitters with the same header get different runs. Without either, every
  request starts a new run.
- **A repeat must be the same request.** Reusing a run id with another plan or input
  is refused ``run_id_conflict`` (details name what differs), never silently answered
  ``existing: true``: the client would follow a run that is not the one it asked for.
  Compared: the plan and the input, after inline secrets are redacted (both sides the
  same way). Labels, thread id and trace context may differ.

Pure.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from loom_core.contracts import ErrorInfo, Principal, RunRequest
from loom_core.executor import RunState, plan_digest

__all__ = ["MAX_MSG_ID", "conflict", "differences", "run_id_from_msg_id"]

MAX_MSG_ID = 256  # longer headers are not a dedupe key a client meant


def run_id_from_msg_id(msg_id: str | None, principal: Principal | None) -> str | None:
    """The run id a ``Nats-Msg-Id`` header stands for (None: no usable header)."""
    if not msg_id or len(msg_id) > MAX_MSG_ID:
        return None
    who = (principal.tenant, principal.user_id, principal.via) if principal else ("", "", "")
    digest = hashlib.sha256("\x1f".join((*who, msg_id)).encode()).hexdigest()
    return f"run-{digest[:20]}"


def differences(state: RunState, request: RunRequest) -> list[str]:
    """What ``request`` asks that the stored run ``state`` did not (``plan``,
    ``input``); ``[]``: the same request. A run not yet stored differs in nothing."""
    if state.version == 0:
        return []
    out = []
    wanted = plan_digest(request.plan) if request.plan is not None else None
    if wanted != state.plan_digest:
        out.append("plan")
    if _canonical(request.input) != _canonical(state.input):
        out.append("input")
    return out


def conflict(run_id: str, differs: list[str]) -> ErrorInfo:
    what = " and ".join(differs)
    return ErrorInfo(
        code="run_id_conflict",
        message=f"run {run_id!r} exists with another {what}: a run id names one request. "
        "Submit the same request to follow that run, or choose a new run id",
        path="$.run_id",
        details={"run_id": run_id, "differs": list(differs)},
    )


def _canonical(value: Any) -> bytes:
    return msgspec.json.encode(value, order="sorted")
