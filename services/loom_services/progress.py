"""Live progress of runs (``RunProgress`` on ``loom.progress.{run_id}``), coalesced.

A run that steps a thousand times a second does not need a thousand progress messages a
second: a live view redraws a few times a second. So while a run keeps its status, its
progress goes out at most every ``EVERY_S`` (the first change at once, then the latest
state at the end of the interval); a change of status (suspended, waiting on a person,
ended...) goes out at once. The last state a run reaches is always published. Issue 10:
building, encoding and publishing a message per step was ~3 % of the executor's CPU per
step. Progress stays a convenience (plain NATS, best effort); the events are the truth.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

from loom_core import codec
from loom_core.contracts import RunProgress
from loom_core.executor import RunState
from loom_core.waits import lifted_state
from loom_services import tenants

log = logging.getLogger("loom.executor")

EVERY_S = 0.05
# runs whose last publish is remembered (a run forgotten publishes at its next change)
REMEMBERED = 10_000


class ProgressPublisher:
    def __init__(
        self,
        actor: Callable[[str], RunState | None],
        publish: Callable[[list[tuple[str, bytes]]], None],
        every_s: float = EVERY_S,
    ) -> None:
        self.actor = actor
        self.publish = publish
        self.every_s = every_s
        # run id -> (loop time of its last publish, the status it said)
        self.last: OrderedDict[str, tuple[float, str]] = OrderedDict()
        # run id -> the time of the newest change not published yet (a publish is due)
        self.due: dict[str, datetime] = {}

    def changed(self, run_ids: list[str], at: datetime) -> None:
        """These runs changed at ``at`` (a commit): publish now or at their interval's end."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        out: list[tuple[str, bytes]] = []
        for run_id in run_ids:
            state = self.actor(run_id)
            if state is None:
                continue
            last = self.last.get(run_id)
            if last is not None and now - last[0] < self.every_s and last[1] == state.status:
                if run_id not in self.due:  # the latest state follows at the interval's end
                    loop.call_at(last[0] + self.every_s, self._flush, run_id)
                self.due[run_id] = at
                continue
            self.due.pop(run_id, None)  # said now; a pending flush finds nothing due
            out.append(self._message(run_id, state, at, now))
        if out:
            self.publish(out)

    def _flush(self, run_id: str) -> None:
        at = self.due.pop(run_id, None)
        state = self.actor(run_id)
        if at is None or state is None:
            return
        try:
            self.publish([self._message(run_id, state, at, asyncio.get_running_loop().time())])
        except Exception as exc:  # progress is a convenience; the events are the truth
            log.debug("progress not published: %r", exc)

    def _message(self, run_id: str, state: RunState, at: datetime, now: float) -> tuple[str, bytes]:
        self.last[run_id] = (now, state.status)
        self.last.move_to_end(run_id)
        while len(self.last) > REMEMBERED:
            self.last.popitem(last=False)
        # children in memory say whether they wait on people (to any depth)
        status, waits = lifted_state(state, self.actor)
        progress = RunProgress(
            run_id=run_id,
            status=status,
            steps_total=state.steps_total,
            steps_done=state.steps_done,
            steps_running=state.running,
            at=at,
            waits=waits,
        )
        return tenants.progress_subject(state), codec.encode(progress)
