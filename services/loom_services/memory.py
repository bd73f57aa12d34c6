"""The memory service: each run's request and final output are appended to the run's
conversation thread, durably (SQLite/PostgreSQL) and for recall (Qdrant); memories,
working memory and knowledge are answered on two request routes (``MemoryRequest``):
- ``loom.api.memory.tool`` (tool-runner only): acts as the stored principal of the run
  the tool call belongs to, read from the executor, never as anything the request says;
- ``loom.api.memory.operator`` (the CLI): acts as the principal the operator names.
This process is the one writer of its Qdrant store (local mode allows no other).

Appends are idempotent by the source event id, so a redelivered event never adds a
second entry. The thread of a finished run is found from the run's first event
(asked of the executor when this process did not see it, e.g. after a restart).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg

from loom_core import codec, routes, subjects, tenancy
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    MemoryReply,
    MemoryRequest,
    Principal,
    RunCompleted,
    RunEventsQuery,
    RunEventsReply,
    RunRequested,
    ThreadEntry,
    ThreadQuery,
    ThreadReply,
)
from loom_infra import bus, endpoints
from loom_infra.blocking import Blocking
from loom_infra.client import is_stored
from loom_infra.settings import Settings
from loom_infra.store import ThreadStore, open_thread_store
from loom_services import tenants
from loom_services.memory_ops import run_op
from loom_services.memorystore import MemoryFailure, MemoryStore
from loom_services.runtime import ServiceContext, run_main

if TYPE_CHECKING:  # the embedders module loads NumPy: only when memory is first used
    from loom_infra.embedders import Embedder

log = logging.getLogger("loom.memory")
# MiniLM in a child process (False: in this one's writer thread, as before issue 10)
EMBED_IN_CHILD = True


class MemoryService:
    name: routes.Identity = "memory"

    def __init__(self, settings: Settings, threads: ThreadStore | None = None) -> None:
        self.settings = settings
        self.threads = threads or open_thread_store(settings.store)
        self.io = Blocking("memory-store")
        self.thread_of: OrderedDict[str, str] = OrderedDict()
        self.principal_of: OrderedDict[str, Principal | None] = OrderedDict()
        self._store: MemoryStore | None = None
        self._warming: asyncio.Future[None] | None = None  # the model's load at start
        self.writes = Blocking("memory-vectors", workers=1)  # the one writer

    def open_store(self) -> MemoryStore:
        """Qdrant (``LOOM_QDRANT``: a path or an http(s) URL; default
        ``<data dir>/qdrant``), the embedder (``LOOM_EMBEDDER``) and the working-memory log
        (the run store's database). Opened on first use; the model itself is loaded at
        the service's start, in the background (``_warm_embedder``)."""
        if self._store is None:
            from loom_infra.vectors import VectorStore
            from loom_infra.workingmemory import WorkingMemoryStore

            store = self.settings.store
            # the model first: if it is missing, no Qdrant folder is left locked
            embedder = self._open_embedder()
            location = self.settings.qdrant or str(store.data_dir / "qdrant")
            try:
                vectors = VectorStore(location)
            except RuntimeError as exc:  # local mode: another process holds the folder
                raise MemoryFailure(
                    "store_busy",
                    f"the Qdrant folder {location} is open in another process: run one "
                    "memory service per folder, or set LOOM_QDRANT to a Qdrant server URL",
                ) from exc
            try:
                if store.kind == "postgres":
                    working = WorkingMemoryStore(dsn=store.postgres_url)
                else:
                    working = WorkingMemoryStore(store.data_dir / "working_memory.db")
                self._store = MemoryStore(vectors, embedder, working)
            except BaseException:
                vectors.close()  # release the folder: the next request tries again
                raise
        return self._store

    async def _warm_embedder(self) -> None:
        """Load the embedding model now, in the background (on the one writer thread):
        every run's request is remembered, so the first run would otherwise pay the
        model's load (~0.3-0.5 s of CPU, in the child for MiniLM) while its first steps
        run (issue 10: the second run after a start measured 1.6 ms a step instead of
        0.95). A model that cannot load is reported by the operations that need it."""
        try:
            await self.writes(self._open_embedder)
        except Exception as exc:
            log.info("memory: the embedder is not loaded at start (%s)", exc)

    def _open_embedder(self) -> Embedder:
        """MiniLM runs in a child process (``loom_services.embedworker``: its CPU-bound
        forward pass held the GIL of the process that runs the steps), one per process
        like the model it replaces; the others (hash, a hosted model) here."""
        from loom_infra import embedders

        if self.settings.embedder.spec == "minilm" and EMBED_IN_CHILD:
            from loom_services import embedworker

            return embedworker.shared(self.settings.embedder)
        return embedders.from_settings(self.settings.embedder)

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        # not a service task (those run for the service's life; one that ends is a
        # failure the health endpoint reports): a one-off, kept to be cancelled at close
        self._warming = asyncio.ensure_future(self._warm_embedder())
        await endpoints.serve(
            ctx.nc, ctx.rejects, routes.API_THREAD, self.name, self.on_thread_query
        )
        consumer = endpoints.durable(
            ctx.js, routes.RUN_EVENTS, self.name, "memory", handler=self.on_events, batch=64
        )
        ctx.spawn(consumer.run(ctx.stop), "memory-events")
        await endpoints.serve(
            ctx.nc, ctx.rejects, routes.API_MEMORY_TOOL, self.name, self.on_tool_request
        )
        await endpoints.serve(
            ctx.nc, ctx.rejects, routes.API_MEMORY_OPERATOR, self.name, self.on_operator_request
        )

    async def close(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
        await self.io.close()
        await self.writes.close()
        self.threads.close()
        if self._store is not None:
            self._store.working.close()
            self._store.vectors.close()

    async def on_tool_request(self, msg: Msg, request: MemoryRequest) -> MemoryReply:
        if not request.run_id:
            return _failed("invalid_input", "a tool's memory request names its run", "$.run_id")
        # the run's principal as the executor stored it; a principal in the request is
        # ignored (the tool-runner forwards, it does not vouch)
        principal = await self._principal_for(request.run_id)
        if principal is None:
            return _failed(
                "no_principal",
                f"run {request.run_id} has no principal (stored before principals, or not a "
                "run): memory tools need one",
                "$.run_id",
            )
        return await self._run(principal, request)

    async def on_operator_request(self, msg: Msg, request: MemoryRequest) -> MemoryReply:
        caller = tenants.caller(msg)  # a tenant's operator acts only within its tenant
        principal = request.principal or Principal(
            user_id="operator", via="operator", roles=["admin"],
            tenant=caller or tenancy.DEFAULT_TENANT,
        )  # fmt: skip
        if caller is not None and principal.tenant == tenancy.DEFAULT_TENANT:
            principal = msgspec.structs.replace(principal, tenant=caller)  # as on submit
        if not tenancy.may_see(caller, principal.tenant):
            return _failed(
                "tenant_mismatch",
                f"the operator of tenant {caller!r} acts only for its own tenant, not for "
                f"{principal.tenant!r}",
                "$.principal.tenant",
            )
        return await self._run(principal, request)

    async def _run(self, principal: Principal, request: MemoryRequest) -> MemoryReply:
        def call():
            return run_op(self.open_store(), principal, request.op, dict(request.args))

        try:
            # every operation on the one writer thread: local mode is not safe otherwise
            return MemoryReply(result=await self.writes(call))
        except MemoryFailure as failure:
            return MemoryReply(
                error=ErrorInfo(
                    code=failure.code,
                    message=failure.message,
                    path=failure.path,
                    details=failure.details,
                )
            )
        except Exception as exc:  # the service stays up; the caller learns what failed
            log.exception("memory %s failed", request.op)
            return _failed("memory_error", f"{request.op} failed: {type(exc).__name__}: {exc}")

    async def on_events(self, msgs: Sequence[Msg]) -> list[bool | BaseException]:
        results: list[bool | BaseException] = []
        for msg in msgs:  # in order: a run's request lands before its output
            try:
                record = codec.decode_event(msg.data)
            except Exception as exc:
                results.append(bus.Poison(bus.decode_error_info(exc)))
                continue
            try:
                await self.remember(record)
                results.append(True)
            except bus.Poison as poison:
                results.append(poison)
            except Exception as exc:
                results.append(exc)
        return results

    async def remember(self, record: EventRecord) -> None:
        event = record.event
        if isinstance(event, RunRequested):
            thread_id = event.thread_id or record.run_id
            self._note_thread(record.run_id, thread_id, event.principal)
            content = event.request if event.request is not None else {"input": event.input}
            entry = ThreadEntry(
                role="user",
                content=content,
                run_id=record.run_id,
                at=record.at,
                source_event_id=record.event_id,
            )
        elif isinstance(event, RunCompleted):
            thread_id = await self._thread_for(record.run_id)
            entry = ThreadEntry(
                role="assistant",
                content=event.output,
                run_id=record.run_id,
                at=record.at,
                source_event_id=record.event_id,
            )
        else:
            return
        # With NATS credentials off anyone can publish on loom.run.>: remember only what
        # the executor stored (one query per run start and end, never per step).
        if not await is_stored(self.ctx.nc, record):
            raise bus.Poison(
                ErrorInfo(
                    code="not_stored",
                    message=f"{record.kind} {record.event_id} is not the event the executor "
                    "stored; it was not published by the relay and is not remembered",
                    path="$.event",
                )
            )
        await self.io(self.threads.append, thread_id, entry)
        principal = await self._principal_for(record.run_id)
        if principal is not None:
            await self._index_message(record, thread_id, entry, principal)

    async def _index_message(
        self, record: EventRecord, thread_id: str, entry: ThreadEntry, principal: Principal
    ) -> None:
        """The recall index of thread messages (idempotent by event id), at the entry's
        position in the durable thread (so replicas agree). Derived from the durable
        thread above: if it cannot be written (no model, a busy Qdrant folder) the
        thread entry stays and the failure is logged, not retried forever."""
        try:
            seq = await self.io(self.threads.position, thread_id, record.event_id)
            if seq is None:
                return
            text = content if isinstance(content := entry.content, str) else json.dumps(content)
            await self.writes(
                lambda: self.open_store().append_message(
                    principal.tenant,
                    principal.user_id,
                    thread_id,
                    entry.role,
                    text,
                    source_id=record.event_id,
                    run_id=record.run_id,
                    seq=seq,
                )
            )
        except Exception as exc:
            log.warning("message %s not indexed for recall: %s", record.event_id, exc)

    def _note_thread(self, run_id: str, thread_id: str, principal: Principal | None) -> None:
        self.thread_of[run_id] = thread_id
        self.principal_of[run_id] = principal
        if len(self.thread_of) > 10_000:
            self.thread_of.popitem(last=False)
        if len(self.principal_of) > 10_000:
            self.principal_of.popitem(last=False)

    async def _principal_for(self, run_id: str) -> Principal | None:
        if run_id not in self.principal_of:
            await self._thread_for(run_id, refresh=True)
        return self.principal_of.get(run_id)

    async def _thread_for(self, run_id: str, refresh: bool = False) -> str:
        if run_id in self.thread_of and not refresh:
            return self.thread_of[run_id]
        reply = await bus.request(
            self.ctx.nc,
            subjects.API_RUN_EVENTS,
            RunEventsQuery(run_id=run_id, limit=1),
            RunEventsReply,
        )
        first = reply.events[0].event if reply.events else None
        thread_id = (
            first.thread_id if isinstance(first, RunRequested) and first.thread_id else run_id
        )
        principal = first.principal if isinstance(first, RunRequested) else None
        self._note_thread(run_id, thread_id, principal)
        return thread_id

    async def on_thread_query(self, msg: Msg, query: ThreadQuery) -> ThreadReply:
        entries = await self.io(self.threads.list, query.thread_id)
        caller = tenants.caller(msg)
        if caller is not None:  # a tenant sees the entries of its own runs only
            kept = []
            for entry in entries:
                owner = tenants.tenant_of(await self._principal_for(entry.run_id))
                if owner == caller:
                    kept.append(entry)
            entries = kept
        return ThreadReply(thread_id=query.thread_id, entries=entries)


def _failed(code: str, message: str, path: str | None = None) -> MemoryReply:
    return MemoryReply(error=ErrorInfo(code=code, message=message, path=path))


def main() -> None:
    run_main(lambda settings: [MemoryService(settings)])


if __name__ == "__main__":
    main()
