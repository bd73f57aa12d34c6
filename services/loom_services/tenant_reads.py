"""Reads a tenant's operator makes through a service (answered by the planner).

The platform's operator reads the tool catalog, blobs and dead letters straight from
JetStream. A tenant's user has no JetStream API at all (a stream read cannot be limited
to one tenant by subject, ``loom_infra.credentials``), so it asks these request routes on
its twin subjects, and the answer holds only what that tenant may see:

- ``apiTools``: the catalog, the same for everyone (tools are the platform's; a tool's
  access rules decide who may call it, not who may read that it exists);
- ``apiBlob``: a page of a blob, read *through a run*: the caller must see the run, and
  one of the run's stored events must refer to the blob. Another tenant's run, a blob
  the run does not refer to, and a blob not stored are the same ``blob_not_found``;
- ``apiDeadLetters``: dead letters (or rejects) sent on the caller's twin subjects or
  about the caller's runs, by stream sequence (``loom_core.tenancy.letter_owner``).

The platform (a plain subject) is answered as the platform: every run, every letter.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import msgspec
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from loom_core import blobs, codec, routes, subjects, tenancy
from loom_core.contracts import (
    BlobQuery,
    BlobReply,
    DeadLetter,
    DeadLettersQuery,
    DeadLettersReply,
    ErrorInfo,
    EventRecord,
    RunEventsQuery,
    RunEventsReply,
    RunRequested,
    StoredDeadLetter,
    ToolSpec,
    ToolsQuery,
    ToolsReply,
)
from loom_core.errors import LoomError
from loom_infra import bus, endpoints, paging
from loom_infra.blobstore import BlobStore, ChunkCursor
from loom_infra.settings import Settings
from loom_services import tenants
from loom_services.runtime import ServiceContext

log = logging.getLogger("loom.tenant_reads")

MAX_TOOLS_PAGE = 1000
MAX_LETTERS_PAGE = 500
# dead letters looked at per request at most: a tenant's page over a stream that is
# mostly others' letters ends early, with the cursor to go on from
SCAN_BUDGET = 2000
MAX_BLOB_PAGE = 512 * 1024
REMEMBERED_RUNS = 1000  # runs whose blob references are kept (the newest used)
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")
_STREAMS = {
    False: (subjects.DLQ_STREAM, subjects.DLQ_ALL),
    True: (routes.REJECTED.stream or "", routes.REJECTED.wildcard),
}


def _refused(code: str, message: str, path: str | None = None) -> endpoints.ServiceError:
    return endpoints.ServiceError(ErrorInfo(code=code, message=message, path=path))


def _not_found(query: BlobQuery) -> endpoints.ServiceError:
    # one answer for a run the caller may not see, a blob the run does not refer to and
    # a blob not stored: nothing tells another tenant's run or blob exists
    return endpoints.ServiceError(
        ErrorInfo(
            code="blob_not_found",
            message=f"no blob {query.digest} of run '{query.run_id}' (the run is not yours or "
            "does not refer to it, or it expired after LOOM_BLOB_MAX_AGE_DAYS)",
            path="$.digest",
        )
    )


def _cursor(query: BlobQuery) -> ChunkCursor:
    """Where a page starts reading the object: the previous page's ``next_after``
    (a chunk's stream sequence and its byte offset, which must not lie past ``offset``),
    or the first chunk."""
    if not query.after:
        return ChunkCursor()
    try:
        seq, start = paging.parse_keyset_cursor(query.after)
        cursor = ChunkCursor(seq, int(start))
    except ValueError:
        cursor = ChunkCursor(-1, -1)
    if cursor.seq < 1 or not 0 <= cursor.start <= query.offset:
        raise _refused(
            "bad_cursor", "`after` is not a cursor this page can go on from: pass the "
            "previous page's next_after with its next_offset (or neither)", "$.after",
        )  # fmt: skip
    return cursor


@dataclass
class RunRefs:
    """What the blob reader knows of one run: its tenant and the blobs its events refer
    to, as of event ``seen`` (a run still going may refer to more later)."""

    tenant: str
    seen: int = 0
    digests: set[str] = field(default_factory=set)


def _for_tenants(spec: ToolSpec) -> ToolSpec:
    """A tool as a tenant sees it: why it is unavailable is the platform's (an MCP
    server's connection error names its hosts); that it is, and until when, is not."""
    if not spec.unavailable_reason:
        return spec
    hidden = "its server is not connected now (the platform's operator sees why)"
    return msgspec.structs.replace(spec, unavailable_reason=hidden)


def _refs_of(record: EventRecord) -> set[str]:
    try:
        found = blobs.find_refs(msgspec.to_builtins(record.event))
    except blobs.BlobRefError:  # a malformed reference-shaped value refers to nothing
        return set()
    return {ref.digest for _, ref in found}


class TenantReads:
    """The three read routes, served in the planner's process."""

    def __init__(
        self,
        ctx: ServiceContext,
        catalog: Callable[[], Awaitable[Mapping[str, ToolSpec]]],
        run_tenant: Callable[[str], Awaitable[str]],
    ) -> None:
        self.ctx = ctx
        self.settings: Settings = ctx.settings
        self.catalog = catalog
        self.run_tenant = run_tenant
        self.runs: OrderedDict[str, RunRefs] = OrderedDict()

    async def start(self) -> None:
        for route, handler in (
            (routes.API_TOOLS, self.on_tools),
            (routes.API_BLOB, self.on_blob),
            (routes.API_DEAD_LETTERS, self.on_dead_letters),
        ):
            await endpoints.serve(self.ctx.nc, self.ctx.rejects, route, "planner", handler)

    @property
    def max_payload(self) -> int:
        return self.ctx.nc.max_payload or self.settings.max_payload

    # ------------------------------------------------------------------ tools

    async def on_tools(self, msg: Msg, query: ToolsQuery) -> ToolsReply:
        if not 1 <= query.limit <= MAX_TOOLS_PAGE:
            raise _refused("invalid_query", f"limit must be 1-{MAX_TOOLS_PAGE}", "$.limit")
        try:
            catalog = await self.catalog()
        except LoomError:  # no tool-runner has published its tools yet
            return ToolsReply()
        names = sorted(name for name in catalog if name > query.after)
        page = paging.fill(
            (catalog[n] for n in names), lambda s: len(codec.encode(s)),
            limit=query.limit, max_payload=self.max_payload,
        )  # fmt: skip
        more = page.more and bool(page.items)
        tools = page.items
        if tenants.caller(msg) is not None:
            tools = [_for_tenants(t) for t in tools]
        return ToolsReply(tools=tools, next_after=page.items[-1].name if more else None)

    # ------------------------------------------------------------------ blobs

    async def on_blob(self, msg: Msg, query: BlobQuery) -> BlobReply:
        if not _RUN_ID.fullmatch(query.run_id):
            raise _refused(
                "invalid_run_id", "run_id must be 1-256 characters of A-Z, a-z, 0-9, '_' or "
                "'-' (no wildcards or dots)", "$.run_id",
            )  # fmt: skip
        try:
            ref = blobs.parse_ref({blobs.BLOB_KEY: query.digest, "bytes": 0}, "$.digest")
        except blobs.BlobRefError as exc:
            raise endpoints.ServiceError(exc.error) from None
        if query.offset < 0 or query.limit < 0:
            raise _refused("invalid_query", "offset and limit must be 0 or more", "$.offset")
        cursor = _cursor(query)
        if not await self._refers(tenants.caller(msg), query.run_id, ref.digest):
            raise _not_found(query)
        store = BlobStore(self.ctx.js, self.settings.blobs)
        info = await store.info(ref)
        if info is None:
            raise _not_found(query)
        size = info.size or 0
        room = paging.budget(self.max_payload) * 3 // 4  # bytes travel as base64
        want = min(query.limit, MAX_BLOB_PAGE, room)
        try:
            data, after = await store.page(info, ref.digest, query.offset, want, cursor)
        except blobs.BlobRefError as exc:
            raise endpoints.ServiceError(exc.error) from None
        if after is None or query.limit == 0:
            return BlobReply(digest=ref.digest, size=size, offset=query.offset, data=data)
        return BlobReply(
            digest=ref.digest, size=size, offset=query.offset, data=data,
            next_offset=query.offset + len(data),
            next_after=paging.keyset_cursor(after.seq, str(after.start)),
        )  # fmt: skip

    async def _refers(self, caller: str | None, run_id: str, digest: str) -> bool:
        """Whether ``caller`` may see run ``run_id`` and one of its events refers to
        ``digest`` (the run's events are read again only when the digest is not known)."""
        known = self.runs.get(run_id)
        if known is not None:
            self.runs.move_to_end(run_id)
            if not tenancy.may_see(caller, known.tenant):
                return False
            if digest in known.digests:
                return True
        after = known.seen if known is not None else 0
        while True:
            query = RunEventsQuery(run_id=run_id, after_seq=after, limit=1000)
            reply = await bus.request(self.ctx.nc, subjects.API_RUN_EVENTS, query, RunEventsReply)
            if reply.error is not None:
                raise endpoints.ServiceError(reply.error)
            for record in reply.events:
                if known is None:
                    first = record.event
                    principal = first.principal if isinstance(first, RunRequested) else None
                    known = RunRefs(tenant=tenants.tenant_of(principal))
                    self.runs[run_id] = known
                    if not tenancy.may_see(caller, known.tenant):
                        return False
                known.digests |= _refs_of(record)
                known.seen = record.seq
            if reply.next_after_seq is None or reply.next_after_seq <= after:
                break
            after = reply.next_after_seq
        while len(self.runs) > REMEMBERED_RUNS:
            self.runs.popitem(last=False)
        return known is not None and digest in known.digests

    # ------------------------------------------------------------------ dead letters

    async def on_dead_letters(self, msg: Msg, query: DeadLettersQuery) -> DeadLettersReply:
        if not 1 <= query.limit <= MAX_LETTERS_PAGE:
            raise _refused("invalid_query", f"limit must be 1-{MAX_LETTERS_PAGE}", "$.limit")
        if query.after_seq < 0:
            raise _refused("invalid_query", "after_seq must be 0 or more", "$.after_seq")
        caller = tenants.caller(msg)
        stream, subject = _STREAMS[query.rejects]
        found: list[StoredDeadLetter] = []
        used = 0
        budget = paging.budget(self.max_payload)
        seq = query.after_seq
        for _ in range(SCAN_BUDGET):
            try:
                raw = await self.ctx.js.get_msg(stream, seq + 1, subject=subject, next=True)
            except NotFoundError:
                return DeadLettersReply(letters=found)  # nothing stored past seq
            try:
                letter = codec.decode(raw.data or b"", DeadLetter)
            except Exception:  # not a letter (someone with stream rights wrote it): skip
                seq = raw.seq or seq + 1
                continue
            if await self._may_read(caller, letter):
                item = StoredDeadLetter(seq=raw.seq or seq + 1, letter=letter)
                size = len(codec.encode(item)) + 1
                if found and used + size > budget:
                    return DeadLettersReply(letters=found, next_after_seq=seq)
                found.append(item)
                used += size
            seq = raw.seq or seq + 1
            if len(found) >= query.limit:
                return DeadLettersReply(letters=found, next_after_seq=seq)
        return DeadLettersReply(letters=found, next_after_seq=seq)

    async def _may_read(self, caller: str | None, letter: DeadLetter) -> bool:
        if caller is None:
            return True  # the platform reads every letter (it reads the stream anyway)
        tenant, run_id = tenancy.letter_owner(letter.origin_subject)
        if tenant is not None:
            return tenant == caller
        if run_id is None:
            return False
        try:
            return await self.run_tenant(run_id) == caller
        except Exception as exc:  # the executor did not answer: never guess, ask again
            log.warning("dead letters: the tenant of run %s is unknown now: %r", run_id, exc)
            raise endpoints.ServiceError(
                ErrorInfo(
                    code="unavailable",
                    retryable=True,
                    message="the executor did not say whose a dead letter's run is; retry",
                )
            ) from None
