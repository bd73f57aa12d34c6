"""Size limits on what a run's events carry (issue 9, docs/design.md decision 12).

A run's events reach the bus one message each, and the broker refuses a message over its
``max_payload`` (the embedded server: ``max(1 MiB, 2 x LOOM_MAX_PAYLOAD)``). One event
over it used to stop the relay for every run. So every value the engine writes into an
event from user data is measured first:

- a *rendered step input* (a tool call's input, a sub-run's input, an approval's
  payload, a foreach/reduce's items) over ``step_input_bytes`` fails the step with
  ``input_too_large``;
- a *step output* (a tool's output, a final step's value, a scope's result: the reduce
  accumulator, a foreach's collected list, a parallel's branches; the run's output) over
  ``step_output_bytes`` fails it with ``output_too_large``.

Both are decisions, so replay must decide them the same: the limits are recorded in the
run's ``run_requested`` (``SizeLimits``, filled from the executor host's settings at
submission); a run recorded without them uses the defaults below. The engine never reads
a setting or the environment.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Any

import msgspec

from loom_core.contracts import ErrorInfo, SizeLimits
from loom_core.limits import check_json

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_STEP_INPUT_BYTES",
    "DEFAULT_STEP_OUTPUT_BYTES",
    "STEP_INPUT_SETTING",
    "STEP_OUTPUT_SETTING",
    "check_input",
    "check_output",
    "json_size",
]

# 128 KiB each. Why that low: one step's commit holds its tool output twice
# (tool_call_completed and step_completed) and the next step's input once, so about
# 3 x 128 KiB = 384 KiB at most, under the ~586 KB batch on which the PostgreSQL recorder
# was seen to hang (psycopg pipeline mode) and far under the broker's 1 MiB. Bigger data
# is meant to travel by reference.
DEFAULT_STEP_INPUT_BYTES = 131_072
DEFAULT_STEP_OUTPUT_BYTES = 131_072
STEP_INPUT_SETTING = "LOOM_MAX_STEP_INPUT_BYTES"
STEP_OUTPUT_SETTING = "LOOM_MAX_STEP_OUTPUT_BYTES"
DEFAULT_LIMITS = SizeLimits(
    step_input_bytes=DEFAULT_STEP_INPUT_BYTES, step_output_bytes=DEFAULT_STEP_OUTPUT_BYTES
)

_encode = msgspec.json.encode


def json_size(value: Any, limit: int) -> int | None:
    """The size of ``value`` as compact JSON when it is over ``limit`` (else None).
    Fast path: msgspec encodes it once (C, no recursion limit issue below ~1,000 levels);
    a value it cannot encode (too deep, not JSON) is measured by the iterative walk,
    which stops just past the limit. A value that is not JSON at all is not this
    module's concern (None): encoding the event will say so."""
    try:
        size = len(_encode(value))
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError):
        error = check_json(value, max_depth=10**9, max_bytes=limit)
        if error is None or error.code != "input_too_large":
            return None
        return int(error.details["size"])
    return size if size > limit else None


def check_input(value: Any, limits: SizeLimits, step_id: str, path: str) -> ErrorInfo | None:
    """None, or ``input_too_large`` when the rendered input of ``step_id`` is over the
    run's ``step_input_bytes``."""
    limit = limits.step_input_bytes
    size = json_size(value, limit)
    if size is None:
        return None
    return _too_large("input_too_large", "input", step_id, path, size, limit, STEP_INPUT_SETTING)


def check_output(value: Any, limits: SizeLimits, step_id: str, path: str) -> ErrorInfo | None:
    """None, or ``output_too_large`` when an output of ``step_id`` (``"run"`` for the
    run's own) is over the run's ``step_output_bytes``."""
    limit = limits.step_output_bytes
    size = json_size(value, limit)
    if size is None:
        return None
    return _too_large("output_too_large", "output", step_id, path, size, limit, STEP_OUTPUT_SETTING)


def _too_large(
    code: str, what: str, step_id: str, path: str, size: int, limit: int, setting: str
) -> ErrorInfo:
    whose = "the run's" if step_id == "run" else f"step '{step_id}':"
    return ErrorInfo(
        code=code,
        message=f"{whose} {what} is {size} bytes as JSON, over the limit of {limit} "
        f"({setting}); pass less data between steps (e.g. a URL or an id to fetch it by)",
        path=path,
        details={"step_id": step_id, "size": size, "limit": limit, "setting": setting},
    )
