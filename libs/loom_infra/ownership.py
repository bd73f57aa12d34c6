"""Which executor replica owns which partitions: leases in a JetStream key-value bucket.

No consensus of our own: every write is a JetStream compare-and-set on the key's last
revision (``Nats-Expected-Last-Subject-Sequence``, replicated by the server's own Raft
in a cluster) with a per-message TTL (``Nats-TTL``). So

- a partition is taken by the one replica whose create (CAS on "no live value") wins;
- its owner renews it every ``lease_s / 3`` (CAS on its own revision); a renewal that
  fails means someone else holds it now: the partition is dropped at once;
- a replica that dies stops renewing; the server expires its keys after ``lease_s`` and
  writes a delete marker (the bucket's ``limit_marker_ttl``), which every survivor's
  watcher sees at once: the partition is free, and the survivors' plans take it;
- a replica that cannot renew for ``FENCE`` of the lease (NATS unreachable, a long
  pause) stops treating its partitions as its own before the server frees them.

Members announce themselves the same way (``member-{replica}``); each replica plans its
own moves from the shared table (``loom_core.partitions.plan_moves``): an even share,
released and taken one CAS at a time, converging with no coordinator.

A replica's name is ``LOOM_REPLICA_ID`` (default: the host name, which a Kubernetes
pod keeps across container restarts): a restarted replica adopts the leases its
previous process left behind instead of waiting for them to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import APIError, NotFoundError

from loom_core import codec, partitions, subjects
from loom_core.contracts import ErrorInfo, PartitionLease
from loom_core.errors import LoomError
from loom_infra.bus import raise_if_cancelled, wait_or_timeout, watch_from_now

# read from LOOM_PARTITIONS, LOOM_PARTITION_LEASE_S, LOOM_REPLICA_ID by the settings module
from loom_infra.settings import DEFAULT_LEASE_S, PartitionSettings

log = logging.getLogger("loom.ownership")

BUCKET = subjects.PARTITIONS_BUCKET
STREAM = f"KV_{BUCKET}"
FENCE = 0.8  # of the lease: unrenewed this long, a partition is given up locally
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed compare-and-set


class NotOwner(LoomError):
    """A write for a run in a partition this replica does not own (now). Retryable: the
    partition's owner takes it (requests are forwarded there)."""

    code = "not_owner"
    retryable = True

    def __init__(self, run_id: str, partition: int, owner: str | None) -> None:
        self.run_id, self.partition, self.owner = run_id, partition, owner
        self.details = {"run_id": run_id, "partition": partition, "owner": owner or ""}
        held = f"held by replica {owner}" if owner else "moving between replicas"
        super().__init__(
            f"run '{run_id}' is in partition {partition}, {held}; this replica does not "
            "write it. Retry: the request reaches the partition's owner"
        )


def moving(partition: int, why: str) -> ErrorInfo:
    """The typed, retryable refusal of a request no owner could take in time."""
    return ErrorInfo(
        code="partition_moving",
        message=f"partition {partition} has no reachable owner right now ({why}); its "
        "runs are safe in the store: retry in a few seconds",
        retryable=True,
        details={"partition": partition},
    )


async def ensure_bucket(
    js: JetStreamContext, lease_s: float = DEFAULT_LEASE_S, replicas: int = 1
) -> Any:
    """The leases bucket (created by whoever provisions streams; ``replicas``:
    LOOM_STREAM_REPLICAS)."""
    try:
        return await js.key_value(BUCKET)
    except Exception:  # not found: nats-py raises BucketNotFoundError
        return await js.create_key_value(
            KeyValueConfig(
                bucket=BUCKET, history=1, limit_marker_ttl=max(1.0, lease_s), replicas=replicas
            )
        )


Callback = Callable[[int], Awaitable[None]]


@dataclass
class _Entry:
    revision: int
    lease: PartitionLease | None  # None: deleted or expired (a marker)


@dataclass
class Ownership:
    """This replica's leases. ``owned``: the partitions it may write now."""

    js: JetStreamContext
    settings: PartitionSettings
    on_gain: Callback
    on_loss: Callback
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex)
    owned: dict[int, int] = field(default_factory=dict)  # partition -> my lease's revision
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _renewed: dict[int, float] = field(default_factory=dict)  # partition -> monotonic
    _member_rev: int = 0
    _member_at: float = 0.0
    _renewed_at: float = 0.0  # monotonic: the last renewal round began
    _started: bool = False
    _watcher: Any = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    frozen_owned: frozenset[int] = frozenset()

    # ------------------------------------------------------------ questions

    @property
    def count(self) -> int:
        return self.settings.count

    def owns(self, run_id: str) -> bool:
        if len(self.frozen_owned) == self.settings.count:  # one replica: every run
            return True
        return partitions.partition_of(run_id, self.settings.count) in self.frozen_owned

    def partition(self, run_id: str) -> int:
        return partitions.partition_of(run_id, self.settings.count)

    def owner_of(self, partition: int) -> str | None:
        entry = self._entries.get(f"p-{partition}")
        return entry.lease.replica if entry is not None and entry.lease is not None else None

    def members(self) -> list[str]:
        return sorted(
            e.lease.replica
            for k, e in self._entries.items()
            if k.startswith("member-") and e.lease is not None
        )

    def table(self) -> dict[int, str | None]:
        """Each partition's owner as this replica sees it (its own by its nonce)."""
        out: dict[int, str | None] = {}
        for p in range(self.count):
            entry = self._entries.get(f"p-{p}")
            lease = entry.lease if entry is not None else None
            if lease is None:
                out[p] = None
            elif lease.replica == self.settings.replica and lease.nonce != self.nonce:
                # left by this replica's previous process: adopt it at start; later it is
                # a twin with the same name (a misconfiguration): not ours
                out[p] = self.settings.replica if not self._started else f"{lease.replica}?"
            else:
                out[p] = lease.replica
        return out

    # ------------------------------------------------------------ life

    async def start(self) -> None:
        """Join: read the table, announce this replica, take a first share."""
        await self._read_table()
        await self._first_share()

    async def _read_table(self) -> None:
        self.kv = await ensure_bucket(self.js, self.settings.lease_s)
        self._watcher = await watch_from_now(self.kv, self._apply)
        self._watch_task = asyncio.ensure_future(self._watch())

    async def _first_share(self) -> None:
        # A restart must not end the service: the table it read may already be stale
        # (its previous process's last renewal landing late, a lease expiring meanwhile,
        # nats-server busy). A tick that fails is tried again here, then by ``run``;
        # until one succeeds this replica still adopts the leases of its previous process.
        for attempt in range(3):
            try:
                await self.tick()
            except Exception as exc:
                log.warning("partition leases not taken at start (attempt %d): %r",
                            attempt + 1, exc)  # fmt: skip
                self.changed.clear()  # the watcher may bring what was missing
                await wait_or_timeout(self.changed, self.settings.lease_s / 10)
                continue
            self._started = True
            return

    async def run(self, stop: asyncio.Event) -> None:
        every = self.settings.lease_s / 3
        while not stop.is_set():
            self.changed.clear()
            await wait_or_timeout(self.changed, every)
            if stop.is_set():
                break
            try:
                await self.tick()
                self._started = True
            except Exception as exc:  # NATS away: the fence decides, the next tick retries
                log.warning("partition leases not renewed: %r", exc)
                await self._fence()

    async def close(self) -> None:
        """Give every partition back (a clean stop: survivors take them at once). Once:
        a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        if self._watch_task is not None:
            self._watch_task.cancel()
        async with self._lock:
            # all refused at once, stopped together, then given back: one stop's wait
            # (a consumer's fetch, the relay's batch) instead of one per partition, so
            # the survivors take them within the lease (else they would expire first)
            held = dict(self.owned)
            self.owned.clear()
            self._renewed.clear()
            self._publish_owned()
            await asyncio.gather(*(self._stopped(p) for p in held), return_exceptions=True)
            for p, revision in sorted(held.items()):
                with contextlib.suppress(Exception):  # else it expires on its own
                    await self._write(f"p-{p}", None, revision)
            with contextlib.suppress(Exception):
                await self._write(f"member-{self.settings.replica}", None, self._member_rev)
        with contextlib.suppress(Exception):
            await self._watcher.stop()

    _watch_task: asyncio.Future[None] | None = None
    closed: bool = False

    async def _watch(self) -> None:
        while True:
            raise_if_cancelled()  # a cancel nats-py's wait_for swallowed (see bus)
            try:
                entry = await self._watcher.updates(timeout=60.0)
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("partition lease watch failed: %r", exc)
                await asyncio.sleep(0.5)  # a broken watch: the ticks still renew
                continue
            if entry is None:
                continue
            if not hasattr(entry, "key"):  # the watcher was stopped (close)
                return
            before = self._entries.get(entry.key)
            self._apply(entry)
            after = self._entries.get(entry.key)
            freed = (
                before is not None
                and before.lease is not None
                and (after is None or after.lease is None)
            )
            if freed or entry.key.startswith("member-"):
                self.changed.set()  # a freed lease or a member come or gone: plan now

    def _apply(self, entry: Any) -> None:
        lease = None
        if entry.operation is None and entry.value:
            try:
                lease = codec.decode(entry.value, PartitionLease)
            except Exception:  # a foreign write to the bucket: treated as taken
                lease = PartitionLease(replica="?", nonce="?")
        self._entries[entry.key] = _Entry(entry.revision, lease)

    # ------------------------------------------------------------ one round

    async def tick(self) -> None:
        async with self._lock:
            await self._renew_member()
            await self._renew()
            # Plan again at once when another replica won a race for a free partition
            # (its CAS refreshed our table from the server): survivors of a crash that
            # picked the same one would otherwise wait a renewal round (lease/3) to take
            # the next. Bounded: each round either takes or learns one partition's owner.
            for _ in range(self.count):
                moves = partitions.plan_moves(self.count, self.settings.replica,
                                              self.members(), self.table())  # fmt: skip
                for p in moves.release:
                    await self._release(p)
                raced = [p for p in moves.acquire if not await self._acquire(p)]
                if not raced:
                    break

    async def _renew_member(self) -> None:
        key = f"member-{self.settings.replica}"
        lease = self._lease()
        try:
            if self._member_rev:
                self._member_rev = await self._claim(key, lease, self._member_rev)
            else:
                self._member_rev = await self._claim(key, lease, self._believed(key))
                self._member_at = time.monotonic()
        except _Lost:
            # a live member key with this name written by another process after this one
            # started: a twin. The later process keeps the name; this one goes on without
            # announcing itself (its partitions' renewals fail and it drops them).
            self._member_rev = 0
            log.error(
                "replica name %s is used by another process too: set a distinct "
                "LOOM_REPLICA_ID per executor replica",
                self.settings.replica,
            )

    async def _renew(self) -> None:
        await self._renew_owned()
        await self._adopt()

    async def _renew_owned(self) -> None:
        self._renewed_at = time.monotonic()
        for p, revision in list(self.owned.items()):
            if p not in self.owned:  # dropped meanwhile (a nested renewal's loss)
                continue
            try:
                renewed = await self._write(f"p-{p}", self._lease(), revision)
                if p in self.owned:
                    self.owned[p] = renewed
                    self._renewed[p] = time.monotonic()
            except _Lost:
                if await self._still_mine(p):
                    continue
                log.warning("partition %d was taken by another replica: dropped", p)
                await self._drop(p)
            except Exception as exc:  # slow or away: the fence decides, the next tick retries
                log.warning("partition %d not renewed: %r", p, exc)
        await self._fence()

    async def _adopt(self) -> None:
        # Keys with this replica's name that it does not hold (now): left by its previous
        # process (adopted at start only: later, the same name is a twin), or given up by
        # the fence while the lease still stood. A CAS on the revision seen proves nobody
        # wrote it since: taking it back then is safe.
        for p in range(self.count):
            entry = self._entries.get(f"p-{p}")
            lease = entry.lease if entry is not None else None
            if entry is None or lease is None or p in self.owned:
                continue
            if lease.replica != self.settings.replica:
                continue
            if lease.nonce != self.nonce and self._started:
                continue
            with contextlib.suppress(_Lost):
                await self._gain(
                    p, await self._claim(f"p-{p}", self._lease(), self._believed(f"p-{p}"))
                )

    async def _still_mine(self, p: int) -> bool:
        """A renewal of ``p`` failed its CAS. If the key's latest value is this process's
        own lease (a write whose reply was lost: it landed, and nobody wrote since), the
        partition never left: renew on that revision. Anything else (another owner, or
        the key gone: expired, or lost by the server) drops it; the table is corrected
        from the server, so a key that is gone is free to take again in this tick."""
        key = f"p-{p}"
        try:
            seq, lease = await self._latest(key)
        except Exception as exc:  # cannot tell: the safe side is to stop writing it
            log.warning("partition %d: its lease could not be read: %r", p, exc)
            return False
        self._entries[key] = _Entry(seq, lease)
        if lease is None or lease.replica != self.settings.replica or lease.nonce != self.nonce:
            return False
        try:
            self.owned[p] = await self._write(key, self._lease(), seq)
        except _Lost:
            return False
        self._renewed[p] = time.monotonic()
        log.info("partition %d: renewed on revision %d, a write of ours we had not seen", p, seq)
        return True

    async def _acquire(self, p: int) -> bool:
        """Take free partition ``p``; False if another replica was faster (the table
        now names it)."""
        try:
            revision = await self._claim(f"p-{p}", self._lease(), self._believed(f"p-{p}"))
        except _Lost:
            return False
        await self._gain(p, revision)
        return True

    def _believed(self, key: str) -> int:
        """The revision to take ``key`` from: the one seen, if what was seen there is free
        or this replica's. The plan was made from the table a moment ago; the watcher
        may since have brought another replica's fresh lease, and a CAS on that
        revision would succeed and overwrite it (two owners until its next renewal).
        0 fails against any existing key, and the server's latest value decides."""
        entry = self._entries.get(key)
        if entry is None or (entry.lease is not None and not self._mine(entry.lease)):
            return 0
        return entry.revision

    async def _gain(self, p: int, revision: int) -> None:
        self.owned[p] = revision
        self._renewed[p] = time.monotonic()
        self._publish_owned()
        log.info("replica %s took partition %d", self.settings.replica, p)
        await self._while_renewing(self.on_gain(p))

    async def _release(self, p: int) -> None:
        revision = self.owned.get(p)
        await self._drop(p)
        if revision is not None:
            with contextlib.suppress(Exception):  # else it expires on its own
                await self._write(f"p-{p}", None, revision)

    async def _drop(self, p: int) -> None:
        """Stop writing partition ``p`` (before its lease is given back)."""
        if self.owned.pop(p, None) is None:
            return
        self._renewed.pop(p, None)
        self._publish_owned()
        await self._while_renewing(self._stopped(p))

    async def _stopped(self, p: int) -> None:
        log.info("replica %s gave up partition %d", self.settings.replica, p)
        try:
            await self.on_loss(p)
        except Exception:
            log.exception("stopping partition %d failed", p)

    async def _while_renewing(self, work: Awaitable[None]) -> None:
        """Run a gain or loss callback, renewing the leases whenever a renewal round is
        due while it lasts. Stopping a partition waits for its consumer's fetch and the
        relay's batch (about a second each), and a tick releasing several used to hold
        every renewal for as long: the leases expired under a replica that still wrote
        them, and another took them (two owners until its next renewal failed)."""
        task = asyncio.ensure_future(work)
        every = self.settings.lease_s / 3
        while True:
            wait = max(0.0, self._renewed_at + every - time.monotonic())
            try:
                done, _ = await asyncio.wait({task}, timeout=wait)
            except asyncio.CancelledError:
                task.cancel()  # as when it was awaited in place
                raise
            if done:
                return task.result()
            try:
                await self._renew_member()
                await self._renew_owned()
            except Exception as exc:  # NATS away: the fence decides
                log.warning("partition leases not renewed: %r", exc)

    async def _fence(self) -> None:
        limit = self.settings.lease_s * FENCE
        now = time.monotonic()
        for p in [p for p, at in self._renewed.items() if now - at > limit]:
            log.error("partition %d not renewed for %.1fs: given up", p, now - self._renewed[p])
            await self._drop(p)

    def _publish_owned(self) -> None:
        self.frozen_owned = frozenset(self.owned)
        self.changed.set()

    def _lease(self) -> PartitionLease:
        return PartitionLease(replica=self.settings.replica, nonce=self.nonce,
                              partitions=self.count)  # fmt: skip

    # ------------------------------------------------------------ compare-and-set

    async def _write(self, key: str, lease: PartitionLease | None, last: int) -> int:
        """CAS ``key`` from revision ``last`` (None: delete it); the new revision. Raises
        _Lost if the key moved on."""
        headers = {"Nats-Expected-Last-Subject-Sequence": str(last)}
        if lease is None:
            headers["KV-Operation"] = "DEL"
        try:
            ack = await self.js.publish(
                f"$KV.{BUCKET}.{key}",
                codec.encode(lease) if lease is not None else b"",
                headers=headers,
                msg_ttl=self.settings.lease_s if lease is not None else None,
            )
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise _Lost(key) from None
            raise
        self._entries[key] = _Entry(ack.seq, lease)
        return ack.seq

    async def _claim(self, key: str, lease: PartitionLease, believed: int) -> int:
        """Write ``lease`` to ``key`` by CAS on the revision ``believed`` current. When
        that is stale, the server's latest value decides (never the watcher's copy, which
        may lag or, after nats-server lost a stream's tail, never arrive): a key that is
        free (deleted, an expiry marker, or gone) or this replica's own (its lease, or at
        start its previous process's) is written on its real revision. Raises _Lost if
        another replica holds it. Bounded: an expiry marker may land between the read
        and the write."""
        try:
            return await self._write(key, lease, believed)
        except _Lost:
            pass
        for _ in range(3):
            seq, latest = await self._latest(key)
            self._entries[key] = _Entry(seq, latest)
            if latest is not None and not self._mine(latest):
                break
            try:
                return await self._write(key, lease, seq)
            except _Lost:
                continue
        raise _Lost(key)

    def _mine(self, lease: PartitionLease) -> bool:
        if lease.replica != self.settings.replica:
            return False
        return lease.nonce == self.nonce or not self._started

    async def _latest(self, key: str) -> tuple[int, PartitionLease | None]:
        """The key's last revision on the server and its lease (None: free)."""
        try:
            msg = await self.js.get_last_msg(STREAM, f"$KV.{BUCKET}.{key}")
        except NotFoundError:
            return 0, None
        headers = msg.headers or {}
        if not msg.data or headers.get("KV-Operation") or headers.get("Nats-Marker-Reason"):
            return msg.seq or 0, None
        try:
            return msg.seq or 0, codec.decode(msg.data, PartitionLease)
        except Exception:  # a foreign write to the bucket: treated as taken
            return msg.seq or 0, PartitionLease(replica="?", nonce="?")


class _Lost(Exception):
    """A compare-and-set found the key at another revision."""
