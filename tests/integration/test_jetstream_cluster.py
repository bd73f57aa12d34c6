"""A 3-node JetStream cluster on this machine (three nats-server processes with cluster
routes, ``natsserver.NatsCluster``), as deploy/k8s/nats/cluster runs it on Kubernetes:
the normal provisioning (``loom provision``, as ``admin``) makes every stream R3, and
killing a node with SIGKILL while publishers wait for acks loses no acknowledged message
and leaves the streams writable. The failover time is printed (``-s`` shows it)."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import waiting  # type: ignore[import-not-found]  # tests/integration on sys.path
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PersistMode
from nats.js.errors import APIError, NoStreamResponseError

from loom_cli.app import load_run_request
from loom_core import codec, subjects
from loom_core.contracts import EventRecord, RunCompleted, RunRequest, RunRequested
from loom_infra import bus
from loom_infra.client import LoomClient
from loom_infra.credentials import ADMIN, Credentials, ensure_credentials
from loom_infra.natsserver import NatsCluster
from loom_infra.settings import OpsSettings, Settings, StoreSettings
from loom_services.runtime import provision
from loom_services.stack import LocalStack

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REPLICAS = 3
PUBLISHERS = 4  # concurrent publishers: acks are in flight when the node dies
PER_PUBLISHER = 150
KILL_AFTER = 200  # acked messages before the kill
BOUND_S = 30.0  # every wait below is bounded by this
# what a publish may meet while the cluster elects a new stream leader: retried
RETRIED = (ConnectionError, TimeoutError, APIError, NoStreamResponseError,
           nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError)  # fmt: skip


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[NatsCluster, Credentials]]:
    creds = ensure_credentials(tmp_path / "creds")
    with NatsCluster(tmp_path / "nats", size=3, authorization=creds.authorization()) as c:
        yield c, creds


async def _connect(url: str, creds: Credentials, identity: str) -> NATS:
    return await bus.connect(url, f"test-{identity}", seed=creds.seed_file(identity),
                             identity=identity)  # fmt: skip


async def _leader(js: JetStreamContext, stream: str) -> str:
    info = await js.stream_info(stream)
    assert info.cluster is not None and info.cluster.leader, f"{stream} has no leader"
    return info.cluster.leader


async def test_provisioning_makes_every_stream_r3_and_a_restart_keeps_it(
    cluster: tuple[NatsCluster, Credentials],
) -> None:
    nodes, creds = cluster
    admin_seed = creds.seed_file(ADMIN)
    await provision(nodes.urls[0], admin_seed, OpsSettings(stream_replicas=REPLICAS))
    # a later provisioning (or an insecure service) without LOOM_STREAM_REPLICAS: 1
    await provision(nodes.urls[1], admin_seed, OpsSettings())
    nc = await _connect(nodes.urls[2], creds, ADMIN)
    try:
        js = nc.jetstream()
        names = [s.name for s in bus.STREAMS] + [
            f"KV_{subjects.TOOLS_BUCKET}",
            f"OBJ_{subjects.BLOBS_BUCKET}",
        ]
        for name in names:
            info = await js.stream_info(name)
            assert info.config.num_replicas == REPLICAS, name
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2, name
        # replicated, LOOM_RUNS fsyncs (the server refuses async persistence at R3)
        runs = await js.stream_info(subjects.RUN_EVENTS_STREAM)
        assert runs.config.persist_mode in (None, PersistMode.DEFAULT)
    finally:
        await nc.close()


@dataclass
class Publishing:
    """What the publishers were told: message id -> stream sequence of its ack."""

    acked: dict[str, int] = field(default_factory=dict)
    enough: asyncio.Event = field(default_factory=asyncio.Event)
    killed_at: float | None = None
    first_ack_after_kill: float | None = None
    retries: int = 0


def _record(run: int) -> tuple[str, bytes]:
    run_id = f"run-{run:05d}"
    record = EventRecord(run_id=run_id, seq=1, at=datetime(2026, 12, 4, tzinfo=UTC),
                         event=RunRequested(request=f"submission {run}"))  # fmt: skip
    return run_id, codec.encode(record)


async def _publish(js: JetStreamContext, first: int, done: Publishing) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 4 * BOUND_S
    for run in range(first, first + PER_PUBLISHER):
        run_id, data = _record(run)
        msg_id = f"{run_id}/1"  # the relay's Nats-Msg-Id: a retried publish is deduplicated
        while True:
            assert loop.time() < deadline, f"{msg_id} never acknowledged"
            try:
                ack = await bus.publish_acked(
                    js, subjects.run_event(run_id, "run_requested"), data,
                    headers={"Nats-Msg-Id": msg_id}, timeout=2.0,
                )  # fmt: skip
                break
            except RETRIED:
                done.retries += 1
                await asyncio.sleep(0.05)  # back-off while a new leader is elected
        done.acked[msg_id] = ack.seq
        if done.killed_at is not None and done.first_ack_after_kill is None:
            done.first_ack_after_kill = time.monotonic()
        if len(done.acked) >= KILL_AFTER:
            done.enough.set()


async def test_killing_the_stream_leader_loses_no_acknowledged_submission(
    cluster: tuple[NatsCluster, Credentials],
) -> None:
    nodes, creds = cluster
    await provision(nodes.urls[0], creds.seed_file(ADMIN), OpsSettings(stream_replicas=REPLICAS))
    admin = await _connect(nodes.urls[0], creds, ADMIN)
    leader = await _leader(admin.jetstream(), subjects.RUN_EVENTS_STREAM)
    await admin.close()
    victim = int(leader.removeprefix("n"))
    survivor = (victim + 1) % 3
    # the publishers are connected to the leader's own node: the worst case, the client
    # loses its server and the stream its leader at once
    publisher = await _connect(nodes.urls[victim], creds, "executor")
    done = Publishing()
    try:
        tasks = [
            asyncio.ensure_future(_publish(publisher.jetstream(), p * PER_PUBLISHER, done))
            for p in range(PUBLISHERS)
        ]
        async with asyncio.timeout(BOUND_S):
            await done.enough.wait()
        acked_before = len(done.acked)
        done.killed_at = time.monotonic()
        nodes.kill(victim)
        async with asyncio.timeout(4 * BOUND_S):
            await asyncio.gather(*tasks)
    finally:
        await publisher.close()

    reader = await _connect(nodes.urls[survivor], creds, ADMIN)
    try:
        js = reader.jetstream()
        new_leader = await _leader(js, subjects.RUN_EVENTS_STREAM)
        info = await js.stream_info(subjects.RUN_EVENTS_STREAM)
        stored: dict[str, int] = {}
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(subjects.RUN_EVENTS_STREAM, seq)
            record = codec.decode_event(msg.data or b"")
            assert record.event_id not in stored, f"{record.event_id} stored twice"
            stored[record.event_id] = seq
    finally:
        await reader.close()

    total = PUBLISHERS * PER_PUBLISHER
    assert acked_before < total, "the kill came after the last publish"
    assert new_leader != leader
    lost = sorted(set(done.acked) - set(stored))
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {lost[:5]}"
    moved = {m: (done.acked[m], stored[m]) for m in done.acked if done.acked[m] != stored[m]}
    assert not moved, f"acked at one sequence, stored at another: {list(moved.items())[:5]}"
    assert len(stored) == total  # and nothing extra (duplicates are dropped by Msg-Id)
    assert done.first_ack_after_kill is not None and done.killed_at is not None
    failover = done.first_ack_after_kill - done.killed_at
    print(
        f"\n3-node JetStream: killed stream leader {leader} after {acked_before} acks; "
        f"new leader {new_leader}; first ack after the kill in {failover * 1000:.0f} ms; "
        f"{done.retries} publish retries; {len(stored)}/{total} stored, 0 lost"
    )

    # the killed node comes back, catches up, and the stream is whole on all three again
    nodes.restart(victim)
    reader = await _connect(nodes.urls[victim], creds, ADMIN)
    try:
        js = reader.jetstream()

        async def caught_up() -> Any:
            try:  # unanswered while the node is catching up
                info = await js.stream_info(subjects.RUN_EVENTS_STREAM)
            except RETRIED:
                return None
            peers = info.cluster.replicas if info.cluster else None
            whole = peers and len(peers) == 2 and all(p.current and not p.offline for p in peers)
            return info if whole else None

        info = await waiting.eventually(caught_up, f"n{victim} caught up", BOUND_S, 0.1)
        assert info is not None and info.state.messages == total
    finally:
        await reader.close()


RUNS = 24
KILL_AFTER_RUNS = 8


async def _submit(client: LoomClient, request: RunRequest, run_id: str) -> int:
    """Submit until accepted; an unanswered submission (the outage) is resent with the same
    run id, which the executor deduplicates. Returns how many resends it took."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    for resends in itertools.count():
        try:
            await client.submit(msgspec.structs.replace(request, run_id=run_id), timeout=2.0)
            return resends
        except RETRIED:
            assert loop.time() < deadline, f"{run_id} never accepted"
    raise AssertionError("unreachable")


async def _followed(client: LoomClient, run_id: str) -> list[EventRecord]:
    """The run's events until its end. While the cluster elects a new meta leader the
    JetStream API does not answer (the consumer cannot be created): follow again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    while True:
        try:
            return await client.wait(run_id, timeout=BOUND_S)
        except RETRIED:
            assert loop.time() < deadline, f"{run_id} could not be followed"


async def _stream_event_ids(url: str, creds: Credentials) -> list[str]:
    reader = await _connect(url, creds, ADMIN)
    try:
        js = reader.jetstream()
        info = await js.stream_info(subjects.RUN_EVENTS_STREAM)
        return [
            codec.decode_event(
                (await js.get_msg(subjects.RUN_EVENTS_STREAM, seq)).data or b""
            ).event_id
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
        ]
    finally:
        await reader.close()


async def test_runs_complete_across_a_killed_node_with_the_whole_stack(
    cluster: tuple[NatsCluster, Credentials],
    sqlite_store_settings: StoreSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The five services and a client on the cluster, every tool call through the
    tool-runner and LOOM_INBOX (no local shortcut). The node that leads LOOM_RUNS, which
    every service is connected to, is killed after a third of the runs were accepted:
    the rest are accepted, every run completes with a gap-free history, and LOOM_RUNS
    holds each stored event exactly once."""
    nodes, creds = cluster
    monkeypatch.setenv("LOOM_LOCAL_TOOLS", "")  # every step crosses NATS twice
    await provision(nodes.urls[0], creds.seed_file(ADMIN), OpsSettings(stream_replicas=REPLICAS))
    admin = await _connect(nodes.urls[0], creds, ADMIN)
    leader = await _leader(admin.jetstream(), subjects.RUN_EVENTS_STREAM)
    await admin.close()
    victim = int(leader.removeprefix("n"))
    settings = Settings(
        nats_url=nodes.urls[victim], store=sqlite_store_settings, creds_dir=creds.directory
    )
    request = load_run_request(EXAMPLES / "hello-dag.yaml", [], None)
    run_ids = [f"cluster-run-{i:03d}" for i in range(RUNS)]
    resends = 0
    async with (
        LocalStack(settings, embedded_nats=False) as stack,
        await stack.client(persistent=True) as client,  # an application: reconnects
    ):
        for run_id in run_ids[:KILL_AFTER_RUNS]:
            resends += await _submit(client, request, run_id)
        killed_at = time.monotonic()
        nodes.kill(victim)
        resends += await _submit(client, request, run_ids[KILL_AFTER_RUNS])
        accepted_after = time.monotonic() - killed_at
        for run_id in run_ids[KILL_AFTER_RUNS + 1 :]:
            resends += await _submit(client, request, run_id)
        in_store: list[str] = []
        for run_id in run_ids:
            records = await _followed(client, run_id)
            assert isinstance(records[-1].event, RunCompleted), (run_id, records[-1].kind)
            stored = await client.events(run_id)
            assert [r.seq for r in stored] == list(range(1, len(stored) + 1)), run_id
            assert stored[-1].event == records[-1].event
            in_store += [r.event_id for r in stored]
        finished = time.monotonic() - killed_at
    # the stream on the survivors: every stored event, each once (the relay republished
    # across the failover; Nats-Msg-Id dropped the duplicates)
    on_stream = await _stream_event_ids(nodes.urls[(victim + 1) % 3], creds)
    assert len(on_stream) == len(set(on_stream)), "an event is on LOOM_RUNS twice"
    assert sorted(on_stream) == sorted(in_store)
    print(
        f"\nwhole stack on 3-node JetStream: killed n{victim} (LOOM_RUNS leader, the "
        f"services' server) after {KILL_AFTER_RUNS} runs; next submission accepted "
        f"{accepted_after * 1000:.0f} ms after the kill ({resends} resends); all {RUNS} runs "
        f"completed {finished:.1f} s after the kill"
    )


async def test_a_consumer_started_without_quorum_is_created_once_quorum_returns(
    cluster: tuple[NatsCluster, Credentials], caplog: pytest.LogCaptureFixture
) -> None:
    """A service starting while the cluster cannot answer JetStream calls (two of three
    nodes down) keeps trying to create its consumer instead of losing that task for
    good; once a second node is back, it consumes."""
    nodes, creds = cluster
    await provision(nodes.urls[0], creds.seed_file(ADMIN), OpsSettings(stream_replicas=REPLICAS))
    nodes.kill(1)
    nodes.kill(2)
    nc = await _connect(nodes.urls[0], creds, "toolrunner")
    stop = asyncio.Event()
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def handle(msgs: Sequence[Msg]) -> list[bool]:
        for msg in msgs:
            seen.put_nowait(msg.subject)
        return [True] * len(msgs)

    consumer = bus.PullConsumer(
        nc.jetstream(), "toolrunner", subjects.RUN_EVENTS_STREAM, "toolrunner",
        [subjects.run_event("*", "tool_call_requested")], handler=handle,
    )  # fmt: skip
    task = asyncio.ensure_future(consumer.run(stop))
    try:
        await waiting.eventually(  # it tried, and was not answered
            lambda: any("consumer not created yet" in r.message for r in caplog.records),
            "a failed consumer creation logged",
            BOUND_S,
            0.05,
        )
        assert not task.done()
        nodes.restart(1)  # quorum again
        executor = await _connect(nodes.urls[1], creds, "executor")
        try:
            subject = subjects.run_event("run-q", "tool_call_requested")
            async with asyncio.timeout(BOUND_S):
                while True:
                    try:
                        await bus.publish_acked(executor.jetstream(), subject, b"{}", timeout=2.0)
                        break
                    except RETRIED:
                        await asyncio.sleep(0.05)  # back-off while leaders are elected
                assert await seen.get() == subject
        finally:
            await executor.close()
    finally:
        stop.set()
        async with asyncio.timeout(BOUND_S):
            await task
        await nc.close()


def test_a_route_port_taken_before_its_node_listens_starts_the_cluster_on_new_ports(
    tmp_path: Path,
) -> None:
    """The ports are chosen free, then released for the nodes: another process may take
    one first. A node whose route listener fails says it is ready and then stops (the
    CI failure this test keeps away), so the cluster starts again on new ports instead
    of waiting out its timeout."""
    nodes = NatsCluster(tmp_path / "nats", size=3)
    taken = nodes.route_ports[2]
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", taken))
    squatter.listen()
    started = time.monotonic()
    try:
        with nodes:
            assert taken not in nodes.route_ports
            assert all(n.process is not None and n.process.poll() is None for n in nodes.nodes)
            nodes.wait_current(BOUND_S)
    finally:
        squatter.close()
    assert time.monotonic() - started < BOUND_S  # not a timeout's wait and a lucky retry
