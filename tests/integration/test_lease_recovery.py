"""Partition leases recover from a table that is not what this replica believes, on a
real nats-server (JetStream KV): a restart whose first read of the table is already
stale, a lease write whose reply was lost, and keys the server lost. In each case the
replica goes on (no exception out of its renewal or its start) and every partition keeps
exactly one owner.

The reported failure (bench/chaos.py, an executor restarted with the same name) was the
renewal raising ``_Lost: member-vm``: the compare-and-set used the revision this replica
last saw, the key had moved on to a value of its own name, and that value was taken for
another replica's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import nats
import pytest

from loom_core import codec
from loom_core.contracts import PartitionLease
from loom_infra import bus
from loom_infra.ownership import BUCKET, STREAM, Ownership, PartitionSettings
from loom_infra.processes import wait_until

pytestmark = pytest.mark.integration

COUNT = 8
LEASE_S = 3.0  # long enough that nothing expires on its own during a test


class Replica:
    """An Ownership whose ticks the test drives itself (no renewal loop)."""

    def __init__(self, js: Any, name: str) -> None:
        self.gained: list[int] = []
        self.lost: list[int] = []
        settings = PartitionSettings(count=COUNT, lease_s=LEASE_S, replica=name)
        self.ownership = Ownership(js, settings, on_gain=self._gain, on_loss=self._loss)

    async def _gain(self, p: int) -> None:
        self.gained.append(p)

    async def _loss(self, p: int) -> None:
        self.lost.append(p)

    def owned(self) -> set[int]:
        return set(self.ownership.frozen_owned)

    def stop_watching(self) -> None:
        """The watcher lags (or, after nats-server lost a stream's tail, never tells):
        what this replica believes is only what it wrote itself."""
        assert self.ownership._watch_task is not None
        self.ownership._watch_task.cancel()


async def put(js: Any, key: str, lease: PartitionLease) -> int:
    """A write to the bucket that the replica under test did not make (no CAS)."""
    ack = await js.publish(f"$KV.{BUCKET}.{key}", codec.encode(lease), msg_ttl=LEASE_S)
    return int(ack.seq)


async def latest(js: Any, key: str) -> PartitionLease | None:
    msg = await js.get_last_msg(STREAM, f"$KV.{BUCKET}.{key}")
    return codec.decode(msg.data, PartitionLease) if msg.data else None


async def test_a_restart_whose_first_read_is_stale_adopts_its_leases(js: Any) -> None:
    """The previous process's last renewals land after the restarted process read the
    table (kill -9 with writes in flight): the restart adopts them all the same."""
    old = Replica(js, "vm")
    await old.ownership.start()
    assert old.owned() == set(range(COUNT))
    old.stop_watching()  # then killed: it writes nothing more of its own accord

    new = Replica(js, "vm")
    await new.ownership._read_table()
    new.stop_watching()  # its watcher has not delivered them yet when the first tick runs
    # the old process's renewals, written after the new one's read
    await old.ownership._renew_member()
    await old.ownership._renew()
    await new.ownership._first_share()  # raised _Lost: member-vm before the fix

    assert new.ownership._started
    assert new.owned() == set(range(COUNT))
    member = await latest(js, "member-vm")
    assert member is not None and member.nonce == new.ownership.nonce
    for p in range(COUNT):
        lease = await latest(js, f"p-{p}")
        assert lease is not None and lease.nonce == new.ownership.nonce, p
    # the old process, were it still alive, could not renew any of them any more
    await old.ownership._renew()
    assert old.owned() == set()


async def test_a_lease_write_whose_reply_was_lost_is_renewed_not_dropped(js: Any) -> None:
    """The replica's own write landed but its reply did not arrive (nats-server slow or
    restarting): the key is at a revision it never saw, holding its own lease."""
    a = Replica(js, "vm")
    await a.ownership.start()
    a.stop_watching()
    mine = a.ownership._lease()
    await put(js, "member-vm", mine)
    await put(js, "p-3", mine)

    await a.ownership.tick()  # raised _Lost: member-vm before the fix

    assert a.owned() == set(range(COUNT)) and a.lost == []  # p-3 never left
    for key in ("member-vm", "p-3"):
        lease = await latest(js, key)
        assert lease is not None and lease.nonce == a.ownership.nonce
    await a.ownership.tick()  # and the next renewals go on from there
    assert a.owned() == set(range(COUNT))


async def test_keys_the_server_lost_are_written_again(js: Any) -> None:
    """nats-server restarted and lost the stream's tail: the member key and a partition
    key are gone, with no delete marker for a watcher to see. The member key is written
    again, and the partition, dropped when its renewal failed, is taken again at once
    (it would otherwise stay ownerless: nothing would ever announce it free)."""
    a = Replica(js, "vm")
    await a.ownership.start()
    a.stop_watching()  # a purge may leave a marker; a lost tail leaves nothing to see
    for key in ("member-vm", "p-5"):
        await js.purge_stream(STREAM, subject=f"$KV.{BUCKET}.{key}")

    await a.ownership.tick()

    assert a.owned() == set(range(COUNT))
    assert a.lost == [5] and a.gained.count(5) == 2  # stopped, then taken again
    for key in ("member-vm", "p-5"):
        lease = await latest(js, key)
        assert lease is not None and lease.nonce == a.ownership.nonce


async def test_a_twin_after_start_logs_an_error_and_does_not_crash(
    js: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Two live processes with one name (a misconfiguration): the later one takes over,
    the other logs an error and drops what it can no longer renew, and its renewal
    does not raise."""
    first = Replica(js, "vm")
    await first.ownership.start()
    first.stop_watching()
    twin = Replica(js, "vm")
    await twin.ownership.start()
    assert twin.owned() == set(range(COUNT))
    twin.stop_watching()

    with caplog.at_level(logging.ERROR, logger="loom.ownership"):
        await first.ownership.tick()
    assert "used by another process too" in caplog.text
    assert first.owned() == set() and sorted(first.lost) == list(range(COUNT))
    await twin.ownership.tick()
    assert twin.owned() == set(range(COUNT)) and twin.lost == []
    member = await latest(js, "member-vm")
    assert member is not None and member.nonce == twin.ownership.nonce


async def test_a_replica_that_loses_a_race_for_a_free_partition_takes_another_at_once(
    js: Any,
) -> None:
    """Two survivors see the same partitions freed (a crash, or a release) and both
    pick one of them: the loser learns the winner from the server and takes another
    free one in the same round, instead of a renewal round (lease/3) later."""
    a, b, c = Replica(js, "a"), Replica(js, "b"), Replica(js, "c")
    await a.ownership.start()
    await b.ownership.start()
    await c.ownership.start()
    assert a.owned() == set(range(COUNT))  # b and c found nothing free yet
    await a.ownership.tick()  # its share of three: five given back
    assert a.owned() == {0, 1, 2}

    def sees_free(r: Replica) -> bool:
        return all(r.ownership.owner_of(p) is None for p in range(3, COUNT))

    for r in (b, c):
        assert await wait_until(r.ownership.changed, lambda r=r: sees_free(r), 5)
        r.stop_watching()  # from here on, each knows only what it asks the server
    await b.ownership.tick()
    assert b.owned() == {3, 4, 5}
    await c.ownership.tick()  # its stale table still shows 5 free: it loses that race
    assert c.owned() == {6, 7}, c.owned()
    assert not (a.owned() & b.owned()) and not (b.owned() & c.owned())


class Live(Replica):
    """A replica with its renewal loop running, that checks on every partition it takes
    that no other replica holds it at that moment."""

    def __init__(self, js: Any, name: str, others: list[Live], changed: asyncio.Event) -> None:
        super().__init__(js, name)
        self.others, self.changed = others, changed
        self.overlaps: list[tuple[int, str]] = []
        self.stop = asyncio.Event()

    async def _gain(self, p: int) -> None:
        await super()._gain(p)
        for other in self.others:
            if other is not self and p in other.ownership.owned:
                self.overlaps.append((p, other.ownership.settings.replica))
        self.changed.set()

    async def _loss(self, p: int) -> None:
        await super()._loss(p)
        self.changed.set()


async def test_replicas_starting_at_once_never_own_a_partition_twice(nats_server: Any) -> None:
    """Three replicas start at the same moment (a Deployment's pods) and converge to
    3/3/2. A plan is made from the table a moment before its CAS; a lease another
    replica wrote meanwhile must not be overwritten (that made two owners until the
    loser's next renewal: seen as 'partition 0 was taken by another replica' right
    after a start)."""
    connections = [await nats.connect(nats_server.url) for _ in range(3)]
    try:
        first = connections[0].jetstream()
        await bus.ensure_streams(first)
        changed = asyncio.Event()
        replicas: list[Live] = []
        for name, nc in zip(("ex-a", "ex-b", "ex-c"), connections, strict=True):
            replicas.append(Live(nc.jetstream(), name, replicas, changed))
        await asyncio.gather(*(r.ownership.start() for r in replicas))
        tasks = [asyncio.ensure_future(r.ownership.run(r.stop)) for r in replicas]

        def split() -> bool:
            return sorted(len(r.owned()) for r in replicas) == [2, 3, 3]

        assert await wait_until(changed, split, 10), [r.owned() for r in replicas]
        assert [r.overlaps for r in replicas] == [[], [], []]
        # and it stays split over two more leases (renewals, no further moves)
        moves = sum(len(r.gained) + len(r.lost) for r in replicas)
        assert not await wait_until(
            changed,
            lambda: sum(len(r.gained) + len(r.lost) for r in replicas) != moves,
            2 * LEASE_S,
        )
        assert [r.overlaps for r in replicas] == [[], [], []]
        owners = [p for r in replicas for p in r.owned()]
        assert sorted(owners) == list(range(COUNT))
        for r in replicas:
            r.stop.set()
        for task in tasks:
            task.cancel()
        for r in replicas:
            await r.ownership.close()
    finally:
        for nc in connections:
            await nc.close()


@pytest.mark.parametrize("held", ["one stop held", "each stop just under a round"])
async def test_a_slow_partition_stop_does_not_let_the_other_leases_expire(
    nats_server: Any, held: str
) -> None:
    """Giving a partition up waits for its consumer's fetch and the relay's batch; while
    a replica releases (one stop held for two leases, or four stops in a row, each a
    little shorter than a renewal round, as an executor's consumers take), it still
    renews the partitions it keeps, so nobody else takes them while it writes them."""
    lease_s, count = 1.0, 16  # eight stops in a row: longer than the lease
    connections = [await nats.connect(nats_server.url) for _ in range(2)]
    gate = asyncio.Event()
    replicas: list[Live] = []
    tasks: list[asyncio.Future[None]] = []
    try:
        await bus.ensure_streams(connections[0].jetstream())
        changed = asyncio.Event()
        a = Live(connections[0].jetstream(), "a", replicas, changed)
        b = Live(connections[1].jetstream(), "b", replicas, changed)
        replicas += [a, b]
        for r in replicas:
            name = r.ownership.settings.replica
            r.ownership.settings = PartitionSettings(count=count, lease_s=lease_s, replica=name)
        slow_losses: list[int] = []

        async def slow_loss(p: int) -> None:  # a consumer whose fetch does not end soon
            slow_losses.append(p)
            changed.set()
            if held == "one stop held":
                await asyncio.wait_for(gate.wait(), 10)
            else:  # the fetch's own time, not a wait for the test
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.Event().wait(), 0.9 * lease_s / 3)
            await Live._loss(a, p)

        a.ownership.on_loss = slow_loss
        await a.ownership.start()
        tasks.append(asyncio.ensure_future(a.ownership.run(a.stop)))
        await b.ownership.start()  # a member more: a gives four back, the first one slowly
        tasks.append(asyncio.ensure_future(b.ownership.run(b.stop)))
        assert await wait_until(changed, lambda: bool(slow_losses), 5)
        kept = a.owned()

        def overlap() -> bool:
            return bool(a.overlaps or b.overlaps or (a.owned() & b.owned()))

        # two leases with the release stuck: a's other leases must stay a's
        assert not await wait_until(changed, overlap, 2 * lease_s), (a.owned(), b.owned())
        assert kept <= a.owned() | set(slow_losses)
        gate.set()

        def split() -> bool:
            return len(a.owned()) == len(b.owned()) == count // 2

        assert await wait_until(changed, split, 10), (a.owned(), b.owned())
        assert not overlap()
    finally:
        gate.set()
        for r in replicas:
            r.stop.set()
        for task in tasks:
            task.cancel()
        for r in replicas:
            await asyncio.wait_for(r.ownership.close(), 10)
        for nc in connections:
            await nc.close()
