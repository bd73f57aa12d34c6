"""NATS JetStream plumbing shared by every service: connection, streams, durable pull
consumers with explicit acks, dead letters, and typed request/reply.

Delivery is at-least-once: a handler acks only after its effect is durable, naks with a
delay on a transient failure, and sends a message it can never process (cannot decode,
or failed ``MAX_DELIVER`` times) to ``loom.dlq.{service}`` with the reason, then
terminates it so it never loops hot (docs/design.md decision 5).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
import weakref
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from secrets import token_hex as secrets_token_hex
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    Header,
    KeyValueConfig,
    PersistMode,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.errors import APIError, NotFoundError

from loom_core import codec, partitions, routes, secrets, subjects, tenancy
from loom_core.contracts import DeadLetter, ErrorInfo, EventRecord
from loom_core.errors import LoomError
from loom_infra import metrics, nats_flush, nats_headers
from loom_infra.settings import DeliverySettings, OpsSettings

log = logging.getLogger("loom.bus")

nats_headers.install()  # every connection of this process parses headers faster (issue 10)
nats_flush.install()  # flush() returns once the server has read what came before it
T = TypeVar("T")

MAX_DELIVER = 5
# How long a fetched, unacked message waits before JetStream hands it to another consumer
# instance: after a crash this is the time to recovery (issue 10: under a second). A
# message being handled is kept by ``in_progress`` heartbeats every third of it
# (``PullConsumer``), so a handler may take as long as it needs while it lives: only a
# dead (or frozen for two heartbeats) process loses its messages to another.
# Read by the settings module when a process starts (LOOM_ACK_WAIT_S, ...) and installed
# here by the service runtime (``configure``): consumers are made deep inside every
# service. Nothing is read at import: a bad value is a SettingsError at start, not an
# import failure. Until ``configure``, the defaults.
_delivery = DeliverySettings()
ACK_WAIT_S = _delivery.ack_wait_s  # the default; ``delivery()`` is what is in force
# Messages a handler *holds* (timers, open waits: ``held_events``) are naked with a
# delay; their ack wait only bounds a crash between a fetch and the nak.
HELD_ACK_WAIT_S = _delivery.held_ack_wait_s  # the default, as ACK_WAIT_S
NAK_DELAY_S = 0.5
# the redelivery delay (per delivery) of a message whose handling failed for want of the
# NATS connection (a result publish cut by a nats-server restart): the reconnect is what
# it waited for, so again nearly at once; still a delay, so a flapping link cannot spin
OUTAGE_NAK_DELAY_S = 0.05
DLQ_PAYLOAD_LIMIT = 64 * 1024

DAY_S = 24 * 3600.0
REJECTS_STREAM = routes.REJECTED.stream or "LOOM_REJECTS"
REJECT_PAYLOAD_LIMIT = 4 * 1024  # a client's typo is shown, not archived


class PartitionCountChanged(LoomError):
    """LOOM_PARTITIONS differs from the count the inbox stream was made with."""

    code = "partition_count_changed"

    def __init__(self, have: int, wanted: int) -> None:
        if have == 0:  # provisioned by a version before partitions
            super().__init__(
                f"stream {subjects.INBOX_STREAM} has no partition transform: provision the "
                "streams with this version first (`loom up`, `loom creds provision` or the "
                "provisioning Job); inbox messages stored before are moved to their "
                "partitions by the executors"
            )
            return
        super().__init__(
            f"LOOM_PARTITIONS is {wanted} but this system's runs are partitioned in {have} "
            f"(stream {subjects.INBOX_STREAM}): a run's partition must not change while it "
            f"runs. Set LOOM_PARTITIONS={have}, or change the count only on a drained system "
            "(docs/partitions.md: changing the partition count)"
        )


def configure(delivery: DeliverySettings) -> None:
    """Install the delivery settings this process read at start (``Stack.start``)."""
    global _delivery
    _delivery = delivery


def delivery() -> DeliverySettings:
    """The delivery settings in force (``configure``; the defaults before it)."""
    return _delivery


def stream_configs(ops: OpsSettings | None = None) -> tuple[StreamConfig, ...]:
    """Every stream with its retention limits (``OpsSettings``). Every stream is bounded
    in age and bytes: JetStream is a transport, the store is the truth.

    LOOM_RUNS and LOOM_INBOX discard *new* messages when full: a refused publish is
    retried and shows as relay lag (readiness), where discarding old ones would silently
    drop a held timer or an unread result. The DLQ and the rejects record keep the
    newest."""
    ops = ops or OpsSettings()
    max_bytes = ops.stream_max_bytes
    replicas = ops.stream_replicas
    streams = (
        StreamConfig(
            name=subjects.RUN_EVENTS_STREAM,
            # A copy of the store (the truth), republished from it by the relay: no fsync
            # per event (issue 10; the relay re-checks what the stream holds after a NATS
            # restart, loom_infra.relay). LOOM_RUNS_PERSIST=default fsyncs every event.
            # Replicated, the replicas are its durability, and the server refuses async
            # persistence on a replicated stream (nats-server 2.15: measured).
            # LOOM_RUNS_PERSIST: "async" (acked before it is on disk; R1 streams,
            # nats-server >= 2.12) or "default" (fsynced per message when the server
            # syncs always)
            persist_mode=PersistMode(ops.runs_persist) if replicas == 1 else PersistMode.DEFAULT,
            subjects=[subjects.RUN_EVENTS_ALL],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            # The relay's own position makes republishing exact; the window only needs
            # to cover a crash between a publish and the tracking write.
            duplicate_window=600.0,
            # timers and waits are held messages here: the age must outlast the longest
            max_age=ops.runs_max_age_days * DAY_S,
            max_bytes=max_bytes,
            discard=DiscardPolicy.NEW,
        ),
        StreamConfig(
            name=subjects.INBOX_STREAM,
            subjects=[subjects.INBOX_ALL],
            # the server stamps each run's partition into the stored subject, so each
            # executor replica consumes only its own partitions (loom_core.partitions)
            subject_transform=SubjectTransform(*partitions.inbox_transform(ops.partitions)),
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            duplicate_window=600.0,
            max_age=7 * DAY_S,
            max_bytes=max_bytes,
            discard=DiscardPolicy.NEW,
        ),
        StreamConfig(
            name=subjects.SIGNALS_STREAM,
            # tenants' signals too (loom.t.<tenant>.signal.>: loom_core.tenancy)
            subjects=[subjects.SIGNALS_ALL, tenancy.twin(subjects.SIGNALS_ALL, "*")],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            max_msgs_per_subject=1,  # the latest event per name and key is what waits see
            max_age=7 * DAY_S,
            max_bytes=min(max_bytes, 1024**3),
            duplicate_window=600.0,
        ),
        StreamConfig(
            name=subjects.DLQ_STREAM,
            subjects=[subjects.DLQ_ALL],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            max_age=30 * DAY_S,
            max_bytes=min(max_bytes, 1024**3),
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=REJECTS_STREAM,
            subjects=[routes.REJECTED.wildcard],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            max_age=7 * DAY_S,
            max_msgs=ops.rejects_max_msgs,
            max_bytes=min(max_bytes, 256 * 1024**2),
            discard=DiscardPolicy.OLD,
        ),
    )
    # LOOM_STREAM_REPLICAS: 3 on a 3-node cluster, so losing a node loses no acked message
    return tuple(dataclasses.replace(s, num_replicas=replicas) for s in streams)


STREAMS = stream_configs()

# What provisioning sets on an existing stream, and how (``merge_stream``).
_FLOORS = ("num_replicas", "duplicate_window")  # raised to ours, never lowered
_LIMITS = ("max_age", "max_bytes", "max_msgs")  # ours only where none is set
_OURS = ("max_msgs_per_subject", "retention")  # what the code relies on


def _finished(
    tasks: set[asyncio.Task[None]], freed: asyncio.Event, task: asyncio.Task[None]
) -> None:
    tasks.discard(task)
    freed.set()


def _unset(value: Any) -> bool:
    return value in (None, 0, -1)


def merge_stream(existing: StreamConfig, wanted: StreamConfig) -> StreamConfig | None:
    """The config to update ``existing`` to so it has what we require, keeping whatever
    an operator set (replicas, limits, description, placement, ...); None when it
    already does. We add subjects and raise floors; a limit is added only where there is
    none (an operator's tighter or looser limit is their decision)."""
    changes: dict[str, Any] = {}
    have = list(existing.subjects or [])
    missing = [s for s in wanted.subjects or [] if s not in have]
    if missing:
        changes["subjects"] = have + missing
    for name in _FLOORS:
        ours, theirs = getattr(wanted, name), getattr(existing, name)
        if not _unset(ours) and (_unset(theirs) or theirs < ours):
            changes[name] = ours
    for name in _LIMITS:
        ours, theirs = getattr(wanted, name), getattr(existing, name)
        if not _unset(ours) and _unset(theirs):
            changes[name] = ours
    for name in _OURS:
        ours = getattr(wanted, name)
        if not _unset(ours) and getattr(existing, name) != ours:
            changes[name] = ours
    # JetStream refuses a duplicate window longer than the age limit
    max_age = changes.get("max_age", existing.max_age)
    window = changes.get("duplicate_window", existing.duplicate_window)
    if not _unset(max_age) and window and window > max_age:
        changes["duplicate_window"] = max_age
    transform = _merged_transform(existing, wanted)
    if transform is not None:
        changes["subject_transform"] = transform
    if not changes:
        return None
    return dataclasses.replace(existing, **changes)


def _merged_transform(existing: StreamConfig, wanted: StreamConfig) -> SubjectTransform | None:
    """The partition transform to add to an existing stream (None: nothing to do). A
    stream partitioned with another count is never re-partitioned here: refused."""
    ours = wanted.subject_transform
    if ours is None:
        return None
    theirs = existing.subject_transform
    if theirs is None or not theirs.dest:
        return ours
    have = partitions.count_of_transform(theirs.dest)
    want = partitions.count_of_transform(ours.dest)
    if have is not None and want is not None and have != want:
        raise PartitionCountChanged(have, want)
    return None


_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
)

# what a handler fails with when the connection dropped under it (``publish_acked``'s
# ConnectionError, nats-py's own): not the message's fault (see OUTAGE_NAK_DELAY_S)
_OUTAGE_ERRORS = (
    ConnectionError,
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
)


class _ConnectionEvents:
    """The asynchronous callbacks of one connection. A refusal (``Permissions
    Violation``: the only trace of a denied JetStream call, which otherwise ends as a bare
    TimeoutError) and any other async error is logged at warning with who hit it; while
    the server is unreachable, one warning per outage instead of one per retry;
    disconnects and closes are routine and stay quiet."""

    def __init__(self, who: str, on_error: Callable[[Exception], None] | None) -> None:
        self.who = who
        self.on_error = on_error
        self.down = False
        # set at each disconnect, then replaced: whoever waits for replies the lost
        # server will never send takes the current one (see wait_acks)
        self.lost = asyncio.Event()
        # set at each reconnect, then replaced: whoever backs off after a failure the
        # outage caused takes the current one and goes on at once (see ``back_or_stop``)
        self.back = asyncio.Event()
        # open pull requests on this connection: a restarted server forgot them, so each
        # is woken at a reconnect to ask again (else it waits out PULL_EXPIRES_S)
        self.pulls: weakref.WeakSet[OpenPull] = weakref.WeakSet()

    async def disconnected(self) -> None:
        self.lost.set()
        self.lost = asyncio.Event()

    async def error(self, exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, _CONNECTION_ERRORS) and "violation" not in text.lower():
            (log.debug if self.down else log.warning)("%s: NATS unreachable: %r", self.who, exc)
            self.down = True
        elif "violation" in text.lower():
            log.warning("%s: NATS refused: %s", self.who, text.removeprefix("nats: "))
        else:
            log.warning("%s: NATS error: %s", self.who, text)
        if self.on_error is not None:
            self.on_error(exc)

    async def reconnected(self) -> None:
        if self.down:
            log.info("%s: reconnected to NATS", self.who)
        self.down = False
        self.back.set()
        self.back = asyncio.Event()
        for pull in list(self.pulls):
            pull.wake()

    async def quiet(self) -> None:
        return None


def _seed_option(seed: str | os.PathLike[str]) -> dict[str, str]:
    """A seed value (``SU…``, 58 characters) or the path of a file holding one."""
    text = os.fspath(seed).strip()
    if len(text) == 58 and text.startswith("SU") and text.isalnum():
        return {"nkeys_seed_str": text}
    if not os.path.isfile(text):
        raise FileNotFoundError(f"NATS nkey seed file {text} not found (LOOM_NKEY_SEED_FILE)")
    return {"nkeys_seed": text}  # read at each (re)connect: a rotated file is picked up


async def connect(
    url: str,
    name: str,
    persistent: bool = True,
    *,
    seed: str | os.PathLike[str] | None = None,
    identity: str | None = None,
    on_error: Callable[[Exception], None] | None = None,
) -> NATS:
    """Services reconnect forever (``persistent``); a CLI or client gives up quickly so
    a stack that is not running is reported instead of waited for.

    ``seed``: the nkey user seed to authenticate with (a file path or the value); None
    connects without credentials (only an insecure development server accepts that).
    ``identity``: the route identity connecting; its replies come to
    ``_INBOX.<identity>.…``, the only inbox its permissions let it read.
    ``on_error``: also told every asynchronous error (after it is logged)."""
    events = _ConnectionEvents(identity or name, on_error)
    options: dict[str, Any] = _seed_option(seed) if seed is not None else {}
    if identity is not None:
        options["inbox_prefix"] = f"_INBOX.{identity}"
    nc = await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1 if persistent else 2,
        reconnect_time_wait=0.2,
        connect_timeout=5 if persistent else 2,
        allow_reconnect=persistent,
        error_cb=events.error,
        disconnected_cb=events.disconnected,
        closed_cb=events.quiet,
        reconnected_cb=events.reconnected,
        **options,
    )
    _EVENTS[nc] = events
    return nc


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Take a given-up future's outcome, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


async def publish_acked(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> Any:
    """``js.publish`` (wait for the stream's ack), but ConnectionError at once when the
    connection drops while the ack is pending, instead of waiting out ``timeout`` for
    an ack a killed server will never send (see :func:`wait_acks`)."""
    # sent from this task, now (``publish_async``; a ``js.publish`` task went out a loop
    # turn later, through a request of its own: issue 10, perf3); the same ack or error
    sent = await js.publish_async(subject, data, headers=headers)
    (ack,) = await wait_acks(js, [sent], timeout)
    if isinstance(ack, BaseException):
        raise ack
    return ack


def publish_soon(nc: NATS, subject: str, data: bytes) -> None:
    """A plain publish (no reply subject, no headers) put in the connection's outgoing
    buffer now, without a coroutine, for a future's done-callback: nats-py's ``publish``
    never suspends for such a message, but calling it from a callback costs a task (the
    executor's receipt of each direct tool result, issue 10, hopcpu). The connection's
    flusher writes it with whatever else is pending, in one socket write, as it writes a
    ``publish``. Raises what nats-py's publish raises (closed, draining, the reconnect
    buffer full, a bad subject, too large), writing nothing. nats-py 2.16's
    ``_pending``, ``_flush_queue`` and ``_flusher_task`` (pinned; the direct dispatch
    tests fail first if an upgrade changes them)."""
    if _buffered(nc, subject, data):
        _kick_flusher(nc)


def _buffered(nc: NATS, subject: str, data: bytes, reply: str = "") -> bool:
    """Put a PUB (no headers) in the connection's outgoing buffer (see ``publish_soon``);
    False when not connected (the reconnect's flush sends it, as a publish meanwhile)."""
    command = _pub_command(nc, subject, data, reply)
    nc._pending.append(command)
    nc._pending_data_size += len(command)
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += len(data)
    return nc.is_connected


def _kick_flusher(nc: NATS) -> None:
    """Have the connection's flusher write what is pending, at its next turn."""
    flusher = nc._flusher_task
    if flusher is None or flusher.done():  # as nats-py's _flush_pending: write it here
        _write_pending(nc)
        return
    queue = nc._flush_queue
    if queue is not None and queue.empty():  # else a flush is queued: it writes this too
        queue.put_nowait(asyncio.get_running_loop().create_future())


def _write_pending(nc: NATS) -> None:
    """Write what the connection has pending to its socket now, in order, in one
    ``writelines``, as its flusher does (nothing without a transport: not connected)."""
    transport = nc._transport
    if transport is not None:
        transport.writelines(nc._pending[:])
        nc._pending = []
        nc._pending_data_size = 0


_NO_RESPONDERS = "503"  # the status nats-server answers a request nobody listens to


async def request_now(nc: NATS, subject: str, data: bytes, timeout: float) -> Msg:
    """nats-py's request (its connection's one response subscription and token scheme),
    with the request written to the socket now, with whatever is pending (the acks
    waiting in the buffer), instead of at the flusher's next loop turn, and the reply
    awaited under a timeout scope instead of ``wait_for`` (its second future and
    callback): the tool-runner's direct result, once per call (issue 10, runnercpu).
    Raises as nats-py's request: ``nats.errors.TimeoutError``, ``NoRespondersError``,
    and what a publish raises. nats-py 2.16's ``_resp_sub_prefix``, ``_resp_map``,
    ``_nuid`` and ``_init_request_sub`` (pinned, as ``publish_soon``'s internals; the
    direct dispatch tests fail first if an upgrade changes them)."""
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    if not nc._resp_sub_prefix:
        await nc._init_request_sub()
    assert nc._resp_sub_prefix
    token = nc._nuid.next()
    token.extend(secrets_token_hex(2).encode())
    inbox = nc._resp_sub_prefix[:]
    inbox.extend(token)
    key = token.decode()
    future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
    nc._resp_map[key] = future
    try:
        if _buffered(nc, subject, data, inbox.decode()):
            _write_pending(nc)
        async with asyncio.timeout(timeout):
            msg = await future
    except TimeoutError:
        raise nats.errors.TimeoutError from None
    finally:
        nc._resp_map.pop(key, None)
    if msg.headers and msg.headers.get(Header.STATUS) == _NO_RESPONDERS:
        raise nats.errors.NoRespondersError
    return msg


def publish_lazily(nc: NATS, subject: str, data: bytes, within_s: float) -> None:
    """``publish_soon`` for a message nobody waits for (an ack): put in the outgoing
    buffer, but the flusher is not woken for it; it goes out with the connection's next
    write (the next publish's), or ``within_s`` from now at the latest (one timer per
    connection). The tool-runner's ack of each request then rides in the socket write of
    the next call's result instead of a write (and a nats-server read) of its own
    (issue 10, runnercpu). Raises as ``publish_soon``."""
    if not _buffered(nc, subject, data) or nc in _LAZY:
        return
    _LAZY[nc] = asyncio.get_running_loop().call_later(within_s, _lazy_due, nc)


def _lazy_due(nc: NATS) -> None:
    del _LAZY[nc]
    if nc._pending and nc.is_connected and not nc.is_closed:
        _kick_flusher(nc)


# the connections with lazily buffered messages, and the timer that writes them at the latest
_LAZY: weakref.WeakKeyDictionary[NATS, asyncio.TimerHandle] = weakref.WeakKeyDictionary()


# what nats-py refuses in a subject (a space or a line break would break the protocol)
BAD_SUBJECT = re.compile(r"[ \t\r\n]")


class _Inline:
    """Stands in for a plain subscription's pending queue (nats-py 2.16's
    ``Subscription._pending_queue``, pinned): each message nats-py's reader puts on it is
    handed to ``handle`` at once, in the reader's own turn, instead of being queued for
    the subscription's task, which then wakes, takes it and calls the callback's
    coroutine. Only for handlers that never wait. Nothing is ever queued here, so what
    nats-py asks of the queue (its size, empty, ``join`` when draining) says so; a
    ``get`` (the task of a subscription made with a callback) waits for ever."""

    __slots__ = ("handle", "sub")

    def __init__(self, sub: Any, handle: Callable[[Msg], None]) -> None:
        self.sub = sub
        self.handle = handle

    def put_nowait(self, msg: Msg) -> None:
        self.sub._pending_size -= len(msg.data)  # counted by nats-py just before
        _handled(self.handle, msg)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def full(self) -> bool:
        return False

    def task_done(self) -> None:
        return None

    def get_nowait(self) -> Msg:
        raise asyncio.QueueEmpty

    async def get(self) -> Msg:
        await asyncio.get_running_loop().create_future()  # nothing ever comes
        raise AssertionError("unreachable")

    async def join(self) -> None:
        return None


def _handled(handle: Callable[[Msg], None], msg: Msg) -> None:
    try:
        handle(msg)
    except Exception:  # never into nats-py's reader: it would end the connection's reads
        log.exception("handling a message on %s failed", msg.subject)


def deliver_inline(sub: Any, handle: Callable[[Msg], None]) -> None:
    """Hand each message of the plain subscription ``sub`` to ``handle`` (which must not
    wait, nor raise: an exception is logged) as nats-py's reader parses it, without the
    subscription's queue and task (issue 10, stackcpu: ~10 us of the executor's CPU per
    message: the relay's five publish acks and the direct tool result of every step).
    What the queue already holds is handed over first, in order. A subscription made
    with a callback keeps its task, waiting on nothing, until it is unsubscribed."""
    queue = sub._pending_queue
    if isinstance(queue, _Inline):
        queue.handle = handle
        return
    sub._pending_queue = _Inline(sub, handle)
    while not queue.empty():
        msg = queue.get_nowait()
        sub._pending_size -= len(msg.data)
        _handled(handle, msg)


async def subscribe_inline(nc: NATS, subject: str, handle: Callable[[Msg], None]) -> Any:
    """A plain subscription to ``subject`` whose messages go to ``handle`` as they are
    parsed (``deliver_inline``); no task of its own."""
    sub = await nc.subscribe(subject)
    deliver_inline(sub, handle)
    return sub


def _pub_command(nc: NATS, subject: str, data: bytes, reply: str = "") -> bytes:
    """nats-py's PUB command for a publish without headers, after its checks (closed,
    draining, the reconnect buffer full, a bad subject or reply, too large: raised as
    nats-py raises them)."""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    if not subject or BAD_SUBJECT.search(subject) is not None:
        raise nats.errors.BadSubjectError
    if reply and BAD_SUBJECT.search(reply) is not None:
        raise nats.errors.BadSubjectError
    size = len(data)
    if not nc.is_connected and (
        nc._max_pending_size <= 0 or size + nc._pending_data_size > nc._max_pending_size
    ):
        raise nats.errors.OutboundBufferLimitError
    if size > nc._max_payload:
        raise nats.errors.MaxPayloadError
    return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), size, data)


async def publish_now(nc: NATS, subject: str, data: bytes) -> bool:
    """A plain publish that is on the socket when this returns, not at the connection's
    flusher's next turn: the caller is about to block the loop (the SQLite commit, issue
    10) and the message must travel meanwhile. Returns False when it could not be written
    now (not connected, refused by nats-py's checks, or a write error): it goes out with
    a later flush or is lost with the connection, so only for messages with a durable
    fallback. Writes what the connection had pending first, in order, as its
    flusher does, in one ``writelines``, without nats-py's ``publish`` (which also woke
    the flusher for nothing: its queue's future and a task step per call; issue 10,
    stackcpu). nats-py 2.16's ``_pending``/``_transport`` (pinned; the direct dispatch
    tests fail first if an upgrade changes them). Never suspends."""
    if not nc.is_connected or nc._transport is None:
        return False
    try:
        _buffered(nc, subject, data)
        _write_pending(nc)
    except Exception as exc:  # the stream copy is the command; this is only a shortcut
        log.debug("publish_now on %s failed: %r", subject, exc)
        return False
    return True


# the callbacks of each connection made by ``connect`` (wait_acks reads its disconnects)
_EVENTS: weakref.WeakKeyDictionary[NATS, _ConnectionEvents] = weakref.WeakKeyDictionary()


async def wait_acks(
    js: JetStreamContext, acks: Sequence[Awaitable[Any]], timeout: float
) -> list[Any]:
    """The results (or exceptions) of pipelined ``publish_async`` acks, like
    ``gather(return_exceptions=True)``, bounded by ``timeout`` (TimeoutError). When the
    connection drops meanwhile, ConnectionError at once: nats-py never fails a pending
    ``publish_async`` future on a disconnect, and a server killed before it acked will
    never ack, so without this the caller waits out the whole timeout (the relay's 10 s
    stall after a nats-server kill, seen in the chaos suite) before publishing again."""
    gathered = asyncio.gather(*acks, return_exceptions=True)
    events = _EVENTS.get(getattr(js, "_nc", None))  # type: ignore[arg-type]  # None finds nothing
    if events is None:  # a connection not made by ``connect``: the timeout only
        return await asyncio.wait_for(gathered, timeout)
    lost = asyncio.ensure_future(events.lost.wait())
    try:
        waited: set[asyncio.Future[Any]] = {gathered, lost}
        done, _ = await asyncio.wait(waited, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
    if gathered in done:
        return gathered.result()
    gathered.cancel()  # cancels the pending futures too, which frees their slots
    gathered.add_done_callback(_retrieved)
    if lost in done:
        raise ConnectionError("the NATS connection dropped while publish acks were pending")
    raise TimeoutError(f"publish acks not received in {timeout}s")


async def ensure_streams(js: JetStreamContext, ops: OpsSettings | None = None) -> None:
    """Create each stream, or bring an existing one up to what we require without
    undoing an operator's settings (``merge_stream``)."""
    for config in stream_configs(ops):
        try:
            assert config.name is not None  # every config we declare is named
            info = await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
            continue
        merged = merge_stream(info.config, config)
        if merged is not None:
            await js.update_stream(merged)


async def ensure_kv(js: JetStreamContext, bucket: str, replicas: int = 1, **config: Any) -> Any:
    """A KV bucket of one value per key (history 1), created if missing with ``replicas``
    (LOOM_STREAM_REPLICAS) and any other ``KeyValueConfig`` field (a TTL, a marker TTL).
    Every bucket of the stack is opened through this, so they are all made alike."""
    try:
        return await js.key_value(bucket)
    except Exception:  # bucket not found; nats-py raises BucketNotFoundError
        return await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=1, replicas=replicas, **config)
        )


async def watch_from_now(kv: Any, apply: Callable[[Any], object], timeout: float = 5.0) -> Any:
    """A watcher on every key of ``kv``, after ``apply`` has seen each current value (the
    watcher sends None once it has delivered them): the caller's view is complete before
    it acts, and the returned watcher goes on with every later change."""
    watcher = await kv.watchall()
    while (entry := await watcher.updates(timeout=timeout)) is not None:
        apply(entry)
    return watcher


async def ensure_tools_bucket(js: JetStreamContext, replicas: int = 1) -> Any:
    """The tool catalog bucket; created (``replicas``: LOOM_STREAM_REPLICAS) if missing."""
    return await ensure_kv(js, subjects.TOOLS_BUCKET, replicas)


MODEL_ANSWERS_TTL_S = 86_400.0  # a redelivery comes within the ack wait; a day is ample


async def ensure_model_answers_bucket(js: JetStreamContext, replicas: int = 1) -> Any:
    """The planner's model answers (created by provisioning; ``replicas``:
    LOOM_STREAM_REPLICAS)."""
    return await ensure_kv(js, subjects.MODEL_ANSWERS_BUCKET, replicas, ttl=MODEL_ANSWERS_TTL_S)


def tool_key(name: str) -> str:
    """The tools bucket's key of a tool: its name, with an MCP tool's ``server.tool`` dot
    as ``/`` (a dot would split the key into two subject tokens; readers use
    ``spec.name``). Every get of one tool by name goes through this."""
    return name.replace(".", "/")


def now() -> datetime:
    return datetime.now(UTC)


async def dead_letter(
    js: JetStreamContext,
    service: str,
    origin_subject: str,
    error: ErrorInfo,
    payload: bytes,
    deliveries: int = 1,
    *,
    rejected: bool = False,
) -> None:
    """Record a message a service cannot process on ``loom.dlq.{service}`` (poison), or,
    with ``rejected``, a client's mistake on ``loom.rejects.{service}`` (bounded, payload
    truncated harder): an operator looking for poison does not wade through typos."""
    # Both are streams: inline secrets are redacted before the copy is stored (JSON: by
    # key and pattern; anything else: key/value forms and patterns in the raw text).
    try:
        text = msgspec.json.encode(secrets.redact_value(msgspec.json.decode(payload))[0])
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # deeper than msgspec
        text = secrets.scrub_raw_text(payload.decode("utf-8", errors="replace")).encode()
    details, _ = secrets.redact_value(error.details)
    error = msgspec.structs.replace(
        error, message=secrets.scrub_raw_text(error.message), details=details
    )
    limit = REJECT_PAYLOAD_LIMIT if rejected else DLQ_PAYLOAD_LIMIT
    letter = DeadLetter(
        origin_subject=origin_subject,
        service=service,
        error=error,
        payload=text[:limit].decode("utf-8", errors="ignore"),
        at=now(),
        deliveries=deliveries,
    )
    subject = (
        routes.REJECTED.subject(service=service) if rejected else subjects.dead_letter(service)
    )
    await js.publish(
        subject,
        codec.encode(letter),
        headers={subjects.DLQ_REASON: f"{error.code}: {error.message}"[:200]},
    )
    if rejected:
        log.debug("rejected by %s on %s: %s", service, origin_subject, error.code)
    else:
        metrics.DEAD_LETTERS.inc(service=service)
        log.warning("dead letter from %s on %s: %s", service, origin_subject, error.code)


class RejectRecorder:
    """Records rejected requests off the request path: ``offer`` never waits (the
    rejection was answered already); a background task publishes them one at a time. A
    bounded queue: when a burst of bad requests outruns the recorder, new rejections are
    dropped, counted (``loom_rejects_dropped_total``) and logged, never queued without
    limit and never in the way of a good request."""

    def __init__(self, js: JetStreamContext, service: str, maxsize: int = 1000) -> None:
        self.js = js
        self.service = service
        self.queue: asyncio.Queue[tuple[str, ErrorInfo, bytes]] = asyncio.Queue(maxsize)
        self.dropped = 0
        metrics.QUEUE_DEPTH.set_function(self.queue.qsize, queue="rejects", service=service)

    def offer(self, origin_subject: str, error: ErrorInfo, payload: bytes) -> bool:
        metrics.REJECTIONS.inc(service=self.service, code=error.code)
        try:
            # the payload is cut here: a queue of large bodies would be unbounded memory
            self.queue.put_nowait((origin_subject, error, payload[: 4 * REJECT_PAYLOAD_LIMIT]))
        except asyncio.QueueFull:
            self.dropped += 1
            metrics.REJECTS_DROPPED.inc(service=self.service)
            if self.dropped == 1 or self.dropped % 1000 == 0:  # one line per burst, not each
                log.warning(
                    "%s: rejection record full (%d queued): %d rejection(s) not recorded "
                    "(LOOM_REJECTS_QUEUE)", self.service, self.queue.maxsize, self.dropped,
                )  # fmt: skip
            return False
        return True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            subject, error, payload = await self.queue.get()
            try:
                await dead_letter(self.js, self.service, subject, error, payload, rejected=True)
            except Exception as exc:  # NATS down: the record is best effort, the answer was not
                log.warning("%s: could not record a rejection: %r", self.service, exc)
                await wait_or_timeout(stop, 0.5)


def decode_error_info(exc: Exception, code: str = "invalid_message") -> ErrorInfo:
    if isinstance(exc, msgspec.ValidationError):
        text = str(exc)
        path = text.rsplit("- at `", 1)[1].rstrip("`") if "- at `" in text else None
        return ErrorInfo(code="invalid_shape", message=text, path=path)
    if isinstance(exc, msgspec.DecodeError):
        return ErrorInfo(code="malformed_json", message=f"not valid JSON: {exc}")
    return ErrorInfo(code=code, message=f"{type(exc).__name__}: {exc}")


class Poison(LoomError):
    """Raised by a handler for a message that can never succeed; it goes to the DLQ."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


class Later(LoomError):
    """A handler's answer for a message it leaves for now: deliver it again in
    ``delay_s`` (a nak with that delay, counted as a delivery)."""

    code = "unavailable"
    retryable = True

    def __init__(self, delay_s: float) -> None:
        super().__init__(f"put back for {delay_s:.3f}s")
        self.delay_s = delay_s


E = TypeVar("E")


def expect_event(msg: Msg, kind: type[E]) -> tuple[EventRecord, E]:
    """Decode a run event of the kind a consumer subscribed to; anything else is Poison."""
    try:
        record = codec.decode_event(msg.data)
    except Exception as exc:
        raise Poison(decode_error_info(exc)) from exc
    if not isinstance(record.event, kind):
        raise Poison(
            ErrorInfo(
                code="unexpected_event",
                message=f"expected {kind.__name__} on {msg.subject}, got '{record.kind}'",
            )
        )
    return record, record.event


BatchHandler = Callable[[Sequence[Msg]], Awaitable[Sequence[bool | BaseException]]]
MessageHandler = Callable[[Msg], Awaitable[bool | BaseException]]
# A consumer's synchronous look at a message before it gets a task (``PullConsumer.quick``):
# True (ack it now), a future whose result settles it as a handler's would, or None (the
# ``message_handler`` takes it, in a task of its own)
QuickHandler = Callable[[Msg], "bool | asyncio.Future[bool | BaseException] | None"]


# How long one pull request stays open (``OpenPull``): as nats-py's fetch(timeout=1.0)
PULL_EXPIRES_S = 1.0
# an open request this close to its expiry is renewed before waiting on it
PULL_RENEW_S = 0.05
# put on a pull's queue at a reconnect (``OpenPull.wake``); taken and dropped
_WAKE: Any = object()


class OpenPull:
    """The fetches of a pull consumer served by one open pull request instead of two per
    fetch (issue 10, perf3). nats-py's ``fetch`` sends a ``no_wait`` probe, takes its
    404 and sends a lingering request on every call, and waits for each message with a
    task, a ``wait_for`` and a ``uuid4``: a consumer taking one message per step (the
    executor's inbox, the tool-runner's requests) paid two requests per message. Here a
    request for ``batch`` messages stays open until used up, expired (``PULL_EXPIRES_S``),
    ended by the server (a 408/409 status) or lost with the connection (a reconnect), and
    each fetch takes what the subscription's queue holds.

    What a message delivered under the open request while the handler runs waits for is
    the next fetch: as with nats-py's lingering request, its ack wait runs meanwhile.

    A reconnect wakes a waiting fetch (``wake``), which asks again at once: a restarted
    nats-server forgot the open request, and waiting for it to expire delayed every
    consumer's first message after the restart by up to PULL_EXPIRES_S (issue 10, perf5:
    the chaos suite's nats recovery, max 1.2 s)."""

    def __init__(self, psub: Any) -> None:
        self.psub = psub
        self.sub = psub._sub  # the deliver subject's subscription (nats-py internals)
        self.queue: asyncio.Queue[Msg] = self.sub._pending_queue
        self.left = 0  # messages the open request may still deliver
        self.until = 0.0  # when it expires (loop time)
        self.reconnects = _reconnects(psub._nc)
        events = _EVENTS.get(psub._nc)
        if events is not None:  # a connection made by ``connect``
            events.pulls.add(self)

    def wake(self) -> None:
        """Wake a fetch waiting on the queue, so it sees the reconnect and asks again."""
        self.queue.put_nowait(_WAKE)  # a marker, never handed to a caller

    async def close(self) -> None:
        """Stop the deliveries to this pull's inbox (the durable consumer stays, with what
        it has not settled): a consumer that stopped (a partition lost), was cancelled or
        failed left its inbox subscribed, one more each time a new one started."""
        with suppress(Exception):  # a closed connection has no subscription left
            await self.psub.unsubscribe()

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        msgs = self._drain(batch)
        while not msgs:
            now = loop.time()
            if now >= deadline:
                raise TimeoutError
            seen = _reconnects(self.psub._nc)
            if self.left <= 0 or now >= self.until - PULL_RENEW_S or seen != self.reconnects:
                self.reconnects = seen
                await self._request(batch, now)
            try:
                # a timeout scope, not ``asyncio.wait_for``: on Python 3.11 that returns
                # the message when the task's cancel comes just after the message did
                # (see raise_if_cancelled: cleanstop), and it wraps the get in a task of
                # its own on every wait of every pull (hopcpu)
                async with asyncio.timeout(max(0.0, min(deadline, self.until) - now)):
                    msg = await self.queue.get()
            except TimeoutError:
                continue
            self._take(msg, msgs)
            msgs += self._drain(batch - len(msgs))
        return msgs

    async def _request(self, batch: int, now: float) -> None:
        self.left, self.until = batch, now + PULL_EXPIRES_S
        request = msgspec.json.encode(
            {"batch": batch, "expires": int((PULL_EXPIRES_S - 0.001) * 1_000_000_000)}
        )
        await self.psub._nc.publish(self.psub._nms, request, self.psub._deliver)

    def _drain(self, room: int) -> list[Msg]:
        msgs: list[Msg] = []
        while len(msgs) < room and not self.queue.empty():
            self._take(self.queue.get_nowait(), msgs)
        return msgs

    def _take(self, msg: Msg, msgs: list[Msg]) -> None:
        if msg is _WAKE:
            return
        self.sub._pending_size -= len(msg.data)
        status = JetStreamContext.is_status_msg(msg)
        if not status:
            self.left -= 1
            msgs.append(msg)
        elif JetStreamContext._is_temporary_error(status):  # 404/408/409: it ended
            self.left = 0
        elif status != "100":  # not a heartbeat: a refusal (e.g. 503, no consumer)
            self.left = 0
            if not msgs:
                APIError.from_msg(msg)  # raises


def _reconnects(nc: Any) -> int:
    stats = getattr(nc, "stats", None)
    return int(stats.get("reconnects", 0)) if isinstance(stats, dict) else 0


@dataclass
class PullConsumer:
    """A durable pull consumer whose handler receives a whole fetched batch (so the
    executor can decide many runs' messages and commit them in one transaction) and
    returns, per message, True (ack), False (nak with delay) or an exception.

    With ``concurrency`` > 0 and a ``message_handler`` instead, each message is handled
    by its own task, at most ``concurrency`` at once, and acked when *it* is done: one
    slow message (a long tool call) never holds back the others."""

    js: JetStreamContext
    service: str
    stream: str
    durable: str
    filter_subjects: Sequence[str]
    handler: BatchHandler | None = None
    batch: int = 128
    ack_wait_s: float = 0.0  # 0: the configured LOOM_ACK_WAIT_S (``delivery()``)
    max_ack_pending: int = 1024
    message_handler: MessageHandler | None = None
    concurrency: int = 0
    # after a batch smaller than ``batch``, wait this long before the next fetch, so a
    # consumer off the step's path (tracing) takes many steps' messages per fetch and
    # per handling, instead of one step's at a time (issue 10, perf3)
    linger_s: float = 0.0
    # settle a batch with one cumulative ack (AckPolicy.ALL) instead of one per message:
    # for a consumer that is cheap to redeliver to (an idempotent read model), a nats-server
    # message operation less per message (issue 10, traceack). See ``_AckAll``.
    ack_all: bool = False
    # a durable this one takes over from (another ack policy needs another consumer):
    # started right after its ack floor, then deleted (``_start_position``)
    replaces: str | None = None
    _acks: _AckAll | None = dataclasses.field(default=None, init=False, repr=False)
    # with ``concurrency``: settles what it can without a task (see ``_settled_quickly``)
    quick: QuickHandler | None = None
    _settling: set[asyncio.Future[None]] = dataclasses.field(
        default_factory=set, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if not self.ack_wait_s:
            self.ack_wait_s = _delivery.ack_wait_s
        if self.ack_all:
            assert not self.concurrency, "ack_all settles whole batches: no concurrency"
            self._acks = _AckAll(self)

    async def run(self, stop: asyncio.Event) -> None:
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.ALL if self.ack_all else AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=MAX_DELIVER + 1,  # our own DLQ step runs on the last delivery
            max_ack_pending=self.max_ack_pending,
            filter_subjects=list(self.filter_subjects) if len(self.filter_subjects) > 1 else None,
            filter_subject=self.filter_subjects[0] if len(self.filter_subjects) == 1 else None,
        )
        if self.replaces is not None:
            config = await _start_position(self.js, self.stream, config, self.replaces)
        sub = OpenPull(await pull_subscribe(self.js, self.stream, config))
        try:
            if self.replaces is not None:
                await _retire(self.js, self.stream, self.replaces)
            if self.concurrency:
                await self._run_concurrently(sub, stop)
                return
            await self._run_batches(sub, stop)
        finally:
            await sub.close()

    async def _run_batches(self, sub: OpenPull, stop: asyncio.Event) -> None:
        while not stop.is_set():
            raise_if_cancelled()  # a cancel a handler's await swallowed (nats-py's request)
            try:
                msgs = await sub.fetch(self.batch, timeout=1.0)
            except TimeoutError:
                continue
            except nats.errors.ConnectionClosedError:
                return
            except Exception as exc:  # connection hiccup: the next fetch retries
                log.warning("%s fetch failed: %s", self.durable, exc)
                await back_or_stop(self.js._nc, stop, 0.5)
                continue
            await (self._dispatch(msgs) if self._acks is None else self._acks.dispatch(msgs))
            if self.linger_s and len(msgs) < self.batch:
                await wait_or_timeout(stop, self.linger_s)

    async def _run_concurrently(self, sub: Any, stop: asyncio.Event) -> None:
        assert self.message_handler is not None
        tasks: set[asyncio.Task[None]] = set()
        freed = asyncio.Event()
        try:
            while not stop.is_set():
                raise_if_cancelled()
                room = self.concurrency - len(tasks)
                if room <= 0:
                    freed.clear()
                    await wait_or_timeout(freed, 1.0)
                    continue
                try:
                    msgs = await sub.fetch(min(self.batch, room), timeout=1.0)
                except TimeoutError:
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                except Exception as exc:
                    log.warning("%s fetch failed: %s", self.durable, exc)
                    await back_or_stop(self.js._nc, stop, 0.5)
                    continue
                for msg in msgs:
                    if self.quick is not None and self._settled_quickly(msg):
                        continue
                    task = asyncio.ensure_future(self._handle_one(msg))
                    tasks.add(task)
                    task.add_done_callback(functools.partial(_finished, tasks, freed))
        finally:
            for task in tasks:
                task.cancel()

    def _settled_quickly(self, msg: Msg) -> bool:
        """Is ``msg`` settled without a task of its own? The tool-runner's stream copy of
        a request it took from its dispatch (issue 10, runnercpu): ``quick`` knows it
        from its bytes, and it is acked now (answered) or when that handling ends, with
        its outcome, as ``_handle_one`` would settle it, and kept alive by ``in_progress``
        meanwhile as a handled message is. No task, coroutine or decode for it."""
        assert self.quick is not None
        outcome = self.quick(msg)
        if outcome is None:
            return False
        if outcome is True:
            _ack_soon(msg)
            return True
        assert isinstance(outcome, asyncio.Future), outcome
        beat = Heartbeat((msg,), self.ack_wait_s)
        outcome.add_done_callback(functools.partial(self._settle_when_done, msg, beat))
        return True

    def _settle_when_done(
        self, msg: Msg, beat: Heartbeat, done: asyncio.Future[bool | BaseException]
    ) -> None:
        beat.stop()
        result = False if done.cancelled() else done.result()
        if result is True:
            _ack_soon(msg)
            return
        settling = asyncio.ensure_future(self._settle(msg, result))  # rare: nak or dead letter
        self._settling.add(settling)
        settling.add_done_callback(self._settling.discard)

    async def _handle_one(self, msg: Msg) -> None:
        assert self.message_handler is not None
        beat = Heartbeat((msg,), self.ack_wait_s)
        try:
            result = await self.message_handler(msg)
        except Exception as exc:  # a bug in a handler must not stop consumption
            log.exception("%s handler crashed", self.durable)
            result = exc
        finally:
            beat.stop()
        await self._settle(msg, result)

    async def _dispatch(self, msgs: Sequence[Msg]) -> None:
        assert self.handler is not None
        beat = Heartbeat(msgs, self.ack_wait_s)
        try:
            results: Sequence[bool | BaseException] = await self.handler(msgs)
        except Exception as exc:  # a bug in a handler must not stop consumption
            log.exception("%s handler crashed", self.durable)
            results = [exc] * len(msgs)
        finally:
            beat.stop()
        for msg, result in zip(msgs, results, strict=True):
            await self._settle(msg, result)

    async def _settle(self, msg: Msg, result: bool | BaseException) -> None:
        if result is True:  # nearly all: the delivery count is not parsed for an ack
            await msg.ack()
            return
        deliveries = msg.metadata.num_delivered if msg.metadata else 1
        error = _refusal(result, deliveries)
        if error is not None:
            await dead_letter(self.js, self.service, msg.subject, error, msg.data, deliveries)
            await msg.term()
            return
        await msg.nak(delay=_retry_delay(self.durable, msg, result, deliveries))


# how long an ack put in the outgoing buffer from a callback may wait for another write
# to ride in (``publish_lazily``): far below any ack wait
ACK_LINGER_S = 0.005


def _ack_soon(msg: Msg) -> None:
    """``msg.ack()`` from a callback: the ack (an empty publish to its reply subject)
    put in the connection's outgoing buffer by ``publish_lazily``, with no task, written
    with the next write or within ``ACK_LINGER_S``. An ack that cannot be written (the
    connection closed) is as an ack lost: the message is redelivered after the ack wait
    and met as answered."""
    if msg._ackd:
        return
    try:
        publish_lazily(msg._client, msg.reply, b"", ACK_LINGER_S)
    except Exception as exc:
        log.debug("ack of %s not sent: %r", msg.subject, exc)
        return
    msg._ackd = True


def _refusal(result: bool | BaseException, deliveries: int) -> ErrorInfo | None:
    """Why a handled message goes to the dead letters (refused, or failed too often), or
    None when it is to be retried."""
    if isinstance(result, Poison):
        return result.error
    if deliveries >= MAX_DELIVER:
        return ErrorInfo(
            code="max_deliveries",
            message=f"failed {deliveries} times; last error: {result!r}"[:500],
        )
    return None


def _retry_delay(durable: str, msg: Msg, result: bool | BaseException, deliveries: int) -> float:
    """The nak delay of a message to retry: what ``Later`` asked, else backing off with
    its deliveries (longer after an outage)."""
    if isinstance(result, Later):
        return result.delay_s
    if isinstance(result, BaseException):
        log.warning("%s will retry %s: %r", durable, msg.subject, result)
    base = OUTAGE_NAK_DELAY_S if isinstance(result, _OUTAGE_ERRORS) else NAK_DELAY_S
    return base * deliveries


def stream_seq(msg: Msg) -> int:
    """A JetStream delivery's stream sequence, from its reply subject alone:
    ``msg.metadata`` parses all of it (a datetime, two dataclasses), which cost more
    than the acks saved (``_AckAll``)."""
    return int(_reply_token(msg, 5, Msg.Ack.StreamSeq))


def num_pending(msg: Msg) -> int:
    """How many messages the consumer still had to deliver when it delivered this one,
    from its reply subject alone (as ``stream_seq``); 0 when the subject has no such
    token (not a JetStream delivery)."""
    return _ack_token(msg, 8, Msg.Ack.NumPending)


def stored_at_ns(msg: Msg) -> int:
    """When the stream stored this delivery's message (ns since the epoch, the server's
    clock), from its reply subject alone; 0 when the subject has no such token."""
    return _ack_token(msg, 7, Msg.Ack.Timestamp)


def _ack_token(msg: Msg, v1: int, v2: int) -> int:
    """``_reply_token`` as a number; 0 when the subject has no such number."""
    try:
        return int(_reply_token(msg, v1, v2))
    except (IndexError, ValueError):
        return 0


def _reply_token(msg: Msg, v1: int, v2: int) -> str:
    """A token of a JetStream delivery's reply subject: ``$JS.ACK.<stream>.<consumer>.
    <delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>`` (9 tokens: ``v1``),
    or the layout with a domain and an account hash (``Msg.Ack``'s indices: ``v2``)."""
    tokens = (msg.reply or "").split(".")
    return tokens[v1] if len(tokens) == 9 else tokens[v2]


# a message put back (``_AckAll.wanting``) that has not come back this long after its
# nak delay is taken as gone (its stream message removed by a limit): else the consumer
# would never ack again and stall at max_ack_pending
WANTED_GIVE_UP_S = 30.0


class _AckAll:
    """Settles each batch of an ``ack_all`` consumer with one ack: of the highest message
    every message before which (in stream order, delivered and unacked) is settled. An
    ack under AckPolicy.ALL acks every pending message up to it, so:

    - a poison message (or one out of deliveries) is dead-lettered and *not* terminated
      (a term is an ack under this policy: it would ack what is before it); it counts as
      settled and the cumulative ack covers it;
    - a message wanting redelivery (False, ``Later``, an exception) is naked with its
      delay (as ``PullConsumer._settle`` does: it comes back when due, counted as a
      delivery) and *holds* the ack below it until it settles, in this batch or a later
      one: an ack past it would drop it from the pending list, so it would never come
      back;
    - messages after a held one are handled as they come (the read model is not held
      back) and remembered as done, not naked: not acked yet, they come back when their
      ack wait ends and are settled without the handler (a poison one is not
      dead-lettered twice), and the ack that follows the held one's settling covers them.

    The state is this process's: after a restart, every message after the ack floor is
    delivered again (handled again: the handler must be idempotent; a poison one is
    dead-lettered again)."""

    def __init__(self, consumer: PullConsumer) -> None:
        self.consumer = consumer
        self.wanting: dict[int, float] = {}  # stream seq -> when to give up waiting for it
        self.done: dict[int, Msg] = {}  # settled, not yet acked (after a wanting one)
        self.acked: list[int] = []  # the stream seq of each ack sent (tests; bounded)
        self.floor = 0  # the highest stream seq acked (all up to it are settled)

    async def dispatch(self, msgs: Sequence[Msg]) -> None:
        c = self.consumer
        seqs = [stream_seq(m) for m in msgs]
        if seqs and min(seqs) <= self.floor:
            # delivered again before our ack reached the server (an ack wait that ran
            # out while they were held): settled and acked already, nothing to do
            msgs = [m for s, m in zip(seqs, msgs, strict=True) if s > self.floor]
            seqs = [s for s in seqs if s > self.floor]
            if not msgs:
                return
        fresh = [(s, m) for s, m in zip(seqs, msgs, strict=True) if s not in self.done]
        if len(fresh) < len(msgs):  # settled ones delivered again: ack the newest delivery
            self.done.update((s, m) for s, m in zip(seqs, msgs, strict=True) if s in self.done)
        results: Sequence[bool | BaseException] = []
        if fresh:
            assert c.handler is not None
            handed = [m for _, m in fresh]
            beat = Heartbeat(handed, c.ack_wait_s)
            try:
                results = await c.handler(handed)
            except Exception as exc:  # a bug in a handler must not stop consumption
                log.exception("%s handler crashed", c.durable)
                results = [exc] * len(fresh)
            finally:
                beat.stop()
        if not self.wanting and not self.done and all(r is True for r in results):
            # nearly every batch: all folded, nothing held: ack the highest
            top = max(range(len(seqs)), key=seqs.__getitem__)
            await msgs[top].ack()
            self.floor = max(self.floor, seqs[top])
            self.acked = [*self.acked[-63:], seqs[top]]
            return
        now = asyncio.get_running_loop().time()
        handled = sorted(zip(fresh, results, strict=True), key=lambda p: p[0][0])
        for (seq, msg), result in handled:
            delay = await self._settle(msg, result)
            if delay is None:
                self.wanting.pop(seq, None)
                self.done[seq] = msg
            else:
                self.wanting[seq] = now + delay + WANTED_GIVE_UP_S
        await self._ack(now)

    async def _settle(self, msg: Msg, result: bool | BaseException) -> float | None:
        """Dead-letter a refused message; nak one to retry. Returns the nak's delay, or
        None for a settled message."""
        c = self.consumer
        if result is True:
            return None
        deliveries = msg.metadata.num_delivered if msg.metadata else 1
        error = _refusal(result, deliveries)
        if error is not None:
            await dead_letter(c.js, c.service, msg.subject, error, msg.data, deliveries)
            return None
        delay = _retry_delay(c.durable, msg, result, deliveries)
        await msg.nak(delay=delay)
        return delay

    async def _ack(self, now: float) -> None:
        for seq, give_up in list(self.wanting.items()):
            if now > give_up:
                log.warning(
                    "%s: stream message %d did not come back; acking past it",
                    self.consumer.durable,
                    seq,
                )
                del self.wanting[seq]
        below = min(self.wanting, default=None)
        ackable = [s for s in self.done if below is None or s < below]
        if not ackable:
            return
        top = max(ackable)
        await self.done[top].ack()
        self.floor = max(self.floor, top)
        self.acked = [*self.acked[-63:], top]
        for seq in ackable:
            del self.done[seq]


async def _start_position(
    js: JetStreamContext, stream: str, config: ConsumerConfig, replaces: str
) -> ConsumerConfig:
    """Where a durable that takes over from ``replaces`` starts: an existing one keeps its
    own start (a changed start is not an update: ``_add_consumer`` would replace it, and
    it would take everything from there again); a new one starts right after the ack
    floor of ``replaces`` when that exists (what it acked is not taken again; what it
    acked above its floor is, once: the handler must be idempotent); else at the start."""
    assert config.durable_name
    try:
        mine = await js.consumer_info(stream, config.durable_name)
    except NotFoundError:
        mine = None
    if mine is not None:
        return dataclasses.replace(
            config,
            deliver_policy=mine.config.deliver_policy,
            opt_start_seq=mine.config.opt_start_seq,
        )
    try:
        old = await js.consumer_info(stream, replaces)
    except NotFoundError:
        return config  # a fresh install
    floor = old.ack_floor.stream_seq if old.ack_floor and old.ack_floor.stream_seq else 0
    log.info("%s takes over from %s after stream seq %d", config.durable_name, replaces, floor)
    return dataclasses.replace(
        config, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=floor + 1
    )


async def _retire(js: JetStreamContext, stream: str, durable: str) -> None:
    """Delete the durable another one took over from (once the new one exists: a crash
    between the two leaves both, and the next start finds the new one and deletes this)."""
    try:
        await js.delete_consumer(stream, durable)
    except NotFoundError:
        return
    log.info("deleted durable %s: taken over", durable)


class Heartbeat:
    """``in_progress`` for ``msgs`` every third of the ack wait while they are handled, so
    the ack wait can be short (a dead process's messages go to another within it) and a
    handler still as long as it needs. A timer, not a task: a message handled within a
    third of the ack wait (nearly all) costs one ``call_later`` and its cancel."""

    def __init__(self, msgs: Sequence[Msg], ack_wait_s: float) -> None:
        self.msgs = msgs
        self.every = ack_wait_s / 3
        self.loop = asyncio.get_running_loop()
        self.handle: asyncio.TimerHandle | None = self.loop.call_later(self.every, self._beat)
        self.sending: asyncio.Future[Any] | None = None

    def _beat(self) -> None:
        if self.sending is None or self.sending.done():
            self.sending = asyncio.ensure_future(self._send())
        self.handle = self.loop.call_later(self.every, self._beat)

    async def _send(self) -> None:
        for msg in self.msgs:
            try:
                await msg.in_progress()
            except Exception as exc:  # the connection is down: the ack wait decides
                log.debug("in_progress not sent: %r", exc)
                return

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


async def held_events(
    js: JetStreamContext,
    durable: str,
    filter_subject: str,
    handle: Callable[[Msg], Awaitable[None]],
    stop: asyncio.Event,
) -> None:
    """Consume one kind of run event whose messages a handler *holds* (naks with a delay
    until the thing they stand for is due or over: timers, open waits). Never dead-letters
    for redeliveries; ``handle`` acks, naks or terminates each message itself."""
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=filter_subject,
        ack_wait=_delivery.held_ack_wait_s,
        max_deliver=-1,  # redelivered as often as it takes
        max_ack_pending=100_000,  # every held message is an unacked one
    )
    sub = await pull_subscribe(js, subjects.RUN_EVENTS_STREAM, config)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(256, timeout=1.0)
        except TimeoutError:
            continue
        except Exception as exc:
            log.warning("%s fetch failed: %s", durable, exc)
            await wait_or_timeout(stop, 0.5)
            continue
        raise_if_cancelled()  # nats-py's fetch swallows one: the batch is redelivered
        for msg in msgs:
            await handle(msg)


async def wait_or_timeout(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it was set. A cancel is
    never lost here (``asyncio.timeout``, not ``wait_for``: see ``raise_if_cancelled``)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


def raise_if_cancelled() -> None:
    """Raise the CancelledError a cancelled task was not given, before it takes more work.

    Python 3.11's ``asyncio.wait_for`` (nats-py's fetch, ``next_msg`` and ``request``
    use it) returns its result instead of raising when the task is cancelled just after
    what it waited for completed: the task then goes on as if never cancelled. A pull
    consumer's loop so took the batch it had just fetched to its handler after a stop;
    the executor's handler then waited for a writer the stop had already cancelled, for
    ever (a clean stop held the partition 2 s, the process 10 s). The task still counts
    the cancel request (``Task.cancelling``) after such a swallow: the loops check it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def back_or_stop(nc: Any, stop: asyncio.Event, timeout: float) -> None:
    """Back off after a failure: until ``stop``, ``nc``'s next reconnect (what failed
    for want of the server may work now: go on at once) or ``timeout``. On a connection
    not made by ``connect``, ``stop`` or the timeout only."""
    events = _EVENTS.get(nc)
    if events is None:
        await wait_or_timeout(stop, timeout)
        return
    waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(events.back.wait())}
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def pull_subscribe(js: JetStreamContext, stream: str, config: ConsumerConfig) -> Any:
    """Create (or update) the durable consumer and bind to it. A JetStream API that does
    not answer is retried up to LOOM_CONSUMER_CREATE_S (``DeliverySettings``): in a
    cluster, a service starting while a node is lost would otherwise lose this consumer
    task for good (seen in tests/integration/test_jetstream_cluster.py)."""
    assert config.durable_name
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _delivery.consumer_create_s
    while True:
        try:
            await _add_consumer(js, stream, config)
            break
        except (TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            if loop.time() > deadline:
                raise
            log.warning("%s: consumer not created yet (%r); retrying", config.durable_name, exc)
            await asyncio.sleep(0.5)  # the retry interval of a bounded wait for JetStream
    return await js.pull_subscribe_bind(durable=config.durable_name, stream=stream)


async def _add_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    assert config.durable_name
    try:
        await js.add_consumer(stream, config)
    except nats.js.errors.BadRequestError:
        # exists with another config (e.g. after an upgrade): replace it in place
        await js.delete_consumer(stream, config.durable_name)
        await js.add_consumer(stream, config)


async def request(
    nc: NATS, subject: str, message: Any, reply_type: type[T], timeout: float = 5.0
) -> T:
    msg = await nc.request(subject, codec.encode(message), timeout=timeout)
    return codec.decode(msg.data, reply_type)
