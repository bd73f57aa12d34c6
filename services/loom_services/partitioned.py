"""The executor's side of partitions: what a replica does with the partitions it owns,
and how work for a run it does not own reaches the owner.

- Owning partition p (``loom_infra.ownership``) = consuming the inbox durable
  ``executor-p{p}`` (the stream stamps each run's partition into the subject) and being
  the only replica whose writer accepts work for p's runs (``RunHost.owns``). Losing it
  = the writer refuses p's runs first (``NotOwner``), then the consumer stops, then the
  run actors of p are forgotten (a later owner reloads them from the store), and only
  then is the lease given back.
- A request on a core NATS route (submit, control, resume, fork) lands on any replica
  (queue group). Whatever the handler would write for a run of another partition fails
  with ``NotOwner`` before anything is stored; the request is then passed to the owner
  on ``loom.fwd.{partition}`` (route FORWARD: original subject in a header, the reply
  relayed back) or, when no owner answers in time, refused with the typed, retryable
  ``partition_moving``. Never lost, never written by two.
- Run events consumed by a shared durable (sub-run start) go the same way; sub-run
  ends, timers and signals only publish into a run's inbox, which the stream routes to
  the partition (and so to its owner) by itself.
- A new run's id (no ``run_id`` given) is drawn in one of this replica's own partitions,
  so a plain submission is never forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from loom_core import codec, partitions, routes, subjects
from loom_core.contracts import ErrorInfo, RelayWake
from loom_infra import bus, endpoints
from loom_infra.ownership import NotOwner, Ownership, PartitionSettings, moving

if TYPE_CHECKING:
    from loom_services.executor import ExecutorService
    from loom_services.runtime import ServiceContext

log = logging.getLogger("loom.partitions")

SUBJECT = "Loom-Subject"  # the forwarded request's own subject
HOPS = "Loom-Hops"  # how often it was forwarded already
RESULT = "Loom-Result"  # a forwarded run event's outcome: ok | poison | retry
MAX_HOPS = 2
RELAY_PARTITION = 0  # its owner runs the one relay
REQUEST_TIMEOUT_S = 5.0
# how long a stopping replica waits for a partition's consumer to end before it gives
# the partition back (``_loss``)
STOPPING_WAIT_S = 0.25
# the status nats-server puts on a request nobody subscribes to; nats-py raises
# NoRespondersError for it
NATS_STATUS, NO_RESPONDERS = "Status", "503"

Refuse = Callable[[ErrorInfo], msgspec.Struct]


class Partitioned:
    def __init__(self, service: ExecutorService, ctx: ServiceContext,
                 settings: PartitionSettings | None = None) -> None:  # fmt: skip
        self.service = service
        self.ctx = ctx
        self.settings = settings or service.settings.partitions
        self.ownership = Ownership(ctx.js, self.settings, on_gain=self._gain, on_loss=self._loss)
        self.consumers: dict[int, tuple[asyncio.Event, asyncio.Future[None]]] = {}
        self._relay: tuple[asyncio.Event, asyncio.Future[None]] | None = None
        self._waking: set[asyncio.Future[None]] = set()  # wakes and forwarded requests
        self.forwarded = 0  # requests passed to another replica (for tests and metrics)
        self._release_on_stop: asyncio.Future[None] | None = None

    # ------------------------------------------------------------ life

    async def start(self) -> None:
        await self._check_count()
        if self.service.relay is not None:
            self.service.relay.active = False  # type: ignore[attr-defined]  # until partition 0
        self.service.host.owns = self.ownership.owns
        self.service.host.owner_error = self.not_owner
        await endpoints.subscribe(self.ctx.nc, routes.FORWARD, "executor", self._on_forward)
        await endpoints.subscribe(self.ctx.nc, routes.RELAY_WAKE, "executor", self._on_wake)
        await self.ownership.start()
        self.ctx.spawn(self.ownership.run(self.ctx.stop), "executor-ownership")
        # not a ctx task: it ends when done, which readiness would report as a failure
        self._drain = asyncio.ensure_future(drain_legacy_inbox(self.ctx.js, self.ctx.stop))
        self._drain.add_done_callback(_log_crash)
        # not a ctx task either: the runtime cancels those first thing on a stop
        self._release_on_stop = asyncio.ensure_future(self._hand_over_on_stop())
        self._release_on_stop.add_done_callback(_log_crash)

    async def _hand_over_on_stop(self) -> None:
        """A clean stop (SIGTERM: a rolling restart, a scale-down) gives the leases back
        at once. The runtime first cancels every task (renewals included) and waits for
        them, then closes the services; that can take seconds (a commit, a fetch, a
        thread to finish), and a lease left to expire meanwhile is a lease with no event
        published for anyone, when this replica runs the relay. Released here, in the
        usual order (the writer refuses, the consumers and the relay stop, the runs are
        forgotten, then the keys are deleted), the survivors take the partitions within
        milliseconds. A write already past the writer's check when its partition moves
        is settled by the store's optimistic concurrency, as for any overlap."""
        await self.ctx.stop.wait()
        await self.ownership.close()

    async def close(self) -> None:
        early = self._release_on_stop
        if early is not None and not early.done():
            if self.ctx.stop.is_set():  # handing over now: let it finish
                with contextlib.suppress(Exception):
                    await early
            else:  # closed with no stop signal: released below
                early.cancel()
        await self.ownership.close()  # nothing left to do after a hand-over
        await self._stop_relay()
        for stop, task in self.consumers.values():
            stop.set()
            task.cancel()

    async def _check_count(self) -> None:
        info = await self.ctx.js.stream_info(subjects.INBOX_STREAM)
        transform = info.config.subject_transform
        have = partitions.count_of_transform(transform.dest if transform else None)
        if have is None:
            raise bus.PartitionCountChanged(0, self.settings.count)
        if have != self.settings.count:
            raise bus.PartitionCountChanged(have, self.settings.count)

    async def _gain(self, p: int) -> None:
        if p == RELAY_PARTITION:
            self._start_relay()
        stop = asyncio.Event()
        consumer = endpoints.inbox_consumer(
            self.ctx.js, routes.INBOXES, p, handler=self.service.on_inbox, batch=256
        )
        name = f"executor-inbox-p{p}"
        self.consumers[p] = (stop, self._spawn(keep_consuming(consumer, stop, name), name))
        self.service.admission.gained(p)  # its runs' slots checked against the store

    async def _loss(self, p: int) -> None:
        # the writer already refuses p's runs (owned no longer lists p)
        stop, task = self.consumers.pop(p, (None, None))
        if stop is not None and task is not None:
            stop.set()
            if self.ctx.stop.is_set():
                # the process is stopping: the runtime cancels it anyway, and its lease
                # is handed over only once it has stopped. What it fetched and did not
                # ack is redelivered to the next owner (ack wait), as after a crash.
                task.cancel()
            # Stopping, the wait is short: the writer already refuses p's runs, and a
            # commit already past that check is settled by the store's optimistic
            # concurrency, so the lease need not wait for a handler that is slow to
            # take its cancellation (a clean stop handed its partitions over 2 s late
            # one time in five: the failover test). Running, one fetch and one batch.
            wait = STOPPING_WAIT_S if self.ctx.stop.is_set() else 2.0
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), wait)
            if not task.done():
                log.info("partition %d's consumer still stopping after %.2f s; handed over "
                         "(its writes are refused)", p, wait)  # fmt: skip
            self._unspawn(task)
        count = self.settings.count
        host = self.service.host
        for run_id in [r for r in host.actors if partitions.partition_of(r, count) == p]:
            host.actors.pop(run_id, None)
        if p == RELAY_PARTITION:
            await self._stop_relay()

    # ------------------------------------------------------------ the relay

    def _start_relay(self) -> None:
        """The relay runs on the owner of partition 0 only: one publisher of the store's
        notification log for every replica keeps the stream in notification order and
        costs one publish per event (a relay per replica cost each replica a read and a
        publish of every replica's events). It starts where the last one stopped
        (``Relay.start_position``: its tracking record, or the stream's last event)."""
        relay = self.service.relay
        if relay is None or self._relay is not None:
            return
        relay._pending.clear()  # offered while another replica ran the relay: stale
        relay.active = True  # type: ignore[attr-defined]  # its readiness check counts now
        stop = asyncio.Event()
        self._relay = (stop, self._spawn(relay.run(stop), "executor-relay"))

    async def _stop_relay(self) -> None:
        if self._relay is None:
            return
        stop, task = self._relay
        self._relay = None
        if self.service.relay is not None:
            self.service.relay.active = False  # type: ignore[attr-defined]  # a flag Relay does not declare; observe reads it by getattr
        stop.set()
        if self.ctx.stop.is_set():  # stopping: the next relay republishes (deduped)
            task.cancel()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 5.0)
        self._unspawn(task)

    def on_commit(self, notification_ids: list[int], records: list[Any]) -> None:
        """After each commit: the relay publishes it (here, or woken over NATS)."""
        relay = self.service.relay
        if self._relay is not None and relay is not None:
            relay.offer(notification_ids, records)
            return
        wake = RelayWake(notification_id=notification_ids[-1] if notification_ids else 0)
        task = asyncio.ensure_future(self._wake(codec.encode(wake)))
        self._waking.add(task)
        task.add_done_callback(self._waking.discard)

    async def _wake(self, data: bytes) -> None:
        try:
            await self.ctx.nc.publish(routes.RELAY_WAKE.subject(), data)
        except Exception as exc:  # the relay's idle poll publishes them anyway
            log.debug("relay wake not sent: %r", exc)

    async def _on_wake(self, msg: Msg) -> None:
        if self._relay is not None and self.service.relay is not None:
            self.service.relay.wake()

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Future[None]:
        """A task readiness watches (``ServiceContext.tasks``: one that ends is a failure)
        while this replica owns what it serves."""
        self.ctx.spawn(coro, name)
        task = self.ctx.tasks[-1]
        task.add_done_callback(_log_crash)
        return task

    def _unspawn(self, task: asyncio.Future[None]) -> None:
        """Stopped on purpose (the partition moved): no longer watched."""
        with contextlib.suppress(ValueError):
            self.ctx.tasks.remove(task)  # type: ignore[arg-type]  # a Task given as the Future that spawn returned

    # ------------------------------------------------------------ questions

    def not_owner(self, run_id: str) -> NotOwner:
        p = self.ownership.partition(run_id)
        return NotOwner(run_id, p, self.ownership.owner_of(p))

    def unpartitioned(self, msg: Msg) -> Msg:
        """An inbox message with its subject set back to the one it was published on (the
        stream stores it with the run's partition), which is also what a dead letter
        names as its origin; Poison if the stamped partition is not the run's."""
        stored = partitions.stored_inbox(msg.subject)
        count = self.settings.count
        if stored is None or partitions.partition_of(stored.run_id, count) != stored.partition:
            raise bus.Poison(ErrorInfo(
                code="wrong_subject",
                message=f"{msg.subject} is not an inbox subject of a run's partition "
                f"(loom.inbox.{{partition}}.{{run_id}}.{{source}}, {count} partitions)",
                details={"received": msg.subject},
            ))  # fmt: skip
        msg.subject = stored.subject
        return msg

    def new_run_id(self, prefix: str = "run-") -> str:
        """A fresh run id in one of this replica's partitions (any id if it owns none)."""
        owned = self.ownership.frozen_owned
        candidates = (f"{prefix}{uuid.uuid4().hex[:20]}" for _ in range(64 * self.settings.count))
        found = partitions.local_run_id(candidates, owned, self.settings.count) if owned else None
        return found or f"{prefix}{uuid.uuid4().hex[:20]}"

    # ------------------------------------------------------------ request routes

    def routed(self, handler: Callable[[Msg], Awaitable[None]], refuse: Refuse
               ) -> Callable[[Msg], Awaitable[None]]:  # fmt: skip
        """``handler`` (which answers ``msg`` itself), passed to the run's owner when it
        would write a run of another partition."""

        async def call(msg: Msg) -> None:
            for _ in range(3):
                try:
                    await handler(msg)
                    return
                except NotOwner as exc:
                    reply = await self.forward(exc.partition, msg)
                if reply is None:  # the partition came here meanwhile: handle it here
                    continue
                if msg.reply:
                    data = reply if isinstance(reply, bytes) else codec.encode(refuse(reply))
                    await msg.respond(data)
                return
            if msg.reply:
                await msg.respond(codec.encode(refuse(moving(-1, "ownership kept moving"))))

        return call

    def served(self, handler: Callable[[Msg, Any], Awaitable[msgspec.Struct]],
               reply_type: type[msgspec.Struct], refuse: Refuse
               ) -> Callable[[Msg, Any], Awaitable[msgspec.Struct]]:  # fmt: skip
        """Like ``routed`` for a handler behind ``endpoints.serve`` (returns its reply)."""

        async def call(msg: Msg, request: Any) -> msgspec.Struct:
            for _ in range(3):
                try:
                    return await handler(msg, request)
                except NotOwner as exc:
                    reply = await self.forward(exc.partition, msg)
                if reply is None:
                    continue
                if isinstance(reply, bytes):
                    return codec.decode(reply, reply_type)
                return refuse(reply)
            return refuse(moving(-1, "ownership kept moving"))

        return call

    def routed_event(self, handler: Callable[[Msg], Awaitable[bool | BaseException]]
                     ) -> Callable[[Msg], Awaitable[bool | BaseException]]:  # fmt: skip
        """A durable consumer's message handler whose write may belong to another
        partition: the event goes to that partition's owner, acked when it answers."""

        async def call(msg: Msg) -> bool | BaseException:
            for _ in range(3):
                result = await handler(msg)
                if not isinstance(result, NotOwner):
                    return result
                reply = await self.forward(result.partition, msg)
                if reply is None:
                    continue
                if isinstance(reply, ErrorInfo):
                    return _Retry(reply.message)
                return _event_outcome(reply)
            return _Retry("partition ownership kept moving")

        return call

    async def forward(self, p: int, msg: Msg) -> bytes | ErrorInfo | None:
        """Pass ``msg`` to the owner of partition ``p``: its reply (bytes, or with
        RESULT for run events), None if ``p`` became this replica's own meanwhile, or
        the typed refusal when no owner answered within two leases."""
        headers = dict(msg.headers or {})
        hops = int(headers.get(HOPS, "0") or 0)
        if hops >= MAX_HOPS:
            return moving(p, f"forwarded {hops} times")
        headers[HOPS] = str(hops + 1)
        headers.setdefault(SUBJECT, msg.subject)
        subject = routes.FORWARD.subject(partition=str(p))
        deadline = time.monotonic() + 2 * self.settings.lease_s + 1
        why = "no owner"
        while True:
            if p in self.ownership.frozen_owned:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return moving(p, why)
            if self.ownership.owner_of(p) is not None:
                try:
                    reply = await self.ctx.nc.request(
                        subject, msg.data, timeout=min(left, REQUEST_TIMEOUT_S), headers=headers
                    )
                except (NatsTimeout, TimeoutError, NoRespondersError) as exc:
                    why = (
                        f"owner {self.ownership.owner_of(p)} did not answer ({type(exc).__name__})"
                    )
                else:
                    self.forwarded += 1
                    if (reply.headers or {}).get(RESULT):
                        return reply  # type: ignore[return-value]  # the forwarded reply itself, passed on with its headers
                    return reply.data
            self.ownership.changed.clear()
            await bus.wait_or_timeout(self.ownership.changed, min(max(left, 0.01), 0.25))

    # ------------------------------------------------------------ the owner's side

    async def _on_forward(self, msg: Msg) -> None:
        try:
            p = int(msg.subject.rsplit(".", 1)[1])
        except ValueError:
            return
        if p not in self.ownership.frozen_owned:
            # every replica hears it; only the owner answers. But while the lease still
            # names this replica and it does not serve p (it is handing p over: its
            # consumer is stopping, ~1 s; or taking p and not serving it yet), no one
            # would answer and the forwarder would wait out its 5 s request timeout (a
            # submission answered 5 s late at every rebalance). Told "no responders"
            # now, it looks at the leases again within 0.25 s.
            if msg.reply and self.ownership.owner_of(p) == self.ownership.settings.replica:
                with contextlib.suppress(Exception):
                    await self.ctx.nc.publish(msg.reply, b"", headers={NATS_STATUS: NO_RESPONDERS})
            return
        original = (msg.headers or {}).get(SUBJECT, "")
        inner = Msg(_client=msg._client, subject=original, reply=msg.reply, data=msg.data,
                    headers=msg.headers)  # fmt: skip
        handler = self._handler_of(original)
        if handler is None:
            log.warning("forwarded request on an unknown subject %r ignored", original)
            return
        # its own task: a slow one (a commit) must not hold up the next, and a request
        # this one forwards again must not wait behind it (two replicas forwarding to
        # each other would otherwise wait for each other's timeout)
        task = asyncio.ensure_future(handler(inner))
        self._waking.add(task)
        task.add_done_callback(self._waking.discard)

    def _handler_of(self, subject: str) -> Callable[[Msg], Awaitable[None]] | None:
        service = self.service
        if subject.startswith(f"{subjects.PREFIX}.submit."):
            return service.on_submit_routed
        if subject == subjects.CONTROL:
            return service.on_control_routed
        if subject == subjects.RESUME:
            return service.on_resume_routed
        if subject == routes.FORK.pattern:
            return self._fork
        if subject.startswith(f"{subjects.PREFIX}.run."):
            return self._event
        return None

    async def _fork(self, msg: Msg) -> None:
        try:
            request = codec.decode(msg.data, routes.FORK.messages[0])
            reply = await self.service.on_fork_routed(msg, request)
        except Exception as exc:
            info = exc.info if hasattr(exc, "info") else ErrorInfo(code="internal_error",
                                                                   message=repr(exc))  # fmt: skip
            reply = endpoints.error_reply(routes.FORK, info)
        await msg.respond(codec.encode(reply))

    async def _event(self, msg: Msg) -> None:
        result = await self.service.on_sub_run_requested_routed(msg)
        if result is True:
            outcome, data = "ok", b""
        elif isinstance(result, bus.Poison):
            outcome, data = "poison", codec.encode(result.error)
        else:
            outcome, data = "retry", repr(result).encode()[:1000]
        await self.ctx.nc.publish(msg.reply, data, headers={RESULT: outcome})


LEGACY_DURABLE = "executor"  # the one inbox consumer of versions before partitions


async def drain_legacy_inbox(js: Any, stop: asyncio.Event) -> int:
    """Upgrade from a single-executor version: inbox messages stored before the stream
    had its partition transform sit on ``loom.inbox.{run_id}.{source}``, where no
    partition consumer reads. Republish what the old durable still holds (the server
    now stamps the partition), ack it, and delete the old durable once it is empty.
    Nothing to do (0) on a system that never had it."""
    try:
        await js.consumer_info(subjects.INBOX_STREAM, LEGACY_DURABLE)
    except Exception:  # not found (a new system, or drained already)
        return 0
    sub = await js.pull_subscribe_bind(durable=LEGACY_DURABLE, stream=subjects.INBOX_STREAM)
    moved = 0
    while not stop.is_set():
        try:
            msgs = await sub.fetch(256, timeout=1.0)
        except (TimeoutError, NatsTimeout):
            info = await js.consumer_info(subjects.INBOX_STREAM, LEGACY_DURABLE)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            continue
        for msg in msgs:
            headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
            await js.publish(msg.subject, msg.data, headers=headers or None)
            await msg.ack()
            moved += 1
    if not stop.is_set():
        with contextlib.suppress(Exception):  # another replica deleted it first
            await js.delete_consumer(subjects.INBOX_STREAM, LEGACY_DURABLE)
        log.info("legacy inbox drained: %d message(s) moved to their partitions", moved)
    return moved


RESTART_FIRST_S = 0.5  # a partition's inbox consumer that failed starts again after this
RESTART_MAX_S = 5.0  # doubling up to this


class Consuming(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


async def keep_consuming(consumer: Consuming, stop: asyncio.Event, name: str) -> None:
    """A partition's inbox consumer, started again whenever it fails while the partition
    is ours (until ``stop``): a JetStream call that a cluster's failover left unanswered
    ended it for good, and the partition's runs waited until the process restarted
    (tests/integration/test_jetstream_cluster.py, seen once in CI). Its messages are
    durable: what it had not settled is delivered again to the next one."""
    delay = RESTART_FIRST_S
    while not stop.is_set():
        try:
            await consumer.run(stop)
            return
        except Exception as exc:
            log.warning("%s stopped (%r); starting it again in %.1f s", name, exc, delay)
            await bus.wait_or_timeout(stop, delay)
            delay = min(delay * 2, RESTART_MAX_S)


class _Retry(Exception):
    """A forwarded event its owner could not take yet: redelivered later."""


def _event_outcome(reply: Any) -> bool | BaseException:
    outcome = (reply.headers or {}).get(RESULT)
    if outcome == "ok":
        return True
    if outcome == "poison":
        return bus.Poison(codec.decode(reply.data, ErrorInfo))
    return _Retry(reply.data.decode(errors="replace"))


def _log_crash(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("partition inbox consumer stopped: %r", task.exception())
