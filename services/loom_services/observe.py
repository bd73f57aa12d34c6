"""What a service process reports on ``/readyz`` and ``/metrics`` (``loom_infra.httpserver``).

Readiness means "doing its job", not "a responder answers" (issue 9: probes stayed green
while the relay was stuck forever):

- every service: its NATS connection is up and every task it spawned (consumers, writer,
  relay, timers) is still running;
- a process with a relay (the executor, the relay alone): relay lag, the store's largest
  notification id minus the relay's position, is under ``LOOM_READY_MAX_RELAY_LAG``, and
  the relay has not sat on unpublished events without moving for ``LOOM_READY_STALL_S``;
- a process with the run writer (the executor): the writer has not left work queued
  without committing for ``LOOM_READY_STALL_S``.

Everything is read from the objects as they are (the relay's position, the writer's
queue and commit listeners), so the services need no code for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from loom_core import routes
from loom_core.contracts import EventRecord, StepCancelled, StepCompleted, StepFailed, StepStarted
from loom_infra import metrics
from loom_infra.httpserver import HealthServer
from loom_infra.relay import Relay
from loom_infra.settings import OpsSettings

log = logging.getLogger("loom.observe")

STEP_STARTS_KEPT = 100_000  # open steps remembered for the latency histogram
_ENDS = {StepCompleted: "completed", StepFailed: "failed", StepCancelled: "cancelled"}


@runtime_checkable
class Writer(Protocol):
    """The executor's ``RunHost``, as seen from here."""

    queue: asyncio.Queue[Any]
    listeners: list[Any]


def watch_service(
    server: HealthServer, name: str, identity: str, nc: NATS, js: JetStreamContext,
    tasks: Sequence[asyncio.Task[None]], stop: asyncio.Event,
) -> None:  # fmt: skip
    async def connected() -> str | None:
        return None if nc.is_connected else "not connected to NATS (reconnecting)"

    async def running() -> str | None:
        if stop.is_set():
            return "stopping"
        ended = [t.get_name() for t in tasks if t.done()]
        return f"task(s) ended: {', '.join(ended)}" if ended else None

    server.add_check(f"{name}.nats", connected)
    # a task that ended does not come back by waiting: liveness fails too, so the pod is
    # restarted instead of sitting unready forever
    server.add_check(f"{name}.tasks", running, live=True)
    durables = sorted(
        {(r.stream, c.durable) for r, c in routes.consumers_of(identity) if c.durable}  # type: ignore[arg-type]  # identity is a service name, checked by routes
    )

    async def consumer_lag() -> None:
        for stream, durable in durables:
            assert stream is not None and durable is not None
            try:
                info = await js.consumer_info(stream, durable)
            except Exception as exc:  # not created yet (or NATS down): no sample this scrape
                log.debug("no info on consumer %s/%s: %r", stream, durable, exc)
                continue
            metrics.CONSUMER_PENDING.set(info.num_pending or 0, consumer=durable, stream=stream)
            metrics.CONSUMER_ACK_PENDING.set(
                info.num_ack_pending or 0, consumer=durable, stream=stream
            )

    if durables:
        server.collectors.append(consumer_lag)


class RelayWatch:
    """Relay lag and stall, sampled at most once a second (the head is a store query)."""

    def __init__(self, relay: Relay, ops: OpsSettings) -> None:
        self.relay = relay
        self.ops = ops
        self.head = 0
        self.sampled_at = float("-inf")
        self.lagging_since: tuple[int, float] | None = None  # (position, since)
        metrics.RELAY_POSITION.set_function(lambda: self.relay.position)

    async def sample(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self.sampled_at < 1.0:
            return
        self.head = await self.relay.io(self.relay.store.max_notification_id)
        self.sampled_at = loop.time()
        metrics.STORE_HEAD.set(self.head)
        metrics.RELAY_LAG.set(self.lag)

    @property
    def lag(self) -> int:
        return max(0, self.head - self.relay.position)

    async def check(self) -> str | None:
        if not getattr(self.relay, "active", True):
            return None  # another executor replica runs the relay (loom_services.partitioned)
        await self.sample()
        now, lag, position = asyncio.get_running_loop().time(), self.lag, self.relay.position
        if lag == 0:
            self.lagging_since = None
            return None
        if self.lagging_since is None or self.lagging_since[0] != position:
            self.lagging_since = (position, now)
        if lag > self.ops.ready_max_relay_lag:
            return (
                f"relay lag {lag} events (position {position}, store head {self.head}) is over "
                f"{self.ops.ready_max_relay_lag} (LOOM_READY_MAX_RELAY_LAG)"
            )
        stalled = now - self.lagging_since[1]
        if stalled > self.ops.ready_stall_s:
            return (
                f"relay stuck at position {position} for {stalled:.0f}s with {lag} event(s) "
                f"unpublished (LOOM_READY_STALL_S={self.ops.ready_stall_s:g}); see its log"
            )
        return None


class WriterWatch:
    """The run writer: commits counted, step latency, and whether queued work moves."""

    def __init__(self, host: Writer, ops: OpsSettings) -> None:
        self.host = host
        self.ops = ops
        self.committed_at = asyncio.get_running_loop().time()
        self.starts: OrderedDict[tuple[str, str], float] = OrderedDict()
        host.listeners.append(self.committed)
        metrics.QUEUE_DEPTH.set_function(host.queue.qsize, queue="writer", service="executor")

    def committed(self, _ids: Sequence[int], records: Sequence[EventRecord]) -> None:
        self.committed_at = asyncio.get_running_loop().time()
        metrics.EVENTS_STORED.inc(len(records))
        for record in records:
            event = record.event
            if isinstance(event, StepStarted):
                self.starts[(record.run_id, event.step_id)] = record.at.timestamp()
                if len(self.starts) > STEP_STARTS_KEPT:
                    self.starts.popitem(last=False)
            elif isinstance(event, StepCompleted | StepFailed | StepCancelled):
                started = self.starts.pop((record.run_id, event.step_id), None)
                if started is not None:
                    metrics.STEP_SECONDS.observe(
                        max(0.0, record.at.timestamp() - started), outcome=_ENDS[type(event)]
                    )

    async def check(self) -> str | None:
        queued = self.host.queue.qsize()
        idle = asyncio.get_running_loop().time() - self.committed_at
        if queued and idle > self.ops.ready_stall_s:
            return (
                f"run writer stuck: {queued} item(s) queued, no commit for {idle:.0f}s "
                f"(LOOM_READY_STALL_S={self.ops.ready_stall_s:g})"
            )
        return None


def watch_internals(server: HealthServer, name: str, service: object, ops: OpsSettings) -> None:
    """The relay and the writer of ``service``, if it has them (after its start)."""
    relay = getattr(service, "relay", None)
    if isinstance(relay, Relay):
        server.add_check(f"{name}.relay", RelayWatch(relay, ops).check)
    host = getattr(service, "host", None)
    if isinstance(host, Writer):
        server.add_check(f"{name}.writer", WriterWatch(host, ops).check)
