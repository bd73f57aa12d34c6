"""The words for a run's status, one set for every view (``loom runs``, ``describe``,
``run -o json``, ``traces --status``, the console).

A run's status is derived from its events (``loom_core.stats``, ``loom_core.spans``);
the terminal event names the end: ``run_completed`` is ``completed``, ``run_failed``
``failed``, ``plan_rejected`` ``rejected``, ``run_cancelled`` ``cancelled``.
``suspended`` is ``running`` with nothing in flight but a person (or a sub-run that
itself waits for one): the rule of ``loom_core.waits.run_status``.
"""

from __future__ import annotations

from loom_core.contracts import PlanRejected, RunCancelled, RunCompleted, RunEvent, RunFailed

__all__ = ["RUN_STATUSES", "TERMINAL_STATUSES", "status_after", "unknown_status_message"]

# word -> what it means (docs/cli.md shows this table)
RUN_STATUSES: dict[str, str] = {
    "planning": "waiting for the planner to turn a request into a plan",
    "running": "steps are running or due (timers, retries, external events included)",
    "suspended": "waiting only for a person (an approval, a tool that asked)",
    "paused": "paused by an operator (`loom unpause` resumes)",
    "queued": "waiting for a slot: its tenant or queue is at its concurrent run limit",
    "needs_review": "stopped: a non-idempotent tool call may or may not have happened",
    "diverged": "replaying its history decided differently: parked for a person",
    "completed": "ended with its output",
    "failed": "ended with an error",
    "rejected": "its plan was invalid; nothing ran",
    "cancelled": "cancelled by an operator (or its parent run)",
}
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "rejected", "cancelled"})

_TERMINAL_EVENT_STATUS: tuple[tuple[type, str], ...] = (
    (RunCompleted, "completed"),
    (RunFailed, "failed"),
    (PlanRejected, "rejected"),
    (RunCancelled, "cancelled"),
)


def status_after(event: RunEvent) -> str | None:
    """The status word a terminal event ends a run in; None for any other event."""
    for cls, word in _TERMINAL_EVENT_STATUS:
        if isinstance(event, cls):
            return word
    return None


def unknown_status_message(word: str) -> str | None:
    """None when ``word`` is a status; else a sentence listing the statuses."""
    if word in RUN_STATUSES:
        return None
    import difflib

    close = difflib.get_close_matches(word, list(RUN_STATUSES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown status {word!r}: {hint}one of {', '.join(RUN_STATUSES)}"
