"""Every route from every identity, against a real nats-server secured with the
credentials generated from the route registry (``loom_infra.credentials``).

The expected outcome of each attempt comes from the registry itself (who publishes,
who consumes with which filter and queue group), computed here independently of the
credentials module; the actual outcome from the server. Every disallowed operation must
be refused, and the refusal logged by the connection that hit it; every allowed one must
work: a subscriber with rights receives what was published.

Refusals are detected deterministically: the server answers a denied PUB or SUB with
``-ERR 'Permissions Violation ...'`` before the PONG of a PING sent after it, and nats-py
runs the error callback inline while reading, so once such a flush returns the refusal,
if any, has been seen (see ``Conn.refused``; a bounded wait backs this up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from loom_cli.app import load_run_request
from loom_core import codec, routes
from loom_core.contracts import Ping, RunCompleted
from loom_core.routes import ROUTES, Route
from loom_infra import bus
from loom_infra.client import LoomClient
from loom_infra.credentials import ADMIN, Credentials, ensure_credentials, permissions
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings, StoreSettings
from loom_services.runtime import provision
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BOUND_S = 2.0  # how long an expected message or refusal may take (they take ms)
# the route identities, and admin (which may do nothing on any route)
IDENTITIES: tuple[str, ...] = (*routes.IDENTITIES, ADMIN)


# ----------------------------------------------------------------------------- oracle
# What the registry says, written here without loom_infra.credentials.


def covers(pattern: str, subject: str) -> bool:
    """``pattern`` (NATS wildcards) matches every subject ``subject`` can stand for."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token == "*" and s[i] == ">") or token not in ("*", s[i]):
            return False
    return len(p) == len(s)


def may_publish(identity: str, route: Route, subject: str) -> bool:
    if identity not in route.publishers or not covers(route.wildcard, subject):
        return False
    if route.own_param is None:
        return True
    own = route.pattern.replace("{" + route.own_param + "}", identity)
    return covers(routes._PARAM.sub("*", own), subject)


def may_subscribe(identity: str, subject: str, queue: str | None) -> bool:
    for route in ROUTES:
        for consumer in route.consumers:
            if consumer.identity != identity or (consumer.queue and consumer.queue != queue):
                continue
            if any(covers(f, subject) for f in route.filters(consumer)):
                return True
    return False


def subject_for(route: Route, identity: str) -> str:
    """A concrete subject of ``route``; an own parameter filled with ``identity`` when it
    publishes there (else with a publisher's: an attempt to speak for someone else)."""
    values = {"run_id": "R1", "name": "n", "key": "k", "tool": "echo", "service": "executor",
              "part": "C", "id": "x", "tenant": "t", "schedule": "s", "digest": "d0",
              "partition": "3"}  # fmt: skip
    if "event" in route.params:
        values["event"] = routes.tag_of(route.messages[0])
    if route.own_param:
        values[route.own_param] = identity if identity in route.publishers else route.publishers[0]
    return route.subject(**{p: values[p] for p in route.params})


def concrete(filter_subject: str) -> str:
    return ".".join("R1" if t == "*" else "x" if t == ">" else t for t in filter_subject.split("."))


# ----------------------------------------------------------------------------- harness


@dataclass
class Conn:
    """One identity's connection, recording every asynchronous error it is told."""

    identity: str
    nc: NATS | None = None
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc).lower())
        self.changed.set()

    async def refused(self, needle: str, since: int) -> bool:
        """Did the server refuse ``needle`` (after error number ``since``)? A refusal
        arrives before the PONG of a PING sent after the command. nats-py writes a flush's
        PING straight to the socket while commands wait for its flusher task, so the
        first flush may overtake them; by the time its PONG is back they are written, and
        a second flush is ordered after them."""
        assert self.nc is not None
        await self.nc.flush(timeout=BOUND_S)
        await self.nc.flush(timeout=BOUND_S)
        return any(needle in e for e in self.errors[since:])

    async def wait_refused(self, needle: str, since: int) -> bool:
        deadline = asyncio.get_running_loop().time() + BOUND_S
        while not any(needle in e for e in self.errors[since:]):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return True


async def connect(url: str, creds: Credentials, identity: str) -> Conn:
    conn = Conn(identity)
    conn.nc = await bus.connect(
        url,
        f"perm-{identity}",
        persistent=False,
        seed=creds.seed_file(identity),
        identity=identity,
        on_error=conn.on_error,
    )
    return conn


@dataclass
class Secured:
    url: str
    creds: Credentials


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    base = tmp_path_factory.mktemp("secured")
    creds = ensure_credentials(base / "creds")
    server = EmbeddedNats(data_dir=base / "nats", port=-1, authorization=creds.authorization())
    server.start()
    try:
        asyncio.run(provision(server.url, creds.seed_file(ADMIN)))
        yield Secured(server.url, creds)
    finally:
        server.stop()


@pytest.fixture
async def conns(secured: Secured) -> AsyncIterator[dict[str, Conn]]:
    out = {i: await connect(secured.url, secured.creds, i) for i in IDENTITIES}
    try:
        yield out
    finally:
        for conn in out.values():
            assert conn.nc is not None
            await conn.nc.close()


def refusal_logged(caplog: pytest.LogCaptureFixture, identity: str, needle: str) -> bool:
    return any(
        r.name == "loom.bus"
        and r.levelno == logging.WARNING
        and r.getMessage().startswith(f"{identity}: NATS refused")
        and needle in r.getMessage()
        for r in caplog.records
    )


# ----------------------------------------------------------------------------- the battery


@dataclass
class Listener:
    conn: Conn
    subject: str
    queue: str | None
    got: asyncio.Queue[Msg] = field(default_factory=asyncio.Queue)


async def subscribe(conn: Conn, subject: str, queue: str | None) -> tuple[bool, Listener]:
    """Subscribe; returns (refused?, the listener)."""
    assert conn.nc is not None
    listener = Listener(conn, subject, queue)
    since = len(conn.errors)

    async def got(msg: Msg) -> None:
        await listener.got.put(msg)

    await conn.nc.subscribe(subject, queue=queue or "", cb=got)
    return await conn.refused(f'subscription to "{subject.lower()}"', since), listener


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
async def test_every_identity_on_every_route(
    route: Route, conns: dict[str, Conn], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="loom.bus")
    wrong: list[str] = []

    # -- subscribe: each consumer's own declaration, and everyone trying to listen in
    attempts: list[tuple[str, str, str | None]] = []
    for identity in IDENTITIES:
        mine = [c for c in route.consumers if c.identity == identity]
        for consumer in mine:
            for subject in route.filters(consumer):
                attempts.append((identity, subject, consumer.queue))
                if consumer.queue:  # outside its own queue group: refused
                    attempts.append((identity, subject, None))
        attempts.append((identity, route.wildcard, None))  # the whole route
        # joining a server's group; on a stream route a group only shares publishes whose
        # stream copy follows anyway (direct dispatch), which anyone who may read the
        # route could delay, never forge
        if route.kind == "request":
            for queue in {c.queue for c in route.consumers if c.queue}:
                attempts.append((identity, route.wildcard, queue))
    listeners: list[Listener] = []
    for identity, subject, queue in dict.fromkeys(attempts):
        refused, listener = await subscribe(conns[identity], subject, queue)
        allowed = may_subscribe(identity, subject, queue)
        if refused == allowed:
            wrong.append(f"{identity} sub {subject} queue={queue}: refused={refused}")
        if refused and not refusal_logged(caplog, identity, f'"{subject.lower()}"'):
            wrong.append(f"{identity} sub {subject}: refusal not logged")
        if not refused:
            listeners.append(listener)

    # every allowed subscription receives what an allowed publisher says there
    for listener in listeners:
        candidates = [concrete(listener.subject)] + [
            subject_for(route, p) for p in route.publishers
        ]
        sent = next(
            (
                (p, s)
                for s in candidates
                for p in route.publishers
                if covers(listener.subject, s) and may_publish(p, route, s)
            ),
            None,
        )
        if sent is None:
            continue  # nobody may say anything this subscription could hear
        publisher, subject = sent
        publisher_nc = conns[publisher].nc
        assert publisher_nc is not None
        await publisher_nc.publish(subject, b"{}")
        await publisher_nc.flush()
        try:
            while (await asyncio.wait_for(listener.got.get(), BOUND_S)).subject != subject:
                pass
        except TimeoutError:
            wrong.append(
                f"{listener.conn.identity} subscribed to {listener.subject} but did not get "
                f"{publisher}'s {subject}"
            )

    # -- publish: everyone tries, each for itself and for every publisher it is not
    pub_attempts = {(i, subject_for(route, i)) for i in IDENTITIES}
    if route.own_param:
        pub_attempts |= {(i, subject_for(route, p)) for i in IDENTITIES for p in route.publishers}
    for identity, subject in sorted(pub_attempts):
        conn = conns[identity]
        assert conn.nc is not None
        since = len(conn.errors)
        await conn.nc.publish(subject, b"{}")
        needle = f'publish to "{subject.lower()}"'
        refused = await conn.refused(needle, since)
        allowed = may_publish(identity, route, subject)
        if not allowed and not refused:
            refused = await conn.wait_refused(needle, since)  # bounded backup of the flush
        if refused == allowed:
            wrong.append(f"{identity} pub {subject}: refused={refused}")
        if refused and not refusal_logged(caplog, identity, needle):
            wrong.append(f"{identity} pub {subject}: refusal not logged")
        if allowed and not refused:
            hearers = [listener for listener in listeners if covers(listener.subject, subject)]
            if not hearers:
                wrong.append(f"{identity} pub {subject}: nobody with rights heard it")
            for listener in hearers[:1]:
                try:
                    while (await asyncio.wait_for(listener.got.get(), BOUND_S)).subject != subject:
                        pass
                except TimeoutError:
                    wrong.append(f"{identity} pub {subject}: {listener.conn.identity} missed it")
    assert not wrong, "\n".join(wrong)


async def test_an_unauthenticated_or_unknown_connection_is_refused_outright(
    secured: Secured, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="loom.bus")
    with pytest.raises(Exception, match="(?i)authorization violation"):
        await bus.connect(secured.url, "anonymous", persistent=False)
    stranger = ensure_credentials(tmp_path / "stranger", identities=("operator",))
    with pytest.raises(Exception, match="(?i)authorization violation"):
        await bus.connect(
            secured.url, "stranger", persistent=False, seed=stranger.seed_file("operator")
        )
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert [r.getMessage().split(":")[0] for r in refusals] == ["anonymous", "stranger"]


async def test_no_identity_says_another_ones_facts(conns: dict[str, Conn]) -> None:
    """The forgeries of issue 8, from identities that hold a key but not that fact."""
    forgeries = {
        "planner": ["loom.inbox.R.tool", "loom.inbox.R.timer", "loom.run.R.run_completed"],
        "toolrunner": ["loom.run.R.tool_call_requested", "loom.run.R.plan_accepted",
                       "loom.inbox.R.plan", "loom.dlq.executor"],
        "memory": ["loom.inbox.R.tool", "loom.progress.R", "$KV.loom_tools.echo",
                   "$O.loom_blobs.C.x"],
        "tracing": ["loom.run.R.run_completed", "loom.signal.n.k", "$O.loom_blobs.M.x"],
        "client": ["loom.submit.operator", "loom.inbox.R.tool", "loom.run.R.run_completed",
                   "loom.signal.n.k", "loom.control", "loom.resume", "loom.api.runs",
                   "$KV.loom_tools.echo", "loom.dlq.executor", "$JS.API.STREAM.INFO.LOOM_RUNS",
                   # it uploads blobs but reads none: no chunk, no message by sequence
                   "$JS.API.DIRECT.GET.OBJ_loom_blobs.$O.loom_blobs.C.x",
                   "$JS.API.STREAM.MSG.GET.OBJ_loom_blobs", "$JS.API.DIRECT.GET.OBJ_loom_blobs",
                   "$JS.API.CONSUMER.CREATE.OBJ_loom_blobs"],
        "operator": ["loom.inbox.R.tool", "loom.run.R.run_completed", "loom.submit.client",
                     "$KV.loom_tools.echo", "loom.dlq.executor"],
    }  # fmt: skip
    allowed_anyway = []
    for identity, subjects in forgeries.items():
        conn = conns[identity]
        assert conn.nc is not None
        for subject in subjects:
            since = len(conn.errors)
            await conn.nc.publish(subject, b"{}")
            if not await conn.refused(f'publish to "{subject.lower()}"', since):
                allowed_anyway.append(f"{identity} -> {subject}")
    assert not allowed_anyway
    # the client may submit (as itself) and upload blobs, nothing else: not even read
    # its own run
    client = permissions("client")
    assert client.publish[:3] == ("loom.submit.client", "loom.health.*", "$O.loom_blobs.*.*")
    assert not [p for p in client.publish[3:] if not p.endswith("OBJ_loom_blobs")
                and "OBJ_loom_blobs." not in p and p != "$JS.API.INFO"]  # fmt: skip


async def test_a_denied_jetstream_call_is_a_timeout_plus_a_logged_refusal(
    conns: dict[str, Conn], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="loom.bus")
    planner = conns["planner"]
    assert planner.nc is not None
    js = planner.nc.jetstream(timeout=0.5)
    since = len(planner.errors)
    with pytest.raises(TimeoutError):
        await js.add_stream(name="EVIL", subjects=["evil.>"])
    assert await planner.wait_refused('publish to "$js.api.stream.create.evil"', since)
    assert refusal_logged(caplog, "planner", "$js.api.stream.create.evil")
    with pytest.raises(TimeoutError):
        await conns["tracing"].nc.jetstream(timeout=0.5).delete_stream("LOOM_RUNS")  # type: ignore[union-attr]
    assert refusal_logged(caplog, "tracing", "$js.api.stream.delete.loom_runs")
    # the operator may follow runs (ephemeral consumers) but not take over a durable
    operator_js = conns["operator"].nc.jetstream(timeout=0.5)  # type: ignore[union-attr]
    with pytest.raises(TimeoutError):
        await operator_js.add_consumer(
            "LOOM_RUNS", ConsumerConfig(durable_name="planner", filter_subject="loom.run.>")
        )
    assert refusal_logged(caplog, "operator", "$js.api.consumer.durable.create.loom_runs.planner")


async def test_only_the_owner_of_a_durable_consumer_may_create_or_read_it(
    conns: dict[str, Conn], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="loom.bus")
    durables = routes.declared_durables()
    attempts = []
    for (stream, durable), (owner, filters) in durables.items():
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            filter_subjects=sorted(filters) if len(filters) > 1 else None,
            filter_subject=next(iter(filters)) if len(filters) == 1 else None,
        )
        for identity in IDENTITIES:
            js = conns[identity].nc.jetstream(timeout=1.0)  # type: ignore[union-attr]
            attempts.append((identity, owner, stream, durable, js.add_consumer(stream, config)))
    # refused calls only end at their timeout: wait for all of them at once
    results = await asyncio.gather(*(a[-1] for a in attempts), return_exceptions=True)
    wrong = []
    for (identity, owner, stream, durable, _), result in zip(attempts, results, strict=True):
        created = not isinstance(result, BaseException)
        if created != (identity in (owner, ADMIN)):  # admin provisions: all of the API
            wrong.append(f"{identity} creating {stream}/{durable}: {result!r}")
        if not created and not refusal_logged(
            caplog, identity, f"$js.api.consumer.durable.create.{stream.lower()}.{durable}"
        ):
            wrong.append(f"{identity} creating {stream}/{durable}: refusal not logged")
    assert not wrong, "\n".join(wrong)
    # the owner pulls from it; nobody else can
    stream, durable = "LOOM_RUNS", "planner"
    owner_sub = await conns["planner"].nc.jetstream().pull_subscribe_bind(durable, stream)  # type: ignore[union-attr]
    with contextlib.suppress(TimeoutError):  # allowed: a message, or none pending
        await owner_sub.fetch(1, timeout=0.2)
    thief = await conns["toolrunner"].nc.jetstream().pull_subscribe_bind(durable, stream)  # type: ignore[union-attr]
    with pytest.raises(TimeoutError):
        await thief.fetch(1, timeout=0.2)
    assert refusal_logged(caplog, "toolrunner", f"consumer.msg.next.loom_runs.{durable}")
    assert not refusal_logged(caplog, "planner", "consumer.msg.next")


async def test_a_requester_cannot_aim_an_honest_reply_at_a_route(
    secured: Secured, conns: dict[str, Conn], caplog: pytest.LogCaptureFixture
) -> None:
    """Replies go only to inboxes: a client asking the planner's health with the reply
    subject set to a run event gets nothing stored there (the planner's reply is refused,
    and the planner logs it). With NATS ``allow_responses`` the reply would have landed."""
    caplog.set_level(logging.WARNING, logger="loom.bus")
    planner, client, admin = conns["planner"], conns["client"], conns["admin"]
    assert planner.nc and client.nc and admin.nc
    answered = asyncio.Event()

    async def answer(msg: Msg) -> None:
        await msg.respond(b'{"type": "pong", "service": "planner", "instance": "x"}')
        answered.set()

    await planner.nc.subscribe("loom.health.planner", queue="planner", cb=answer)
    await planner.nc.flush()
    before = (await admin.nc.jetstream().stream_info("LOOM_RUNS")).state.last_seq
    since = len(planner.errors)
    forged = "loom.run.R9.run_completed"
    await client.nc.publish("loom.health.planner", codec.encode(Ping()), reply=forged)
    await client.nc.flush()
    await asyncio.wait_for(answered.wait(), BOUND_S)
    # (nats-py lower-cases the server's error text, subject included)
    assert await planner.refused(f'publish to "{forged.lower()}"', since)
    assert refusal_logged(caplog, "planner", forged.lower())
    after = (await admin.nc.jetstream().stream_info("LOOM_RUNS")).state.last_seq
    assert after == before
    # and a genuine request still gets its answer, in the asker's own inbox
    reply = await client.nc.request("loom.health.planner", codec.encode(Ping()), timeout=BOUND_S)
    assert b"pong" in reply.data


async def test_a_whole_stack_with_credentials_runs_a_plan_without_a_single_refusal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every service with its own key, the streams provisioned by admin: hello-dag
    completes, a submit-only client can submit, and nothing the stack does is refused
    (the generated permissions are enough, not only tight)."""
    caplog.set_level(logging.WARNING)
    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=StoreSettings(kind="sqlite", data_dir=tmp_path / "data"),
    )
    async with LocalStack(settings, nats_port=-1) as stack:
        assert stack.credentials is not None
        seed = stack.seed_file("operator")
        assert seed is not None and seed.stat().st_mode & 0o777 == 0o600
        async with await stack.client() as operator:
            request = load_run_request(EXAMPLES / "hello-dag.yaml", [], None)
            accepted = await operator.submit(request)
            records = await operator.wait(accepted.run_id, timeout=30)
            assert isinstance(records[-1].event, RunCompleted)
            assert records[-1].event.output["city_loud"] == "LISBON"
        async with await stack.client("client") as client:
            by_client = await client.submit(request)  # submit-only, and enough for that
            with pytest.raises(TimeoutError):  # but it cannot read runs: JetStream refused
                await client.nc.jetstream(timeout=0.5).stream_info("LOOM_RUNS")
        async with await stack.client() as operator:
            records = await operator.wait(by_client.run_id, timeout=30)
            assert isinstance(records[-1].event, RunCompleted)
            assert records[0].event.principal.via == "client"  # type: ignore[union-attr]
    refusals = [r.getMessage() for r in caplog.records if "NATS refused" in r.getMessage()]
    assert refusals == ['client: NATS refused: permissions violation for publish to '
                        '"$js.api.stream.info.loom_runs"']  # fmt: skip


async def test_an_insecure_stack_still_runs_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=StoreSettings(kind="sqlite", data_dir=tmp_path / "data"),
    )
    async with LocalStack(settings, nats_port=-1, secure=False) as stack:
        assert stack.credentials is None and stack.seed_file("operator") is None
        async with await LoomClient.connect(stack.url) as anyone:  # no key at all
            request = load_run_request(EXAMPLES / "hello-dag.yaml", [], None)
            accepted = await anyone.submit(request)
            records = await anyone.wait(accepted.run_id, timeout=30)
            assert isinstance(records[-1].event, RunCompleted)
    assert any("INSECURE" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "data" / "creds").exists()
