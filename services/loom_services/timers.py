"""Durable timers, held by JetStream itself.

A ``timer_started`` event sits on the LOOM_RUNS stream. This consumer receives it and,
while it is not yet due, naks it with a delay equal to the time left: JetStream keeps the
message and redelivers it when due, whatever restarts in between (the consumer's state
lives in the server). When due, it answers the run's inbox with ``TimerElapsed`` and
acks. A repeat is refused by the executor (the timer is no longer pending), and so is
a copy that arrives before the timer is due by the executor's clock.

So a retry's backoff, a ``sleep`` step or a timeout is never a sleep in a process: every
service may stop and start again and the timer still fires (late if nothing was
running at its time, never lost). The timer runs inside the executor process, but it
only talks to JetStream and could run anywhere.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from loom_core import codec, routes
from loom_core.contracts import TimerElapsed, TimerStarted
from loom_infra import bus

log = logging.getLogger("loom.timers")

DURABLE = "timers"
# A timer far in the future is naked for at most this long, then looked at again: the
# server's redelivery delay needs no bound, but this keeps a clock jump harmless.
MAX_NAK_S = 3600.0


class TimerService:
    def __init__(self, js: JetStreamContext, service: str = "executor") -> None:
        self.js = js
        self.service = service
        self.fired = 0

    async def run(self, stop: asyncio.Event) -> None:
        (subject,) = routes.RUN_EVENTS.filters(routes.RUN_EVENTS.consumer("executor", DURABLE))
        await bus.held_events(self.js, DURABLE, subject, self._one, stop)

    async def _one(self, msg: Msg) -> None:
        try:
            record, timer = bus.expect_event(msg, TimerStarted)
        except bus.Poison as poison:
            await bus.dead_letter(self.js, self.service, msg.subject, poison.error, msg.data)
            await msg.term()
            return
        left = (timer.fire_at - bus.now()).total_seconds()
        if left > 0.001:
            await msg.nak(delay=min(left, MAX_NAK_S))
            return
        try:
            # no Nats-Msg-Id: this one is guessable, and a copy published early (refused by
            # the executor as not yet due) would get the real one dropped as a duplicate
            await self.js.publish(
                routes.INBOX_TIMER.subject(run_id=record.run_id),
                codec.encode(TimerElapsed(run_id=record.run_id, timer_id=timer.timer_id)),
            )
        except Exception as exc:  # try again shortly: the timer is due, not lost
            log.warning("timer %s could not fire yet: %r", timer.timer_id, exc)
            await msg.nak(delay=0.5)
            return
        self.fired += 1
        await msg.ack()
