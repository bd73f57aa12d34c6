"""Executors scale by replicas: three executor processes share the partitions over one
nats-server (credentials on) and one PostgreSQL; one is SIGKILLed mid-run, and later
another is stopped cleanly (SIGTERM, as a rolling restart does).

What must hold:
- all three start at the same moment on an empty database (the store's tables are
  created under an advisory lock: none fails);
- before the kill, the partitions are split 3/3/2 and every replica owns some; the
  replica killed is the owner of partition 0, which runs the one relay;
- after it, the dead replica's partitions are owned by the survivors within a bound
  (the lease, plus a little): the failover time is measured from the kill to the last
  of its partitions taken over, and to the first new event of a run in one of them;
- every run completes with the expected output, including its sub-run (whose start
  crosses partitions: the parent's owner passes it to the child's);
- the store holds each run's events at versions 1..n, each fact once (no step completed
  twice, one run_completed), and LOOM_RUNS holds each event id once;
- submissions with explicit run ids land on any replica (queue group) and are passed to
  the owner; so do a cancel (control) and a resume after the kill, and a signal
  reaches the run waiting for it;
- no event is published while partition 0 (and so the relay) moves: after the kill
  that pause is about one lease; after the clean stop, which gives the leases back
  before the process exits, it is far shorter than a lease.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import DeliverPolicy

from loom_core import codec, partitions, subjects
from loom_core.contracts import (
    ApprovalStep,
    EventMatch,
    FinalStep,
    PartitionLease,
    Plan,
    RunCompleted,
    RunRequest,
    SleepStep,
    StepCompleted,
    SubRunStep,
    ToolStep,
    WaitEventStep,
)
from loom_infra.client import LoomClient
from loom_infra.credentials import ADMIN, ensure_credentials
from loom_infra.natsserver import EmbeddedNats
from loom_infra.processes import ServiceProcess, replicated_services, wait_healthy_at, wait_until
from loom_infra.settings import StoreSettings
from loom_infra.store import open_event_store
from loom_services import partitioned
from loom_services.runtime import provision

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
REPLICAS = ("ex-a", "ex-b", "ex-c")
RUNS = 24
LEASE_S = 3.0
STOPPED = ("run_completed", "run_failed", "plan_rejected", "run_cancelled")


def effect(sid: str, label: str, deps: list[str] | None = None) -> ToolStep:
    return ToolStep(id=sid, tool="effect", input={"label": label, "ms": 30},
                    depends_on=deps or [])  # fmt: skip


def plan() -> Plan:
    chain = [effect("s0", "{{ input.name }}")]
    for i in range(1, 6):
        chain.append(effect(f"s{i}", f"{{{{ steps.s{i - 1}.output.label }}}}.{i}"))
        if i == 3:  # a durable timer in the middle: its inbox message crosses replicas
            chain.append(SleepStep(id="nap", seconds=2.0, depends_on=["s3"]))
    chain[-1] = effect("s5", "{{ steps.s4.output.label }}.5", deps=["nap"])
    child = Plan(steps=[
        effect("c0", "child"), effect("c1", "{{ steps.c0.output.label }}!"),
        FinalStep(id="co", output="{{ steps.c1.output.label }}"),
    ])  # fmt: skip
    sub = SubRunStep(id="sub", plan=child, depends_on=["s5"])
    final = FinalStep(id="out", output="{{ steps.s5.output.label }}/{{ steps.sub.output }}")
    return Plan(steps=[*chain, sub, final])


@dataclass
class Deployment:
    url: str
    env: dict[str, str]
    store: StoreSettings
    executors: dict[str, ServiceProcess]
    others: list[ServiceProcess]

    def logs(self) -> str:
        return "\n".join(s.tail(40) for s in [*self.executors.values(), *self.others])


@pytest.fixture
def deployment(tmp_path: Path, pg_store_settings: StoreSettings) -> Iterator[Deployment]:
    creds = ensure_credentials(tmp_path / "creds")
    server = EmbeddedNats(
        data_dir=tmp_path / "nats", port=-1, authorization=creds.authorization()
    ).start()
    asyncio.run(provision(server.url, creds.seed_file(ADMIN)))
    effects = tmp_path / "effects.log"
    effects.touch()
    pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    assert pg_store_settings.postgres_url is not None
    env = {
        **os.environ,
        "LOOM_NATS_URL": server.url,
        "LOOM_STORE": "postgres",
        "LOOM_POSTGRES_URL": pg_store_settings.postgres_url,
        "LOOM_DATA_DIR": str(tmp_path / "data"),
        "LOOM_LOG_LEVEL": "INFO",
        "LOOM_TOOL_MODULES": "crash_tools",
        "LOOM_TEST_EFFECTS": str(effects),
        "LOOM_PARTITION_LEASE_S": str(LEASE_S),
        "PYTHONPATH": pythonpath,
        "LOOM_NKEY_SEED_FILE": str(creds.seed_file("operator")),  # the test's own client
    }
    executors, others = replicated_services(env, creds.seed_file, tmp_path, REPLICAS)
    try:
        # every replica at once on an empty database, as a Kubernetes Deployment starts
        # them: the store creates its tables under an advisory lock, so none fails
        for service in [*executors.values(), *others]:
            service.start()
        for replica in executors.values():
            asyncio.run(wait_healthy_at(server.url, env["LOOM_NKEY_SEED_FILE"], replica))
        yield Deployment(server.url, env, pg_store_settings, executors, others)
    finally:
        for service in [*executors.values(), *others]:
            service.stop()
        server.stop()


class Leases:
    """The partition table as the bucket says it, with when each owner took over."""

    def __init__(self) -> None:
        self.owner: dict[int, str | None] = {}
        self.since: dict[int, float] = {}
        self.changed = asyncio.Event()

    async def follow(self, kv: Any) -> None:
        watcher = await kv.watchall()
        async for entry in watcher:
            if entry is None or not entry.key.startswith("p-"):
                continue
            p = int(entry.key[2:])
            lease = None
            if entry.operation is None and entry.value:
                lease = codec.decode(entry.value, PartitionLease).replica
            if lease != self.owner.get(p):
                self.owner[p], self.since[p] = lease, time.monotonic()
                self.changed.set()

    def held(self, replica: str) -> set[int]:
        return {p for p, o in self.owner.items() if o == replica}


class Runs:
    """Follows LOOM_RUNS: which runs ended, and when each run last had an event."""

    def __init__(self) -> None:
        self.ended: dict[str, str] = {}
        self.last_event: dict[str, float] = {}
        self.first_after: dict[str, float] = {}
        self.killed_at: float | None = None
        self.kinds: dict[str, set[str]] = {}  # the event kinds seen per run
        self.arrivals: list[float] = []  # when each event reached LOOM_RUNS's reader
        self.changed = asyncio.Event()

    def pause(self, since: float, until: float) -> float:
        """The longest time with no event published, from ``since`` to the first event
        after ``until`` (a replica's relay gone, until the next one publishes)."""
        times = [since, *(t for t in self.arrivals if t > since)]
        times = [t for t in times if t <= until] + [t for t in times if t > until][:1]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    async def on_msg(self, msg: Any) -> None:
        _, _, run_id, kind = msg.subject.split(".", 3)
        now = time.monotonic()
        self.arrivals.append(now)
        self.last_event[run_id] = now
        if self.killed_at is not None and run_id not in self.first_after:
            self.first_after[run_id] = now
        if kind in STOPPED:
            self.ended[run_id] = kind
        self.kinds.setdefault(run_id, set()).add(kind)
        self.changed.set()


async def stream_ids(client: LoomClient) -> Counter[str]:
    info = await client.js.stream_info(subjects.RUN_EVENTS_STREAM)
    ids: Counter[str] = Counter()
    sub = await client.js.subscribe(
        subjects.RUN_EVENTS_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=10)
            ids[(msg.headers or {}).get(subjects.MSG_ID, "").rsplit("/", 1)[0]] += 1
    finally:
        await sub.unsubscribe()
    return ids


async def test_a_killed_executor_replicas_partitions_move_and_every_run_completes(
    deployment: Deployment,
) -> None:
    count = partitions.DEFAULT_COUNT
    seed = deployment.env["LOOM_NKEY_SEED_FILE"]
    async with await LoomClient.connect(deployment.url, seed=seed) as client:
        await client.wait_ready(("executor", "planner", "toolrunner"), timeout=60)
        leases = Leases()
        kv = await client.js.key_value(subjects.PARTITIONS_BUCKET)
        following = asyncio.ensure_future(leases.follow(kv))

        def split_evenly() -> bool:
            shares = sorted(len(leases.held(r)) for r in REPLICAS)
            return shares == [2, 3, 3] and len(leases.owner) == count

        assert await wait_until(leases.changed, split_evenly, timeout=30), (
            f"partitions not split over three replicas: {leases.owner}\n{deployment.logs()}"
        )
        runs = Runs()
        live = await client.js.subscribe(
            subjects.RUN_EVENTS_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL,
            cb=runs.on_msg,
        )  # fmt: skip
        names = [f"fo-{i:02d}" for i in range(RUNS)]
        submitting = time.monotonic()
        await asyncio.gather(
            *(client.submit(RunRequest(plan=plan(), input={"name": n}, run_id=n)) for n in names)
        )
        # the replicas have just settled their leases; one still handing a partition
        # over tells a forwarder so at once, so none waits out a forward's 5 s timeout
        # (the runs of a partition then finished before the kill could cut them)
        submitted = time.monotonic() - submitting
        assert submitted < partitioned.REQUEST_TIMEOUT_S - 1, f"submitted in {submitted:.2f}s"
        # runs that wait on people and events, answered after the kill (resume, signal),
        # and a long one to cancel (control): each request lands on any replica
        sleeper = RunRequest(plan=Plan(steps=[SleepStep(id="zz", seconds=600)]), run_id="fo-zz")
        ask = Plan(steps=[
            ApprovalStep(id="ok", label="boss", schema={"type": "boolean"}),
            FinalStep(id="out", output="{{ steps.ok.output }}"),
        ])  # fmt: skip
        wait = Plan(steps=[
            WaitEventStep(id="w", events=[EventMatch(name="paid", key="k1")]),
            FinalStep(id="out", output="{{ steps.w.output.paid }}"),
        ])  # fmt: skip
        for request in (sleeper, RunRequest(plan=ask, run_id="fo-ask"),
                        RunRequest(plan=wait, run_id="fo-sig")):  # fmt: skip
            await client.submit(request)

        # kill the owner of partition 0, which also runs the one relay, once runs are
        # under way everywhere: its partitions and the relay must move
        await wait_until(runs.changed, lambda: len(runs.last_event) >= RUNS // 2, timeout=30)
        victim = leases.owner[0]
        assert victim is not None
        moved = leases.held(victim)
        in_moved = [n for n in names if partitions.partition_of(n, count) in moved]

        def victim_busy() -> bool:
            # a run of the victim's partitions started and not ended: the kill cuts it
            # (half the runs having begun does not say the victim's have)
            return any(n in runs.last_event and n not in runs.ended for n in in_moved)

        assert await wait_until(runs.changed, victim_busy, timeout=30), (
            f"no run of {victim}'s partitions {sorted(moved)} in flight to cut: "
            f"{ {n: (runs.last_event.get(n), runs.ended.get(n)) for n in in_moved} }\n"
            + deployment.logs()
        )
        runs.killed_at = killed_at = time.monotonic()
        deployment.executors[victim].kill()

        def taken_over() -> bool:
            return all(leases.owner.get(p) not in (None, victim) for p in moved)

        assert await wait_until(leases.changed, taken_over, timeout=4 * LEASE_S), (
            f"partitions {sorted(moved)} of {victim} not taken over: {leases.owner}\n"
            + deployment.logs()
        )
        failover = max(leases.since[p] for p in moved) - killed_at
        # no event is published from the kill until the next owner of partition 0 runs
        # the relay: every run, on every replica, waits that long
        assert await wait_until(runs.changed, lambda: runs.arrivals[-1] > leases.since[0], 30)
        crash_pause = runs.pause(killed_at, leases.since[0])

        cancelled = await client.control("fo-zz", "cancel", reason="failover test")
        assert cancelled.ok
        # a resume answers a suspension that exists: wait for it (bounded), wherever
        # its run lives now
        suspended = await wait_until(
            runs.changed, lambda: "step_suspended" in runs.kinds.get("fo-ask", ()), timeout=30
        )
        assert suspended, f"fo-ask never suspended: {runs.kinds.get('fo-ask')}"
        resumed_reply = await client.resume("fo-ask", True, label="boss")
        assert resumed_reply.ok, resumed_reply.error
        await client.signal("paid", "k1", "yes")
        extra = ["fo-zz", "fo-ask", "fo-sig"]

        # a clean stop (SIGTERM, a rolling restart) of the relay's new owner, with runs
        # still going on both survivors: it gives its leases back before it exits, so
        # partition 0 and the relay move at once, and the pause is short
        await wait_until(runs.changed, lambda: len(runs.ended) >= 2, timeout=60)
        relay_owner = leases.owner[0]
        assert relay_owner is not None and relay_owner != victim
        handed = leases.held(relay_owner)
        stopped_at = time.monotonic()
        await asyncio.to_thread(deployment.executors[relay_owner].stop)
        survivor = next(r for r in REPLICAS if r not in (victim, relay_owner))
        assert await wait_until(
            leases.changed, lambda: all(leases.owner.get(p) == survivor for p in handed), 10
        ), f"{relay_owner}'s partitions not handed over: {leases.owner}\n{deployment.logs()}"
        handover = max(leases.since[p] for p in handed) - stopped_at
        assert await wait_until(runs.changed, lambda: runs.arrivals[-1] > leases.since[0], 30)
        clean_pause = runs.pause(stopped_at, leases.since[0])

        def all_ended() -> bool:
            return all(n in runs.ended for n in [*names, *extra])

        ended = await wait_until(runs.changed, all_ended, timeout=120)
        await live.unsubscribe()
        following.cancel()
        assert ended, f"runs not ended: {sorted(set(names) - set(runs.ended))}\n{deployment.logs()}"
        assert runs.ended["fo-zz"] == "run_cancelled"
        assert runs.ended["fo-ask"] == runs.ended["fo-sig"] == "run_completed"
        resumed = [runs.first_after[n] - killed_at for n in in_moved if n in runs.first_after]
        assert resumed, f"no run of {victim}'s partitions {sorted(moved)} was in flight"

        # every run completed with its output, its versions 1..n, each fact once
        store = open_event_store(deployment.store)
        try:
            all_records = {n: store.load(n) for n in names}
            children = {n: store.load(f"{n}--sub") for n in names}
        finally:
            store.close()
        for name, records in all_records.items():
            assert [r.seq for r in records] == list(range(1, len(records) + 1)), name
            done = Counter(r.event.step_id for r in records if isinstance(r.event, StepCompleted))
            assert done and max(done.values()) == 1, (name, done)
            ends = [r.event for r in records if isinstance(r.event, RunCompleted)]
            assert len(ends) == 1, (name, [r.event for r in records][-3:])
            assert ends[0].output == f"{name}.1.2.3.4.5/child!", ends[0].output
            child = children[name]
            assert [r.seq for r in child] == list(range(1, len(child) + 1))
            assert sum(isinstance(r.event, RunCompleted) for r in child) == 1
        ids = await stream_ids(client)
        assert not {i: n for i, n in ids.items() if n > 1}, "an event published twice"

        print(
            f"\nfailover: {victim} held partitions {sorted(moved)} ({len(in_moved)} runs); "
            f"all taken over {failover:.2f}s after the kill (lease {LEASE_S}s); "
            f"first event of a moved run {min(resumed):.2f}s, last {max(resumed):.2f}s "
            f"after it; no event published for {crash_pause:.2f}s (the relay's move)\n"
            f"clean stop of {relay_owner}: partitions {sorted(handed)} handed over in "
            f"{handover:.2f}s; no event published for {clean_pause:.2f}s"
        )
        assert failover <= 2 * LEASE_S, f"failover took {failover:.2f}s"
        assert crash_pause <= 2 * LEASE_S, f"publishing paused {crash_pause:.2f}s after a crash"
        # a rolling restart must not cost a lease: far below one (a slow machine's margin)
        assert clean_pause < LEASE_S / 2, (
            f"publishing paused {clean_pause:.2f}s on a clean stop\n{deployment.logs()}"
        )
