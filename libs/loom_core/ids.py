"""Identifiers that are safe to use as NATS subject tokens, and the ids derived from them.

Derived ids are pure functions of their inputs so replay and rebuild reproduce them.
"""

from __future__ import annotations

import hashlib
import re

# fullmatch, not ``^...$``: ``$`` also matches before a trailing newline, and "run\n"
# is no subject token
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_token(value: str) -> bool:
    return _TOKEN.fullmatch(value) is not None


def event_id(run_id: str, seq: int) -> str:
    return f"{run_id}/{seq}"


def idempotency_key(run_id: str, step_id: str, attempt: int) -> str:
    return f"{run_id}:{step_id}:{attempt}"


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\x1f".join(parts).encode()).digest()


def trace_id(run_id: str) -> str:
    """32 hex chars (128 bits), never all zero."""
    h = _digest("trace", run_id)[:16].hex()
    return h if int(h, 16) else "1".rjust(32, "0")


def span_id(run_id: str, *path: str) -> str:
    """16 hex chars (64 bits) naming one span of a run's trace, e.g.
    ``span_id(run, "step", "fetch", "attempt", "1")``."""
    h = _digest("span", run_id, *path)[:8].hex()
    return h if int(h, 16) else "1".rjust(16, "0")


def child_run_id(parent_run_id: str, step_id: str) -> str:
    """A sub-run's id: readable when short, hashed to stay a subject token when long."""
    readable = f"{parent_run_id}--{step_id.replace('/', '_')}"
    if len(readable) <= 64:
        return readable
    return f"{parent_run_id[:40]}--{_digest('child', parent_run_id, step_id)[:8].hex()}"
