"""The tool-runner: executes ``tool_call_requested`` events, exactly once per
idempotency key, and answers the run's inbox with a ``ToolResult``.

Exactly-once effects over at-least-once delivery (docs/design.md decision 5):
1. for a tool that is not idempotent, the key is *claimed* in the ledger (a unique
   insert: one claimant wins, across replicas and restarts) before the tool runs;
   an idempotent tool runs first and records claim + result in one commit (a race
   can run it twice, which is harmless by definition, and the first result stands);
2. the result is stored in the ledger, then published (with the request's digest, and
   no ``Nats-Msg-Id``: the executor dedupes by the run's state), then the message is
   acked. The ledger key is the idempotency key plus the request's digest
   (``ledger_key``), so a forged request reusing a run's key cannot pre-empt it.
A redelivered request whose key is finished re-sends the stored result without running
anything. One whose key is claimed but unfinished means the runner that claimed it died
mid-call: an idempotent tool runs again; a non-idempotent one is never re-run, the run
gets an ``ambiguous_outcome`` error instead.

Long calls are kept by ``in_progress`` heartbeats (``bus.Heartbeat``, every third of
the ack wait) so the request is not redelivered while it still runs; a runner killed
mid-call stops beating and its call is re-dispatched within the ack wait (1 s).

The fast path (issue 10): a first delivery of a request has no ledger entry in all but
rare cases, so it is not read. A non-idempotent call is claimed at once (the unique
insert is the read: a lost claim then reads the entry); an idempotent one runs and its
result is published to the inbox (JetStream, fsynced) at once; claim + result are then
recorded in the ledger, many calls per transaction (``LedgerBackfill``), and only then
is the request acked. The executor has the result before the ledger write, so the
write is off the step's path; the ack still waits for it, so a redelivery (a lost ack,
a runner killed after publishing) finds the result instead of running the call again.
A result the run's writer took straight and stored (its receipt says ``recorded``) is
not written to the ledger at all: the run's store holds it, and the request is acked at
once (issue 10, runnercpu); a redelivery then finds no entry and asks the run, below.
A redelivery of a request this process answered (its ack lost in a NATS restart) is
acked unread (``answered``); one that finds no ledger entry asks the executor whether
the run holds a result for it already (the runner that published it was killed before
its ledger write) and then sends nothing (``_recorded_by_run``). A first delivery
that does meet an entry (a consumer recreated, a NATS restart that forgot delivery
counts, on another replica) runs an idempotent call again: harmless by definition, and
the executor keeps the first result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import socket
import uuid
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg

from loom_core import blobs, codec, routes, secrets, sizes, subjects
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    InboxReceipt,
    RunEventsQuery,
    RunEventsReply,
    SizeLimits,
    ToolCallCancelled,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolResult,
)
from loom_core.errors import LoomError
from loom_core.executor import request_digest
from loom_core.ledger_decision import EntryState, Known, Step, next_step
from loom_core.quotas import NO_QUOTAS
from loom_infra import bus, endpoints
from loom_infra.blobstore import BlobStore
from loom_infra.blocking import Blocking
from loom_infra.client import is_stored
from loom_infra.secret_source import SecretSource
from loom_infra.settings import Settings, SettingsError
from loom_infra.store import LedgerEntry, ToolCallLedger, open_tool_ledger
from loom_services.admission import load_quotas
from loom_services.runtime import ServiceContext, run_main
from loom_services.shared_rates import SharedRates
from loom_services.throttle import CallThrottle, run_tenants
from loom_services.tools.catalog import (
    CatalogPublisher,
    ToolCatalog,
    transitions_of,
    with_transitions,
)
from loom_services.tools.config import load_tools_config
from loom_services.tools.library import default_registry
from loom_services.tools.registry import (
    ToolContext,
    ToolOutcome,
    ToolRegistry,
    ToolSettings,
)

log = logging.getLogger("loom.toolrunner")

# Requests answered by this process remembered, so that one redelivered after its ack
# was lost (NATS restarted) is acked without running it again.
ANSWERED_MAX = 50_000
# A request taken from its direct dispatch (``on_request_copy``) is remembered by its
# ``early_mark``: its stream copy settles as it only if it is the same stored event.
PUBLISH = "publish"
# How long a result sent straight to the executor waits for its receipt (it comes after
# the commit that stores it) before it goes to the inbox stream instead: at most this,
# and no longer than the executor's ack wait (``_receipt_wait``)
RESULT_RECEIPT_S = 1.0
# A dispatch of a request decided longer ago than this is stale (a delayed message):
# left to the stream copy, which meets the ledger.
PUBLISH_MAX_AGE_S = 5.0
# Dispatches remembered by their bytes until their stream copy comes (``settle_quickly``):
# at most this many and this many bytes in all (oldest out first: copies that went to
# another replica), each at most this large (a larger one's copy takes the full path)
DISPATCHED_MAX = 4096
DISPATCHED_MAX_TOTAL_BYTES = 4 * 1024 * 1024
DISPATCHED_MAX_BYTES = 16 * 1024


class ToolRunnerService:
    name: routes.Identity = "toolrunner"

    def __init__(
        self,
        settings: Settings,
        registry: ToolRegistry | None = None,
        ledger: ToolCallLedger | None = None,
    ) -> None:
        self.settings = settings
        if registry is None:
            registry = default_registry()
            from loom_services.tools.memory_tools import MEMORY_TOOLS

            for memory_tool in MEMORY_TOOLS:  # memory as tools (they call the memory service)
                registry.register(memory_tool)
        self.registry = registry
        sources = {}
        for module in settings.tool_modules:
            before = set(self.registry.names())
            load_tools(self.registry, module)
            sources.update({n: f"module:{module}" for n in set(self.registry.names()) - before})
        self.ledger = ledger or open_tool_ledger(settings.store)
        self.io = Blocking("toolrunner-ledger")
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.secret_source = SecretSource(settings.secrets)
        # every tool source in layers, each call through its breakers (tools.catalog)
        tools_config = load_tools_config(settings.tools_config)  # LOOM_TOOLS_CONFIG
        self.catalog = ToolCatalog(self.registry, tools_config, self.secret_source.get, sources)
        self.tool_settings = ToolSettings(
            http_allow_private=tuple(settings.http_allow_private),
            # a big output is stored as a blob (by_reference): the largest blob bounds it
            max_output_bytes=settings.blobs.max_blob_bytes,
        )
        # ledger key -> the task running its call (``_execute``), while the call runs
        self.inflight: dict[str, asyncio.Task[Any]] = {}
        # ledger key -> the handling of its request in this process: a redelivery that
        # arrives meanwhile waits for it instead of acking a call that may yet be lost
        self.handling: dict[str, tuple[int | str | None, asyncio.Future[bool | BaseException]]] = {}
        self.cancelled: set[str] = set()
        # ledger key -> stream sequence of the request this process answered (bounded)
        self.answered: OrderedDict[str, int | str | None] = OrderedDict()
        # ledger key -> the result of an idempotent call run without a ledger record
        # (``Step.RUN_RECORD_LATER``), until ``_answer`` knows whether it needs one
        self.unrecorded: dict[str, ToolResult] = {}
        self.executed = 0
        self.backfill = LedgerBackfill(self.ledger, self.io)
        # ledger keys whose publish was seen and left to the stream copy (bounded)
        self.declined: OrderedDict[str, None] = OrderedDict()
        # ledger keys dispatched again after this runner answered them: the executor
        # decided the request again (its first decision was never committed), so the
        # run may lack the result: answered from the ledger, after asking the run
        self.redecided: OrderedDict[str, None] = OrderedDict()
        self.direct_tasks: set[asyncio.Future[bool | BaseException]] = set()
        # the bytes of each dispatch this runner took -> its ledger key and early_mark,
        # until its stream copy comes (bounded): see ``settle_quickly``
        self.dispatched = Dispatched()
        self.copies_since: datetime | None = None  # when this runner began taking publishes
        self.from_publish = 0  # calls started from the dispatch (tests, metrics)
        self.put_back = 0  # stream copies put back for another replica (``_elsewhere``)
        self.copies_known = 0  # stream copies settled by ``settle_quickly`` (tests, metrics)

    # the tenants' tool call rates (loom_services.throttle); none until started
    throttle = CallThrottle(NO_QUOTAS, "tool")

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.throttle = CallThrottle(
            load_quotas(self.settings.quotas_file),
            "tool",
            run_tenants(ctx.nc),
            shared=SharedRates(ctx.js),  # one rate across replicas (loom_services.shared_rates)
        )
        self.blobs = BlobStore(ctx.js, self.settings.blobs)
        self.catalog_publisher = CatalogPublisher(await bus.ensure_tools_bucket(ctx.js))
        self.catalog.on_change = lambda: self.catalog_publisher.publish(self.catalog)
        await self.catalog_publisher.publish_now(self.catalog)
        self.catalog.start()
        consumer = endpoints.durable(
            ctx.js,
            routes.RUN_EVENTS,
            self.name,
            "toolrunner",
            message_handler=self._one,
            quick=self.settle_quickly,  # the stream copy of a dispatch taken: no task
            # tool calls one runner process runs at once (each acked when it ends)
            concurrency=self.settings.delivery.tool_concurrency,
            batch=64,
            # how long a call may go without a heartbeat before JetStream re-dispatches
            # it to another runner (a runner that died mid-call is detected this way)
            ack_wait_s=self.settings.delivery.tool_ack_wait_s,
        )
        ctx.spawn(consumer.run(ctx.stop), "toolrunner-requests")
        ctx.spawn(self.backfill.run(ctx.stop), "toolrunner-ledger-backfill")
        if self.settings.direct_dispatch:
            self.copies_since = bus.now()
            # the executor's dispatch of each request, sent before its commit
            await endpoints.subscribe(ctx.nc, routes.TOOL_DISPATCH, self.name, self.on_request_copy)
        # Every replica hears cancellations (no queue group): only the one running the
        # call has something to stop.
        await endpoints.subscribe(
            ctx.nc, routes.RUN_EVENTS, self.name, self.on_cancelled, (ToolCallCancelled,)
        )

    async def close(self) -> None:
        for task in list(self.direct_tasks):  # their stream copies are redelivered
            task.cancel()
        await self.backfill.flush()
        await self.catalog.close()
        if (publisher := getattr(self, "catalog_publisher", None)) is not None:
            await publisher.close()  # absent when start() never ran
        await self.io.close()
        self.ledger.close()

    async def _one(self, msg: Msg) -> bool | BaseException:
        if msg.headers and msg.headers.get(subjects.ANSWERED):
            return True  # answered in the executor, in the commit that asked (local_tools)
        try:
            record, request = bus.expect_event(msg, ToolCallRequested)
        except bus.Poison as poison:
            return poison
        key = ledger_key(record.run_id, request)
        meta = stream_metadata(msg)
        seq = meta.sequence.stream if meta else None
        mark = early_mark(record)  # this stored event's, as its dispatch was marked
        while (running := self.handling.get(key)) is not None:
            # This process is handling it. The same message redelivered (a stall longer
            # than the ack wait), or the stream copy of the dispatch it is handling, is
            # settled as that handling is, once it ends; another copy is answered after
            # it, from the ledger like any copy.
            outcome = await asyncio.shield(running[1])
            if seq is not None and running[0] in (seq, mark):
                return outcome
        answered = self.answered.get(key)
        if seq is not None and answered in (seq, mark):
            # answered by this process (from this message, or from its dispatch: the very
            # event stored), the ack lost or not given yet: the result is in the inbox
            self.answered[key] = seq
            return True
        if isinstance(answered, str) and answered.startswith(PUBLISH):
            # answered from a dispatch of an earlier decision that was never stored (a
            # failed commit, an executor restart): the run may have refused that result,
            # so this one is answered from the ledger after asking the run, at once
            self._note(self.redecided, key)
        elif self._elsewhere(key, request, msg):
            # redelivered in a moment, see ``_elsewhere``: half the ack wait, the time a
            # replica that took the dispatch has to show it is alive
            self.put_back += 1
            return bus.Later(self.settings.delivery.tool_ack_wait_s / 2)
        return await self._handle(record.run_id, request, msg, key, seq)

    def settle_quickly(self, msg: Msg) -> bool | asyncio.Future[bool | BaseException] | None:
        """The stream copy of a dispatch this runner took, known by its bytes: the very
        event dispatched (same run, seq, decision time and request), so ``_one`` would
        settle it as that dispatch's handling, and so it is, without a task, a decode or
        a hash (issue 10, runnercpu): the handling's future while it runs (the consumer
        settles the copy with its outcome), True once it answered. None for anything
        else, and for a copy whose key is handled again meanwhile (another decision):
        ``_one`` takes those."""
        found = self.dispatched.pop(msg.data)
        if found is None:
            return None
        key, mark = found
        running = self.handling.get(key)
        if running is not None:
            if running[0] != mark:
                return None
            self.copies_known += 1
            return running[1]
        if self.answered.get(key) != mark:
            return None
        self.answered[key] = bus.stream_seq(msg)  # as ``_one``: this copy, answered
        self.copies_known += 1
        return True

    def _register(self, key: str, seq: int | str | None) -> asyncio.Future[bool | BaseException]:
        handling = asyncio.get_running_loop().create_future()
        self.handling[key] = (seq, handling)
        return handling

    async def _handle(
        self,
        run_id: str,
        request: ToolCallRequested,
        msg: Msg,
        key: str,
        seq: int | str | None,
        handling: asyncio.Future[bool | BaseException] | None = None,
    ) -> bool | BaseException:
        handling = handling or self._register(key, seq)
        try:
            outcome = await self._answer(run_id, request, msg, key, seq)
        except BaseException as exc:
            handling.set_result(exc if isinstance(exc, Exception) else False)
            raise
        else:
            handling.set_result(outcome)
        finally:
            self.handling.pop(key, None)
        return outcome

    async def on_request_copy(self, msg: Msg) -> None:
        """A tool request as the executor dispatches it (``routes.TOOL_DISPATCH``), just
        before its commit, so the call and the commit overlap (issue 10): an idempotent
        call starts at once, as a first delivery; the stream copy of the stored event,
        which always follows (to this runner or another), is then settled as this
        handling is (``_one``), if it is the very event dispatched (``early_mark``).
        Left to the stream copy: a non-idempotent tool (its claim and the
        ambiguous-outcome rule need the durable, stored command), a request with secret
        references (resolved only for a request the executor stored), one this process is
        handling, one decided long ago, and any when the runner is full. A dispatch of a
        key this process answered already is the executor deciding it again (its first
        decision was not stored): answered from the ledger after asking the run
        (``redecided``), so a result the run refused is sent again. Registered
        synchronously, so the stream copy, delivered after it, finds it."""
        try:
            record, request = bus.expect_event(msg, ToolCallRequested)
        except bus.Poison:
            return  # the stream copy is dead-lettered with the reason
        key = ledger_key(record.run_id, request)
        if key in self.handling:
            return
        if (
            not self.catalog.idempotent(request.tool)
            or request.secret_refs  # resolved only for a stored request (``_unless_stored``)
            or len(self.handling) >= self.settings.delivery.tool_concurrency
            or (bus.now() - record.at).total_seconds() > PUBLISH_MAX_AGE_S
        ):
            self._note(self.declined, key)  # its stream copy is not waited for
            return
        if self.answered.pop(key, None) is not None:
            self._note(self.redecided, key)
        mark = early_mark(record)
        handling = self._register(key, mark)  # now: its stream copy may come next
        self.dispatched.add(msg.data, key, mark)
        self.from_publish += 1
        # not awaited here: the connection's delivery task must go on to the next message
        task = asyncio.ensure_future(self._handle(record.run_id, request, msg, key, mark, handling))
        self.direct_tasks.add(task)
        task.add_done_callback(self.direct_tasks.discard)

    def _elsewhere(self, key: str, request: ToolCallRequested, msg: Msg) -> bool:
        """Is this stream copy's request probably being handled by another replica (the
        dispatch goes to one runner of the queue group, the stream copy to any)? Then
        the first delivery is put back for half the ack wait, so that this one does not
        run the call a second time: the redelivery meets that runner's ledger entry or
        the run's result. Only for requests this runner would have taken from a
        dispatch, and stored since it takes them (after a restart, the dispatches it
        missed were taken by a runner that is gone, or by none: answered at once)."""
        if self.copies_since is None or key in self.declined or request.secret_refs:
            return False  # (requests with secret references are never dispatched)
        meta = stream_metadata(msg)
        if meta is None or meta.num_delivered > 1 or meta.timestamp < self.copies_since:
            return False
        return self.catalog.idempotent(request.tool)

    @staticmethod
    def _note(keys: OrderedDict[str, None], key: str) -> None:
        keys[key] = None
        while len(keys) > ANSWERED_MAX:
            keys.popitem(last=False)

    def _first(self, key: str, request: ToolCallRequested, msg: Msg) -> bool:
        """Can no runner have handled this request before (so it runs without a ledger
        read)? The dispatch itself: yes, unless this process answered an earlier
        dispatch of it (``redecided``). A stream copy's first delivery: without direct
        dispatch, yes; with it, only if this runner saw the dispatch and left it
        (``declined``), or if the request is never dispatched (secret references): any
        other dispatch may have been taken by another runner, or by this one's previous
        process."""
        if key in self.redecided:
            return False
        meta = stream_metadata(msg)
        if meta is None:
            return True
        if meta.num_delivered > 1:
            return False
        return self.copies_since is None or key in self.declined or bool(request.secret_refs)

    async def _answer(
        self, run_id: str, request: ToolCallRequested, msg: Msg, key: str, seq: int | str | None
    ) -> bool | BaseException:
        recording: asyncio.Future[None] | None = None
        try:
            result = await self._result_for(run_id, request, msg, key)
            if result is not None and await self._recorded_directly(result):
                # The run's store holds it: the idempotent call's ledger record is not
                # written (issue 10, runnercpu). A redelivery (the ack lost) finds no
                # entry, asks the run, which has it, and sends nothing (``next_step``).
                self.unrecorded.pop(key, None)
            elif result is not None:
                # no Nats-Msg-Id: a guessable one could be claimed first and get the real
                # result dropped; the executor dedupes results by the run's state
                subject = routes.inbox_subject(result)
                await bus.publish_acked(self.ctx.js, subject, codec.encode(result))
        except Exception as exc:
            log.warning("tool call %s will be retried: %r", key, exc)
            return exc
        finally:
            # recorded whatever happened above but a direct receipt (a failed publish:
            # the redelivery resends the result from the ledger, as before)
            if (unrecorded := self.unrecorded.pop(key, None)) is not None:
                recording = self.backfill.offer(key, self.owner, unrecorded)
        if recording is not None:
            # acked only once the ledger holds it (the result is in LOOM_INBOX already):
            # a redelivery after the ack was lost finds it there instead of running the
            # call again
            await recording
        self.answered[key] = seq  # the stream sequence, or the dispatch's early_mark
        if len(self.answered) > ANSWERED_MAX:
            self.answered.popitem(last=False)
        return True

    async def _recorded_directly(self, result: ToolResult) -> bool:
        """Send the result straight to the run's writer (``routes.TOOL_RESULT``), which
        answers once the run's events hold it: then it is stored, and no inbox stream
        write is needed (issue 10: one JetStream write and fsync, one delivery and one
        ack less per call). False (the caller publishes to the inbox stream, the durable
        path) when direct dispatch is off, when no writer answers in time, or when the
        run refused it (the stream copy is then dead-lettered with the reason)."""
        if self.copies_since is None:
            return False
        subject = routes.TOOL_RESULT.subject(run_id=result.run_id)
        try:
            # written now, not at the flusher's next turn (``bus.request_now``)
            reply = await bus.request_now(
                self.ctx.nc, subject, codec.encode(result), self._receipt_wait()
            )
            receipt = codec.decode(reply.data, InboxReceipt)
        except Exception as exc:  # no writer, a timeout, a lost connection
            log.debug(
                "result of %s not taken directly (%r): to the inbox", result.idempotency_key, exc
            )
            return False
        if receipt.error is not None:
            log.info(
                "result of %s not recorded directly (%s): to the inbox stream",
                result.idempotency_key,
                receipt.error.message,
            )
        return receipt.recorded

    def _receipt_wait(self) -> float:
        """A writer killed after it took a direct result never answers: the result waits
        this long before it goes to the inbox stream for the restarted (or next)
        executor. Bounded by the executor's ack wait, the time the deployment accepts
        for noticing a dead process: with the documented 100 ms settings
        (``LOOM_ACK_WAIT_S=0.15``) a fixed 1 s was the slowest part of an executor's
        recovery (0.55 s in ``bench/chaos.py --seed 12``). Too short costs only a
        duplicate: the writer refuses a result it recorded already."""
        return min(RESULT_RECEIPT_S, self.settings.delivery.ack_wait_s)

    async def _recorded_by_run(self, msg: Msg, request: ToolCallRequested) -> bool:
        """Has the run recorded a result for this request already? Asked of the executor
        on a redelivery that finds no ledger entry: the runner that answered was killed
        between its publish and its ledger write (idempotent calls are written after the
        publish). Then there is nothing to run or send. If the executor cannot say, the
        (idempotent) call runs again, which is harmless."""
        try:
            record = codec.decode_event(msg.data)
            query = RunEventsQuery(run_id=record.run_id, after_seq=record.seq, limit=1000)
            reply = await bus.request(
                self.ctx.nc, subjects.API_RUN_EVENTS, query, RunEventsReply, 5.0
            )
        except Exception as exc:
            log.info("could not ask the executor about %s: %r", request.idempotency_key, exc)
            return False
        return any(
            isinstance(r.event, ToolCallCompleted | ToolCallFailed)
            and r.event.idempotency_key == request.idempotency_key
            for r in reply.events
        )

    async def _result_for(
        self, run_id: str, request: ToolCallRequested, msg: Msg, key: str
    ) -> ToolResult | None:
        """The result to send, or None when the run has it already. What to do is
        decided by ``loom_core.ledger_decision.next_step`` (pure); this does each step's
        I/O and tells it what was learnt, until the step is final. ``key`` is the
        request's ``ledger_key`` (computed once per message: it hashes the request)."""
        idempotent = self.catalog.idempotent(request.tool)  # unknown tools: only an error
        known = Known(
            first=self._first(key, request, msg), idempotent=idempotent,
            ask_before_resend=self.copies_since is not None,
        )  # fmt: skip
        entry: LedgerEntry | None = None
        own: ToolResult | None = None
        for _ in range(MAX_LEDGER_STEPS):
            step = next_step(known)
            if step is Step.CLAIM:
                claimed = await self.io(self.ledger.claim, key, self.owner, bus.now())
                known = dataclasses.replace(known, claimed=claimed, entry=None)
            elif step is Step.READ:
                entry = await self.io(self.ledger.get, key)
                known = dataclasses.replace(known, entry=entry_state(entry))
            elif step is Step.ASK_RUN:
                has = await self._recorded_by_run(msg, request)
                known = dataclasses.replace(known, run_has_result=has)
            elif step is Step.RUN_RECORD_NOW:  # running twice is harmless: no claim first
                own = await self._execute(run_id, request, msg, key)
                recorded = await self.io(
                    self.ledger.record, key, self.owner, own.started_at, codec.encode(own)
                )
                known = dataclasses.replace(known, ran=True, recorded=recorded, entry=None)
            elif step is Step.RUN_RECORD_LATER:  # no read, no commit before the answer
                result = await self._execute(run_id, request, msg, key)
                self.unrecorded[key] = result  # recorded unless the run stores it (``_answer``)
                return result
            elif step is Step.RUN_FINISH:
                result = await self._execute(run_id, request, msg, key)
                await self.io(self.ledger.finish, key, codec.encode(result))
                return result
            elif step is Step.SEND_OWN:
                assert own is not None
                return own
            elif step is Step.RESEND:
                assert entry is not None and entry.result is not None
                return codec.decode(entry.result, ToolResult)
            elif step is Step.NOTHING:
                return None  # the run has it: another copy would only be refused
            elif step is Step.AMBIGUOUS:
                assert entry is not None
                result = ambiguous_result(run_id, request, entry)
                await self.io(self.ledger.finish, key, codec.encode(result))
                return result
            else:
                break
        raise LedgerContradiction(f"the ledger entry of {key} contradicts itself; retried")

    async def _execute(
        self, run_id: str, request: ToolCallRequested, msg: Msg, key: str
    ) -> ToolResult:
        ctx = ToolContext(
            idempotency_key=request.idempotency_key,
            run_id=run_id,
            step_id=request.step_id,
            attempt=request.attempt,
            settings=self.tool_settings,
            resume=request.resume,
            nc=self.ctx.nc,
        )
        throttled_ms = await self.throttle.wait(run_id)  # the tenant's call rate
        # The call runs in this task, not in one of its own (issue 10, hopcpu: a task and
        # a loop turn less per call). A run's cancel (``on_cancelled``) cancels this task
        # only while it is listed here, i.e. while it waits inside ``_call``: the entry
        # goes in the same turn the call ends, so the CancelledError always lands there.
        task = asyncio.current_task()
        assert task is not None
        self.inflight[key] = task
        started = bus.now()
        try:
            outcome = await self._call(request, ctx, msg)
        except asyncio.CancelledError:
            if key not in self.cancelled:
                raise  # the service is stopping, not the call
            outcome = ToolOutcome(
                ok=False,
                error=ErrorInfo(code="cancelled", message="the run cancelled this call"),
            )
        finally:
            self.inflight.pop(key, None)
            if key in self.cancelled:  # the run's cancel (``on_cancelled``), taken here
                self.cancelled.discard(key)  # (or swallowed by the tool): this task
                task.uncancel()  # goes on to answer it, with no cancel pending
        result = tool_result(run_id, request, outcome, started, key_digest(key))
        if throttled_ms:
            result = msgspec.structs.replace(result, throttled_ms=throttled_ms)
        self.executed += 1
        return result

    async def _call(self, request: ToolCallRequested, ctx: ToolContext, msg: Msg) -> ToolOutcome:
        """Resolve the secret references the plan wrote (here and nowhere else, just
        before the call), run the tool, and return its outcome with secret-looking keys
        and every resolved value scrubbed: the ledger, the inbox and the run's events
        only ever see the scrubbed outcome. The resolved input is never logged."""
        if request.secret_refs:
            refused = await self._unless_stored(msg)
            if refused is not None:
                return ToolOutcome(ok=False, error=refused)
        try:
            tool_input, used = secrets.resolve(
                request.input, request.secret_refs, self.secret_source.get, request.step_id
            )
        except secrets.SecretReferenceError as exc:
            return ToolOutcome(ok=False, error=exc.error)
        try:  # tools see plain values: references are resolved here (loom_core.blobs)
            tool_input = await self.blobs.resolve(
                tool_input, self.settings.blobs.max_resolved_bytes, "$.input"
            )
        except blobs.BlobRefError as exc:
            return ToolOutcome(ok=False, error=exc.error)
        outcome = await self.catalog.execute(request.tool, tool_input, ctx, request.timeout_s)
        breaker = transitions_of(outcome)
        outcome = redact_outcome(outcome, secrets.scrub_forms(used))
        outcome = await by_reference(outcome, self.blobs, request.step_id)
        outcome = bounded_outcome(outcome, self.settings.size_limits, request.step_id)
        return with_transitions(outcome, breaker)

    async def _unless_stored(self, msg: Msg) -> ErrorInfo | None:
        """Secrets are resolved only for a request the executor stored: with NATS
        credentials off anybody can publish on the run stream, and a forged request must
        not get a secret sent where it says. Fails closed when the executor cannot say."""
        record = codec.decode_event(msg.data)
        try:
            stored = await is_stored(self.ctx.nc, record)
        except Exception as exc:
            return ErrorInfo(
                code="unavailable",
                message=f"could not confirm with the executor that {record.event_id} is the "
                f"request it stored ({type(exc).__name__}); secrets are resolved only then",
                retryable=True,
            )
        if stored:
            return None
        log.warning(
            "not resolving secrets for %s: not the event the executor stored", record.event_id
        )
        return ErrorInfo(
            code="untrusted_secret_reference",
            message=f"{record.event_id} is not the tool call request the executor stored; "
            "its secret references are not resolved",
        )

    async def on_cancelled(self, msg: Msg) -> None:
        try:
            record, event = bus.expect_event(msg, ToolCallCancelled)
        except bus.Poison:
            return
        try:  # a stop cannot be undone: obey only one the executor stored
            if not await is_stored(self.ctx.nc, record):
                log.warning("ignored %s: not the event the executor stored", record.event_id)
                return
        except Exception as exc:  # the executor cannot say: a real cancel must still stop
            log.warning("could not check %s (%r); cancelling", record.event_id, exc)
        # in-flight calls are keyed by ledger key (idempotency key + request digest)
        for key, call in list(self.inflight.items()):
            if key.startswith(event.idempotency_key + "#") and not call.done():
                self.cancelled.add(key)
                call.cancel()


class Dispatched:
    """The dispatches a runner took, by their bytes, until their stream copy comes
    (``ToolRunnerService.settle_quickly``): bytes -> (ledger key, ``early_mark``). Bounded
    in count and in bytes, oldest out first (the copies that went to another replica);
    a dispatch larger than ``DISPATCHED_MAX_BYTES`` is not kept (its copy takes ``_one``)."""

    def __init__(
        self,
        max_count: int = DISPATCHED_MAX,
        max_total: int = DISPATCHED_MAX_TOTAL_BYTES,
        max_one: int = DISPATCHED_MAX_BYTES,
    ) -> None:
        self.entries: OrderedDict[bytes, tuple[str, str]] = OrderedDict()
        self.size = 0  # bytes kept
        self.max_count, self.max_total, self.max_one = max_count, max_total, max_one

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, data: bytes, key: str, mark: str) -> None:
        if len(data) > self.max_one or data in self.entries:
            return
        self.entries[data] = (key, mark)
        self.size += len(data)
        while len(self.entries) > self.max_count or self.size > self.max_total:
            self.size -= len(self.entries.popitem(last=False)[0])

    def pop(self, data: bytes) -> tuple[str, str] | None:
        found = self.entries.pop(data, None)
        if found is not None:
            self.size -= len(data)
        return found


def stream_metadata(msg: Msg) -> Msg.Metadata | None:
    """The stream delivery's metadata; None for a publish taken as it was sent."""
    try:
        return msg.metadata
    except nats.errors.NotJSMessageError:
        return None


class LedgerContradiction(LoomError):
    """A lost claim found no entry (it was deleted meanwhile): the message is retried."""

    code = "unavailable"
    retryable = True


MAX_LEDGER_STEPS = 8  # the longest path of next_step is 5 steps


def entry_state(entry: LedgerEntry | None) -> EntryState:
    if entry is None:
        return "absent"
    return "finished" if entry.status == "finished" and entry.result is not None else "unfinished"


def ambiguous_result(run_id: str, request: ToolCallRequested, entry: LedgerEntry) -> ToolResult:
    """The answer for a non-idempotent call whose claimant stopped mid-call."""
    error = ErrorInfo(
        code="ambiguous_outcome",
        message=f"the tool-runner that started '{request.tool}' ({entry.owner}) "
        "stopped before recording a result; the tool is not idempotent, so it was "
        "not run again. Check its effect by hand.",
        details={"owner": entry.owner},
    )
    return tool_result(run_id, request, ToolOutcome(ok=False, error=error), entry.claimed_at)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def early_mark(record: EventRecord) -> str:
    """What a dispatch is remembered by: the event it carries (seq and decision time).
    The stream copy of the event stored has the same mark only if the dispatch was of
    the decision that was committed; a decision made again (after a failed commit or an
    executor restart) is stored with another time."""
    at = record.at if record.at.tzinfo else record.at.replace(tzinfo=UTC)
    return f"{PUBLISH}@{record.seq}/{(at - EPOCH) // timedelta(microseconds=1)}"


def ledger_key(run_id: str, request: ToolCallRequested) -> str:
    """The ledger key of one request: its idempotency key and the digest of the request
    as stored. Exactly once holds per request: a forged request reusing a run's key with
    other content gets a slot of its own, so the run's real call still runs (once) and
    is never answered from the forged entry, whose result the executor refuses."""
    return f"{request.idempotency_key}#{request_digest(run_id, request)}"


def key_digest(key: str) -> str:
    """The request digest a ``ledger_key`` ends with (a digest is hex: no ``#``)."""
    return key.rpartition("#")[2]


def redact_outcome(outcome: ToolOutcome, forms: list[str]) -> ToolOutcome:
    """``outcome`` with ``forms`` (resolved secret values, see ``secrets.scrub_forms``)
    masked everywhere and inline secrets redacted (``secrets.redact_value``)."""
    output, _ = secrets.redact_value(secrets.scrub_values(outcome.output, forms))
    error = outcome.error
    if error is not None:
        details, _ = secrets.redact_value(secrets.scrub_values(error.details, forms))
        error = msgspec.structs.replace(
            error, message=secrets.scrub_str(error.message, forms), details=details
        )
    suspend = outcome.suspend
    if suspend is not None:
        payload, _ = secrets.redact_value(secrets.scrub_values(suspend.payload, forms))
        suspend = msgspec.structs.replace(
            suspend, label=secrets.scrub_str(suspend.label, forms), payload=payload
        )
    return ToolOutcome(ok=outcome.ok, output=output, error=error, suspend=suspend)


async def by_reference(outcome: ToolOutcome, store: BlobStore, step_id: str) -> ToolOutcome:
    """A redacted outcome whose output is over the blob threshold, with the output
    stored as a blob and a reference in its place (so no event or message carries it);
    a reference the tool itself returned must be well-formed and stored (a tool output
    is untrusted input: an unknown reference is ``blob_not_found`` naming its path)."""
    if not outcome.ok:
        return outcome
    data = blobs.canonical(outcome.output)  # once: screened, measured, maybe stored
    try:
        if b'"$blob"' in data:
            error = await store.check_refs(outcome.output, f"$.steps.{step_id}.output")
            if error is not None:
                return ToolOutcome(ok=False, error=error)
        if blobs.is_ref(outcome.output) or len(data) <= store.settings.threshold_bytes:
            return outcome
        ref = await store.put_bytes(data)
    except blobs.BlobRefError as exc:
        return ToolOutcome(ok=False, error=exc.error)
    return dataclasses.replace(outcome, output=ref.as_json())


def tool_result(
    run_id: str,
    request: ToolCallRequested,
    outcome: ToolOutcome,
    started: datetime,
    digest: str | None = None,
) -> ToolResult:
    """The inbox answer to ``request``: the same whether the tool-runner ran the tool or
    the executor did (local calls), so a run's history cannot tell them apart.
    ``digest``: the request's ``request_digest``, when the caller has it already."""
    return ToolResult(
        run_id=run_id,
        step_id=request.step_id,
        attempt=request.attempt,
        idempotency_key=request.idempotency_key,
        request_digest=digest or request_digest(run_id, request),
        ok=outcome.ok,
        started_at=started,
        finished_at=bus.now(),
        output=outcome.output,
        error=outcome.error,
        suspend=outcome.suspend,
        breaker=transitions_of(outcome),
    )


def bounded_outcome(outcome: ToolOutcome, limits: SizeLimits, step_id: str) -> ToolOutcome:
    """An output over the limit becomes a failed attempt ``output_too_large`` here,
    before the ledger or the inbox hold it (the executor would refuse it anyway, by the
    limits its run recorded; see loom_core.sizes)."""
    if not outcome.ok:
        return outcome
    error = sizes.check_output(
        [outcome.output, outcome.suspend], limits, step_id, f"$.steps.{step_id}.output"
    )
    return outcome if error is None else ToolOutcome(ok=False, error=error)


def load_tools(registry: ToolRegistry, module: str) -> None:
    """Registered Python callables: ``module.register(registry)`` adds its tools.
    The module is named by the operator (LOOM_TOOL_MODULES), never by a plan."""
    register = getattr(importlib.import_module(module), "register", None)
    if not callable(register):
        raise SettingsError(
            "LOOM_TOOL_MODULES", f"module {module!r} has no register(registry) function"
        )
    register(registry)


class LedgerBackfill:
    """Records idempotent calls' claim + result in the ledger after they were answered
    through the inbox stream (a result the run stored directly needs none), off the
    call's path: a queue drained by one task, every waiting entry in one hop to
    the store's thread. Best effort by design: a lost record only means a redelivery
    runs the (idempotent) call again."""

    MAX_QUEUED = 10_000
    # after the first waiting entry, how long more may join it before the commit: one
    # SQLite commit (and fsync, on the disk the executor's commits use) per several
    # calls instead of per call (issue 10, perf3). The request is acked after it, so
    # this is also how much later its ack goes (well within the ack wait).
    LINGER_S = 0.01
    BATCH = 256

    def __init__(self, ledger: ToolCallLedger, io: Blocking) -> None:
        self.ledger = ledger
        self.io = io
        self.queue: list[tuple[str, str, ToolResult, asyncio.Future[None]]] = []
        self.ready = asyncio.Event()
        self.dropped = 0

    def offer(self, key: str, owner: str, result: ToolResult) -> asyncio.Future[None]:
        """Queue one record; the future is done once it is stored (or given up)."""
        done = asyncio.get_running_loop().create_future()
        if len(self.queue) >= self.MAX_QUEUED:
            self.dropped += 1  # bounded: a slow store must not grow memory without end
            done.set_result(None)
            return done
        self.queue.append((key, owner, result, done))
        self.ready.set()
        return done

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.ready.wait()
            if len(self.queue) < self.BATCH:
                await bus.wait_or_timeout(stop, self.LINGER_S)
            self.ready.clear()
            await self.flush()

    async def flush(self) -> None:
        entries, self.queue = self.queue, []
        if not entries:
            return

        rows = [(key, owner, r.started_at, codec.encode(r)) for key, owner, r, _ in entries]
        try:
            await self.io(self.ledger.record_many, rows)
        except Exception as exc:
            log.warning("%d idempotent results not recorded in the ledger: %r", len(entries), exc)
        for *_, done in entries:
            if not done.done():
                done.set_result(None)


def main() -> None:
    run_main(lambda settings: [ToolRunnerService(settings)])


if __name__ == "__main__":
    main()
