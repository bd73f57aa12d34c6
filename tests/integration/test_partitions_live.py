"""Partitions against real servers: the hash nats-server stamps equals ours, the leases
split and move through a real JetStream KV bucket, a changed partition count is
refused, and two writers of one run (a forced overlap) end in a typed conflict for
the loser, who re-reads and goes on from the winner's events."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from loom_core import partitions, routes, subjects
from loom_core.contracts import Plan, RunControl, RunRequest, SleepStep
from loom_core.executor import Submission
from loom_infra import bus
from loom_infra.blocking import Blocking
from loom_infra.natsserver import EmbeddedNats
from loom_infra.ownership import NotOwner, Ownership, PartitionSettings
from loom_infra.processes import wait_until
from loom_infra.settings import SettingsError, StoreSettings, ops_settings_from_env
from loom_infra.store import ConcurrencyConflict, open_event_store
from loom_services.partitioned import LEGACY_DURABLE, drain_legacy_inbox
from loom_services.runhost import RunHost

pytestmark = pytest.mark.integration

LEASE_S = 1.0


async def test_the_server_stamps_the_partition_our_hash_computes(js: Any) -> None:
    run_ids = [f"run-{i:03d}-x" for i in range(64)] + ["a", "Z_9-q", "run-" + "f" * 60]
    for run_id in run_ids:
        await js.publish(subjects.inbox(run_id, "tool"), b"{}")
    sub = await js.pull_subscribe(subjects.INBOX_ALL, stream=subjects.INBOX_STREAM)
    msgs = await sub.fetch(len(run_ids), timeout=5)
    for run_id, msg in zip(run_ids, msgs, strict=True):
        stored = partitions.stored_inbox(msg.subject)
        assert stored is not None, msg.subject
        assert stored.run_id == run_id
        assert stored.partition == partitions.partition_of(run_id, partitions.DEFAULT_COUNT)


async def test_a_different_partition_count_is_refused(js: Any) -> None:
    with pytest.raises(bus.PartitionCountChanged) as caught:
        await bus.ensure_streams(js, ops_settings_from_env({"LOOM_PARTITIONS": "16"}))
    assert caught.value.info.code == "partition_count_changed"
    assert "LOOM_PARTITIONS=8" in caught.value.info.message
    with pytest.raises(SettingsError, match="LOOM_PARTITIONS"):
        ops_settings_from_env({"LOOM_PARTITIONS": "0"})


async def test_inbox_messages_of_the_single_executor_version_move_to_their_partitions(
    nats_server: EmbeddedNats,
) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        # the stream and the one inbox durable as the version before partitions made them
        (inbox,) = [c for c in bus.stream_configs() if c.name == subjects.INBOX_STREAM]
        await js.add_stream(dataclasses.replace(inbox, subject_transform=None))
        await js.add_consumer(subjects.INBOX_STREAM, ConsumerConfig(
            durable_name=LEGACY_DURABLE, ack_policy=AckPolicy.EXPLICIT,
            filter_subjects=[r.wildcard for r in routes.INBOXES],
        ))  # fmt: skip
        for i in range(3):
            await js.publish(subjects.inbox("old-run", "tool"), f'{{"n": {i}}}'.encode())
        await bus.ensure_streams(js)  # the upgrade adds the partition transform
        await js.publish(subjects.inbox("old-run", "tool"), b'{"n": 3}')
        assert await drain_legacy_inbox(js, asyncio.Event()) == 3
        with pytest.raises(NotFoundError):
            await js.consumer_info(subjects.INBOX_STREAM, LEGACY_DURABLE)
        p = partitions.partition_of("old-run", partitions.DEFAULT_COUNT)
        sub = await js.pull_subscribe(f"loom.inbox.{p}.old-run.tool", stream=subjects.INBOX_STREAM)
        got = sorted(m.data for m in await sub.fetch(10, timeout=2))
        assert got == [f'{{"n": {i}}}'.encode() for i in range(4)]
        assert await drain_legacy_inbox(js, asyncio.Event()) == 0  # nothing left to do
    finally:
        await nc.close()


class Replica:
    def __init__(self, js: Any, name: str, changed: asyncio.Event | None = None) -> None:
        self.gained: list[int] = []
        self.lost: list[int] = []
        self.changed = changed or asyncio.Event()  # set on every gain or loss
        settings = PartitionSettings(count=8, lease_s=LEASE_S, replica=name)
        self.ownership = Ownership(js, settings, on_gain=self._gain, on_loss=self._loss)
        self.stop = asyncio.Event()
        self.task: asyncio.Future[None] | None = None

    async def _gain(self, p: int) -> None:
        self.gained.append(p)
        self.changed.set()

    async def _loss(self, p: int) -> None:
        self.lost.append(p)
        self.changed.set()

    async def start(self) -> Replica:
        await self.ownership.start()
        self.task = asyncio.ensure_future(self.ownership.run(self.stop))
        return self

    def owned(self) -> set[int]:
        return set(self.ownership.frozen_owned)

    def crash(self) -> None:
        """Stop renewing, give nothing back (as a killed process would)."""
        assert self.task is not None and self.ownership._watch_task is not None
        self.task.cancel()
        self.ownership._watch_task.cancel()


async def test_leases_split_move_on_a_clean_stop_and_expire_after_a_crash(js: Any) -> None:
    changed = asyncio.Event()
    a = await Replica(js, "a", changed).start()
    assert a.owned() == set(range(8))  # alone: every partition at once
    b = await Replica(js, "b", changed).start()
    try:
        assert await wait_until(changed, lambda: len(a.owned()) == len(b.owned()) == 4, 10), (
            a.owned(),
            b.owned(),
        )
        assert not a.owned() & b.owned()

        # a clean stop gives the leases back: the survivor takes them within a tick
        loop = asyncio.get_running_loop()
        started = loop.time()
        a.stop.set()
        await a.ownership.close()
        assert await wait_until(changed, lambda: b.owned() == set(range(8)), 5), b.owned()
        print(f"\nclean handover {loop.time() - started:.2f}s")

        # a crash: the leases expire after LEASE_S; the expiry markers wake the survivor
        c = await Replica(js, "c", changed).start()
        assert await wait_until(changed, lambda: len(c.owned()) == 4, 10), c.owned()
        held = c.owned()
        started = loop.time()
        c.crash()
        assert await wait_until(changed, lambda: b.owned() == set(range(8)), 5 * LEASE_S)
        took = loop.time() - started
        print(f"crash failover of {sorted(held)}: {took:.2f}s (lease {LEASE_S}s)")
        assert took >= LEASE_S * 0.5  # not before the dead owner's lease could expire
    finally:
        b.stop.set()
        await b.ownership.close()


async def test_a_replica_with_the_same_name_adopts_its_leases_at_once(js: Any) -> None:
    first = await Replica(js, "same").start()
    assert first.owned() == set(range(8))
    first.crash()  # its leases are still live for LEASE_S
    second = await Replica(js, "same").start()  # a restart of the same replica (a pod)
    assert second.owned() == set(range(8))
    second.stop.set()
    await second.ownership.close()


# ------------------------------------------------------------------ the run host


@pytest.fixture
async def two_hosts(store_settings: StoreSettings) -> AsyncIterator[tuple[RunHost, RunHost]]:
    store = open_event_store(store_settings)
    io = Blocking("overlap", workers=2)
    hosts = (RunHost(store, io, verify_on_load=False), RunHost(store, io, verify_on_load=False))
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(h.run(stop)) for h in hosts]
    yield hosts
    stop.set()
    for task in tasks:
        task.cancel()
    await io.close()
    store.close()


def nap(run_id: str) -> Submission:
    plan = Plan(steps=[SleepStep(id="z", seconds=600)])
    return Submission(RunRequest(plan=plan, run_id=run_id))


async def test_a_forced_overlap_ends_in_a_typed_conflict_and_a_reread(
    two_hosts: tuple[RunHost, RunHost],
) -> None:
    """Both hosts believe they own the run (a lease that expired under a paused owner):
    the store's optimistic concurrency lets one write per version; the other gets a
    typed ConcurrencyConflict, forgets its copy, re-reads and decides on the winner's
    history."""
    a, b = two_hosts
    await a.submit("overlap-1", nap("overlap-1"))
    await b.state_of("overlap-1")  # b holds a copy at the same version
    await a.submit("overlap-1", RunControl(run_id="overlap-1", action="pause", by="a"))
    version_a = (await a.state_of("overlap-1")).version
    with pytest.raises(ConcurrencyConflict) as caught:
        await b.submit("overlap-1", RunControl(run_id="overlap-1", action="cancel", by="b"))
    assert caught.value.info.code == "store_error"  # typed: a StoreError, not retried blindly
    assert "overlap-1" in caught.value.run_ids
    assert "overlap-1" not in b.actors  # the stale copy is gone
    reread = await b.state_of("overlap-1")
    assert reread.version == version_a  # b now sees a's pause
    await b.submit("overlap-1", RunControl(run_id="overlap-1", action="cancel", by="b"))
    stored = b.store.load("overlap-1")
    assert [r.seq for r in stored] == list(range(1, len(stored) + 1))
    assert (await b.state_of("overlap-1")).status == "cancelled"


async def test_a_host_writes_no_run_outside_its_partitions(
    two_hosts: tuple[RunHost, RunHost],
) -> None:
    a, _ = two_hosts
    a.owns = lambda run_id: run_id != "elsewhere"
    with pytest.raises(NotOwner) as caught:
        await a.submit("elsewhere", nap("elsewhere"))
    assert caught.value.info.code == "not_owner" and caught.value.info.retryable
    assert a.store.load("elsewhere") == []
    await a.submit("here", nap("here"))  # its own runs go on
    assert len(a.store.load("here")) > 0


async def test_a_failing_commit_listener_neither_hangs_nor_undoes_the_commit(
    two_hosts: tuple[RunHost, RunHost],
) -> None:
    """Listeners run before the batch's answers (so the relay publishes first): one
    that raises must not leave the submitter waiting, and the others still hear."""
    host, _ = two_hosts
    heard: list[int] = []

    def broken(_ids: list[int], _records: list[Any]) -> None:
        raise RuntimeError("a listener's bug")

    host.listeners.extend([broken, lambda ids, _records: heard.extend(ids)])
    produced = await asyncio.wait_for(host.submit("listen-1", nap("listen-1")), 10)
    assert produced and heard  # answered, and the listener after the broken one heard
    assert (await host.state_of("listen-1")).version == len(produced)
