"""The executor service: the only writer of run streams, on the bus.

It takes submissions, controls, resumes, forks, inbox messages, timers, signals and
sub-run ends from NATS, checks each where it lands (route, run, principal, tenant,
partition), and hands it to the run host (``loom_services.runhost``): the actor cache
and its one writer loop, which decides, folds and commits a batch per transaction.
Replies and acks go out only once the batch is stored; the relay then publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
from nats.aio.msg import Msg

from loom_core import codec, limits, message_limits, resubmit, routes, secrets, shape, subjects
from loom_core.blobs import BlobRefError
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    ForkReply,
    ForkRun,
    InboxMessage,
    InboxReceipt,
    ParentLink,
    ResumeReply,
    ResumeRun,
    RunControl,
    RunControlReply,
    RunEventsQuery,
    RunEventsReply,
    RunPublishFailed,
    RunRequest,
    SubmitAccepted,
    SubmitRejected,
    SubRunFinished,
    SubRunRequested,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolResult,
)
from loom_core.errors import LoomError
from loom_core.executor import (
    RunState,
    Submission,
    explain_resume,
)
from loom_core.lineage import ForkError, fork_request
from loom_core.resume_route import MAX_DEPTH, children_of, route_resume
from loom_core.validation import check_run_id, check_run_request
from loom_infra import auth, bus, endpoints, paging
from loom_infra.blobstore import BlobStore
from loom_infra.blocking import Blocking
from loom_infra.ownership import NotOwner
from loom_infra.relay import Relay
from loom_infra.settings import Settings
from loom_infra.store import (
    ConcurrencyConflict,
    EventStore,
    open_event_store,
    open_snapshot_store,
)
from loom_services import tenants
from loom_services.admission import AdmissionControl, load_quotas
from loom_services.local_tools import LocalTools
from loom_services.partitioned import Partitioned
from loom_services.progress import ProgressPublisher
from loom_services.runhost import RunHost, Work, child_status
from loom_services.runtime import ServiceContext, run_main
from loom_services.schedules import Scheduler
from loom_services.signals import SignalRouter
from loom_services.timers import TimerService

log = logging.getLogger("loom.executor")

# A resume looks at most this many runs of a family (the run and its sub-runs).
_FAMILY_MAX = 256


TAKEN_MAX = 10_000  # results taken from their publish whose stream copy has not come yet

# submissions handled at once (``on_submit_message``): enough for a burst of clients to
# share the writer's commits; past it, the subscription waits (NATS' pending limits)
SUBMITS_IN_FLIGHT = 256


# the receipt of a direct result the executor cannot record because it is stopping
STOPPING = ErrorInfo(
    code="unavailable",
    message="the executor is stopping: the result goes to the run's inbox stream",
    retryable=True,
)


def _result_mismatch(message: InboxMessage, run_id: str) -> ErrorInfo | None:
    """Why a message sent on ``loom.result.{run_id}.tool`` is not that run's tool result."""
    if not isinstance(message, ToolResult):
        tag = routes.tag_of(type(message))
        return ErrorInfo(
            code="wrong_subject",
            message=f"a {tag} is not accepted on {routes.TOOL_RESULT.pattern}",
            path="$.type",
        )
    if message.run_id != run_id:
        return ErrorInfo(
            code="wrong_subject",
            message=f"{routes.TOOL_RESULT.subject(run_id=run_id)} is run '{run_id}''s; the "
            f"tool_result names run '{message.run_id}'",
            path="$.run_id",
            details={"expected": run_id, "received": message.run_id},
        )
    return None


def _copy_key(msg: Msg) -> bytes:
    """What makes a publish and its stream copy one message: the same subject and bytes."""
    return hashlib.blake2b(msg.subject.encode() + b"\n" + msg.data, digest_size=16).digest()


class ExecutorService:
    name: routes.Identity = "executor"

    def __init__(self, settings: Settings, store: EventStore | None = None) -> None:
        self.settings = settings
        self.store = store or open_event_store(settings.store)
        self.io = Blocking("executor-store", workers=4)
        self.snapshots = open_snapshot_store(settings.store)
        self.principals = auth.PrincipalResolver(settings.auth)
        self.host = RunHost(
            self.store, self.io, self.snapshots, limits=settings.size_limits, caps=settings.caps,
            local=LocalTools.from_settings(
                settings.size_limits, settings.delivery, settings.blobs.threshold_bytes
            ),
        )  # fmt: skip
        self.relay: Relay | None = None
        self._pending: set[asyncio.Future[None]] = set()
        # direct results waiting for their commit, to be answered (``on_result``): the
        # work's done future -> the request to answer
        self._receipts: dict[asyncio.Future[Any], Msg] = {}
        # submissions being handled (``on_submit_message``), bounded
        self._submits: set[asyncio.Future[None]] = set()
        self._submit_room = asyncio.Semaphore(SUBMITS_IN_FLIGHT)
        self.progress = ProgressPublisher(self.host.actors.get, self._send_progress)
        # quotas per tenant and queue (loom_services.admission)
        self.admission = AdmissionControl(load_quotas(settings.quotas_file), self.host.submit)
        # tool results taken from the tool-runner's publish, by copy (``on_result_copy``)
        self.taken: OrderedDict[bytes, Work] = OrderedDict()
        self.results_from_publish = 0  # (tests, metrics)
        # other inbox messages taken from their publish, by source: plan, model (tests)
        self.answers_from_publish: Counter[str] = Counter()
        self.partitions: Partitioned | None = None

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        # partitions this replica owns (leases in JetStream KV); requests for the others
        # are passed to their owners (loom_services.partitioned)
        self.partitions = parts = Partitioned(self, ctx)
        self.on_submit_routed = parts.routed(self.on_submit, lambda e: SubmitRejected(error=e))
        self.on_control_routed = parts.routed(
            self.on_control, lambda e: RunControlReply(run_id="", ok=False, error=e)
        )
        self.on_resume_routed = parts.routed(
            self.on_resume, lambda e: ResumeReply(run_id="", ok=False, error=e)
        )
        self.on_fork_routed = parts.served(self.on_fork, ForkReply, lambda e: ForkReply(error=e))
        self.on_sub_run_requested_routed = parts.routed_event(self.on_sub_run_requested)
        self.relay = Relay(self.store, ctx.js, io=self.io, on_unpublishable=self.on_unpublishable)
        # one relay for all replicas: it runs on the owner of partition 0; the others
        # wake it after each commit (loom_services.partitioned)
        self.host.listeners.append(parts.on_commit)
        self.host.listeners.append(lambda _, records: self.publish_progress(records))
        self.host.listeners.append(self.admission.on_commit)
        ctx.spawn(self.host.run(ctx.stop), "executor-writer")
        ctx.spawn(TimerService(ctx.js).run(ctx.stop), "executor-timers")
        router = SignalRouter(
            ctx.js, self.host.state_of, limits=self.settings.message_limits, rejects=ctx.rejects
        )
        for task in await router.start(ctx.nc, ctx.stop):
            ctx.spawn(task, "executor-signals")
        # Sub-runs: the command event starts the child; the child's end answers the parent.
        for durable, handler in (
            ("subruns-start", self.on_sub_run_requested_routed),
            ("subruns-end", self.on_run_ended),
        ):
            consumer = endpoints.durable(
                ctx.js, routes.RUN_EVENTS, self.name, durable,
                message_handler=handler, concurrency=32,
            )  # fmt: skip
            ctx.spawn(consumer.run(ctx.stop), f"executor-{durable}")
        await parts.start()  # owns its first partitions before it answers anything
        # the tenants' admission books, shared by the replicas (only with run limits)
        await self.admission.start(
            ctx.js, self.host, parts.ownership, self.store.read_notifications, self.io,
            self._report, ctx.stop, ctx.spawn, self.settings.ops.stream_replicas,
        )  # fmt: skip
        await endpoints.listen(ctx.nc, routes.SUBMIT, self.name, self.on_submit_message)
        await endpoints.listen(ctx.nc, routes.CONTROL, self.name, self.on_control_routed)
        await endpoints.listen(ctx.nc, routes.RESUME, self.name, self.on_resume_routed)
        await endpoints.serve(ctx.nc, ctx.rejects, routes.FORK, self.name, self.on_fork_routed)
        await endpoints.serve(
            ctx.nc, ctx.rejects, routes.API_RUN_EVENTS, self.name, self.on_events_query
        )
        # the inbox: one consumer per owned partition, started by ``parts``
        if self.settings.direct_dispatch:
            # each handled as nats-py parses it, not queued for a task: neither waits
            # (issue 10, stackcpu)
            for inbox in routes.DIRECT_INBOXES:  # tool results, verdicts, model turns
                for sub in await endpoints.stream_copies(
                    ctx.nc, inbox, self.name, self.on_result_copy
                ):
                    bus.deliver_inline(sub, self.take_result_copy)
            self.host.before_commit = self.dispatch_early
            for sub in await endpoints.subscribe(
                ctx.nc, routes.TOOL_RESULT, self.name, self.on_result
            ):
                bus.deliver_inline(sub, self.take_result)
        # schedules fire here: a firing acts for its creator, as only the engine may
        self.scheduler = Scheduler(self.settings, self.host.submit, self.principals,
                                   self._check_scheduled, exists=self._run_exists,
                                   admission=self.admission)  # fmt: skip
        await self.scheduler.start(ctx)

    async def _run_exists(self, run_id: str) -> bool:
        """Whether ``run_id`` is stored, whichever replica owns it (the shared store)."""
        return bool(await self.io(self.store.last_seq, run_id))

    async def _check_scheduled(self, request: RunRequest, data: bytes) -> ErrorInfo | None:
        """A schedule's run request is refused at creation for what submit refuses."""
        return check_run_request(request) or await self._check_blobs(request, data)

    def _report(self, subject: str, error: ErrorInfo, data: bytes) -> None:
        if self.ctx.rejects is not None:
            self.ctx.rejects.offer(subject, error, data)

    async def close(self) -> None:
        for submit in list(self._submits):  # unanswered: the client's retry finds the run
            submit.cancel()
        # the direct results still waiting for their commit are answered "unavailable" at
        # once: the runner sends them to the inbox stream, for the partition's next owner,
        # not after its receipt wait
        receipts, self._receipts = self._receipts, {}
        for msg in receipts.values():
            self._receipt(msg, STOPPING)
        await self.admission.close()
        if self.partitions is not None:
            await self.partitions.close()  # survivors take its partitions at once
        await self.host.loader.close()
        await self.io.close()
        self.store.close()
        self.snapshots.close()

    async def on_unpublishable(self, record: EventRecord, error: ErrorInfo) -> None:
        """The relay skipped one of ``record``'s run's events for good: the run ends
        failed with the reason (loom_infra.relay)."""
        details = error.details or {}
        if self.host.owns is not None and not self.host.owns(record.run_id):
            # the relay runs on one replica; the event is dead-lettered with the reason
            log.error("run %s of another replica has an unpublishable event %s: %s",
                      record.run_id, record.event_id, error.message)  # fmt: skip
            return
        await self.host.submit(record.run_id, RunPublishFailed(
            seq=record.seq, event_type=record.kind, code=error.code,
            size=int(details.get("size") or 0), limit=int(details.get("limit") or 0),
            message=error.message,
        ))  # fmt: skip

    # ------------------------------------------------------------------ submit

    async def on_submit_message(self, msg: Msg) -> None:
        """Each submission handled in a task of its own (at most SUBMITS_IN_FLIGHT): the
        subscription's callback runs one message at a time, and a submission waits for
        its run's commit, so a burst of N clients was answered one commit after another
        (the Nth after N commits, none sharing one). Together they reach the writer
        together and share its batches. Submissions of different runs are independent;
        two of the same run id are decided in the order the writer takes them, as
        before (the second finds the run stored: a repeat, or a conflict)."""
        await self._submit_room.acquire()
        task = asyncio.ensure_future(self._submit_one(msg))
        self._submits.add(task)
        task.add_done_callback(self._submit_done)

    async def _submit_one(self, msg: Msg) -> None:
        try:
            await self.on_submit_routed(msg)
        except Exception:  # unanswered: the client times out and retries (idempotent)
            log.exception("submission on %s not answered", msg.subject)

    def _submit_done(self, task: asyncio.Future[None]) -> None:
        self._submits.discard(task)
        self._submit_room.release()

    async def on_submit(self, msg: Msg) -> None:
        reply = await self._submit(msg)
        if msg.reply:
            await msg.respond(codec.encode(reply))

    async def _submit(self, msg: Msg) -> SubmitAccepted | SubmitRejected:
        limit = self.settings.max_payload
        if len(msg.data) > limit:
            return await self._reject(
                msg,
                ErrorInfo(
                    code="payload_too_large",
                    message=f"run request is {len(msg.data)} bytes; the limit is {limit} "
                    "(LOOM_MAX_PAYLOAD). Pass large data by reference (a URL) instead.",
                ),
            )
        try:  # who the run acts for: the subject's identity and the token, never the body
            principal = tenants.submitter(self.principals, msg)  # bound to its tenant
        except auth.AuthError as exc:
            return await self._reject(msg, exc.error)
        depth = self.settings.max_json_depth
        document: object = None
        try:
            # the depth first, without recursing: nothing downstream (templating,
            # validation, spans) may meet a document deeper than the limit
            document = msgspec.json.decode(msg.data)
            error = limits.check_json(document, max_depth=depth)
            request = codec.decode(msg.data, RunRequest) if error is None else None
        except RecursionError:
            error = limits.too_deep("$", max_depth=depth)
        except Exception as exc:
            # every shape mistake at once (details.issues), not msgspec's first
            error = shape.with_issues(bus.decode_error_info(exc), document, RunRequest)
        if error is not None or request is None:
            return await self._reject(msg, error or limits.too_deep("$", max_depth=depth))
        request, redacted = secrets.redact_request(request)  # before anything stores it
        header = (msg.headers or {}).get(subjects.TRACEPARENT)
        if header:
            request = msgspec.structs.replace(request, traceparent=header)
        error = check_run_request(request)
        if error is None:
            error = await self._check_blobs(request, msg.data)
        if error is not None:
            return await self._reject(msg, error)
        # the run id is the dedupe key; a Nats-Msg-Id header stands for one (resubmit)
        msg_id = (msg.headers or {}).get(subjects.MSG_ID)
        run_id = (
            request.run_id or resubmit.run_id_from_msg_id(msg_id, principal) or self.new_run_id()
        )
        if self.admission.active and self.host.owns is not None and not self.host.owns(run_id):
            raise self.host.owner_error(run_id)  # counted and booked by the run's owner
        error = await self.admission.refusal(principal, request)  # queue name, submission rate
        if error is not None:
            return await self._reject(msg, error)
        queued = booked = False
        if self.admission.applies(principal, request):  # a slot in the tenant's shared book
            try:
                queued, booked = await self.admission.book(run_id, principal, request)
            except LoomError as exc:  # too many waiting, the book kept moving
                return await self._reject(msg, exc.info)
        produced: list[EventRecord] = []  # empty: not created here (it is unbooked)
        try:
            produced = await self.host.submit(
                run_id, Submission(request, principal, redacted, queued=queued)
            )
        except ConcurrencyConflict:
            produced = []  # another replica created it at the same moment
        except NotOwner:
            if booked:  # the partition moved meanwhile: its new owner books it
                await self.admission.unbook(run_id, principal)
            raise  # passed to the partition's owner (loom_services.partitioned)
        except Exception as exc:
            log.exception("submit failed")
            if booked:
                await self.admission.unbook(run_id, principal)
            return SubmitRejected(
                error=ErrorInfo(
                    code="unavailable",
                    message=f"the run could not be stored ({type(exc).__name__}); retry",
                    retryable=True,
                )
            )
        if booked and not produced:
            await self.admission.unbook(run_id, principal)
        elif queued:
            await self.admission.after_stored(run_id)  # a slot may have freed meanwhile
        if not produced:  # a repeat: of the same request, or a reused id (refused)
            existing = await self.host.state_of(run_id)
            if tenants.hidden(msg, existing):  # says nothing of the other tenant's run
                return await self._reject(msg, tenants.id_taken(run_id))
            differs = resubmit.differences(existing, request)
            if differs:
                return await self._reject(msg, resubmit.conflict(run_id, differs))
        return SubmitAccepted(run_id=run_id, existing=not produced)

    async def _check_blobs(self, request: RunRequest, data: bytes) -> ErrorInfo | None:
        """A reference in the input (or written in the plan) must be well-formed and
        stored, else the submission is refused naming its path (``bad_blob_reference``,
        ``blob_not_found``). The tool-runner checks again when it reads one; this is
        the early, clear answer. The plan is walked only if its text mentions blobs."""
        values: list[tuple[str, Any]] = [("$.input", request.input)]
        if request.plan is not None and b"blob" in data:
            values.append(("$.plan", msgspec.to_builtins(request.plan)))
        return await self._unknown_blob(values)

    async def _unknown_blob(self, values: list[tuple[str, Any]]) -> ErrorInfo | None:
        store = BlobStore(self.ctx.js, self.settings.blobs)
        for base, value in values:
            try:
                error = await store.check_refs(value, base)
            except BlobRefError as exc:  # the store did not answer
                error = exc.error
            if error is not None:
                return error
        return None

    async def _reject(self, msg: Msg, error: ErrorInfo) -> SubmitRejected:
        # answered now; recorded (bounded, apart from poison) by a background task, so
        # a burst of bad submissions never holds up a good one (issue 9)
        if self.ctx.rejects is not None:
            self.ctx.rejects.offer(msg.subject, error, msg.data)
        return SubmitRejected(error=error)

    # ------------------------------------------------------------------ inbox

    async def dispatch_early(self, records: list[EventRecord]) -> None:
        """Send the batch's tool requests to the tool-runners before the batch is
        committed (``RunHost.before_commit``, issue 10): the call and the commit overlap,
        where the relay's publish came only after the commit. Safe to send uncommitted:
        only idempotent calls are started from it (others wait for the stream copy); a
        result is recorded only for a request the run has stored, checked by the writer
        after this commit; a request with secret references is not sent (its secrets are
        resolved only once the executor confirms it stored it); and if this commit
        fails, the run is re-decided and the same request (same key) sent again, which
        the tool-runner answers from its ledger (``ToolRunnerService.on_request_copy``).
        Requests answered here (local calls) are not sent. Best effort: the relay's
        publish stays the command (docs/decisions.md, "Performance, sixth part")."""
        answered = {
            (r.run_id, r.event.idempotency_key)
            for r in records
            if isinstance(r.event, ToolCallCompleted | ToolCallFailed)
        }
        for record in records:
            event = record.event
            if (
                isinstance(event, ToolCallRequested)
                and not event.secret_refs  # resolved only for a stored request: the stream
                and (record.run_id, event.idempotency_key) not in answered
            ):
                subject = routes.TOOL_DISPATCH.subject(run_id=record.run_id)
                await bus.publish_now(self.ctx.nc, subject, codec.encode(record))

    async def on_result_copy(self, msg: Msg) -> None:
        """``take_result_copy`` as a subscription callback."""
        self.take_result_copy(msg)

    def take_result_copy(self, msg: Msg) -> None:
        """An inbox message on the critical path (``routes.DIRECT_INBOXES``: a tool
        result, the planner's verdict, a model turn) as its sender publishes it, before
        LOOM_INBOX has stored (and fsynced) it and its consumer handed it over (issue 10:
        ~1 ms of a step; 1.3-3.6 ms of a run's start).
        Taken only for a run this executor holds in memory (so with several executors
        only the run's writer takes it), checked exactly as the stream copy is (route,
        run, then by the writer: is the run waiting for it). The stream copy, which
        always follows, is then settled as this one was (``on_inbox``): one record, one
        ack. A copy that is not taken, or not recorded, is left to the stream copy (its
        refusal is dead-lettered there). Never waits: it runs as nats-py's reader parses
        the message (``bus.deliver_inline``)."""
        source = routes.inbox_source(msg.subject)
        if source is None or source[0] not in self.host.actors:
            return
        copy = _copy_key(msg)
        if copy in self.taken:
            return
        try:
            message = self._inbox_message(msg)
        except bus.Poison:
            return
        work = Work(message.run_id, message, checked=True)
        self.taken[copy] = work
        if source[1] == "tool":
            self.results_from_publish += 1
        else:
            self.answers_from_publish[source[1]] += 1
        while len(self.taken) > TAKEN_MAX:
            self.taken.popitem(last=False)
        work.done.add_done_callback(lambda done: self._taken_done(copy, work, done))
        self.host.queue.put_nowait(work)

    async def on_result(self, msg: Msg) -> None:
        """``take_result`` as a subscription callback."""
        self.take_result(msg)

    def take_result(self, msg: Msg) -> None:
        """A tool result sent straight here by the tool-runner (``routes.TOOL_RESULT``,
        issue 10), answered once recorded: the run's writer checks it exactly as an
        inbox message (route, run, then against the state: is the run waiting for it)
        and answers ``recorded`` after the commit that stored it; a refusal is answered
        with its reason (the runner then publishes the result to the inbox stream,
        which dead-letters it with that reason). Replicas that do not write the run say
        nothing (the runner falls back when no answer comes). Never waits: it runs as
        nats-py's reader parses the message (``bus.deliver_inline``). The answer is
        written by the work's done-callback (``_result_settled``), not by a task
        awaiting it: one task and its coroutines less per tool call, and it joins the
        commit's other messages (the relay's batch) in the connection's next socket
        write (issue 10, hopcpu)."""
        run_id = msg.subject.split(".")[2]  # the subscription's filter: loom.result.*.tool
        if self.host.owns is not None and not self.host.owns(run_id):
            return
        try:
            message = codec.decode_inbox(msg.data)
        except Exception as exc:
            self._receipt(msg, bus.decode_error_info(exc))
            return
        error = _result_mismatch(message, run_id)
        if error is not None:
            self._receipt(msg, error)
            return
        work = Work(run_id, message, checked=True)
        self.results_from_publish += 1
        self._receipts[work.done] = msg
        work.done.add_done_callback(functools.partial(self._result_settled, work))
        self.host.queue.put_nowait(work)

    def _result_settled(self, work: Work, done: asyncio.Future[Any]) -> None:
        msg = self._receipts.pop(done, None)
        if msg is None:
            return  # answered already: the executor stopped (``close``)
        error: ErrorInfo | None
        if done.cancelled():
            error = STOPPING
        elif (exc := done.exception()) is not None:  # not stored: the runner sends it on
            error = ErrorInfo(code="unavailable", message=f"not recorded: {exc!r}", retryable=True)
        else:
            error = work.refused
        self._receipt(msg, error)

    @staticmethod
    def _receipt(msg: Msg, error: ErrorInfo | None) -> None:
        if msg.reply and msg._client is not None:
            with contextlib.suppress(Exception):  # no answer: the runner falls back
                bus.publish_soon(
                    msg._client,
                    msg.reply,
                    codec.encode(InboxReceipt(recorded=error is None, error=error)),
                )

    def _taken_done(self, copy: bytes, work: Work, done: asyncio.Future[Any]) -> None:
        if done.cancelled() or done.exception() is not None or work.refused is not None:
            self.taken.pop(copy, None)  # the stream copy is checked (and answered) anew

    async def on_inbox(self, msgs: Sequence[Msg]) -> list[bool | BaseException]:
        """Inbox messages are believed only on their own route and run (checked here) and
        when the run is waiting for them (checked by the writer, against the state at
        that moment). A refused message is dead-lettered with its reason and never
        redelivered (``Poison``); it is never recorded and blocks nothing."""
        works: list[Work | BaseException] = []
        for msg in msgs:
            try:
                if self.partitions is not None:  # the subject as published
                    msg = self.partitions.unpartitioned(msg)
            except bus.Poison as poison:
                works.append(poison)
                continue
            if self.taken:  # keyed by the subject as published: set it back first
                taken = self.taken.pop(_copy_key(msg), None)
                if taken is not None:  # its publish was taken: settled as that is
                    works.append(taken)
                    continue
            try:
                message = self._inbox_message(msg)
            except bus.Poison as poison:
                works.append(poison)
                continue
            work = Work(message.run_id, message, checked=True)
            self.host.queue.put_nowait(work)
            works.append(work)
        results: list[bool | BaseException] = []
        for item in works:
            if isinstance(item, BaseException):
                results.append(item)
                continue
            try:
                await item.done
            except Exception as exc:
                results.append(exc)
                continue
            if item.refused is not None:
                log.info("inbox message refused: %s", item.refused.message)
                results.append(bus.Poison(item.refused))
            else:
                results.append(True)
        return results

    def new_run_id(self) -> str:
        return self.partitions.new_run_id() if self.partitions else f"run-{uuid.uuid4().hex[:20]}"

    def _inbox_message(self, msg: Msg) -> InboxMessage:
        """The message, if its shape, route and run are right; else Poison. (Its size is
        the broker's to bound: a genuine tool result may be larger than a run request.)"""
        try:
            message = codec.decode_inbox(msg.data)
        except Exception as exc:
            raise bus.Poison(bus.decode_error_info(exc)) from None
        route = routes.INBOX_ROUTE_OF[type(message)]
        source = routes.inbox_source(msg.subject)
        tag = routes.tag_of(type(message))
        if source is None or msg.subject != route.subject(run_id=source[0]):
            raise bus.Poison(ErrorInfo(
                code="wrong_subject",
                message=f"a {tag} is accepted only on {route.pattern}, not on {msg.subject}",
                path="$.type",
                details={"expected": route.pattern, "received": msg.subject},
            ))  # fmt: skip
        if source[0] != message.run_id:
            raise bus.Poison(ErrorInfo(
                code="wrong_subject",
                message=f"{msg.subject} is run '{source[0]}''s inbox; the {tag} names run "
                f"'{message.run_id}'",
                path="$.run_id",
                details={"expected": source[0], "received": message.run_id},
            ))  # fmt: skip
        return message

    # ------------------------------------------------------------------ sub-runs

    async def on_sub_run_requested(self, msg: Msg) -> bool | BaseException:
        try:
            record, event = bus.expect_event(msg, SubRunRequested)
        except bus.Poison as poison:
            return poison
        try:
            # anyone may publish on loom.run.> when credentials are off: only the command
            # this executor stored starts a child
            if not await self.is_stored(record):
                return bus.Poison(not_stored(record))
        except Exception as exc:
            return exc
        link = ParentLink(run_id=record.run_id, step_id=event.step_id)
        request = RunRequest(
            plan=event.plan, input=event.input, run_id=event.child_run_id, parent=link
        )
        try:
            parent = await self.host.state_of(record.run_id)
            child = Submission(request, auth.inherit(parent.principal))  # the parent's user
            await self.host.submit(event.child_run_id, child)  # idempotent by run id
        except ConcurrencyConflict:
            pass  # another replica created it
        except Exception as exc:
            return exc
        try:
            # The id may have been taken first (a client's run, another run's child): the
            # step fails rather than adopt a run it did not start.
            existing = await self.host.state_of(event.child_run_id)
            if existing.parent != link:
                await self.host.submit(record.run_id, _child_conflict(existing, event, link))
        except Exception as exc:
            return exc
        return True

    async def is_stored(self, record: EventRecord) -> bool:
        """Is ``record`` (from the bus) exactly the event stored at its run and seq?"""
        stored = await self.io(self.store.load, record.run_id, record.seq - 1, 1)
        if not stored or stored[0].seq != record.seq:
            return False
        return codec.encode(stored[0]) == codec.encode(record)

    async def on_run_ended(self, msg: Msg) -> bool | BaseException:
        try:
            record = codec.decode_event(msg.data)
        except Exception as exc:
            return bus.Poison(bus.decode_error_info(exc))
        try:
            child = await self.host.state_of(record.run_id)
        except Exception as exc:
            return exc
        status = child_status(child)
        if child.parent is None or status is None:
            # no parent to answer, or a forged terminal event for a run still going
            return True
        error = child.error
        if status == "rejected":
            issues = getattr(record.event, "issues", [])
            detail = "; ".join(f"{i.code} at {i.path}: {i.message}" for i in issues)[:1000]
            error = ErrorInfo(code="sub_run_rejected", message=f"child plan rejected: {detail}")
        finished = SubRunFinished(
            run_id=child.parent.run_id,
            step_id=child.parent.step_id,
            child_run_id=record.run_id,
            status=status,
            output=child.output if status == "completed" else None,
            error=error,
        )
        try:
            # no Nats-Msg-Id on inbox messages: an id anyone can guess could be claimed
            # first and get the real message dropped; the run dedupes by its state
            await self.ctx.js.publish(routes.inbox_subject(finished), codec.encode(finished))
        except Exception as exc:
            return exc
        return True

    # ------------------------------------------------------------------ control

    async def on_control(self, msg: Msg) -> None:
        reply = await self._control(msg)
        if msg.reply:
            await msg.respond(codec.encode(reply))

    async def _control(self, msg: Msg) -> RunControlReply:
        try:
            control = codec.decode(msg.data, RunControl)
        except Exception as exc:
            return RunControlReply(run_id="", ok=False, error=bus.decode_error_info(exc))
        too_large = self._over_limits(
            msg, [(control.reason, "$.reason"), (control.by, "$.by")], None
        )
        if too_large is not None:  # before anything is loaded or stored
            return RunControlReply(run_id=control.run_id, ok=False, error=too_large)
        state = await self.host.state_of(control.run_id)
        if state.version == 0 or tenants.hidden(msg, state):
            return self._refuse(control, "not_found", f"no run '{control.run_id}'")
        if state.terminal:
            return self._refuse(
                control, "already_finished", f"run '{control.run_id}' already {state.status}"
            )
        try:
            await self.host.submit(control.run_id, control)
        except NotOwner:
            raise  # passed to the partition's owner
        except Exception as exc:
            return self._refuse(control, "unavailable", f"not stored ({type(exc).__name__}); retry")
        status = (await self.host.state_of(control.run_id)).status
        return RunControlReply(run_id=control.run_id, ok=True, status=status)

    async def on_fork(self, msg: Msg, request: ForkRun) -> ForkReply:
        """Forks are made here, from this executor's own store: the caller names a run
        and a step; which outputs are reused is read from the recorded events, so no run
        can claim outputs another run never produced."""
        if request.new_run_id is not None:
            error = check_run_id(request.new_run_id, "$.new_run_id")
            if error is not None:
                return ForkReply(error=error)
        records = await self.io(self.store.load, request.run_id)
        if not records or tenants.hidden_history(msg, records):
            error = ErrorInfo(
                code="not_found", message=f"no run '{request.run_id}'", path="$.run_id"
            )
            return ForkReply(error=error)
        try:
            fork = fork_request(
                records, request.from_step, request.set_output, request.input, request.new_run_id
            )
        except ForkError as exc:
            error = ErrorInfo(code=exc.code, message=str(exc), path=exc.path, details=exc.details)
            return ForkReply(error=error)
        size, limit = len(codec.encode(fork)), self.settings.max_payload
        reused = len(fork.fork.reused) if fork.fork is not None else 0
        if size > limit:  # a run request this big is refused on submit: say so now
            return ForkReply(error=ErrorInfo(
                code="fork_too_large",
                message=f"the fork would start with {reused} reused results, "
                f"{size} bytes in its run request; the limit is {limit} (LOOM_MAX_PAYLOAD). "
                "Fork from an instance whose composite has fewer elements, or fork the "
                "run from the top-level step instead",
                path="$.from_step",
                details={"bytes": size, "limit": limit, "reused": reused},
            ))  # fmt: skip
        # what the caller wrote (not what is reused: recorded references were checked)
        error = await self._unknown_blob(
            [("$.input", request.input), ("$.set_output", request.set_output)]
        )
        if error is not None:
            return ForkReply(error=error)
        run_id = fork.run_id or self.new_run_id()
        origin = await self.host.state_of(request.run_id)
        fork = msgspec.structs.replace(fork, run_id=run_id)
        fork, redacted = secrets.redact_request(fork)  # a new input may hold secrets
        try:
            # the fork acts for the same user as the run it comes from
            produced = await self.host.submit(
                run_id, Submission(fork, auth.inherit(origin.principal), redacted)
            )
        except ConcurrencyConflict:
            produced = []  # another replica created it at the same moment
        return ForkReply(run_id=run_id, existing=not produced)

    async def on_resume(self, msg: Msg) -> None:
        reply = await self._resume(msg)
        if msg.reply:
            await msg.respond(codec.encode(reply))

    async def _resume(self, msg: Msg) -> ResumeReply:
        try:
            request = codec.decode(msg.data, ResumeRun)
        except Exception as exc:
            return ResumeReply(run_id="", ok=False, error=bus.decode_error_info(exc))
        texts = [(request.by, "$.by"), (request.label, "$.label")]
        too_large = self._over_limits(msg, texts, request.data)
        if too_large is not None:  # before anything is loaded or stored
            return ResumeReply(run_id=request.run_id, ok=False, error=too_large)
        if not request.request_id:
            request = msgspec.structs.replace(request, request_id=uuid.uuid4().hex)
        state = await self.host.state_of(request.run_id)
        if state.version == 0 or tenants.hidden(msg, state):
            error = ErrorInfo(
                code="not_found", message=f"no run '{request.run_id}'", path="$.run_id"
            )
            return ResumeReply(run_id=request.run_id, ok=False, error=error)
        # The question may be asked by a sub-run (or deeper): find the run it is for.
        target = route_resume(await self._family(state), request.run_id, request)
        if isinstance(target, ErrorInfo):
            return ResumeReply(run_id=request.run_id, ok=False, error=target)
        addressed = msgspec.structs.replace(request, run_id=target)
        try:
            await self.host.submit(target, addressed)
        except NotOwner:
            raise  # passed to the partition's owner
        except Exception as exc:
            error = ErrorInfo(
                code="unavailable",
                message=f"not stored ({type(exc).__name__}); retry",
                retryable=True,
            )
            return ResumeReply(run_id=request.run_id, ok=False, error=error)
        # The single writer decided it; the state now says who won and why.
        reply = explain_resume(await self.host.state_of(target), addressed)
        answered = target if reply.suspension_id is not None else ""
        return msgspec.structs.replace(reply, run_id=request.run_id, answered_run_id=answered)

    def _over_limits(
        self, msg: Msg, texts: list[tuple[str | None, str]], data: object
    ) -> ErrorInfo | None:
        """The first of a control/resume request's fields over its limit
        (``loom_core.message_limits``); recorded with the client mistakes."""
        limits = self.settings.message_limits
        error = next(
            (e for text, path in texts if (e := message_limits.check_text(text, limits, path))),
            None,
        )
        if error is None and data is not None:
            error = message_limits.check_resume_data(data, limits)
        if error is not None and self.ctx is not None and self.ctx.rejects is not None:
            self.ctx.rejects.offer(msg.subject, error, msg.data)
        return error

    async def _family(self, state: RunState) -> dict[str, RunState]:
        """``state``'s run and its sub-runs, recursively (bounded: ``MAX_DEPTH`` levels,
        ``_FAMILY_MAX`` runs), as the executor's store has them."""
        family = {state.run_id: state}
        level = [state]
        for _ in range(MAX_DEPTH):
            nxt: list[RunState] = []
            for parent in level:
                for child in children_of(parent):
                    if child in family or len(family) >= _FAMILY_MAX:
                        continue
                    loaded = await self.host.state_of(child)
                    if loaded.version:
                        family[child] = loaded
                        nxt.append(loaded)
            if not nxt:
                break
            level = nxt
        return family

    @staticmethod
    def _refuse(control: RunControl, code: str, message: str) -> RunControlReply:
        error = ErrorInfo(code=code, message=message, path="$.run_id")
        return RunControlReply(run_id=control.run_id, ok=False, error=error)

    def publish_progress(self, records: list[EventRecord]) -> None:
        """Live progress of each run changed by a commit (plain NATS; best effort;
        coalesced per run: ``loom_services.progress``). A child's change is its
        parent's too (the parent is suspended once the child waits on a person), so the
        parent in memory is published again."""
        changed = dict.fromkeys(r.run_id for r in records)
        for run_id in list(changed):  # every ancestor in memory, to the 8 levels lifted
            state = self.host.actors.get(run_id)
            for _ in range(8):
                if state is None or state.parent is None:
                    break
                changed.setdefault(state.parent.run_id, None)
                state = self.host.actors.get(state.parent.run_id)
        self.progress.changed(list(changed), records[-1].at)

    def _send_progress(self, messages: list[tuple[str, bytes]]) -> None:
        # one task per publish round, not one per run (issue 10, perf4)
        task = asyncio.ensure_future(self._publish(messages))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, messages: list[tuple[str, bytes]]) -> None:
        for subject, data in messages:
            try:
                await self.ctx.nc.publish(subject, data)
            except Exception as exc:  # progress is a convenience; the events are the truth
                log.debug("progress not published: %r", exc)

    # ------------------------------------------------------------------ queries

    async def on_events_query(self, msg: Msg, query: RunEventsQuery) -> RunEventsReply:
        """One page of the run's events: at most ``limit`` and at most a byte budget
        under this connection's max_payload, so the reply can always be sent;
        ``next_after_seq`` says where the next page starts. The store is read a chunk at
        a time, so a page of big events does not load thousands of them."""
        # another tenant's run reads as no run (the platform's services read any run)
        if tenants.caller(msg) and tenants.hidden(msg, await self.host.state_of(query.run_id)):
            return RunEventsReply(run_id=query.run_id, events=[])
        limit = max(1, min(query.limit, 5000))
        max_payload = (self.ctx.nc.max_payload if self.ctx else 0) or self.settings.max_payload
        chunk = min(limit + 1, 256)

        def stored() -> Iterator[EventRecord]:
            after = query.after_seq
            while True:
                records = self.store.load(query.run_id, after, chunk)
                yield from records
                if len(records) < chunk:
                    return
                after = records[-1].seq

        def page() -> paging.Page[EventRecord]:  # sized as the reply encodes them
            encoded = lambda r: len(codec.encode(r))  # noqa: E731
            return paging.fill(stored(), encoded, limit=limit, max_payload=max_payload)

        got = await self.io(page)
        if got.too_large is not None:
            record, size = got.too_large
            details = {"run_id": query.run_id, "seq": record.seq, "bytes": size}
            raise endpoints.ServiceError(
                ErrorInfo(
                    code="event_too_large",
                    message=f"event {record.seq} of run '{query.run_id}' ({record.kind}) is "
                    f"{size} bytes, more than one reply can carry (NATS max_payload "
                    f"{max_payload}); read it from the executor's event store",
                    path="$.after_seq",
                    details={**details, "max_payload": max_payload},
                )
            )
        next_after = got.items[-1].seq if got.more else None
        return RunEventsReply(run_id=query.run_id, events=got.items, next_after_seq=next_after)


def not_stored(record: EventRecord) -> ErrorInfo:
    return ErrorInfo(
        code="not_stored",
        message=f"run event {record.event_id} ({record.kind}) is not the event stored at that "
        "position: only the executor's relay publishes run events",
        details={"run_id": record.run_id, "seq": record.seq, "kind": record.kind},
    )


def _child_conflict(existing: RunState, event: SubRunRequested, link: ParentLink) -> SubRunFinished:
    owner = (
        f"started by {existing.parent.run_id}/{existing.parent.step_id}"
        if existing.parent is not None
        else "submitted by a client"
    )
    return SubRunFinished(
        run_id=link.run_id,
        step_id=link.step_id,
        child_run_id=event.child_run_id,
        status="failed",
        error=ErrorInfo(
            code="child_run_conflict",
            message=f"the child run id '{event.child_run_id}' is already taken by a run "
            f"{owner}; a sub_run step never adopts a run it did not start (give the step "
            "another run_id)",
            path=f"$.steps.{link.step_id}.run_id",
            details={"child_run_id": event.child_run_id},
        ),
    )


def main() -> None:
    run_main(lambda settings: [ExecutorService(settings)])


if __name__ == "__main__":
    main()
