"""Limits on what people and outside systems send into a live run (issue 9).

A pause or cancel reason, the data that answers a suspension, and an external event's
payload become run events as they arrive. They were bounded only by the message they
came in (the broker's max_payload, 1 MiB embedded): a 900 KB pause reason was accepted,
stored and made the run's events a weight every later read carries. Each has its own
limit now, checked where it enters (the executor's control and resume handlers, the
signal router), before anything is stored; a refusal is a typed error naming the field,
the size, the limit and the setting that raises it.

These are checks at the edge, not decisions of the engine: a refused message never
becomes an event, so replay never meets them and they need not be recorded per run.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loom_core.contracts import ErrorInfo
from loom_core.limits import DEFAULT_MAX_DEPTH, check_json
from loom_core.sizes import json_size

__all__ = [
    "DEFAULT_MESSAGE_LIMITS",
    "REASON_SETTING",
    "RESUME_DATA_SETTING",
    "SIGNAL_PAYLOAD_SETTING",
    "MessageLimits",
    "check_resume_data",
    "check_signal_payload",
    "check_text",
]

REASON_SETTING = "LOOM_MAX_REASON_BYTES"
RESUME_DATA_SETTING = "LOOM_MAX_RESUME_DATA_BYTES"
SIGNAL_PAYLOAD_SETTING = "LOOM_MAX_SIGNAL_PAYLOAD_BYTES"


@dataclass(frozen=True)
class MessageLimits:
    """- ``reason_bytes``: the free text of a control or resume request (``reason``,
      ``by``, ``label``), UTF-8 bytes; 4 KiB is a paragraph, far more than a reason needs.
    - ``resume_data_bytes``: a resume's ``data`` as compact JSON; 128 KiB like a step
      output (``LOOM_MAX_STEP_OUTPUT_BYTES``), which the data becomes.
    - ``signal_payload_bytes``: an external event's ``payload`` as compact JSON, 64 KiB.
    - ``max_depth``: how deep resume data and signal payloads may nest
      (``LOOM_MAX_JSON_DEPTH``, as at submit)."""

    reason_bytes: int = 4096
    resume_data_bytes: int = 131_072
    signal_payload_bytes: int = 65_536
    max_depth: int = DEFAULT_MAX_DEPTH


DEFAULT_MESSAGE_LIMITS = MessageLimits()


def check_text(value: str | None, limits: MessageLimits, path: str) -> ErrorInfo | None:
    """None, or ``reason_too_large`` when the text at ``path`` is over ``reason_bytes``."""
    if value is None or len(value) * 4 <= limits.reason_bytes:  # fast: surely under
        return None
    size = len(value.encode("utf-8", "surrogatepass"))
    if size <= limits.reason_bytes:
        return None
    return _too_large("reason_too_large", path, size, limits.reason_bytes, REASON_SETTING)


def check_resume_data(data: Any, limits: MessageLimits) -> ErrorInfo | None:
    """None, or ``too_deep`` / ``data_too_large`` for a resume's ``data``."""
    return _check_json(
        data, "$.data", "data_too_large", limits.resume_data_bytes, RESUME_DATA_SETTING, limits
    )


def check_signal_payload(payload: Any, limits: MessageLimits) -> ErrorInfo | None:
    """None, or ``too_deep`` / ``payload_too_large`` for an external event's payload."""
    return _check_json(
        payload,
        "$.payload",
        "payload_too_large",
        limits.signal_payload_bytes,
        SIGNAL_PAYLOAD_SETTING,
        limits,
    )


def _check_json(
    value: Any, path: str, code: str, limit: int, setting: str, limits: MessageLimits
) -> ErrorInfo | None:
    # depth first (iterative, never recurses), then the size as the event will hold it
    deep = check_json(value, max_depth=limits.max_depth, path=path)
    if deep is not None:
        return deep
    size = json_size(value, limit)
    if size is None:
        return None
    return _too_large(code, path, size, limit, setting)


def _too_large(code: str, path: str, size: int, limit: int, setting: str) -> ErrorInfo:
    return ErrorInfo(
        code=code,
        message=f"{path} is {size} bytes, over the limit of {limit} ({setting}); send "
        "less (a reference to the data, e.g. a URL or an id), or raise the setting",
        path=path,
        details={"size": size, "limit": limit, "setting": setting},
    )
