"""Tenants on a real stack: two tenants (acme, globex) with their own NATS users, and
globex trying every route of ``loom_core.routes`` against acme's runs, threads and
memory. Each route has its check in ``ATTACKS`` (a test fails when a route has none, so
a new route cannot be forgotten); each check shows that globex reads nothing of acme's
and writes nothing into it, either because the NATS server refuses the subject
(permissions generated for tenant users) or because the service answers as if acme's
thing did not exist. Acme's own use of the same routes works (positive controls), and
acme's stored runs are unchanged by everything globex tried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from test_permissions import Conn, connect  # type: ignore[import-not-found]
from waiting import eventually, having, until  # type: ignore[import-not-found]

from loom_cli.app import load_run_request
from loom_cli.schedule import ask as ask_schedule
from loom_cli.tools import read_catalog
from loom_core import blobs, codec, routes, subjects, tenancy
from loom_core.contracts import (
    BlobQuery,
    BlobReply,
    DeadLettersQuery,
    DeadLettersReply,
    ForkRun,
    MemoryReply,
    MemoryRequest,
    Principal,
    RunCompleted,
    RunProgress,
    RunRequest,
    RunsReply,
    Schedule,
    ScheduleControl,
    ScheduleCreate,
    ScheduleReply,
    ScheduleSpec,
    SchedulesQuery,
    SlowestStepsQuery,
    SlowestStepsReply,
    StoredDeadLetter,
    SubmitRejected,
    ToolsQuery,
    ToolsReply,
    TracesQuery,
    TracesReply,
    UsageQuery,
    UsageReply,
)
from loom_core.routes import ROUTES
from loom_infra import paging
from loom_infra.blobstore import CHUNK_BYTES
from loom_infra.client import LoomClient, LoomError
from loom_infra.settings import BlobSettings, Settings, StoreSettings
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DENIED = "permissions violation"


@dataclass
class World:
    stack: LocalStack
    acme: LoomClient  # operator@acme
    globex: LoomClient  # operator@globex
    globex_client: LoomClient  # client@globex (submit only)
    raw: dict[str, Conn]  # globex's users as bare connections (refusals are seen)
    done: str  # acme's completed run (thread "t1")
    waiting: str  # acme's run suspended on an approval (label manager)
    signal_wait: str  # acme's run waiting for the event payment/A-17
    own: str  # globex's own completed run
    platform: LoomClient  # the platform's operator (plain subjects)
    blob_run: str  # acme's completed run whose output is a blob
    blob: str  # that blob's digest
    own_blob_run: str  # globex's, likewise
    own_blob: str

    async def refused_publish(self, who: str, subject: str) -> None:
        conn = self.raw[who]
        since = len(conn.errors)
        assert conn.nc is not None
        await conn.nc.publish(subject, b"{}")
        assert await conn.refused(f'publish to "{subject.lower()}"', since), subject

    async def refused_subscribe(self, who: str, subject: str) -> None:
        conn = self.raw[who]
        since = len(conn.errors)
        assert conn.nc is not None
        sub = await conn.nc.subscribe(subject)
        assert await conn.refused(f'subscription to "{subject.lower()}"', since), subject
        await sub.unsubscribe()

    async def refused_stream(self, stream: str) -> None:
        """No JetStream API at all for a tenant user: a denied call is a timeout."""
        conn = self.raw["operator"]
        assert conn.nc is not None
        since = len(conn.errors)
        with pytest.raises(TimeoutError):
            await conn.nc.jetstream(timeout=0.5).stream_info(stream)
        assert await conn.wait_refused(DENIED, since)

    async def acme_history(self) -> dict[str, bytes]:
        runs = (self.done, self.waiting, self.signal_wait)
        return {r: b"".join(codec.encode(e) for e in await self.acme.events(r)) for r in runs}


Attack = Callable[[World], Awaitable[None]]


def _route(route: routes.Route, **values: str) -> str:
    fill = {"run_id": "R1", "name": "payment", "key": "A-17", "service": "executor",
            "via": "operator", "tool": "echo", "part": "C", "id": "x",
            "event": "run_completed", "tenant": "acme", "schedule": "s",
            "digest": "d0", "partition": "0"}  # fmt: skip
    fill.update(values)
    return route.subject(**{p: fill[p] for p in route.params})


async def _not_found_alike(world: World, call: Callable[[str], Awaitable[object]]) -> None:
    """Acme's run and a run that exists nowhere get the same typed refusal."""
    answers = []
    for run_id in (world.waiting, "no-such-run-anywhere"):
        with pytest.raises(LoomError) as refused:
            await call(run_id)
        info = refused.value.info
        answers.append((info.code, info.message.replace(run_id, "<id>"), info.path))
    assert answers[0] == answers[1]
    assert answers[0][0] == "not_found"


# ----------------------------------------------------------------------------- attacks


async def submit(w: World) -> None:
    # acme's run id: refused without a word about acme's run, nothing written into it
    request = load_run_request(EXAMPLES / "hello-dag.yaml", [], None)
    reply = await w.globex_client.submit_raw(
        codec.encode(msgspec.structs.replace(request, run_id=w.done))
    )
    assert isinstance(reply, SubmitRejected) and reply.error.code == "run_id_taken"
    assert w.done not in reply.error.message.replace(f"'{w.done}'", "")  # named, no more
    assert "differs" not in (reply.error.details or {})
    # only its own tenant's submit subject, and only its own identity's
    for subject in ("loom.submit.client", "loom.t.acme.submit.client",
                    "loom.t.globex.submit.operator"):  # fmt: skip
        await w.refused_publish("client", subject)
    # a run globex submits is globex's
    accepted = await w.globex_client.submit(request)
    records = await w.globex.wait(accepted.run_id, timeout=30)
    assert records[0].event.principal.tenant == "globex"  # type: ignore[union-attr]
    assert accepted.run_id not in {r.run_id for r in await w.acme.runs(limit=1000)}


async def run_event(w: World) -> None:
    await w.refused_subscribe("operator", "loom.run.*.>")
    await w.refused_subscribe("operator", subjects.run_events_of(w.done))
    await w.refused_stream(subjects.RUN_EVENTS_STREAM)


async def run_gap(w: World) -> None:
    # fillers carry no tenant's data, but a tenant may neither read nor write the stream
    await w.refused_subscribe("operator", subjects.RUN_GAP)
    await w.refused_publish("operator", subjects.RUN_GAP)


async def inbox(w: World) -> None:
    for route in routes.INBOXES:
        await w.refused_publish("operator", _route(route, run_id=w.waiting))
        await w.refused_publish("operator", tenancy.twin(_route(route, run_id=w.waiting), "globex"))


async def signal(w: World) -> None:
    await w.refused_publish("operator", subjects.signal("payment", "A-17"))
    await w.refused_publish("operator", tenancy.twin(subjects.signal("payment", "A-17"), "acme"))
    # globex's own signal of that name and key is globex's: acme's run does not take it
    await w.globex.signal("payment", "A-17", {"amount": 999}, signal_id="globex-1")
    await w.acme.signal("payment", "A-17", {"amount": 12}, signal_id="acme-1")
    records = await w.acme.wait(w.signal_wait, timeout=30)
    assert records[-1].event == RunCompleted(output="order A-17 paid 12")


async def dead_letter(w: World) -> None:
    await w.refused_subscribe("operator", _route(routes.DEAD_LETTER, service="executor"))
    await w.refused_stream(subjects.DLQ_STREAM)


async def rejected(w: World) -> None:
    await w.refused_subscribe("operator", _route(routes.REJECTED, service="executor"))
    await w.refused_stream(routes.REJECTED.stream or "")


async def control(w: World) -> None:
    await _not_found_alike(w, lambda run_id: w.globex.control(run_id, "cancel"))
    await w.refused_publish("operator", subjects.CONTROL)
    await w.refused_publish("operator", tenancy.twin(subjects.CONTROL, "acme"))


async def resume(w: World) -> None:
    async def answer(run_id: str) -> None:
        reply = await w.globex.resume(run_id, {"approved": True}, label="manager")
        assert not reply.ok and reply.error is not None
        raise LoomError(reply.error)

    await _not_found_alike(w, answer)
    await w.refused_publish("operator", tenancy.twin(subjects.RESUME, "acme"))


async def fork(w: World) -> None:
    await _not_found_alike(
        w, lambda run_id: w.globex.fork(ForkRun(run_id=run_id, from_step="quote"))
    )
    await w.refused_publish("operator", routes.FORK.subject())


async def progress(w: World) -> None:
    await w.refused_subscribe("operator", "loom.progress.*")
    await w.refused_subscribe("operator", tenancy.twin("loom.progress.*", "acme"))
    # globex's own progress subject hears globex's runs only, while acme's run moves
    heard: list[str] = []

    async def got(msg: object) -> None:
        heard.append(codec.decode(msg.data, RunProgress).run_id)  # type: ignore[attr-defined]

    sub = await w.globex.nc.subscribe(w.globex.scoped("loom.progress.*"), cb=got)
    await w.globex.nc.flush()
    reply = await w.acme.resume(w.waiting, {"approved": True}, label="manager")
    assert reply.ok, reply.error
    await w.acme.wait(w.waiting, timeout=30)
    mine = await w.globex.submit(load_run_request(EXAMPLES / "hello-dag.yaml", [], None))
    await w.globex.wait(mine.run_id, timeout=30)
    await eventually(lambda: _async(mine.run_id in heard), "globex hears its own progress")
    await sub.unsubscribe()
    assert w.waiting not in heard and set(heard) <= {mine.run_id}


async def _async(value: object) -> object:
    return value


async def model_stream(w: World) -> None:
    await w.refused_subscribe("operator", "loom.stream.*")
    await w.refused_subscribe("operator", tenancy.twin("loom.stream.*", "acme"))


async def api_run_events(w: World) -> None:
    assert await w.globex.events(w.done) == []
    assert await w.globex.events("no-such-run-anywhere") == []
    assert len(await w.acme.events(w.done)) > 3
    await w.refused_publish("operator", subjects.API_RUN_EVENTS)


async def api_runs(w: World) -> None:
    acme_ids = {r.run_id for r in await w.acme.runs(limit=1000)}
    globex_ids = {r.run_id for r in await w.globex.runs(limit=1000)}
    assert {w.done, w.waiting, w.signal_wait} <= acme_ids
    assert w.own in globex_ids
    assert not acme_ids & globex_ids
    assert all(r.tenant == "globex" for r in await w.globex.runs(limit=1000))


async def api_trace(w: World) -> None:
    spans = await w.acme.trace(w.done)
    assert spans and all(s.attributes.get("loom.tenant") == "acme" for s in spans)
    await _not_found_alike(w, lambda run_id: w.globex.trace(run_id, rebuild=True))
    # a read first folds a run the read model has not reached; the tenant check follows
    await _not_found_alike(w, lambda run_id: w.globex.trace(run_id))


async def api_traces(w: World) -> None:
    reply = await w.globex.ask(subjects.API_TRACES, TracesQuery(limit=1000), TracesReply, 10)
    assert {r.run_id for r in reply.runs} and all(r.tenant == "globex" for r in reply.runs)
    mine = await w.acme.ask(subjects.API_TRACES, TracesQuery(limit=1000), TracesReply, 10)
    assert w.done in {r.run_id for r in mine.runs}


async def api_traces_slowest(w: World) -> None:
    query = SlowestStepsQuery(limit=1000)
    theirs = await w.globex.ask(subjects.API_TRACES_SLOWEST, query, SlowestStepsReply, 10)
    globex_runs = {r.run_id for r in await w.globex.runs(limit=1000)}
    assert theirs.spans and {s.run_id for s in theirs.spans} <= globex_runs
    mine = await w.acme.ask(subjects.API_TRACES_SLOWEST, query, SlowestStepsReply, 10)
    assert w.done in {s.run_id for s in mine.spans}


async def api_traces_usage(w: World) -> None:
    query = UsageQuery(by="run")
    theirs = await w.globex.ask(subjects.API_TRACES_USAGE, query, UsageReply, 10)
    globex_runs = {r.run_id for r in await w.globex.runs(limit=1000)}
    assert theirs.rows and {row.key for row in theirs.rows} <= globex_runs
    mine = await w.acme.ask(subjects.API_TRACES_USAGE, query, UsageReply, 10)
    assert w.done in {row.key for row in mine.rows}


async def api_traces_rebuild(w: World) -> None:
    await w.refused_publish("operator", subjects.API_TRACES_REBUILD)
    await w.refused_publish("operator", tenancy.twin(subjects.API_TRACES_REBUILD, "globex"))


async def api_thread(w: World) -> None:
    # both have a thread named t1: each reads its own
    mine = await eventually(lambda: w.acme.thread("t1"), "acme's thread t1")
    assert {e.run_id for e in mine} == {w.done}
    theirs = await eventually(lambda: w.globex.thread("t1"), "globex's thread t1")
    assert {e.run_id for e in theirs} == {w.own}
    assert await w.globex.thread("only-acme-has-this") == []


async def api_memory_tool(w: World) -> None:
    await w.refused_publish("operator", subjects.API_MEMORY_TOOL)
    await w.refused_publish("operator", tenancy.twin(subjects.API_MEMORY_TOOL, "globex"))


async def api_memory_operator(w: World) -> None:
    alice = Principal(user_id="alice", via="operator")

    async def memory(client: LoomClient, op: str, args: dict, who: Principal) -> MemoryReply:
        request = MemoryRequest(op=op, args=args, principal=who)
        return await client.ask(subjects.API_MEMORY_OPERATOR, request, MemoryReply, 30)

    stored = await memory(
        w.acme, "working_set", {"doc": {"secret": "acme"}, "expected_version": 0}, alice
    )
    assert stored.error is None, stored.error
    theirs = await memory(w.globex, "working_get", {}, alice)  # their alice, not acme's
    assert "acme" not in msgspec.json.encode(theirs.result).decode()
    acme_alice = msgspec.structs.replace(alice, tenant="acme")
    refused = await memory(w.globex, "working_get", {}, acme_alice)
    assert refused.error is not None and refused.error.code == "tenant_mismatch"
    mine = await memory(w.acme, "working_get", {}, alice)
    assert "acme" in msgspec.json.encode(mine.result).decode()


FORGED = "sha256:" + "ab" * 32


async def _blob_refusal(w: World, run_id: str, digest: str) -> tuple[object, ...]:
    with pytest.raises(LoomError) as refused:
        b"".join([c async for c in w.globex.run_blob_chunks(run_id, digest)])
    info = refused.value.info
    shown = info.message.replace(run_id, "<run>").replace(digest, "<blob>")
    return info.code, shown, info.path, msgspec.json.encode(info.details)


async def api_blob(w: World) -> None:
    # acme reads its run's blob through the run, and only the bytes stored
    mine = b"".join([c async for c in w.acme.run_blob_chunks(w.blob_run, w.blob)])
    assert blobs.digest_of(mine) == w.blob
    assert await w.acme.run_blob_size(w.blob_run, w.blob) == len(mine) > 1024
    # globex: acme's run, acme's blob through its own run, a run that exists nowhere,
    # a blob never stored: one answer, which tells nothing of acme's run or blob
    answers = {
        await _blob_refusal(w, w.blob_run, w.blob),
        await _blob_refusal(w, w.own_blob_run, w.blob),
        await _blob_refusal(w, "no-such-run-anywhere", w.blob),
        await _blob_refusal(w, w.own_blob_run, FORGED),
        await _blob_refusal(w, w.blob_run, FORGED),
    }
    assert len(answers) == 1 and next(iter(answers))[0] == "blob_not_found", answers
    # its own run's blob it reads
    theirs = b"".join([c async for c in w.globex.run_blob_chunks(w.own_blob_run, w.own_blob)])
    assert blobs.digest_of(theirs) == w.own_blob
    # hostile queries: typed errors naming the field, nothing read
    for run_id in ("*", ">", "a.b", "loom.t.acme", " ", "x" * 300, ""):
        reply = await w.globex.ask(
            subjects.API_BLOB, BlobQuery(run_id=run_id, digest=w.blob), BlobReply, 10
        )
        assert reply.error is not None and reply.error.code == "invalid_run_id", run_id
        assert reply.error.path == "$.run_id" and not reply.data
    for digest in ("sha256:*", "sha256:" + "zz" * 32, "../" + w.blob, w.blob + ".x", ""):
        reply = await w.globex.ask(
            subjects.API_BLOB, BlobQuery(run_id=w.own_blob_run, digest=digest), BlobReply, 10
        )
        assert reply.error is not None and reply.error.code == "bad_blob_reference", digest
    for query in (
        BlobQuery(run_id=w.own_blob_run, digest=w.own_blob, offset=-1),
        BlobQuery(run_id=w.own_blob_run, digest=w.own_blob, limit=-5),
    ):
        reply = await w.globex.ask(subjects.API_BLOB, query, BlobReply, 10)
        assert reply.error is not None and reply.error.code == "invalid_query"
    # a huge page asked for is cut to what one reply carries; a malformed request is
    # a typed refusal
    for after in ("garbage", paging.keyset_cursor(0, "0"), paging.keyset_cursor(5, "9"),
                  paging.keyset_cursor(5, "x"), "k1." + "A" * 5000):  # fmt: skip
        query = BlobQuery(run_id=w.own_blob_run, digest=w.own_blob, offset=3, after=after)
        reply = await w.globex.ask(subjects.API_BLOB, query, BlobReply, 10)
        assert reply.error is not None and reply.error.code == "bad_cursor", after
        assert reply.error.path == "$.after" and not reply.data
    # small pages: each goes on from the previous one's cursor
    paged = [c async for c in w.globex.run_blob_chunks(w.own_blob_run, w.own_blob, page=1000)]
    assert len(paged) > 2 and b"".join(paged) == theirs
    huge = BlobQuery(run_id=w.own_blob_run, digest=w.own_blob, limit=10**12)
    page = await w.globex.ask(subjects.API_BLOB, huge, BlobReply, 10)
    assert page.error is None and page.data == theirs[: len(page.data)]
    raw = await w.globex.nc.request(w.globex.scoped(subjects.API_BLOB), b'{"run_id": 1}', 10)
    assert codec.decode(raw.data, BlobReply).error.code == "invalid_shape"  # type: ignore[union-attr]
    # the platform reads every tenant's run's blob
    assert blobs.digest_of(
        b"".join([c async for c in w.platform.run_blob_chunks(w.blob_run, w.blob)])
    ) == w.blob  # fmt: skip
    await w.refused_publish("operator", subjects.API_BLOB)
    await w.refused_publish("operator", tenancy.twin(subjects.API_BLOB, "acme"))
    await w.refused_publish("client", tenancy.twin(subjects.API_BLOB, "globex"))


async def api_tools(w: World) -> None:
    theirs = await w.globex.tools()
    names = [t.name for t in theirs]
    assert "echo" in names and names == sorted(names)
    # one catalog for every tenant: the platform's, as the bucket holds it
    assert [t.name for t in await w.acme.tools()] == names
    assert [t.name for t in await read_catalog(w.platform)] == names
    for limit in (0, -1, 10**6):
        reply = await w.globex.ask(subjects.API_TOOLS, ToolsQuery(limit=limit), ToolsReply, 10)
        assert reply.error is not None and reply.error.code == "invalid_query"
    paged = await w.globex.ask(subjects.API_TOOLS, ToolsQuery(limit=2), ToolsReply, 10)
    assert [t.name for t in paged.tools] == names[:2] and paged.next_after == names[1]
    await w.refused_publish("operator", subjects.API_TOOLS)
    await w.refused_publish("operator", tenancy.twin(subjects.API_TOOLS, "acme"))


SECRET = "hunter2-do-not-show"  # noqa: S105 - a canary, not a secret


async def _letters(client: LoomClient, rejects: bool) -> list[StoredDeadLetter]:
    found: list[StoredDeadLetter] = []
    after: int | None = 0
    while after is not None:
        page = await client.dead_letters(after, 500, rejects)
        found += page.letters
        after = page.next_after_seq
    return found


async def api_dead_letters(w: World) -> None:
    # acme's user sends a malformed control request (a secret in it) on its twin; a
    # toolrunner sends garbage to acme's run's inbox; globex sends a malformed submit
    acme_raw = await connect(w.stack.url, w.stack.credentials, tenancy.user("operator", "acme"))
    runner = await connect(w.stack.url, w.stack.credentials, "toolrunner")
    try:
        bad = {"type": "runs_query", "limit": 5, "password": SECRET}
        await acme_raw.nc.request(  # type: ignore[union-attr]
            tenancy.twin(subjects.API_RUNS, "acme"), msgspec.json.encode(bad), timeout=10
        )
        garbage = {"type": "tool_result", "api_key": SECRET, "run_id": w.done}
        await runner.nc.publish(  # type: ignore[union-attr]
            routes.INBOX_TOOL.subject(run_id=w.done), msgspec.json.encode(garbage)
        )
        await runner.nc.flush()  # type: ignore[union-attr]
    finally:
        await acme_raw.nc.close()  # type: ignore[union-attr]
        await runner.nc.close()  # type: ignore[union-attr]
    reply = await w.globex_client.submit_raw(b'{"plan": 12, "token": "' + SECRET.encode() + b'"}')
    assert isinstance(reply, SubmitRejected)

    def about(letters: list[StoredDeadLetter], needle: str) -> list[StoredDeadLetter]:
        return [x for x in letters if needle in x.letter.origin_subject]

    async def seen(client: LoomClient, rejects: bool, needle: str) -> list[StoredDeadLetter]:
        return about(await _letters(client, rejects), needle)

    # the platform sees every letter; each tenant only its own
    await eventually(lambda: seen(w.platform, True, "loom.t.acme.api.runs"), "acme's reject")
    await eventually(lambda: seen(w.platform, True, "loom.t.globex.submit"), "globex's reject")
    await eventually(lambda: seen(w.platform, False, f"inbox.{w.done}."), "the run's letter")
    acme_rejects = await _letters(w.acme, rejects=True)
    acme_letters = await _letters(w.acme, rejects=False)
    globex_rejects = await _letters(w.globex, rejects=True)
    globex_letters = await _letters(w.globex, rejects=False)
    assert about(acme_rejects, "loom.t.acme.api.runs") and about(acme_letters, w.done)
    assert all(tenancy.letter_owner(x.letter.origin_subject)[0] in ("acme", None)
               for x in acme_rejects + acme_letters)  # fmt: skip
    assert about(globex_rejects, "loom.t.globex.submit.client")
    assert not about(globex_rejects + globex_letters, "acme")
    assert not about(globex_letters, w.done)
    assert not about(acme_rejects, "globex")
    every = acme_rejects + acme_letters + globex_rejects + globex_letters
    every += await _letters(w.platform, True) + await _letters(w.platform, False)
    assert SECRET not in codec.encode(every).decode()  # redacted when written
    # paging by sequence: a page and the rest are the whole, in order
    first = await w.acme.dead_letters(0, 1, rejects=True)
    assert len(first.letters) == 1 and first.next_after_seq is not None
    rest = await _letters_after(w.acme, first.next_after_seq)
    assert [x.seq for x in first.letters + rest] == [x.seq for x in acme_rejects]
    for query in (DeadLettersQuery(limit=0), DeadLettersQuery(limit=10**6),
                  DeadLettersQuery(after_seq=-1)):  # fmt: skip
        refused = await w.globex.ask(subjects.API_DEAD_LETTERS, query, DeadLettersReply, 10)
        assert refused.error is not None and refused.error.code == "invalid_query", query
    await w.refused_publish("operator", subjects.API_DEAD_LETTERS)
    await w.refused_publish("operator", tenancy.twin(subjects.API_DEAD_LETTERS, "acme"))


async def _letters_after(client: LoomClient, after: int) -> list[StoredDeadLetter]:
    found: list[StoredDeadLetter] = []
    cursor: int | None = after
    while cursor is not None:
        page = await client.dead_letters(cursor, 500, rejects=True)
        found += page.letters
        cursor = page.next_after_seq
    return found


async def health(w: World) -> None:
    pong = await w.globex.ping("executor")  # liveness only: nothing of any tenant
    assert set(msgspec.to_builtins(pong)) <= {"type", "service", "instance", "error"}


async def tool_catalog(w: World) -> None:
    await w.refused_publish("operator", _route(routes.TOOL_CATALOG))
    await w.refused_stream(routes.TOOL_CATALOG.stream or "")


async def blob_store(w: World) -> None:
    await w.refused_publish("client", _route(routes.BLOBS))
    await w.refused_stream(routes.BLOBS.stream or "")


async def _scheduled(client: LoomClient, message: object) -> ScheduleReply:
    return await ask_schedule(client, message)  # type: ignore[arg-type]


async def _schedule_refusal(w: World, name: str, action: str) -> tuple[object, ...]:
    reply = await _scheduled(w.globex, ScheduleControl(name=name, action=action))  # type: ignore[arg-type]
    assert reply.error is not None, (name, action)
    error = reply.error
    return error.code, error.message.replace(name, "<name>"), error.path, error.details


async def schedule(w: World) -> None:
    hello = load_run_request(EXAMPLES / "hello-dag.yaml", [], None)
    made = await _scheduled(w.acme, ScheduleCreate(
        name="nightly", when=ScheduleSpec(every="1s"), run=hello))  # fmt: skip
    assert made.error is None and made.schedule is not None, made.error
    # a firing of acme's schedule is a run of acme's, verified, as if acme submitted it
    fired = await eventually(lambda: _fired(w.acme, "nightly"), "acme's schedule fired")
    await _done(w.acme, "nightly", "pause")
    first = (await w.acme.wait(fired.last_run_id, timeout=30))[0].event
    assert first.principal.tenant == "acme" and first.principal.tenant_verified  # type: ignore[union-attr]
    assert first.labels == {"schedule": "nightly"}  # type: ignore[union-attr]
    assert await w.globex.events(fired.last_run_id) == []
    # globex sees none of acme's schedules, and acme's schedule is, to every control of
    # globex's, exactly a schedule that does not exist
    listed = await _scheduled(w.globex, SchedulesQuery())
    assert listed.error is None and "nightly" not in {s.name for s in listed.schedules}
    before = await _scheduled(w.acme, ScheduleControl(name="nightly", action="describe"))
    for action in ("describe", "pause", "resume", "trigger", "delete"):
        theirs = await _schedule_refusal(w, "nightly", action)
        assert theirs == await _schedule_refusal(w, "no-such-schedule", action), action
        assert theirs[0] == "schedule_not_found"
    after = await _scheduled(w.acme, ScheduleControl(name="nightly", action="describe"))
    assert after.schedule == before.schedule  # nothing globex did touched it
    await _every_tenants_schedules(w, before.schedule)
    # globex's own schedule of that name is another one, with globex's runs
    own = await _scheduled(w.globex, ScheduleCreate(
        name="nightly", when=ScheduleSpec(every="1h"), run=hello))  # fmt: skip
    assert own.error is None and own.schedule is not None, own.error
    assert own.schedule.schedule_id != made.schedule.schedule_id
    triggered = await _scheduled(w.globex, ScheduleControl(name="nightly", action="trigger"))
    assert triggered.run_id and triggered.run_id != fired.last_run_id
    theirs_first = (await w.globex.wait(triggered.run_id, timeout=30))[0].event
    assert theirs_first.principal.tenant == "globex"  # type: ignore[union-attr]
    assert await w.acme.events(triggered.run_id) == []
    mine = {s.name: s for s in (await _scheduled(w.acme, SchedulesQuery())).schedules}
    assert mine["nightly"].schedule_id == made.schedule.schedule_id
    # acme's own controls work on its own schedule
    for action in ("trigger", "resume", "delete"):
        await _done(w.acme, "nightly", action)
    assert "nightly" not in {s.name for s in (await _scheduled(w.acme, SchedulesQuery())).schedules}
    assert (
        await _scheduled(w.globex, ScheduleControl(name="nightly", action="delete"))
    ).error is None
    # only its own tenant's twin, and only the operator's
    await w.refused_publish("operator", _route(routes.SCHEDULE))
    await w.refused_publish("operator", tenancy.twin(_route(routes.SCHEDULE), "acme"))
    await w.refused_publish("client", tenancy.twin(_route(routes.SCHEDULE), "globex"))
    await w.refused_publish("client", tenancy.twin(_route(routes.SCHEDULE, via="client"), "globex"))


async def _every_tenants_schedules(w: World, acmes: Schedule | None) -> None:
    """The platform's operator lists and describes every tenant's schedules (each with
    its tenant), but changes none (that takes the tenant's credentials); a tenant asks
    for neither, and learns nothing of another's schedule names by trying."""
    assert acmes is not None
    every = await _scheduled(w.platform, SchedulesQuery(every_tenant=True))
    assert every.error is None, every.error
    shown = {(s.tenant, s.name) for s in every.schedules}
    assert ("acme", "nightly") in shown
    assert all(s.run is None for s in every.schedules)  # a listing leaves the run out
    paged = await _scheduled(w.platform, SchedulesQuery(every_tenant=True, limit=1))
    first = paged.schedules[0]
    more = f"{first.tenant}/{first.name}" if len(every.schedules) > 1 else None
    assert len(paged.schedules) == 1 and paged.next_after == more
    described = await _scheduled(
        w.platform, ScheduleControl(name="nightly", action="describe", tenant="acme")
    )
    assert described.error is None and described.schedule is not None, described.error
    assert described.schedule.schedule_id == acmes.schedule_id
    assert described.schedule.tenant == "acme"
    missing = await _scheduled(
        w.platform, ScheduleControl(name="nightly", action="describe", tenant="globex")
    )
    assert missing.error is not None and missing.error.code == "schedule_not_found"
    for action in ("pause", "delete", "trigger"):
        refused = await _scheduled(
            w.platform,
            ScheduleControl(name="nightly", action=action, tenant="acme"),  # type: ignore[arg-type]
        )
        assert refused.error is not None and refused.error.code == "not_authorized", action
    for bad in ("a.b", "*", ">", "default", "ACME", "x" * 41):
        refused = await _scheduled(
            w.platform, ScheduleControl(name="nightly", action="describe", tenant=bad)
        )
        assert refused.error is not None and refused.error.code == "invalid_tenant", bad
    # a tenant: not every tenant's, and naming another tenant is refused alike whether
    # that tenant has the schedule or not
    theirs = await _scheduled(w.globex, SchedulesQuery(every_tenant=True))
    assert theirs.error is not None and theirs.error.code == "not_authorized"
    assert not theirs.schedules
    refusals = set()
    for name in ("nightly", "no-such-schedule"):
        reply = await _scheduled(
            w.globex, ScheduleControl(name=name, action="describe", tenant="acme")
        )
        assert reply.error is not None and reply.schedule is None
        refusals.add((reply.error.code, reply.error.message, reply.error.path))
    assert len(refusals) == 1 and next(iter(refusals))[0] == "not_authorized"


async def _done(client: LoomClient, name: str, action: str) -> ScheduleReply:
    """``action`` done, retried while it is refused as retryable (a 1s schedule's firing
    moved it in between: the compare-and-set says retry)."""

    async def attempt() -> ScheduleReply | None:
        reply = await _scheduled(client, ScheduleControl(name=name, action=action))  # type: ignore[arg-type]
        if reply.error is not None and reply.error.retryable:
            return None
        assert reply.error is None, (action, reply.error)
        return reply

    return await eventually(attempt, f"{action} {name}")


async def _fired(client: LoomClient, name: str) -> Schedule | None:
    reply = await _scheduled(client, ScheduleControl(name=name, action="describe"))
    schedule = reply.schedule
    return schedule if schedule is not None and schedule.last_run_id else None


async def forward(w: World) -> None:
    # between executor replicas only: a tenant can neither pose as one nor overhear one
    await w.refused_publish("operator", _route(routes.FORWARD))
    await w.refused_subscribe("operator", routes.FORWARD.wildcard)
    await w.refused_publish("client", tenancy.twin(_route(routes.FORWARD), "globex"))


async def relay_wake(w: World) -> None:
    await w.refused_publish("operator", _route(routes.RELAY_WAKE))
    await w.refused_subscribe("operator", routes.RELAY_WAKE.wildcard)


def between_services(route: routes.Route) -> Attack:
    """A route between services only (a tool request dispatched to the tool-runners, a
    result sent to the executor; each carries every tenant's runs): a tenant's users may
    neither send on it (pose as the executor or a tool-runner) nor hear it."""

    async def attack(w: World) -> None:
        for role in ("operator", "client"):
            await w.refused_publish(role, _route(route))
            await w.refused_subscribe(role, route.wildcard)

    return attack


def internal_bucket(route: routes.Route) -> Attack:
    """A bucket only services use (schedules, model answers, leases, admission books,
    rates; each holds every tenant's entries): a tenant may neither write nor read it."""

    async def attack(w: World) -> None:
        await w.refused_publish("operator", _route(route))
        await w.refused_stream(route.stream or "")

    return attack


ATTACKS: dict[str, Attack] = {
    "submit": submit,
    "runEvent": run_event,
    "runGap": run_gap,
    **{route.name: inbox for route in routes.INBOXES},
    "signal": signal,
    "deadLetter": dead_letter,
    "rejected": rejected,
    "control": control,
    "resume": resume,
    "fork": fork,
    "progress": progress,
    "modelStream": model_stream,
    "apiRunEvents": api_run_events,
    "apiRuns": api_runs,
    "apiTrace": api_trace,
    "apiTraces": api_traces,
    "apiTracesSlowest": api_traces_slowest,
    "apiTracesUsage": api_traces_usage,
    "apiTracesRebuild": api_traces_rebuild,
    "apiThread": api_thread,
    "apiMemoryTool": api_memory_tool,
    "apiMemoryOperator": api_memory_operator,
    "apiTools": api_tools,
    "apiBlob": api_blob,
    "apiDeadLetters": api_dead_letters,
    "health": health,
    "toolCatalog": tool_catalog,
    "blobs": blob_store,
    "schedule": schedule,
    "scheduleStore": internal_bucket(routes.SCHEDULE_STORE),
    "modelAnswers": internal_bucket(routes.MODEL_ANSWERS),
    "forward": forward,
    "relayWake": relay_wake,
    "toolDispatch": between_services(routes.TOOL_DISPATCH),
    "toolResult": between_services(routes.TOOL_RESULT),
    "partitionLeases": internal_bucket(routes.PARTITION_LEASES),
    "admissionBook": internal_bucket(routes.ADMISSION_BOOK),
    "rateBuckets": internal_bucket(routes.RATE_BUCKETS),
}
# routes whose check changes acme's runs on purpose (acme's own signal and resume)
ACME_ACTS = ("signal", "progress")


def test_every_route_has_a_cross_tenant_check() -> None:
    assert set(ATTACKS) == {route.name for route in ROUTES}


async def test_no_route_reads_or_writes_across_tenants(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_EMBEDDER", "hash")  # memory without loading a model
    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=StoreSettings(kind="sqlite", data_dir=tmp_path / "data"),
        tenants=("acme", "globex"),
        # a step output over 1 KiB is stored as a blob (the runs' blob outputs)
        blobs=BlobSettings(threshold_bytes=1024),
    )
    async with LocalStack(settings, nats_port=-1) as stack:
        acme = await stack.client(tenant="acme")
        globex = await stack.client(tenant="globex")
        globex_client = await stack.client("client", tenant="globex")
        platform = await stack.client()
        assert stack.credentials is not None
        raw = {
            role: await connect(stack.url, stack.credentials, tenancy.user(role, "globex"))
            for role in tenancy.ROLES
        }
        hello = load_run_request(EXAMPLES / "hello-dag.yaml", [], None)
        done = (await acme.submit(msgspec.structs.replace(hello, thread_id="t1"))).run_id
        approval = load_run_request(EXAMPLES / "approval.yaml", [], None)
        waiting = (await acme.submit(approval)).run_id
        wait_event = load_run_request(EXAMPLES / "wait-event.yaml", [], None)
        signal_wait = (await acme.submit(wait_event)).run_id
        own = (await globex.submit(msgspec.structs.replace(hello, thread_id="t1"))).run_id
        blob_run, blob = await _blob_output(acme, "acme's big output ")
        own_blob_run, own_blob = await _blob_output(globex, "globex's big output ")
        assert isinstance((await acme.wait(done, timeout=30))[-1].event, RunCompleted)
        await until(acme, waiting, having("step_suspended"), 30)
        await until(acme, signal_wait, having("event_wait_started"), 30)
        await globex.wait(own, timeout=30)
        # the read model has every run before the queries run
        for client, run_id in ((acme, done), (acme, waiting), (globex, own)):
            await eventually(lambda c=client, r=run_id: _has_run(c, r), f"{run_id} listed")
        world = World(stack, acme, globex, globex_client, raw, done, waiting, signal_wait, own,
                      platform, blob_run, blob, own_blob_run, own_blob)  # fmt: skip
        try:
            before = await world.acme_history()
            for route in ROUTES:
                if ATTACKS[route.name] in [ATTACKS[n] for n in ACME_ACTS]:
                    continue
                await ATTACKS[route.name](world)
            assert await world.acme_history() == before  # nothing written into acme's runs
            for name in ACME_ACTS:
                await ATTACKS[name](world)
            # every run acme has is acme's
            for summary in await acme.runs(limit=1000):
                first = (await acme.events(summary.run_id))[0].event
                assert first.principal.tenant == "acme"  # type: ignore[union-attr]
        finally:
            for conn in raw.values():
                assert conn.nc is not None
                await conn.nc.close()
            for client in (acme, globex, globex_client, platform):
                await client.close()


async def _blob_output(client: LoomClient, text: str) -> tuple[str, str]:
    """A completed run of ``client``'s whose output (a tool's, over the 1 KiB blob
    threshold) is a blob: its run id and the blob's digest."""
    plan = {"steps": [{"kind": "tool", "id": "big", "tool": "echo",
                       "input": {"message": "{{ input.text }}"}}],
            "output": "{{ steps.big.output }}"}  # fmt: skip
    request = msgspec.convert({"plan": plan, "input": {"text": text * 200}}, RunRequest)
    run_id = (await client.submit(request)).run_id
    last = (await client.wait(run_id, timeout=30))[-1].event
    assert isinstance(last, RunCompleted), last
    ((_, ref),) = blobs.find_refs(msgspec.to_builtins(last.output))
    return run_id, ref.digest


async def _has_run(client: LoomClient, run_id: str) -> bool:
    return run_id in {r.run_id for r in await client.runs(limit=1000)}


async def test_a_default_stack_still_answers_plain_subjects(tmp_path: Path) -> None:
    """No tenants configured: the platform's operator submits, follows and lists as
    before; its runs are the default tenant's."""
    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=StoreSettings(kind="sqlite", data_dir=tmp_path / "data"),
    )
    async with LocalStack(settings, nats_port=-1) as stack, await stack.client() as operator:
        request = load_run_request(EXAMPLES / "hello-dag.yaml", [], None)
        accepted = await operator.submit(RunRequest(plan=request.plan, input=request.input))
        records = await operator.wait(accepted.run_id, timeout=30)
        assert records[0].event.principal.tenant == "default"  # type: ignore[union-attr]
        listed = await eventually(lambda: operator.runs(limit=10), "the run listed")
        assert listed[0].tenant == "default"
        assert await asyncio.wait_for(operator.ping("executor"), 5)


async def test_the_cli_acts_in_the_tenant_loom_tenant_names(tmp_path: Path) -> None:
    """``LOOM_TENANT=acme loom ...`` connects as operator@acme (its seed from the
    credentials directory): it runs and follows its own runs, lists only them, and
    another tenant's run is "not found" to it. Separate OS processes, no traceback."""
    import os
    import subprocess
    import sys

    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=StoreSettings(kind="sqlite", data_dir=tmp_path / "data"),
        tenants=("acme", "globex"),
    )
    loom = str(Path(sys.executable).parent / "loom")
    async with LocalStack(settings, nats_port=-1) as stack:
        async with await stack.client(tenant="globex") as globex:
            theirs = await globex.submit(load_run_request(EXAMPLES / "hello-dag.yaml", [], None))
            await globex.wait(theirs.run_id, timeout=30)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
        env.update(LOOM_NATS_URL=stack.url, LOOM_TENANT="acme", LOOM_LOG_LEVEL="WARNING",
                   LOOM_CREDS_DIR=str(stack.settings.credentials_dir))  # fmt: skip

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run([loom, *args], env=env, capture_output=True, text=True,
                                  timeout=60, cwd=EXAMPLES.parent)  # fmt: skip
            assert "Traceback" not in done.stderr + done.stdout, done.stderr
            return done

        ran = await asyncio.to_thread(cli, "run", "examples/hello-dag.yaml", "-o", "json")
        assert ran.returncode == 0, ran.stderr
        listed = await asyncio.to_thread(cli, "runs", "-o", "json")
        assert listed.returncode == 0, listed.stderr
        assert theirs.run_id not in listed.stdout and '"tenant": "acme"' in listed.stdout
        for command in (("describe", theirs.run_id), ("cancel", theirs.run_id)):
            refused = await asyncio.to_thread(cli, *command)
            assert refused.returncode != 0 and "no run" in refused.stderr.lower(), refused


async def test_the_cli_manages_only_the_schedules_of_the_tenant_loom_tenant_names(
    tmp_path: Path,
) -> None:
    """``LOOM_TENANT=acme loom schedule create`` makes acme's schedule; ``loom schedule
    list``, a separate OS process, lists it and not globex's; globex's is "no schedule"
    to acme's CLI. No traceback."""
    import os
    import subprocess
    import sys

    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=StoreSettings(kind="sqlite", data_dir=tmp_path / "data"),
        tenants=("acme", "globex"),
    )
    loom = str(Path(sys.executable).parent / "loom")
    async with LocalStack(settings, nats_port=-1) as stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
        env.update(LOOM_NATS_URL=stack.url, LOOM_TENANT="acme", LOOM_LOG_LEVEL="WARNING",
                   LOOM_CREDS_DIR=str(stack.settings.credentials_dir))  # fmt: skip

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run([loom, "schedule", *args], env=env, capture_output=True,
                                  text=True, timeout=60, cwd=EXAMPLES.parent)  # fmt: skip
            assert "Traceback" not in done.stderr + done.stdout, done.stderr
            return done

        made = await asyncio.to_thread(
            cli, "create", "nightly", "examples/hello-dag.yaml", "--every", "1h", "-o", "json"
        )
        assert made.returncode == 0, made.stderr
        created = msgspec.json.decode(made.stdout)["schedule"]
        assert created["tenant"] == "acme" and created["principal"]["tenant_verified"]
        async with await stack.client(tenant="globex") as globex:
            hello = load_run_request(EXAMPLES / "hello-dag.yaml", [], None)
            theirs = await ask_schedule(globex, ScheduleCreate(
                name="theirs", when=ScheduleSpec(every="1h"), run=hello))  # fmt: skip
            assert theirs.error is None, theirs.error
            listed = await ask_schedule(globex, SchedulesQuery())
            assert [s.name for s in listed.schedules] == ["theirs"]
        listed = await asyncio.to_thread(cli, "list", "-o", "json")
        assert listed.returncode == 0, listed.stderr
        assert [s["name"] for s in msgspec.json.decode(listed.stdout)] == ["nightly"]
        for action in ("describe", "trigger", "delete"):
            refused = await asyncio.to_thread(cli, action, "theirs")
            assert refused.returncode != 0, refused
            assert "schedule_not_found" in refused.stderr and "no schedule named" in refused.stderr
        triggered = await asyncio.to_thread(cli, "trigger", "nightly", "-o", "json")
        assert triggered.returncode == 0, triggered.stderr
        run_id = msgspec.json.decode(triggered.stdout)["run_id"]
        async with await stack.client(tenant="acme") as acme:
            first = (await acme.wait(run_id, timeout=30))[0].event
            assert first.principal.tenant == "acme" and first.principal.tenant_verified  # type: ignore[union-attr]
        # the platform's operator (no LOOM_TENANT) lists every tenant's, with the tenant,
        # and describes one; acme's CLI may not
        platform_env = {k: v for k, v in env.items() if k != "LOOM_TENANT"}

        def platform_cli(*args: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run([loom, "schedule", *args], env=platform_env,
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
            assert "Traceback" not in done.stderr + done.stdout, done.stderr
            return done

        every = await asyncio.to_thread(platform_cli, "list", "--every-tenant", "-o", "json")
        assert every.returncode == 0, every.stderr
        assert {(s["tenant"], s["name"]) for s in msgspec.json.decode(every.stdout)} == {
            ("acme", "nightly"), ("globex", "theirs"),
        }  # fmt: skip
        table = await asyncio.to_thread(platform_cli, "list", "--every-tenant")
        assert "tenant" in table.stdout and "globex" in table.stdout, table.stdout
        one = await asyncio.to_thread(platform_cli, "describe", "theirs", "--tenant", "globex")
        assert one.returncode == 0 and "tenant globex" in one.stdout, one
        mine = await asyncio.to_thread(platform_cli, "list", "-o", "json")
        assert msgspec.json.decode(mine.stdout) == []  # the platform's own: none
        refused = await asyncio.to_thread(cli, "list", "--every-tenant")
        assert refused.returncode != 0 and "not_authorized" in refused.stderr, refused
        other = await asyncio.to_thread(cli, "describe", "theirs", "--tenant", "globex")
        assert other.returncode != 0 and "not_authorized" in other.stderr, other


async def test_a_tenants_streamed_model_text_reaches_only_its_own_operator(
    tmp_path: Path,
) -> None:
    """The planner sends a tenant's run's streamed model text on that tenant's twin
    (``loom.t.<tenant>.stream.<run>``): its operator hears every piece, in order; another
    tenant's operator and the platform's plain subject hear nothing of it. ``LOOM_TENANT=acme
    loom run`` (a separate OS process) shows the text live."""
    import os
    import subprocess
    import sys

    from test_agents import agent_plan, write_models  # type: ignore[import-not-found]

    from loom_core.contracts import ModelChunk
    from loom_infra.fakemodel import FakeModelServer, Reply, ToolCall

    answer = "Lisbon is the capital of Portugal, on the Tagus."
    with FakeModelServer() as server:
        settings = Settings(
            nats_url="nats://127.0.0.1:4222",
            store=StoreSettings(kind="sqlite", data_dir=tmp_path / "data"),
            tenants=("acme", "globex"),
            models_file=write_models(tmp_path / "models.yaml", server.base_url, stream=True),
        )
        async with LocalStack(settings, nats_port=-1) as stack:
            acme = await stack.client(tenant="acme")
            globex = await stack.client(tenant="globex")
            platform = await stack.client()
            heard: dict[str, list[ModelChunk]] = {
                "acme": [], "globex": [], "platform": [], "platform-twins": [],
            }  # fmt: skip
            got_all = asyncio.Event()

            def hear(who: str) -> Callable[[Any], Awaitable[None]]:
                async def on_chunk(msg: Any) -> None:
                    heard[who].append(codec.decode(msg.data, ModelChunk))
                    if "".join(c.text for c in heard["acme"] if c.turn == 2) == answer:
                        got_all.set()

                return on_chunk

            run_id = "acme-streamed"
            subs = [
                await acme.nc.subscribe(
                    acme.scoped(subjects.model_stream(run_id)), cb=hear("acme")
                ),
                await globex.nc.subscribe(globex.scoped("loom.stream.*"), cb=hear("globex")),
                await platform.nc.subscribe("loom.stream.*", cb=hear("platform")),
                # the platform's operator may hear every tenant's (the cluster's admin)
                await platform.nc.subscribe("loom.t.*.stream.*", cb=hear("platform-twins")),
            ]
            for client in (acme, globex, platform):
                await client.nc.flush()
            server.script(
                "main-model",
                Reply(content="Let me check.", tool_calls=[ToolCall("echo", {"message": "x"})]),
                Reply(content=answer),
            )
            request = RunRequest(plan=agent_plan(), input={"question": "q"}, run_id=run_id)
            await acme.submit(request)
            records = await acme.wait(run_id, timeout=30)
            assert isinstance(records[-1].event, RunCompleted), records[-1]
            async with asyncio.timeout(30):  # plain NATS: the last pieces may trail the events
                await got_all.wait()
            first = [c for c in heard["acme"] if c.turn == 1]
            assert "".join(c.text for c in first) == "Let me check."
            assert all(c.run_id == run_id for c in heard["acme"])
            # the platform's own run still streams on the plain subject (its operator
            # follows the stream there); nothing of acme's reached it or globex
            server.script("main-model", Reply(content="platform's answer"))
            mine = RunRequest(plan=agent_plan(), input={"question": "q"}, run_id="plain-run")
            await platform.submit(mine)
            await platform.wait("plain-run", timeout=30)
            await eventually(
                lambda: _async(any(c.run_id == "plain-run" for c in heard["platform"])),
                "the platform's run's text on the plain subject",
            )
            assert all(c.run_id == "plain-run" for c in heard["platform"])
            assert heard["globex"] == []
            assert {c.run_id for c in heard["platform-twins"]} == {run_id}
            for sub in subs:
                await sub.unsubscribe()
            # the CLI of acme's tenant shows its run's text live
            env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
            env.update(LOOM_NATS_URL=stack.url, LOOM_TENANT="acme", LOOM_LOG_LEVEL="WARNING",
                       LOOM_CREDS_DIR=str(stack.settings.credentials_dir))  # fmt: skip
            plan_file = tmp_path / "agent.json"
            plan_file.write_text(
                msgspec.json.encode({"plan": agent_plan(), "input": {"question": "q"}}).decode()
            )
            server.script(
                "main-model",
                Reply(content="Let me check.", tool_calls=[ToolCall("echo", {"message": "x"})]),
                Reply(content=answer),
            )
            loom = str(Path(sys.executable).parent / "loom")
            ran = await asyncio.to_thread(
                subprocess.run, [loom, "run", str(plan_file)], env=env, capture_output=True,
                text=True, timeout=60,
            )  # fmt: skip
            assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stderr
            assert "think turn 2: " + answer in ran.stderr.replace("\n", ""), ran.stderr
            for client in (acme, globex, platform):
                await client.close()


async def test_the_cli_reads_tools_blobs_and_dead_letters_of_the_tenant_loom_tenant_names(
    tmp_path: Path,
) -> None:
    """``LOOM_TENANT=acme loom tools / blob get --run / blob info --run / dead-letters``,
    separate OS processes with acme's operator key: the catalog, acme's run's blob, and
    acme's own rejected requests; globex's blob is "not found" to it; what a tenant cannot
    do (read a blob without its run, upload) says what to do instead. No traceback."""
    import os
    import subprocess
    import sys

    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=StoreSettings(kind="sqlite", data_dir=tmp_path / "data"),
        tenants=("acme", "globex"),
        blobs=BlobSettings(threshold_bytes=1024),
    )
    loom = str(Path(sys.executable).parent / "loom")
    async with LocalStack(settings, nats_port=-1) as stack:
        async with await stack.client(tenant="globex") as globex:
            their_run, their_blob = await _blob_output(globex, "globex's own ")
            bad = await globex.nc.request(globex.scoped(subjects.API_RUNS), b"[1]", timeout=10)
            assert codec.decode(bad.data, RunsReply).error is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
        env.update(LOOM_NATS_URL=stack.url, LOOM_TENANT="acme", LOOM_LOG_LEVEL="WARNING",
                   LOOM_CREDS_DIR=str(stack.settings.credentials_dir))  # fmt: skip

        def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
            done = subprocess.run([loom, *args], env=env, capture_output=True, timeout=60,
                                  cwd=tmp_path)  # fmt: skip
            assert b"Traceback" not in done.stderr + done.stdout, done.stderr
            return done

        async with await stack.client() as platform:
            big_input = await platform.put_blob("acme's " * 45_000)
        plan = {"steps": [{"kind": "tool", "id": "big", "tool": "echo",
                           "input": {"message": "{{ input.text }}"}}],
                "output": "{{ steps.big.output }}"}  # fmt: skip
        (tmp_path / "big.json").write_text(
            # ~2.5 chunks of the blob store (a blob read in several pages); the platform
            # hands acme the input by reference (a tenant cannot upload)
            msgspec.json.encode({"plan": plan, "input": {"text": big_input}}).decode()
        )
        ran = await asyncio.to_thread(cli, "run", "big.json", "-o", "json")
        assert ran.returncode == 0, ran.stderr
        body = msgspec.json.decode(ran.stdout)
        ((_, ref),) = blobs.find_refs(body["output"])
        run_id = body["run_id"]
        shown = await asyncio.to_thread(cli, "run", "big.json")  # the text form: the command
        assert f"loom blob get {ref.digest} --run " in shown.stderr.decode(), shown.stderr
        async with await stack.client(tenant="acme") as acme:  # pages across its chunks
            for page in (100_000, CHUNK_BYTES, 3 * CHUNK_BYTES - 1):
                read = [c async for c in acme.run_blob_chunks(run_id, ref.digest, page=page)]
                assert blobs.digest_of(b"".join(read)) == ref.digest, page
                assert len(read) == -(-ref.bytes // min(page, 512 * 1024)), page
        got = await asyncio.to_thread(cli, "blob", "get", ref.digest, "--run", run_id)
        assert got.returncode == 0, got.stderr
        assert blobs.digest_of(got.stdout) == ref.digest and b"acme's" in got.stdout
        info = await asyncio.to_thread(cli, "blob", "info", ref.digest, "--run", run_id)
        described = blobs.describe(blobs.BlobRef(ref.digest, ref.bytes)).encode()
        assert info.returncode == 0 and described in info.stdout, info
        for command in (("blob", "get", their_blob, "--run", their_run),
                        ("blob", "get", their_blob, "--run", run_id),
                        ("blob", "info", their_blob, "--run", their_run)):  # fmt: skip
            refused = await asyncio.to_thread(cli, *command)
            assert refused.returncode == 1 and b"blob_not_found" in refused.stderr, refused
        bare = await asyncio.to_thread(cli, "blob", "get", ref.digest)
        assert bare.returncode != 0 and b"--run" in bare.stderr, bare.stderr
        (tmp_path / "v.json").write_text('{"x": 1}')
        upload = await asyncio.to_thread(cli, "blob", "put", "v.json")
        assert upload.returncode != 0 and b"inline" in upload.stderr, upload.stderr
        tools = await asyncio.to_thread(cli, "tools", "-o", "json")
        assert tools.returncode == 0, tools.stderr
        assert "echo" in {t["name"] for t in msgspec.json.decode(tools.stdout)}
        shown_tool = await asyncio.to_thread(cli, "tools", "show", "echo")
        assert shown_tool.returncode == 0 and b"input schema" in shown_tool.stdout
        # acme's own mistake is in its rejects; globex's is not
        async with await stack.client(tenant="acme") as acme:
            bad = await acme.nc.request(acme.scoped(subjects.API_RUNS), b"[2]", timeout=10)
            assert codec.decode(bad.data, RunsReply).error is not None

        async def rejects() -> list[dict[str, Any]] | None:
            listed = await asyncio.to_thread(cli, "dead-letters", "--rejects", "-o", "json")
            assert listed.returncode == 0, listed.stderr
            letters = msgspec.json.decode(listed.stdout)["letters"]
            return letters or None

        letters = await eventually(rejects, "acme's rejected request listed")
        subjects_seen = {x["letter"]["origin_subject"] for x in letters}
        assert subjects_seen == {tenancy.twin(subjects.API_RUNS, "acme")}, subjects_seen
        text = await asyncio.to_thread(cli, "dead-letters")
        assert text.returncode == 0, text.stderr
