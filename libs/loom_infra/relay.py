"""The relay: stored events reach JetStream from the store, never beside it
(docs/design.md decision 2).

It tails the store's notification log from its position, publishes each event to
``loom.run.{run_id}.{event_tag}`` with ``Nats-Msg-Id`` = event id, waits for every
publish ack, then records the new position (a tracking record). Publishes are
pipelined (``loom_infra.publish_pipe``: one write and one future per batch, half the CPU
of ``publish_async``): order on the wire is the order they were sent, so the stream
holds events in notification order.

Exactly once, in order, across crashes: after a crash between a publish and the
tracking write, the relay starts from the larger of its tracking position and the
notification id found in the header of the stream's last message, so it neither
republishes what JetStream already holds nor skips anything; JetStream's duplicate
window on ``Nats-Msg-Id`` is the second net.

Neither can be turned against it by another publisher on ``loom.run.>`` (docs/design.md
decision 11; with NATS credentials off anyone may publish there):
- the header of the stream's last message is believed only when the message is the
  event the store holds at that notification id (else it is ignored, with a warning,
  and the tracking record, a lower bound, decides: a few events go out again and are
  dropped as duplicates);
- the ``Nats-Msg-Id`` is bound to the content, ``{run_id}/{seq}/{digest of subject and
  record}``: only the identical message can claim it first, and a ``duplicate`` ack is
  checked against what the stream holds at that sequence; if it is not ours (someone
  set our id on other bytes), the event is published again under an unguessable id.

It is woken by the executor after each commit (``wake()``); a slow timer is only a
safety net for writers in other processes.

One event that can never be published must not stop the others (issue 9): an event over
the broker's max_payload (measured before sending, header block included: the server
closes a connection that sends one), one that cannot be encoded or whose subject NATS
refuses (a space or line break in it), or one JetStream refuses
for good (``PERMANENT_ERR_CODES``) is *skipped*: logged as an error, dead-lettered with
its event id and the reason (not its data: the store holds it), reported to
``on_unpublishable`` (the executor ends that run failed with the reason), and the
position moves past it and is recorded at once, so a restart does not meet it again.
The alarm is raised before the position moves: if it cannot be (NATS down), the batch is
retried like any transient failure. Everything else (timeouts, a lost connection) stays
transient: retried, never skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from loom_core import codec, subjects
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    StreamFiller,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
)
from loom_infra import metrics
from loom_infra.blocking import Blocking
from loom_infra.bus import back_or_stop, dead_letter
from loom_infra.publish_pipe import PublishPipe, bad_subject, clean
from loom_infra.store import EventStore

log = logging.getLogger("loom.relay")

# JetStream refusals that no retry can change: the message exceeds the stream's
# max_msg_size (10054), its headers exceed the maximum (10097).
PERMANENT_ERR_CODES = frozenset({10054, 10097})

Unpublishable = Callable[[EventRecord, ErrorInfo], Awaitable[None]]

# The latest publishes re-checked after a NATS reconnect: more than a crashed server can
# have held unwritten (it writes within milliseconds; it fsyncs LOOM_RUNS lazily).
RECENT_MAX = 4096
RECONNECT_CHECK_S = 0.1
# the back-off after a failed publish (NATS down, a store hiccup)
RETRY_S = 0.5
# On an event published before (a retried batch, a rewind after a reconnect, a restart
# that found the stream behind): JetStream drops such a copy as a duplicate, so its
# stream consumers never see it twice, but a plain subscriber does. Tool-runners taking
# requests from the publish (``loom_services.toolrunner``) leave these alone.
AGAIN = "Loom-Again"
# A message delete that found nothing to delete: "sequence not found" (10043; after a
# restart, a sequence the recovered stream never held), "no message found" (10057)
NOT_THERE_ERR_CODES = frozenset({10043, 10057})
# Fillers go out in chunks of this many publishes (each chunk's acks awaited)
FILL_CHUNK = 512
# How many fillers in a row ``_last_published`` steps back over (a fill per crash)
FILL_HOPS = 8


def _taken(future: asyncio.Future[Any]) -> None:
    """Take a given-up future's outcome (its CancelledError is no news)."""
    if not future.cancelled():
        future.exception()


async def _done_or_after(future: asyncio.Future[Any], seconds: float) -> None:
    """Until ``future`` is done or ``seconds`` passed (``asyncio.wait`` of one future,
    without its sets and its second future: this runs once per relayed batch)."""
    loop = asyncio.get_running_loop()
    woken = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    timer = loop.call_later(max(seconds, 0.0), wake)
    future.add_done_callback(wake)
    try:
        await woken
    finally:
        timer.cancel()
        future.remove_done_callback(wake)


def msg_id(record: EventRecord, subject: str, data: bytes) -> str:
    """The ``Nats-Msg-Id`` of a published event: its event id and a digest of exactly
    what is published, so only that very message can hold the id."""
    digest = hashlib.sha256(subject.encode() + b"\n" + data).hexdigest()[:32]
    return f"{record.event_id}/{digest}"


def _unpublishable(record: EventRecord, why: str) -> ErrorInfo:
    return ErrorInfo(
        code="event_unpublishable",
        message=f"event {record.event_id} ({record.kind}) {why}; it stays in the store, "
        "unpublished",
        details={"event_id": record.event_id, "run_id": record.run_id, "seq": record.seq,
                 "event_type": record.kind},
    )  # fmt: skip


def _answered(rows: Sequence[tuple[int, EventRecord]]) -> set[tuple[str, str]]:
    """(run, idempotency key) of the tool calls whose result is among ``rows``: their
    requests were answered in the executor (local calls) and go out marked so."""
    return {
        (record.run_id, record.event.idempotency_key)
        for _, record in rows
        if isinstance(record.event, ToolCallCompleted | ToolCallFailed)
    }


def _same_event(stored: EventRecord, found: EventRecord) -> bool:
    return (stored.run_id, stored.seq, stored.kind, stored.at) == (
        found.run_id, found.seq, found.kind, found.at,
    )  # fmt: skip


_ANSWERED_LINE = f"{subjects.ANSWERED}: 1\r\n"
_AGAIN_LINE = f"{AGAIN}: 1\r\n"


def _headers(mid: str, notification_id: int, kind: str, answered: bool, again: bool) -> bytes:
    """The NATS header block of a published event, written in one string (the generic
    ``publish_pipe.header_block`` costs twice as much, per event, on the step's path)."""
    extra = (_ANSWERED_LINE if answered else "") + (_AGAIN_LINE if again else "")
    return (
        f"NATS/1.0\r\n{subjects.MSG_ID}: {mid}\r\n"
        f"{subjects.NOTIFICATION_ID}: {notification_id}\r\n"
        f"{subjects.EVENT_TYPE}: {clean(kind)}\r\n{extra}\r\n"
    ).encode()


class Relay:
    def __init__(
        self,
        store: EventStore,
        js: JetStreamContext,
        name: str = "relay",
        batch: int = 512,
        idle_poll_s: float = 2.0,
        ack_timeout_s: float = 10.0,
        io: Blocking | None = None,
        track_interval_s: float = 1.0,
        on_unpublishable: Unpublishable | None = None,
        service: str = "executor",
    ) -> None:
        self.on_unpublishable = on_unpublishable
        self.service = service  # whose dead-letter subject the alarms go to
        self.track_interval_s = track_interval_s
        self.tracked = 0
        self._tracked_at = float("-inf")
        self.io = io or Blocking("relay", workers=1)
        self.ack_timeout_s = ack_timeout_s
        self.store = store
        self.js = js
        self.name = name
        self.batch = batch
        self.idle_poll_s = idle_poll_s
        self.position = 0
        self._wake = asyncio.Event()
        # the idle relay's wait: resolved by a wake (the executor's commit) or a stop, so
        # the relay runs on the loop's next turn (an Event waited through asyncio.wait
        # took three turns: issue 10, perf3)
        self._waiter: asyncio.Future[None] | None = None
        # (notification id, record) the executor just committed: published from memory
        # when they follow the position exactly, saving a read of the store per step.
        self._pending: deque[tuple[int, EventRecord]] = deque()
        self._more_in_store = True
        # (notification id, stream seq, msg id) of the latest publishes, oldest first
        self._recent: deque[tuple[int, int, str]] = deque(maxlen=RECENT_MAX)
        self._reconnects_seen = 0
        self._sent_up_to = 0  # the highest notification id ever sent (AGAIN below it)
        # the durable consumers' positions are checked against the stream's end before
        # the next publish (at a start, after every reconnect): ``_cover_consumers``
        self._consumers_checked = False
        # after a reconnect that lost events: notification ids (first, last) published
        # again under fresh message ids (``_fresh_token``), see ``_check_after_reconnect``
        self._fresh: tuple[int, int] = (0, -1)
        self._fresh_token = ""
        self._pipe: PublishPipe | None = None  # made on the first publish (its inbox)

    def wake(self) -> None:
        self._wake.set()
        self._resolve_waiter()

    def _resolve_waiter(self, *_: object) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def offer(self, notification_ids: Sequence[int], records: Sequence[EventRecord]) -> None:
        """Committed events, in commit order (the executor's writer calls this)."""
        self._pending.extend(zip(notification_ids, records, strict=True))
        self.wake()

    def _take_pending(self) -> list[tuple[int, EventRecord]] | None:
        """The pending events that continue the position with no gap, or None when the
        store must be read (catch-up after a start, another writer, an id hole)."""
        while self._pending and self._pending[0][0] <= self.position:
            self._pending.popleft()  # already published from the store
        if not self._pending or self._pending[0][0] != self.position + 1:
            return None
        rows: list[tuple[int, EventRecord]] = []
        while self._pending and len(rows) < self.batch:
            nid = self._pending[0][0]
            if nid != (rows[-1][0] if rows else self.position) + 1:
                break
            rows.append(self._pending.popleft())
        return rows

    async def _last_published(self) -> int:
        try:
            info = await self.js.stream_info(subjects.RUN_EVENTS_STREAM)
            if not info.state.last_seq:
                return 0
            msg = await self.js.get_msg(subjects.RUN_EVENTS_STREAM, info.state.last_seq)
            # fillers at the end (a crash between a fill and the republish after it):
            # the event before them tells where publishing stopped
            for _ in range(FILL_HOPS):
                if msg.subject != subjects.RUN_GAP:
                    break
                after = msgspec.json.decode(msg.data or b"", type=StreamFiller).after_seq
                if after <= 0:
                    return 0
                msg = await self.js.get_msg(subjects.RUN_EVENTS_STREAM, after)
        except (NotFoundError, msgspec.DecodeError):
            return 0
        value = (msg.headers or {}).get(subjects.NOTIFICATION_ID)
        if not value:
            return 0
        # Trusted only if the message is the stored event at that position: a message
        # anyone published with a large id would otherwise make every later event skipped.
        found = "an unreadable message"
        try:
            position = int(value)
            record = codec.decode_event(msg.data or b"")
            found = f"{record.event_id} ({record.kind})"
            rows = await self.io(self.store.read_notifications, position - 1, 1)
        except Exception as exc:
            log.warning(
                "relay: ignoring %s=%r on the stream's last message (seq %s): %s (%r)",
                subjects.NOTIFICATION_ID, value, msg.seq, found, exc,
            )  # fmt: skip
            return 0
        if rows and rows[0][0] == position and _same_event(rows[0][1], record):
            return position
        stored = f"{rows[0][1].event_id} at {rows[0][0]}" if rows else "nothing"
        log.warning(
            "relay: ignoring %s=%s on the stream's last message (seq %s, %s on %s): the store "
            "holds %s there; resuming from the tracking record",
            subjects.NOTIFICATION_ID, value, msg.seq, found, msg.subject, stored,
        )  # fmt: skip
        return 0

    async def start_position(self) -> int:
        """Where publishing resumes: after the last event the stream holds (verified),
        which is ahead of the tracking record after a crash of the relay and behind it
        when the stream lost its newest events (LOOM_RUNS is not fsynced per message, so
        a crash of its host can drop them); the tracking record when the stream holds
        none of ours (empty, expired, or its last message is not believed)."""
        tracked = await self.io(self.store.position, self.name)
        published = await self._last_published()
        if published and published < tracked:
            log.warning(
                "relay: the stream holds events up to notification %d but %d were published "
                "before: publishing %d events again from the store",
                published, tracked, tracked - published,
            )  # fmt: skip
        return published or tracked

    def _reconnects(self) -> int:
        nc = getattr(self.js, "_nc", None)
        stats = getattr(nc, "stats", None)
        return int(stats.get("reconnects", 0)) if isinstance(stats, dict) else 0

    async def _check_after_reconnect(self) -> None:
        """After NATS reconnected (a restart of the server, maybe a crash), publish again
        whatever the stream lost of the events published lately: they were acked before
        being on disk (LOOM_RUNS persists asynchronously). The recent publishes are
        checked oldest first; from the first one the stream does not hold at its
        sequence, everything goes out again (the held ones come back as duplicates)."""
        seen = self._reconnects()
        if seen == self._reconnects_seen:
            return
        self._consumers_checked = False  # a restarted server may have lost the tail
        recent = list(self._recent)
        lost: int | None = None
        # What a crash loses is a suffix of what the old server acked, and no batch is
        # taken as published when a reconnect came between this check and its acks
        # (``_acks``): "held at its sequence" is true for a prefix of ``recent``, so the
        # newest is checked first (a clean restart lost nothing) and the boundary is
        # found by bisection, a dozen reads at most.
        if recent and not await self._holds(recent[-1]):
            lo, hi = 0, len(recent) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if await self._holds(recent[mid]):
                    lo = mid + 1
                else:
                    hi = mid
            lost = recent[lo][0]
            # publishes sent while the connection was down reach the new server when it
            # reconnects, before this check: they may sit at reused sequences, from
            # the first lost one on, that consumers already passed
            await self._drop_reused(recent[lo - 1][1] + 1 if lo else recent[0][1])
        self._recent = deque(maxlen=RECENT_MAX)
        self._reconnects_seen = seen  # checked: a failure above retries the check
        if lost is None:
            return
        if recent and lost == recent[0][0]:
            # even the oldest remembered is gone: go back to the stored lower bound too
            lost = min(lost, self.tracked + 1)
        log.warning(
            "relay: after a NATS reconnect the stream lacks events from notification %d "
            "(position %d): publishing them again", lost, self.position,
        )  # fmt: skip
        self.position = min(self.position, lost - 1)
        self.tracked = min(self.tracked, self.position)
        # Publishing them again under their own ids would meet the copies the reconnect
        # flushed (``_drop_reused`` deleted them, but JetStream remembers their ids):
        # dropped as duplicates, never delivered. Fresh ids for everything sent before.
        self._fresh = (self.position + 1, self._sent_up_to)
        self._fresh_token = uuid.uuid4().hex[:16]
        self._pending.clear()  # re-read from the store
        self._more_in_store = True

    async def run(self, stop: asyncio.Event) -> None:
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(self._resolve_waiter)
        try:
            await self._run(stop)
        finally:
            stopper.cancel()

    async def _run(self, stop: asyncio.Event) -> None:
        self._reconnects_seen = self._reconnects()
        self.position = self.tracked = await self.start_position()
        # what a previous process may have sent: at least up to its tracking record
        self._sent_up_to = max(self.position, await self.io(self.store.position, self.name))
        while not stop.is_set():
            self._wake.clear()
            before = self._reconnects()
            try:
                moved = await self.publish_once()
                metrics.EVENTS_PUBLISHED.inc(moved)
            except Exception as exc:  # NATS down or store hiccup: try again shortly
                log.warning("relay publish failed at %s: %r", self.position, exc)
                if self._reconnects() == before:
                    # at most RETRY_S, less if NATS comes back meanwhile: after a
                    # nats-server restart every run waits for this relay (issue 10, perf5)
                    await back_or_stop(getattr(self.js, "_nc", None), stop, RETRY_S)
                # else a reconnect came during the attempt (its acks were given up for
                # it): again at once, once per reconnect, so never a hot loop
                continue
            if moved and (self._pending or self._more_in_store):
                continue  # there may be more: drain before sleeping
            if await self._idle(stop):  # idle a while: record the position now
                try:
                    await self._track(force=True)
                except Exception as exc:
                    log.warning("relay could not record its position: %r", exc)

    async def _idle(self, stop: asyncio.Event) -> bool:
        """Wait for a wake, a stop, a NATS reconnect (noticed within RECONNECT_CHECK_S:
        what the stream lost goes out again at once) or ``idle_poll_s``; True for the
        last (the safety-net read of the store, for writers in other processes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.idle_poll_s
        while True:
            if self._wake.is_set() or stop.is_set():
                return False
            left = deadline - loop.time()
            if left <= 0:
                return True
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(min(left, RECONNECT_CHECK_S), self._resolve_waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if self._reconnects() != self._reconnects_seen:
                return False

    async def _drop_reused(self, first_lost_seq: int) -> None:
        """Delete what the stream holds from ``first_lost_seq`` on (after a reconnect that
        lost it; what is there now came from the reconnect's flush): copies of events the
        relay publishes again, under fresh ids. The stream keeps one copy of each."""
        info = await self.js.stream_info(subjects.RUN_EVENTS_STREAM)
        for seq in range(max(first_lost_seq, info.state.first_seq), info.state.last_seq + 1):
            try:
                await self.js.delete_msg(subjects.RUN_EVENTS_STREAM, seq)
            except NotFoundError:
                pass  # not there (lost, or deleted by an earlier try)
            except APIError as exc:
                if exc.err_code not in NOT_THERE_ERR_CODES:
                    raise

    async def _cover_consumers(self) -> None:
        """After nats-server lost the stream's newest messages (LOOM_RUNS persists
        asynchronously), the stream's end can be behind a durable consumer's position
        (stored separately, and kept): the next publishes would take sequence numbers that
        consumer already passed, and it would never deliver them (a run stuck at
        ``tool_call_requested``). Fillers on ``loom.run.gap``, which no consumer's filter
        matches, first take the stream past the furthest consumer."""
        info = await self.js.stream_info(subjects.RUN_EVENTS_STREAM)
        last = info.state.last_seq
        furthest = 0
        for consumer in await self.js.consumers_info(subjects.RUN_EVENTS_STREAM):
            for position in (consumer.delivered, consumer.ack_floor):
                if position is not None:
                    furthest = max(furthest, position.stream_seq or 0)
        if furthest <= last:
            return
        log.warning(
            "relay: stream %s ends at sequence %d but a consumer stands at %d (nats-server "
            "lost the stream's newest messages): publishing %d fillers before publishing again",
            subjects.RUN_EVENTS_STREAM, last, furthest, furthest - last,
        )  # fmt: skip
        data = msgspec.json.encode(StreamFiller(after_seq=last, up_to_seq=furthest))
        left = furthest - last
        while left > 0:
            chunk = min(left, FILL_CHUNK)
            futures = [await self.js.publish_async(subjects.RUN_GAP, data) for _ in range(chunk)]
            for ack in await self._acks(asyncio.gather(*futures, return_exceptions=True)):
                if isinstance(ack, BaseException):
                    raise ack
            left -= chunk

    async def publish_once(self) -> int:
        """Publish the next batch; returns how many events went out."""
        await self._check_after_reconnect()
        if not self._consumers_checked:
            await self._cover_consumers()
            self._consumers_checked = True
        rows = self._take_pending()
        if rows is None:
            rows = await self.io(self.store.read_notifications, self.position, self.batch)
            self._more_in_store = len(rows) == self.batch
        else:
            self._more_in_store = False
        if not rows:
            return 0
        # (nid, record, subject, data, msg id, answered, again) of each message written
        sent: list[tuple[int, EventRecord, str, bytes, str, bool, bool]] = []
        messages: list[tuple[str, bytes, bytes]] = []  # what the pipe writes
        skipped: list[tuple[EventRecord, ErrorInfo]] = []
        answered = _answered(rows)
        limit = getattr(getattr(self.js, "_nc", None), "max_payload", None)
        for notification_id, record in rows:
            kind = record.kind
            subject = subjects.run_event(record.run_id, kind)
            if bad_subject(subject):  # never publishable: skipped, not retried forever
                reason = f"has a subject NATS refuses ({subject!r}: a space or line break)"
                skipped.append((record, _unpublishable(record, reason)))
                continue
            try:
                data = codec.encode(record)
            except Exception as exc:  # the stored event cannot be said on the wire
                skipped.append((record, _unpublishable(record, f"cannot be encoded: {exc!r}")))
                continue
            mid = clean(msg_id(record, subject, data))  # the run id is in it
            if self._fresh[0] <= notification_id <= self._fresh[1]:
                mid = f"{mid}-{self._fresh_token}"  # still {run_id}/{seq}/{digest...}
            event = record.event
            answered_call = isinstance(event, ToolCallRequested) and (
                (record.run_id, event.idempotency_key) in answered
            )
            again = notification_id <= self._sent_up_to
            headers = _headers(mid, notification_id, kind, answered_call, again)
            too_large = self._too_large(record, len(headers) + len(data), limit)
            if too_large is not None:
                skipped.append((record, too_large))
                continue
            sent.append((notification_id, record, subject, data, mid, answered_call, again))
            messages.append((subject, headers, data))
        if self._pipe is None:
            self._pipe = PublishPipe(self.js._nc)
        # A publish whose ack never comes must not hang the relay: fail the batch and
        # retry it (Nats-Msg-Id makes the retry harmless).
        batch = await self._pipe.send(messages)
        if sent:
            self._sent_up_to = max(self._sent_up_to, sent[-1][0])
        acks = await self._acks(batch)
        for (nid, record, subject, data, mid, answered_call, again), ack in zip(
            sent, acks, strict=True
        ):
            if isinstance(ack, APIError) and ack.err_code in PERMANENT_ERR_CODES:
                skipped.append((record, _unpublishable(record, f"refused by JetStream: {ack}")))
            elif isinstance(ack, BaseException):
                raise ack  # transient: the whole batch again
            elif ack.duplicate:  # after a crash, a republish; else someone took our id
                sent_headers = {subjects.MSG_ID: mid, subjects.NOTIFICATION_ID: str(nid),
                                subjects.EVENT_TYPE: record.kind}  # fmt: skip
                if answered_call:
                    sent_headers[subjects.ANSWERED] = "1"
                if again:
                    sent_headers[AGAIN] = "1"
                await self._check_duplicate(subject, data, sent_headers, ack.seq)
        for record, error in skipped:  # before the position moves past them
            await self._alarm(record, error)
        # remembered to re-check after a reconnect: the stream acked them before its disk
        for (notification_id, _, _, _, mid, _, _), ack in zip(sent, acks, strict=True):
            if not isinstance(ack, BaseException) and not ack.duplicate:
                self._recent.append((notification_id, ack.seq, mid))
        self.position = rows[-1][0]
        await self._track(force=bool(skipped))  # a restart must not meet them again
        return len(rows)

    async def _holds(self, published: tuple[int, int, str]) -> bool:
        """Does the stream hold this publish (notification id, stream seq, msg id)?"""
        _, seq, mid = published
        try:
            held = await self.js.get_msg(subjects.RUN_EVENTS_STREAM, seq)
        except NotFoundError:
            return False
        return (held.headers or {}).get(subjects.MSG_ID) == mid

    def acks_pending(self) -> int:
        """Batches published whose acks have not all come (nor been given up)."""
        return self._pipe.pending() if self._pipe is not None else 0

    async def _acks(self, batch: asyncio.Future[list[Any]]) -> list[Any]:
        """A batch's publish acks (or exceptions). Raises TimeoutError after
        ``ack_timeout_s``, or at once when NATS reconnected meanwhile: acks of a server
        that died never come, and waiting them out stalled every run for the whole
        timeout after a restart (measured by bench/chaos.py: 10 s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout_s
        seen = self._reconnects_seen  # as of the check before this batch
        try:
            while True:
                if not batch.done():
                    await _done_or_after(batch, min(deadline - loop.time(), RECONNECT_CHECK_S))
                if batch.done() and self._reconnects() == seen:
                    return batch.result()
                if loop.time() >= deadline or self._reconnects() != seen:
                    raise TimeoutError("publish acks did not come (NATS reconnected or slow)")
        finally:
            if not batch.done():
                batch.cancel()
                # taken, so asyncio does not log it as "never retrieved" (an ERROR line
                # in every chaos run's executor log after a nats-server kill)
                batch.add_done_callback(_taken)

    @staticmethod
    def _too_large(record: EventRecord, size: int, limit: object) -> ErrorInfo | None:
        """``event_too_large`` when the message (payload and header block, as the server
        counts it) is over the connection's max_payload (``limit``): the server would
        close the connection on it."""
        if not isinstance(limit, int) or size <= limit:
            return None
        return ErrorInfo(
            code="event_too_large",
            message=f"event {record.event_id} ({record.kind}) is {size} bytes, over the "
            f"broker's max_payload of {limit} bytes; it stays in the store, unpublished",
            details={"event_id": record.event_id, "run_id": record.run_id,
                     "seq": record.seq, "event_type": record.kind, "size": size,
                     "limit": limit},
        )  # fmt: skip

    async def _alarm(self, record: EventRecord, error: ErrorInfo) -> None:
        """The typed alarm for an event that is skipped: an error log, a dead letter
        naming it (not its data), and the run told (the executor fails it)."""
        log.error("relay: skipping %s: %s", record.event_id, error.message)
        letter = msgspec.json.encode({
            "event_id": record.event_id, "run_id": record.run_id, "seq": record.seq,
            "type": record.kind,
        })  # fmt: skip
        await dead_letter(
            self.js, self.service, subjects.run_event(record.run_id, record.kind), error, letter
        )
        if self.on_unpublishable is not None:
            await self.on_unpublishable(record, error)

    async def _check_duplicate(
        self, subject: str, data: bytes, headers: dict[str, str], seq: int
    ) -> None:
        """JetStream dropped our publish as a duplicate of stream message ``seq``: fine if
        that message is ours; if not, publish ours again under an id no one can guess."""
        try:
            held = await self.js.get_msg(subjects.RUN_EVENTS_STREAM, seq)
        except NotFoundError:
            held = None
        if held is not None and held.subject == subject and held.data == data:
            return
        log.warning(
            "relay: %s was taken by another message (stream seq %s on %s); publishing the "
            "event again under a fresh id",
            headers[subjects.MSG_ID], seq, held.subject if held is not None else "nothing",
        )  # fmt: skip
        fresh = {**headers, subjects.MSG_ID: f"{headers[subjects.MSG_ID]}/{uuid.uuid4().hex}"}
        await self.js.publish(subject, data, headers=fresh)

    async def _track(self, force: bool = False) -> None:
        """Record the position at most every ``track_interval_s`` (one commit saved per
        batch): after a crash the stream's last notification id covers the gap."""
        now = asyncio.get_running_loop().time()
        if self.position > self.tracked and (
            force or now - self._tracked_at >= self.track_interval_s
        ):
            await self.io(self.store.set_position, self.name, self.position)
            self.tracked, self._tracked_at = self.position, now
