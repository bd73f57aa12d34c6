"""The signal router: external events reach the runs waiting for them.

Any system publishes a ``Signal`` to ``loom.signal.{name}.{key}`` (JetStream stream
LOOM_SIGNALS keeps the latest one per name and key). A ``wait_event`` step records
``event_wait_started`` with the names and keys it waits for.

- Waits are indexed from those events by a durable consumer that never acks a wait
  while it is open: it naks it with a delay and looks again later, so after any
  restart the index is rebuilt from JetStream. When a wait is indexed, the stream's
  latest signal for each of its subjects is delivered at once: an event that raced ahead
  of the wait is not lost.
- Live signals arrive on a plain subscription and go to every waiting (run, step)
  indexed for that subject, as ``ExternalEventArrived`` in the run's inbox
  (the run records each name once and refuses repeats).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from loom_core import codec, routes, subjects, tenancy
from loom_core.contracts import (
    ErrorInfo,
    EventWaitStarted,
    ExternalEventArrived,
    Signal,
    WaitEventStep,
)
from loom_core.executor import RunState
from loom_core.message_limits import DEFAULT_MESSAGE_LIMITS, MessageLimits, check_signal_payload
from loom_infra import bus, endpoints
from loom_services.tenants import run_tenant

log = logging.getLogger("loom.signals")

RECHECK_S = 3.0  # an open wait is looked at again this often: after a restart, the
# index is whole again within this time (events that came meanwhile are in the stream)

StateOf = Callable[[str], Awaitable[RunState]]
REFUSED_REMEMBERED = 1000  # refused signals whose report is not repeated


class SignalRouter:
    def __init__(
        self,
        js: JetStreamContext,
        state_of: StateOf,
        service: str = "executor",
        limits: MessageLimits = DEFAULT_MESSAGE_LIMITS,
        rejects: bus.RejectRecorder | None = None,
    ):
        self.js = js
        self.state_of = state_of
        self.service = service
        # a payload over its limit is refused before any run's inbox holds it; it is
        # the sender's mistake, recorded with the client mistakes (loom.rejects.*)
        self.limits = limits
        self.rejects = rejects
        # refused signals already reported: the latest one is offered again at each
        # recheck of an open wait (RECHECK_S), which must not repeat the report
        self._refused: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.waiting: dict[str, set[tuple[str, str]]] = {}  # subject -> {(run, step)}

    async def start(self, nc: object, stop: asyncio.Event) -> list[Awaitable[None]]:
        await endpoints.subscribe(nc, routes.SIGNAL, "executor", self.on_signal)  # type: ignore[arg-type]  # nc typed object here to keep nats out of the signature
        return [self.index_waits(stop)]

    # ------------------------------------------------------------------ waits

    async def index_waits(self, stop: asyncio.Event) -> None:
        waits = routes.RUN_EVENTS.consumer("executor", "signal-waits")
        (subject,) = routes.RUN_EVENTS.filters(waits)
        await bus.held_events(self.js, "signal-waits", subject, self._wait, stop)

    async def _wait(self, msg: Msg) -> None:
        try:
            record, wait = bus.expect_event(msg, EventWaitStarted)
        except bus.Poison as poison:
            await bus.dead_letter(self.js, self.service, msg.subject, poison.error, msg.data)
            await msg.term()
            return
        try:
            state = await self.state_of(record.run_id)
        except Exception as exc:
            log.warning("wait of %s not indexed yet: %r", record.run_id, exc)
            await msg.nak(delay=1.0)
            return
        inst = state.insts.get(wait.step_id)
        still = (
            inst is not None and inst.status == "running" and isinstance(inst.step, WaitEventStep)
        )
        target = (record.run_id, wait.step_id)
        for match in wait.matches:
            # a run hears only its own tenant's signals (loom.t.<tenant>.signal.…)
            subject = tenancy.scoped(subjects.signal(match.name, match.key), run_tenant(state))
            if not still or match.name in inst.received:  # type: ignore[union-attr]  # not still covers inst is None (short-circuit)
                # one event per name is taken: resending would only be refused
                self.waiting.get(subject, set()).discard(target)
                continue
            self.waiting.setdefault(subject, set()).add(target)
            await self._deliver_latest(subject, record.run_id, wait.step_id)
        if still:
            await msg.nak(delay=RECHECK_S)
        else:
            await msg.ack()

    async def _deliver_latest(self, subject: str, run_id: str, step_id: str) -> None:
        try:
            latest = await self.js.get_last_msg(subjects.SIGNALS_STREAM, subject)
        except NotFoundError:
            return
        except Exception as exc:
            log.warning("latest signal on %s unreadable: %r", subject, exc)
            return
        await self._send(subject, latest.data or b"", f"seq{latest.seq}", [(run_id, step_id)])

    # ------------------------------------------------------------------ signals

    def _refuse(self, subject: str, signal_id: str, error: ErrorInfo, data: bytes) -> None:
        if (subject, signal_id) in self._refused:
            return
        self._refused[(subject, signal_id)] = None
        while len(self._refused) > REFUSED_REMEMBERED:
            self._refused.popitem(last=False)
        log.warning("signal %s on %s refused: %s", signal_id, subject, error.message)
        if self.rejects is not None:
            self.rejects.offer(subject, error, data)

    async def on_signal(self, msg: Msg) -> None:
        targets = list(self.waiting.get(msg.subject, ()))
        if targets:
            fallback = hashlib.sha256(msg.data).hexdigest()[:16]
            await self._send(msg.subject, msg.data, fallback, targets)

    async def _send(
        self, subject: str, data: bytes, fallback_id: str, targets: list[tuple[str, str]]
    ) -> None:
        try:
            signal = codec.decode(data, Signal)
        except Exception as exc:
            error = bus.decode_error_info(exc)
            await bus.dead_letter(self.js, self.service, subject, error, data)
            return
        name, key = tenancy.split(subject)[1].split(".")[2:4]
        if (signal.name, signal.key) != (name, key):
            return  # the subject is the address; a mismatching body is ignored
        too_large = check_signal_payload(signal.payload, self.limits)
        if too_large is not None:
            self._refuse(subject, signal.signal_id or fallback_id, too_large, data)
            return
        signal_id = signal.signal_id or fallback_id
        for run_id, step_id in targets:
            arrived = ExternalEventArrived(
                run_id=run_id, step_id=step_id, name=name, key=key,
                payload=signal.payload, signal_id=signal_id,
            )  # fmt: skip
            try:
                # no Nats-Msg-Id (anyone could claim a guessable one first): the run
                # takes one event per name and refuses the rest
                await self.js.publish(routes.inbox_subject(arrived), codec.encode(arrived))
            except Exception as exc:  # the wait's next recheck delivers the latest again
                log.warning("signal to %s not delivered: %r", run_id, exc)
