"""Schedules on the real stack (nats-server with JetStream, SQLite, every service, NATS
credentials, JWT principals): a schedule fires runs once per fire time, across a restart
of every service and against racing firers; pause, delete and trigger do what they say;
the runs act for the schedule's creator; hostile requests get typed errors with paths."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tests.integration.waiting import eventually, having, until

from loom_cli.app import load_run_request
from loom_cli.schedule import ask
from loom_core import codec, routes
from loom_core import schedules as sched
from loom_core.contracts import (
    Plan,
    Principal,
    RunAdmitted,
    RunCompleted,
    RunRequest,
    RunRequested,
    Schedule,
    ScheduleControl,
    ScheduleCreate,
    ScheduleReply,
    ScheduleSpec,
    SchedulesQuery,
    ToolStep,
)
from loom_infra.client import LoomClient, LoomError
from loom_infra.settings import AuthSettings, ScheduleSettings, Settings, StoreSettings
from loom_services.executor import ExecutorService
from loom_services.runtime import Stack
from loom_services.schedules import Scheduler, key_of
from loom_services.stack import LocalStack, all_services

pytestmark = pytest.mark.integration

ISSUER = "https://id.example.test"
AUDIENCE = "agentloom"
NOOP = RunRequest(plan=Plan(steps=[ToolStep(id="a", tool="noop")]))
MAX_SCHEDULES = 4


@pytest.fixture(scope="module")
def issuer_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: Any, sub: str = "alice", tenant: str = "acme") -> str:
    claims = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600,
              "roles": ["analyst"], "tenant": tenant}  # fmt: skip
    return jwt.encode(claims, key, algorithm="RS256")


@pytest.fixture
async def stack(
    tmp_path: Path, sqlite_store_settings: StoreSettings, issuer_key: rsa.RSAPrivateKey
) -> AsyncIterator[LocalStack]:
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(
        issuer_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=sqlite_store_settings,
        max_payload=64 * 1024,
        auth=AuthSettings(issuer=ISSUER, audience=AUDIENCE, public_key_file=key_file),
        schedules=ScheduleSettings(max_per_tenant=MAX_SCHEDULES),
    )
    async with LocalStack(settings, nats_port=-1, read_models="inline") as s:
        yield s


@pytest.fixture
async def client(stack: LocalStack, issuer_key: rsa.RSAPrivateKey) -> AsyncIterator[LoomClient]:
    async with await stack.client() as c:
        c.token = token(issuer_key)  # alice of acme
        yield c


def acme_key(name: str) -> str:
    """The bucket key of alice's schedule ``name`` (the platform's caller, claim acme)."""
    return key_of(Principal(user_id="alice", via="operator", tenant="acme"), name)


async def create(client: LoomClient, name: str, **when: Any) -> Schedule:
    reply = await ask(client, ScheduleCreate(name=name, when=ScheduleSpec(**when), run=NOOP))
    assert reply.error is None and reply.schedule is not None, reply.error
    return reply.schedule


async def control(client: LoomClient, name: str, action: str) -> ScheduleReply:
    return await ask(client, ScheduleControl(name=name, action=action))  # type: ignore[arg-type]


async def fired(client: LoomClient, name: str, at_least: int, bound_s: float = 15.0) -> Schedule:
    async def probe() -> Schedule | None:
        reply = await control(client, name, "describe")
        s = reply.schedule
        return s if s is not None and s.fired >= at_least else None

    return await eventually(probe, f"{name} fired {at_least} times", bound_s, every_s=0.05)


def grid(schedule: Schedule, until: datetime) -> list[datetime]:
    """Every fire time of an `every` schedule from its first to ``until``."""
    when = sched.When(sched.Every(sched.parse_every(schedule.when.every or ""), schedule.anchor),
                      sched.zone("UTC"))  # fmt: skip
    times, t = [], sched.next_fire(when, schedule.anchor)
    while t is not None and t <= until:
        times.append(t)
        t = sched.next_fire(when, t)
    return times


async def requested(client: LoomClient, run_id: str) -> RunRequested | None:
    records = await client.events(run_id)
    if not records:
        return None
    assert [r.kind for r in records].count("run_requested") == 1
    assert isinstance(records[0].event, RunRequested)
    return records[0].event


def executor_of(stack: LocalStack) -> ExecutorService:
    assert stack.stack is not None
    return next(s for s in stack.stack.services if isinstance(s, ExecutorService))


async def test_every_second_fires_once_per_time_across_a_restart(
    stack: LocalStack, client: LoomClient
) -> None:
    schedule = await create(client, "tick", every="1s", catch_up="all")
    assert schedule.next_at == schedule.anchor + timedelta(seconds=1)
    first = grid(schedule, schedule.anchor + timedelta(seconds=2))
    # each firing's run id is known in advance: wait on the runs' own events
    for t in first:
        records = await client.wait(sched.run_id_for(schedule.schedule_id, t), timeout=15)
        assert isinstance(records[-1].event, RunCompleted)
    await fired(client, "tick", 2)

    # stop every service (NATS and the store stay), then start them again
    assert stack.stack is not None
    await stack.stack.close()
    down_at = datetime.now(UTC)
    # not a synchronisation: while nothing runs, two fire times pass unfired
    await asyncio.sleep(2.2)
    up_at = datetime.now(UTC)
    stack.stack = Stack(all_services(stack.settings), stack.settings)
    await stack.stack.start()
    # the missed fire times, and two after the restart, each ran
    for t in grid(schedule, up_at + timedelta(seconds=2)):
        records = await client.wait(sched.run_id_for(schedule.schedule_id, t), timeout=15)
        assert isinstance(records[-1].event, RunCompleted)
    last = await fired(client, "tick", len(grid(schedule, up_at + timedelta(seconds=2))))

    assert last.last_fire_at is not None
    times = grid(last, last.last_fire_at)
    # catch-up `all`: no fire time was lost while nothing ran; each is one run
    assert len(times) == last.fired
    runs = [sched.run_id_for(last.schedule_id, t) for t in times]
    assert last.last_run_id == runs[-1]
    for run_id in runs:
        event = await requested(client, run_id)
        assert event is not None, f"{run_id} was never submitted"
        assert event.labels == {"schedule": "tick"}
        # the run acts for the schedule's creator, submitted by the engine
        assert event.principal == Principal(
            user_id="alice", via="executor", roles=["analyst"], tenant="acme", issuer=ISSUER
        )
    # the times that passed while it was down were fired after the restart (catch-up)
    missed = [t for t in times if down_at < t < up_at]
    assert len(missed) >= 2
    for t in missed:
        records = await client.events(sched.run_id_for(last.schedule_id, t))
        assert records[0].at >= up_at
    # and the tracing read model knows exactly these runs of the schedule
    prefix = f"sch-{last.schedule_id}-"

    async def listed() -> set[str] | None:
        mine = [r for r in await client.runs(limit=500) if r.run_id.startswith(prefix)]
        assert all(r.labels == {"schedule": "tick"} for r in mine)  # as `loom runs` shows
        found = {r.run_id for r in mine}
        return found if set(runs) <= found else None

    found = await eventually(listed, "the runs in the read model")
    # nothing but runs of its fire times (later ones: it kept firing after the describe)
    on_grid = {sched.run_id_for(last.schedule_id, t)
               for t in grid(last, last.last_fire_at + timedelta(seconds=60))}  # fmt: skip
    assert found <= on_grid
    await control(client, "tick", "delete")


async def test_racing_firers_and_a_crash_after_submit_fire_once(
    stack: LocalStack, client: LoomClient
) -> None:
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    await create(client, "once", at=at)
    executor = executor_of(stack)
    late = at + timedelta(seconds=1)

    def firer() -> Scheduler:  # another replica's, whose clock says the time has come
        other = Scheduler(
            stack.settings, executor.host.submit, executor.principals,
            executor._check_scheduled, clock=lambda: late,
        )  # fmt: skip
        other.kv = executor.scheduler.kv
        return other

    key = acme_key("once")
    # a firer that crashed after submitting, before moving the schedule on
    entry = await executor.scheduler.kv.get(key)
    crashed = await firer()._submit(codec.decode(entry.value, Schedule), at)
    assert not crashed.existing
    # then two firers at once
    a, b = await asyncio.gather(firer().fire_due(key), firer().fire_due(key))
    assert [f.run_id for f in a + b] == [crashed.run_id] * len(a + b)
    assert all(f.existing for f in a + b)
    done = (await control(client, "once", "describe")).schedule
    assert done is not None and done.fired == 1 and done.next_at is None
    assert done.last_run_id == crashed.run_id == sched.run_id_for(done.schedule_id, at)
    assert isinstance((await client.wait(crashed.run_id, timeout=10))[-1].event, RunCompleted)
    await control(client, "once", "delete")


async def test_an_index_that_missed_changes_is_resynced_from_the_bucket(
    stack: LocalStack, client: LoomClient
) -> None:
    made = await create(client, "seen", every="1h")
    scheduler = executor_of(stack).scheduler
    key = acme_key("seen")
    # as if the watcher had stopped: a schedule it never saw, one deleted behind its back
    scheduler.known.pop(key)
    scheduler.known["0000000000000000.ghost"] = (1, made)
    await scheduler.resync()
    assert scheduler.known[key][1] == made
    assert "0000000000000000.ghost" not in scheduler.known
    await control(client, "seen", "delete")


async def test_a_schedule_whose_rule_no_longer_compiles_is_paused_with_the_reason(
    stack: LocalStack, client: LoomClient
) -> None:
    made = await create(client, "broken", every="1h")
    scheduler = executor_of(stack).scheduler
    key = acme_key("broken")
    entry = await scheduler.kv.get(key)
    # as if the tz data had dropped its zone since it was created, and it is due
    spoiled = msgspec.structs.replace(
        made, when=ScheduleSpec(cron="0 * * * *", tz="Gone/Zone"), next_at=made.created_at
    )
    await scheduler.kv.update(key, codec.encode(spoiled), last=entry.revision)

    async def paused() -> Schedule | None:
        s = (await control(client, "broken", "describe")).schedule
        return s if s is not None and s.paused else None

    found = await eventually(paused, "the broken schedule paused")
    assert found.error is not None and found.error.code == "invalid_timezone"
    assert found.fired == 0
    await control(client, "broken", "delete")


async def test_pause_resume_delete_and_trigger(stack: LocalStack, client: LoomClient) -> None:
    await create(client, "witness", every="1s")
    await create(client, "paused", every="1s")
    before = (await fired(client, "paused", 1)).fired
    paused = (await control(client, "paused", "pause")).schedule
    assert paused is not None and paused.paused
    count = paused.fired
    seen = (await control(client, "witness", "describe")).schedule
    assert seen is not None
    later = await fired(client, "witness", seen.fired + 3)
    assert later.last_fire_at is not None
    still = (await control(client, "paused", "describe")).schedule
    assert still is not None and still.fired == count >= before
    # no run for the fire times the witness passed while it was paused
    assert still.last_fire_at is not None
    for t in grid(still, later.last_fire_at):
        if t > still.last_fire_at + timedelta(seconds=1):
            assert await requested(client, sched.run_id_for(still.schedule_id, t)) is None

    resumed = (await control(client, "paused", "resume")).schedule
    assert resumed is not None and not resumed.paused
    assert resumed.next_at is not None and resumed.next_at > later.last_fire_at
    await fired(client, "paused", count + 1)

    # trigger: fires now, once, apart from the grid
    triggered = await control(client, "witness", "trigger")
    assert triggered.run_id.startswith("sch-") and not triggered.existing
    records = await client.wait(triggered.run_id, timeout=10)
    assert isinstance(records[-1].event, RunCompleted)

    # delete: gone from describe and list, and it fires no more
    gone = await control(client, "paused", "delete")
    assert gone.schedule is not None
    missing = await control(client, "paused", "describe")
    assert missing.error is not None and missing.error.code == "schedule_not_found"
    listing = await ask(client, SchedulesQuery())
    assert [s.name for s in listing.schedules] == ["witness"]
    assert all(s.run is None for s in listing.schedules)  # listings leave the plan out
    mark = (await control(client, "witness", "describe")).schedule
    assert mark is not None and mark.last_fire_at is not None
    end = await fired(client, "witness", mark.fired + 3)
    assert end.last_fire_at is not None
    for t in grid(gone.schedule, end.last_fire_at):
        if t > mark.last_fire_at + timedelta(seconds=1):
            assert await requested(client, sched.run_id_for(gone.schedule.schedule_id, t)) is None
    await control(client, "witness", "delete")


async def test_schedules_belong_to_their_tenant(
    stack: LocalStack, client: LoomClient, issuer_key: rsa.RSAPrivateKey
) -> None:
    await create(client, "mine", cron="0 9 * * 1-5", tz="Europe/Lisbon")
    other = token(issuer_key, sub="bob", tenant="globex")
    assert (await ask(client, SchedulesQuery(), token=other)).schedules == []
    refused = await ask(client, ScheduleControl(name="mine", action="delete"), token=other)
    assert refused.error is not None and refused.error.code == "schedule_not_found"
    # bob's own schedule of that name is another one
    reply = await ask(client, ScheduleCreate(name="mine", when=ScheduleSpec(every="1h"), run=NOOP),
                      token=other)  # fmt: skip
    assert reply.error is None
    mine = (await control(client, "mine", "describe")).schedule
    assert mine is not None and mine.when.cron == "0 9 * * 1-5"
    assert mine.next_at is not None and mine.next_at.astimezone(
        sched.zone("Europe/Lisbon")).hour == 9  # fmt: skip
    # no token: refused (this stack admits no anonymous user)
    client.token = None
    anonymous = await ask(client, SchedulesQuery())
    assert anonymous.error is not None and anonymous.error.code == "not_authenticated"


async def test_a_tenant_users_schedules_are_that_tenants_own(
    tmp_path: Path, sqlite_store_settings: StoreSettings, issuer_key: rsa.RSAPrivateKey
) -> None:
    """operator@acme's schedules are acme's, verified (the subject's tenant, bound as on
    submit); a token naming another tenant is refused ``tenant_mismatch``; the platform's
    schedules made with a token claiming acme are another scope: neither sees the other's."""
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(
        issuer_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=sqlite_store_settings,
        auth=AuthSettings(issuer=ISSUER, audience=AUDIENCE, public_key_file=key_file),
        tenants=("acme",),
    )
    async with (
        LocalStack(settings, nats_port=-1) as stack,
        await stack.client(tenant="acme") as acme,
        await stack.client() as platform,
    ):
        acme.token = platform.token = token(issuer_key)  # alice, claiming acme
        spec = ScheduleSpec(every="1h")
        made = await ask(acme, ScheduleCreate(name="nightly", when=spec, run=NOOP))
        assert made.error is None and made.schedule is not None, made.error
        assert made.schedule.tenant == "acme"
        assert made.schedule.principal == Principal(
            user_id="alice", via="operator", roles=["analyst"], tenant="acme", issuer=ISSUER,
            tenant_verified=True,
        )  # fmt: skip
        # its firing is acme's run, as if operator@acme had submitted it
        fired = await ask(acme, ScheduleControl(name="nightly", action="trigger"))
        assert fired.run_id is not None
        first = (await acme.wait(fired.run_id, timeout=30))[0].event
        assert isinstance(first, RunRequested) and first.principal is not None
        assert first.principal.tenant_verified and first.principal.via == "executor"
        # a token of another tenant on acme's credentials: refused, nothing stored
        wrong = token(issuer_key, sub="bob", tenant="globex")
        refused = await ask(acme, ScheduleCreate(name="x", when=spec, run=NOOP), token=wrong)
        assert refused.error is not None and refused.error.code == "tenant_mismatch"
        listed = await ask(acme, SchedulesQuery(), token=wrong)
        assert listed.error is not None and listed.error.code == "tenant_mismatch"
        # the platform's schedules for a token claiming acme are not the tenant's
        assert (await ask(platform, SchedulesQuery())).schedules == []
        theirs = await ask(platform, ScheduleCreate(name="nightly", when=spec, run=NOOP))
        assert theirs.error is None and theirs.schedule is not None
        assert theirs.schedule.principal is not None
        assert not theirs.schedule.principal.tenant_verified
        mine = (await ask(acme, SchedulesQuery())).schedules
        assert [s.schedule_id for s in mine] == [made.schedule.schedule_id]


async def test_a_tenants_firings_take_its_concurrent_run_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A firing is held to its tenant's quotas as a submission is: at acme's concurrent
    run limit, a firing is stored queued and starts when acme's running run ends."""
    monkeypatch.setenv("LOOM_EMBEDDER", "hash")  # memory without loading a model
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text("tenants:\n  acme:\n    max_concurrent_runs: 1\n")
    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=StoreSettings(kind="sqlite", data_dir=tmp_path / "data"),
        tenants=("acme",),
        quotas_file=quotas,
    )
    examples = Path(__file__).resolve().parents[2] / "examples"
    async with (
        LocalStack(settings, nats_port=-1) as stack,
        await stack.client(tenant="acme") as acme,
    ):
        holder = await acme.submit(load_run_request(examples / "approval.yaml", [], None))
        await until(acme, holder.run_id, having("step_suspended"), 30)
        made = await ask(acme, ScheduleCreate(name="q", when=ScheduleSpec(every="1h"), run=NOOP))
        assert made.error is None, made.error
        fired = await ask(acme, ScheduleControl(name="q", action="trigger"))
        assert fired.run_id is not None and not fired.existing
        records = await until(acme, fired.run_id, having("run_queued"), 30)
        assert records[0].event.queued  # type: ignore[union-attr]
        # the holder ends: the firing's run is admitted and completes
        reply = await acme.resume(holder.run_id, {"approved": True}, label="manager")
        assert reply.ok, reply.error
        done = await acme.wait(fired.run_id, timeout=30)
        assert isinstance(done[-1].event, RunCompleted)
        assert any(isinstance(r.event, RunAdmitted) for r in done)


HOSTILE: dict[str, tuple[dict[str, Any], str, str]] = {
    "impossible cron": ({"cron": "0 0 31 2 *"}, "invalid_cron", "$.when.cron.day_of_month"),
    "bad cron field": ({"cron": "61 * * * *"}, "invalid_cron", "$.when.cron.minute"),
    "four fields": ({"cron": "* * * *"}, "invalid_cron", "$.when.cron"),
    "bad tz": ({"cron": "* * * * *", "tz": "Mars/Olympus"}, "invalid_timezone", "$.when.tz"),
    "tz path": ({"cron": "* * * * *", "tz": "../../etc/passwd"}, "invalid_timezone", "$.when.tz"),
    "bad every": ({"every": "soon"}, "invalid_schedule", "$.when.every"),
    "too often": ({"every": "10ms"}, "invalid_schedule", "$.when.every"),
    "two rules": ({"every": "1m", "cron": "* * * * *"}, "invalid_schedule", "$.when"),
    "no rule": ({}, "invalid_schedule", "$.when"),
    "past": ({"at": datetime(2020, 1, 1, tzinfo=UTC)}, "invalid_schedule", "$.when.at"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_schedules_are_refused_naming_the_field(
    client: LoomClient, case: str
) -> None:
    when, code, path = HOSTILE[case]
    reply = await ask(client, ScheduleCreate(name="bad", when=ScheduleSpec(**when), run=NOOP))
    assert reply.error is not None and (reply.error.code, reply.error.path) == (code, path)
    assert (await ask(client, SchedulesQuery())).schedules == []


async def test_hostile_requests_are_refused_and_bounded(
    stack: LocalStack, client: LoomClient
) -> None:
    spec = ScheduleSpec(every="1h")
    subject = routes.SCHEDULE.subject(via="operator")

    async def raw(body: dict[str, Any] | bytes) -> ScheduleReply:
        data = body if isinstance(body, bytes) else codec.encode(body)
        headers = {"Authorization": f"Bearer {client.token}"}
        msg = await client.nc.request(subject, data, timeout=10, headers=headers)
        return codec.decode(msg.data, ScheduleReply)

    for name in ("a.b", "with space", "", "x" * 49, "-lead"):
        reply = await ask(client, ScheduleCreate(name=name, when=spec, run=NOOP))
        assert reply.error is not None and reply.error.code == "invalid_schedule", name
        assert reply.error.path == "$.name"
    base = {"type": "schedule_create", "name": "x", "when": {"every": "1h"},
            "run": {"plan": {"steps": [{"id": "a", "kind": "tool", "tool": "noop"}]}}}  # fmt: skip
    # who the runs act for is never a body field
    forged = await raw({**base, "run": {**base["run"], "principal": {"user_id": "root"}}})
    assert forged.error is not None and forged.error.code == "invalid_shape"
    assert "principal" in (forged.error.path or "") + forged.error.message
    forged = await raw({**base, "principal": {"user_id": "root", "via": "operator"}})
    assert forged.error is not None and forged.error.code == "invalid_shape"
    # run ids are derived; engine fields are refused; the label is the schedule's
    reply = await raw({**base, "run": {**base["run"], "run_id": "mine"}})
    assert reply.error is not None and reply.error.path == "$.run.run_id"
    reply = await raw({**base, "run": {**base["run"], "labels": {"schedule": "other"}}})
    assert reply.error is not None and reply.error.path == "$.run.labels.schedule"
    reply = await raw({**base, "run": {**base["run"], "parent": {"run_id": "p", "step_id": "s"}}})
    assert reply.error is not None and reply.error.code == "internal_field"
    assert reply.error.path == "$.run.parent"
    reply = await raw({**base, "run": {"plan": {"steps": [{"id": "a", "kind": "tool",
                       "tool": "noop", "depends_on": ["ghost"]}]}}})  # fmt: skip
    assert reply.error is not None and reply.error.path.startswith("$.run.plan.steps[0]")
    # a firing's run id is the engine's: a client may not take one beforehand
    with pytest.raises(LoomError) as taken:
        await client.submit(RunRequest(plan=NOOP.plan, run_id="sch-0123456789ab-x"))
    assert (taken.value.error.code, taken.value.error.path) == ("invalid_run_id", "$.run_id")
    # a huge plan, malformed JSON, a deep document
    huge = {**base, "run": {**base["run"], "input": {"blob": "x" * 70_000}}}
    assert (await raw(huge)).error.code == "payload_too_large"  # type: ignore[union-attr]
    assert (await raw(b"{nope")).error.code == "malformed_json"  # type: ignore[union-attr]
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    assert (await raw({**base, "run": {**base["run"], "input": {"d": deep}}})).error.code == (  # type: ignore[union-attr]
        "too_deep"
    )
    # a bound on how many schedules one tenant has
    for i in range(MAX_SCHEDULES):
        assert (await ask(client, ScheduleCreate(name=f"s{i}", when=spec, run=NOOP))).error is None
    over = await ask(client, ScheduleCreate(name="one-more", when=spec, run=NOOP))
    assert over.error is not None and over.error.code == "too_many_schedules"
    again = await ask(client, ScheduleCreate(name="s0", when=spec, run=NOOP))
    assert again.error is not None and again.error.code in ("schedule_exists", "too_many_schedules")
    await control(client, "s0", "delete")
    again = await ask(client, ScheduleCreate(name="s1", when=spec, run=NOOP))
    assert again.error is not None and again.error.code == "schedule_exists"


async def test_with_executor_replicas_each_firing_is_submitted_by_its_owner_once(
    stack: LocalStack, client: LoomClient
) -> None:
    """Two replicas' firers, each owning half of the due firings' runs (a write outside
    a replica's partitions raises NotOwner, as the run host does): each submits only its
    own, the schedule moves on once every firing is stored, and none is stored twice."""
    from loom_infra.ownership import NotOwner
    from loom_services.schedules import FiringElsewhere

    made = await create(client, "fan", every="1h", catch_up="all")
    executor = executor_of(stack)
    late = made.anchor + timedelta(hours=4, seconds=1)
    due = grid(made, late)
    assert len(due) == 4
    run_ids = [sched.run_id_for(made.schedule_id, t) for t in due]
    owner = {run_id: k % 2 for k, run_id in enumerate(run_ids)}  # alternate replicas
    submitted: list[str] = []

    def replica(mine: int) -> Scheduler:
        async def submit(run_id: str, submission: Any) -> list[Any]:
            if owner.get(run_id, 0) != mine:
                raise NotOwner(run_id, 1 - mine, f"replica-{1 - mine}")
            submitted.append(run_id)
            return await executor.host.submit(run_id, submission)

        firer = Scheduler(stack.settings, submit, executor.principals,
                          executor._check_scheduled, clock=lambda: late,
                          exists=executor._run_exists)  # fmt: skip
        firer.kv = executor.scheduler.kv
        return firer

    a, b = replica(0), replica(1)
    key = acme_key("fan")
    elsewhere = 0
    for _ in range(4):  # bounded: each round stores at least one replica's firings
        results = await asyncio.gather(a.fire_due(key), b.fire_due(key), return_exceptions=True)
        elsewhere += sum(isinstance(r, FiringElsewhere) for r in results)
        assert not [r for r in results if isinstance(r, BaseException)
                    and not isinstance(r, FiringElsewhere)], results  # fmt: skip
        moved = (await control(client, "fan", "describe")).schedule
        assert moved is not None
        if moved.next_at is not None and moved.next_at > late:
            break
    assert elsewhere >= 1  # the path was taken: a replica left firings to the other
    assert moved.fired == 4 and moved.last_run_id == run_ids[-1]
    assert set(submitted) == set(run_ids)  # each by its owner (a repeat answers existing)
    for run_id in run_ids:
        records = await client.events(run_id)
        assert isinstance(records[0].event, RunRequested)  # stored once: one request
        assert sum(isinstance(r.event, RunRequested) for r in records) == 1
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
    await control(client, "fan", "delete")
