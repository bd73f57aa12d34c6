"""A read model that runs only on CPU the step path leaves idle, while it keeps up (Linux).

The embedded stack runs the tracing read model as a child process beside the executor,
the tool-runner and nats-server. Its folds come in bursts (a sequential run: ~140
events every 50 ms, 5-10 ms of CPU), and at any ``nice`` the kernel lets a task that
holds a core keep it for its slice: a step's process woken meanwhile waited for a core
(issue 10: most of a sequential run's steps over 3x p50 overlapped a fold). A
``SCHED_IDLE`` task is preempted at once by any woken normal task, and a core running
only idle tasks counts as free when the kernel places a woken one.

``SCHED_IDLE`` alone could starve the read model for as long as the machine is busy, so
it is used only while the read model keeps up, and only where the process may leave it
again: an unprivileged process may not (Linux lets it out of ``SCHED_IDLE`` only within
its ``RLIMIT_NICE``, which is 0 by default, or with ``CAP_SYS_NICE``). The stack starts
the child idle when the child may leave (:func:`may_leave_idle`); the child leaves as
soon as a batch it receives says it is behind (a batch's worth more waiting: its own
load; or the batch's first event stored a second ago or more: a machine kept busy by
others, where an idle task still gets a few milliseconds a second to see it), and goes
back once it has caught up (:class:`IdleWhileCaughtUp`). Elsewhere (no privilege,
not Linux) nothing changes: the child runs at its ``nice`` (``LOOM_READ_MODELS_NICE``).

Policies are per thread on Linux: switching the process switches every thread it has,
and a thread started later inherits the policy of the thread that started it.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("loom.cpu_priority")

_CAP_SYS_NICE = 23  # bit of the capability sets in /proc/<pid>/status


def _effective_capabilities() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def may_leave_idle(
    nice: int,
    capabilities: Callable[[], int] = _effective_capabilities,
    nice_limit: Callable[[], int] = lambda: resource.getrlimit(resource.RLIMIT_NICE)[0],
) -> bool:
    """May a process of this one's privileges, running at ``nice``, go back from
    ``SCHED_IDLE`` to the normal policy? The kernel allows it with ``CAP_SYS_NICE``, or
    when ``RLIMIT_NICE`` (as ``20 - nice``) permits that nice value."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    if capabilities() >> _CAP_SYS_NICE & 1:
        return True
    limit = nice_limit()
    return limit == resource.RLIM_INFINITY or 20 - nice <= limit


def is_idle() -> bool:
    """Does this thread run under ``SCHED_IDLE``?"""
    return hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) == os.SCHED_IDLE


def set_idle(idle: bool) -> None:
    """Every thread of this process to ``SCHED_IDLE`` (``idle``) or the normal policy
    (each keeps its nice). A thread that ended meanwhile is skipped; a refusal
    (``PermissionError``) propagates."""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(task), policy, os.sched_param(0))
        except ProcessLookupError:
            continue


class IdleWhileCaughtUp:
    """Keeps a batch consumer under ``SCHED_IDLE`` while it keeps up, and under the
    normal policy while it is behind (``behind_at`` or more messages still waiting after
    a batch, or its oldest message stored ``late_s`` or longer ago), so a busy machine
    cannot starve it. Does nothing unless the process started idle: the stack asked for
    it (``ReadModelProcess(idle=True)``), having checked the process may leave it."""

    def __init__(
        self,
        behind_at: int,
        managed: bool | None = None,
        switch: Callable[[bool], None] = set_idle,
        late_s: float = 1.0,
    ) -> None:
        self.behind_at = behind_at
        self.late_s = late_s
        self.managed = is_idle() if managed is None else managed
        self.idle = self.managed
        self.switch = switch
        self.switches = 0  # how often the policy changed (tests, logs)

    def saw(self, pending: int, age_s: float = 0.0) -> None:
        """A batch arrived, after which ``pending`` messages were still waiting, its
        oldest message stored ``age_s`` ago."""
        if not self.managed:
            return
        idle = pending < self.behind_at and age_s < self.late_s
        if idle == self.idle:
            return
        try:
            self.switch(idle)
        except OSError as exc:  # refused after all: stay as the kernel left us
            log.warning(
                "cannot switch to %s (%r): the read model keeps its CPU policy",
                "SCHED_IDLE" if idle else "the normal CPU policy",
                exc,
            )
            self.managed = False
            return
        self.idle = idle
        self.switches += 1
        log.debug(
            "%s: %d messages waiting, the oldest %.2f s old",
            "idle" if idle else "normal policy",
            pending,
            age_s,
        )
