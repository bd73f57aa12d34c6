"""A tenant's concurrent run limit across executor replicas (issue 14, point 3): two
executor processes own the partitions between them, sharing one nats-server and one
PostgreSQL store; the tenant may run 2 runs at once. Its runs are spread over
partitions of both replicas. From the stored events alone: never more than 2 run at
once, every queued run starts, in submission order; a replica killed (-9) while its
runs hold slots leaks none (its partitions' new owner finishes them, the slots free,
the queue drains and the shared book ends empty).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from nats.js.errors import KeyNotFoundError
from waiting import eventually, having, until  # type: ignore[import-not-found]

from loom_core import codec, partitions, subjects
from loom_core.contracts import (
    AdmissionBook,
    EventRecord,
    FinalStep,
    PartitionLease,
    Plan,
    RunAdmitted,
    RunCompleted,
    RunRequest,
    RunRequested,
    SleepStep,
)
from loom_infra.client import LoomClient, LoomError
from loom_infra.credentials import ADMIN, ensure_credentials
from loom_infra.natsserver import EmbeddedNats
from loom_infra.processes import ServiceProcess, replicated_services, wait_healthy_at
from loom_infra.settings import StoreSettings
from loom_services.runtime import provision

pytestmark = pytest.mark.integration

REPLICAS = ("qa", "qb")
LEASE_S = 3.0  # as test_failover: a shorter lease flaps on this loaded machine
LIMIT = 2
BOUND_S = 120.0


async def submit(op: LoomClient, request: RunRequest) -> None:
    """As a client does: a retryable refusal (its partition moving) is sent again."""

    async def sent() -> bool:
        try:
            await op.submit(request)
        except LoomError as exc:
            if not exc.error.retryable:  # type: ignore[attr-defined]
                raise
            return False
        return True

    await eventually(sent, f"{request.run_id} accepted", BOUND_S, every_s=0.2)


def sleeper(seconds: float) -> Plan:
    return Plan(steps=[SleepStep(id="nap", seconds=seconds),
                       FinalStep(id="out", output="done", depends_on=["nap"])])  # fmt: skip


class Stack:
    def __init__(self, url: str, env: dict[str, str], executors: dict[str, ServiceProcess],
                 others: list[ServiceProcess]) -> None:  # fmt: skip
        self.url, self.env, self.executors, self.others = url, env, executors, others

    def logs(self) -> str:
        return "\n".join(s.tail(40) for s in [*self.executors.values(), *self.others])


@pytest.fixture
def stack(tmp_path: Path, pg_store_settings: StoreSettings) -> Iterator[Stack]:
    creds = ensure_credentials(tmp_path / "creds")
    server = EmbeddedNats(
        data_dir=tmp_path / "nats", port=-1, authorization=creds.authorization()
    ).start()
    asyncio.run(provision(server.url, creds.seed_file(ADMIN)))
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text(f"tenants:\n  default:\n    max_concurrent_runs: {LIMIT}\n")
    assert pg_store_settings.postgres_url is not None
    env = {
        **os.environ,
        "LOOM_NATS_URL": server.url,
        "LOOM_STORE": "postgres",
        "LOOM_POSTGRES_URL": pg_store_settings.postgres_url,
        "LOOM_DATA_DIR": str(tmp_path / "data"),
        "LOOM_LOG_LEVEL": "INFO",
        "LOOM_QUOTAS_FILE": str(quotas),
        "LOOM_PARTITION_LEASE_S": str(LEASE_S),
        "LOOM_NKEY_SEED_FILE": str(creds.seed_file("operator")),  # the test's own client
    }
    executors, others = replicated_services(env, creds.seed_file, tmp_path, REPLICAS)
    try:
        first, second = executors.values()
        first.start()  # creates the store's tables alone (see test_failover)
        for service in others:
            service.start()
        asyncio.run(wait_healthy_at(server.url, env["LOOM_NKEY_SEED_FILE"], first))
        second.start()
        yield Stack(server.url, env, executors, others)
    finally:
        for service in [*executors.values(), *others]:
            service.stop()
        server.stop()


async def owners(client: LoomClient) -> dict[int, str]:
    kv = await client.js.key_value(subjects.PARTITIONS_BUCKET)
    table: dict[int, str] = {}
    for p in range(partitions.DEFAULT_COUNT):
        try:
            entry = await kv.get(f"p-{p}")
        except KeyNotFoundError:  # free (moving) right now
            entry = None
        if entry is not None and entry.value:
            table[p] = codec.decode(entry.value, PartitionLease).replica
    return table


async def split(client: LoomClient) -> dict[int, str]:
    """Wait until the replicas own half the partitions each (the plan's end); the table."""

    async def shared() -> dict[int, str] | None:
        table = await owners(client)
        held = [list(table.values()).count(r) for r in REPLICAS]
        return table if held == [partitions.DEFAULT_COUNT // len(REPLICAS)] * 2 else None

    return await eventually(shared, "both replicas owning partitions", BOUND_S, every_s=0.1)


def ids_on(table: dict[int, str], replica: str, prefix: str, n: int) -> list[str]:
    """``n`` run ids whose partitions ``replica`` owns."""
    found: list[str] = []
    i = 0
    while len(found) < n:
        run_id = f"{prefix}-{i}"
        if table[partitions.partition_of(run_id, partitions.DEFAULT_COUNT)] == replica:
            found.append(run_id)
        i += 1
    return found


def spans(histories: dict[str, list[EventRecord]]) -> dict[str, tuple[datetime, datetime]]:
    """Each run's running interval from its events: from its start (run_requested when
    not queued, else run_admitted) to its last event."""
    out: dict[str, tuple[datetime, datetime]] = {}
    for run_id, records in histories.items():
        requested = records[0]
        assert isinstance(requested.event, RunRequested)
        start = requested.at
        if requested.event.queued:
            start = next(r.at for r in records if isinstance(r.event, RunAdmitted))
        out[run_id] = (start, records[-1].at)
    return out


def most_at_once(intervals: list[tuple[datetime, datetime]]) -> int:
    edges = sorted(
        [(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1])
    )  # an end before a start at the same instant
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def book_of(client: LoomClient, tenant: str = "default") -> AdmissionBook:
    kv = await client.js.key_value(subjects.ADMISSION_BUCKET)
    return codec.decode((await kv.get(f"t-{tenant}")).value, AdmissionBook)


async def test_two_at_once_across_replicas_in_order_and_no_slot_leaks_when_one_dies(
    stack: Stack,
) -> None:
    async with await LoomClient.connect(stack.url, seed=stack.env["LOOM_NKEY_SEED_FILE"]) as op:
        await op.wait_ready(("executor", "planner", "toolrunner"), timeout=60)
        table = await split(op)
        # first wave: 8 runs alternating between the replicas' partitions, submitted in
        # this order (every submission lands on either replica: the queue group)
        a, b = (ids_on(table, r, "w1", 4) for r in REPLICAS)
        wave = [x for pair in zip(a, b, strict=True) for x in pair]
        for run_id in wave:
            await submit(op, RunRequest(plan=sleeper(2.0), run_id=run_id))
        histories = {r: await op.wait(r, timeout=BOUND_S) for r in wave}
        assert all(isinstance(h[-1].event, RunCompleted) for h in histories.values())
        queued = [r for r in wave if histories[r][0].event.queued]  # type: ignore[union-attr]
        assert len(queued) >= len(wave) - 2 * LIMIT, stack.logs()  # a few may end meanwhile
        intervals = spans(histories)
        assert most_at_once(list(intervals.values())) <= LIMIT, intervals
        # started in submission order (two picks by two replicas may land a few ms apart)
        starts = [intervals[r][0] for r in queued]
        slack = timedelta(milliseconds=300)
        assert all(x <= y + slack for x, y in zip(starts, starts[1:], strict=False)), starts
        assert (await book_of(op)).running == []

        # second wave: qb's runs hold both slots (long naps) and qa's wait; qb dies
        table = await owners(op)
        held = ids_on(table, "qb", "w2", LIMIT)
        waiting = ids_on(table, "qa", "w2q", 3)
        for run_id in held:
            await submit(op, RunRequest(plan=sleeper(4.0), run_id=run_id))
        for run_id in held:
            await until(op, run_id, having("timer_started"), BOUND_S)
        for run_id in waiting:
            await submit(op, RunRequest(plan=sleeper(0.3), run_id=run_id))
        book = await book_of(op)
        assert {s.run_id for s in book.running} == set(held)
        assert [s.run_id for s in book.waiting] == waiting
        stack.executors["qb"].kill()
        histories = {r: await op.wait(r, timeout=BOUND_S) for r in [*held, *waiting]}
        assert all(isinstance(h[-1].event, RunCompleted) for h in histories.values()), stack.logs()
        intervals = spans(histories)
        assert most_at_once(list(intervals.values())) <= LIMIT, intervals
        first_queued = min(intervals[r][0] for r in waiting)
        assert first_queued >= min(intervals[r][1] for r in held)  # a slot freed first
        book = await book_of(op)
        assert book.running == [] and book.waiting == [], book
