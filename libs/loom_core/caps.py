"""Fan-out caps: how much one step may multiply (issue 9, point 3).

A foreach over 100,000 items used to be accepted; its elements' events, state and
snapshots grew without any setting saying so. Each multiplying construct now has a cap:

- ``foreach_items``: elements of one foreach or reduce. A static ``items`` list over it
  is refused by validation (``too_many_items``, a plan issue); a list rendered at run
  time over it fails the step (``too_many_items``, the step's error).
- ``foreach_concurrency``: a foreach's ``concurrency`` (``too_much_concurrency``).
- ``parallel_branches``: branches of one parallel (``too_many_branches``).
- ``loop_iterations``: a loop's ``max_iterations`` (``too_many_iterations``); every loop
  already needs one, this bounds it.

Every refusal names the step, the count, the cap and the setting that raises it.

Caps are decisions, so replay must decide them the same: they are recorded in the run's
``run_requested`` (``Caps``, filled by the executor host from its settings at
submission). A run recorded without them (before caps existed, or a bare ``RunRequest``
given to the core) was decided without caps: ``None`` here means "no cap", never the
current defaults, or a deploy lowering a default would park old runs as diverged. The
engine never reads a setting or the environment.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from loom_core.contracts import Caps, ErrorInfo

__all__ = [
    "BRANCHES_SETTING",
    "CONCURRENCY_SETTING",
    "DEFAULT_CAPS",
    "ITEMS_SETTING",
    "ITERATIONS_SETTING",
    "too_many",
]

ITEMS_SETTING = "LOOM_MAX_FOREACH_ITEMS"
CONCURRENCY_SETTING = "LOOM_MAX_FOREACH_CONCURRENCY"
BRANCHES_SETTING = "LOOM_MAX_PARALLEL_BRANCHES"
ITERATIONS_SETTING = "LOOM_MAX_LOOP_ITERATIONS"

# Why these: 10,000 elements (or iterations) is ~70,000 events for a one-step body, a run
# that still loads, replays and reads in seconds; 64 at once is far more than a tool's
# rate limit usually allows; 64 branches is more than anyone writes by hand (a data-
# driven fan-out is a foreach). Raise them per deployment; they are per run.
DEFAULT_CAPS = Caps(
    foreach_items=10_000, foreach_concurrency=64, parallel_branches=64, loop_iterations=10_000
)

# code, what is counted, the Caps field, the setting, a hint
_KINDS: dict[str, tuple[str, str, str, str]] = {
    "items": (
        "too_many_items", "foreach_items", ITEMS_SETTING,
        "split the list (e.g. batches in a sub_run each) or raise the setting",
    ),
    "concurrency": (
        "too_much_concurrency", "foreach_concurrency", CONCURRENCY_SETTING,
        "lower `concurrency` or raise the setting",
    ),
    "branches": (
        "too_many_branches", "parallel_branches", BRANCHES_SETTING,
        "use a foreach over a list for a data-driven fan-out, or raise the setting",
    ),
    "iterations": (
        "too_many_iterations", "loop_iterations", ITERATIONS_SETTING,
        "lower `max_iterations` or raise the setting",
    ),
}  # fmt: skip


def too_many(
    kind: str, caps: Caps | None, step_id: str, count: int, path: str, what: str | None = None
) -> ErrorInfo | None:
    """None, or the typed error when ``count`` (of ``kind``: items, concurrency,
    branches, iterations) is over the run's cap. No caps (None): never."""
    if caps is None:
        return None
    code, name, setting, hint = _KINDS[kind]
    cap: int = getattr(caps, name)
    if count <= cap:
        return None
    what = what or {"items": "items has", "concurrency": "concurrency is",
                    "branches": "it has", "iterations": "max_iterations is"}[kind]  # fmt: skip
    unit = {"items": " elements", "branches": " branches"}.get(kind, "")
    return ErrorInfo(
        code=code,
        message=f"step '{step_id}': {what} {count}{unit}, over the cap of {cap} ({setting}); "
        f"{hint}",
        path=path,
        details={"step_id": step_id, "count": count, "cap": cap, "setting": setting},
    )
