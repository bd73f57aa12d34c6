"""The executor: host of the run actors, the only writer of run streams.

Every change to a run goes through one writer loop that takes all work waiting
(submissions and inbox messages of many runs), lets each run's pure ``decide`` produce
events, folds them into the in-memory actor with ``evolve``, and appends the whole
batch in ONE store transaction. Only then are submitters answered and inbox messages
acked, and the relay woken to publish. A step therefore costs one commit however many
runs share it (DESIGN: performance budget).

Actors stay in memory; a run is loaded from the store only on a cache miss (restart,
eviction, or a run written by another replica). A concurrency conflict (another
replica wrote the run) evicts the run and the messages are redelivered, which is safe
because ``decide`` ignores what no longer applies.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
from nats.aio.msg import Msg

from loom_core import codec, ids, routes, subjects
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    ParentLink,
    ResumeReply,
    ResumeRun,
    RunControl,
    RunControlReply,
    RunEventsQuery,
    RunEventsReply,
    RunProgress,
    RunRequest,
    SubmitAccepted,
    SubmitRejected,
    SubRunFinished,
    SubRunRequested,
)
from loom_core.executor import (
    SNAPSHOT_EVERY,
    Message,
    RunState,
    advance,
    evolve,
    explain_resume,
    initial_state,
    restore,
    snapshot,
)
from loom_core.replay import replay
from loom_infra import bus
from loom_infra.blocking import Blocking
from loom_infra.relay import Relay
from loom_infra.settings import Settings
from loom_infra.store import (
    ConcurrencyConflict,
    EventStore,
    SnapshotStore,
    open_event_store,
    open_snapshot_store,
)
from loom_services.runtime import ServiceContext, run_main
from loom_services.signals import SignalRouter
from loom_services.timers import TimerService

log = logging.getLogger("loom.executor")

MAX_BATCH = 512
MAX_ACTORS = 10_000


@dataclass
class Work:
    run_id: str
    message: Message
    done: asyncio.Future[list[EventRecord]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class RunHost:
    """Actors in memory + the single writer loop."""

    def __init__(
        self,
        store: EventStore,
        io: Blocking,
        snapshots: SnapshotStore | None = None,
        verify_on_load: bool = True,
    ) -> None:
        self.store = store
        self.io = io
        self.snapshots = snapshots
        self.verify_on_load = verify_on_load
        self.actors: OrderedDict[str, RunState] = OrderedDict()
        self.queue: asyncio.Queue[Work] = asyncio.Queue()
        self.loading: dict[str, asyncio.Future[RunState]] = {}
        # run after each commit with (notification ids, records), in commit order
        self.listeners: list[Callable[[list[int], list[EventRecord]], None]] = []

    async def submit(self, run_id: str, message: Message) -> list[EventRecord]:
        work = Work(run_id, message)
        self.queue.put_nowait(work)
        return await work.done

    async def state_of(self, run_id: str) -> RunState:
        state = self.actors.get(run_id)
        if state is not None:
            self.actors.move_to_end(run_id)
            return state
        # One load per run at a time: two readers must share one actor object.
        loading = self.loading.get(run_id)
        if loading is None:
            loading = self.loading[run_id] = asyncio.ensure_future(self._load(run_id))
            loading.add_done_callback(lambda _: self.loading.pop(run_id, None))
        return await asyncio.shield(loading)

    async def _load(self, run_id: str) -> RunState:
        # From the latest snapshot (if any): the cost is the events after it, not the
        # whole history.
        taken = await self.io(self.snapshots.latest, run_id) if self.snapshots else None
        base = restore(taken[1]) if taken else None
        records = await self.io(self.store.load, run_id, taken[0] if taken else 0)
        state = restore(taken[1]) if taken else initial_state(run_id)
        for record in records:
            evolve(state, record.event, record.at)
        if records and self.verify_on_load and state.status != "diverged":
            # The code may have changed since these events were decided (a deploy):
            # re-decide the history; if it differs, park the run with the report.
            report, _ = replay(records, start=base)
            if report.divergence is not None:
                log.error("run %s diverged on replay: %s", run_id, report.divergence.message)
                state.divergence = report.divergence.as_event()
        self.actors[run_id] = state
        if len(self.actors) > MAX_ACTORS:
            self.actors.popitem(last=False)
        return state

    async def _snapshot(self, records: list[EventRecord]) -> None:
        """Snapshot runs whose history just crossed a multiple of SNAPSHOT_EVERY."""
        assert self.snapshots is not None
        crossed = {r.run_id for r in records if r.seq % SNAPSHOT_EVERY == 0}
        for run_id in crossed:
            state = self.actors.get(run_id)
            if state is None:
                continue
            try:
                await self.io(self.snapshots.save, run_id, state.version, snapshot(state))
            except Exception as exc:  # a snapshot is a cache: the run is fine without it
                log.warning("snapshot of %s not saved: %r", run_id, exc)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            first = await self.queue.get()
            batch = [first]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            await self._process(batch)

    async def _process(self, batch: list[Work]) -> None:
        at = bus.now()
        records: list[EventRecord] = []
        per_work: list[list[EventRecord]] = []
        touched: set[str] = set()
        try:
            for work in batch:
                state = await self.state_of(work.run_id)
                touched.add(work.run_id)
                base = state.version
                produced = [
                    EventRecord(run_id=work.run_id, seq=base + i, at=at, event=event)
                    for i, event in enumerate(advance(state, work.message, at), start=1)
                ]
                per_work.append(produced)
                records.extend(produced)
            if records:
                notification_ids = await self.io(self.store.append, records)
        except Exception as exc:
            # The in-memory actors may now be ahead of the store: forget them; they are
            # reloaded from the store when next needed.
            for run_id in touched:
                self.actors.pop(run_id, None)
            if not isinstance(exc, ConcurrencyConflict):
                log.exception("executor batch failed")
            for work in batch:
                if not work.done.done():
                    work.done.set_exception(exc)
            return
        for work, produced in zip(batch, per_work, strict=True):
            if not work.done.done():
                work.done.set_result(produced)
        if self.snapshots is not None:
            await self._snapshot(records)
        if records:
            for listener in self.listeners:
                listener(notification_ids, records)


class ExecutorService:
    name = "executor"

    def __init__(self, settings: Settings, store: EventStore | None = None) -> None:
        self.settings = settings
        self.store = store or open_event_store(settings.store)
        self.io = Blocking("executor-store", workers=4)
        self.snapshots = open_snapshot_store(settings.store)
        self.host = RunHost(self.store, self.io, self.snapshots)
        self.relay: Relay | None = None
        self._pending: set[asyncio.Future[None]] = set()

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.relay = Relay(self.store, ctx.js, io=self.io)
        self.host.listeners.append(self.relay.offer)
        self.host.listeners.append(lambda _, records: self.publish_progress(records))
        ctx.spawn(self.host.run(ctx.stop), "executor-writer")
        ctx.spawn(self.relay.run(ctx.stop), "executor-relay")
        ctx.spawn(TimerService(ctx.js).run(ctx.stop), "executor-timers")
        router = SignalRouter(ctx.js, self.host.state_of)
        for task in await router.start(ctx.nc, ctx.stop):
            ctx.spawn(task, "executor-signals")
        # Sub-runs: the command event starts the child; the child's end answers the parent.
        for durable, kinds, handler in (
            ("subruns-start", ["sub_run_requested"], self.on_sub_run_requested),
            ("subruns-end", ["run_completed", "run_failed", "run_cancelled", "plan_rejected"],
             self.on_run_ended),
        ):  # fmt: skip
            consumer = bus.PullConsumer(
                js=ctx.js,
                service=self.name,
                stream=subjects.RUN_EVENTS_STREAM,
                durable=durable,
                filter_subjects=[subjects.events_of_kind(k) for k in kinds],
                message_handler=handler,
                concurrency=32,
            )
            ctx.spawn(consumer.run(ctx.stop), f"executor-{durable}")
        await ctx.nc.subscribe(subjects.SUBMIT, queue="executor", cb=self.on_submit)
        await ctx.nc.subscribe(subjects.CONTROL, queue="executor", cb=self.on_control)
        await ctx.nc.subscribe(subjects.RESUME, queue="executor", cb=self.on_resume)
        await ctx.nc.subscribe(subjects.API_RUN_EVENTS, queue="executor", cb=self.on_events_query)
        consumer = bus.PullConsumer(
            js=ctx.js,
            service=self.name,
            stream=subjects.INBOX_STREAM,
            durable="executor",
            filter_subjects=[subjects.INBOX_ALL],
            handler=self.on_inbox,
            batch=256,
        )
        ctx.spawn(consumer.run(ctx.stop), "executor-inbox")

    async def close(self) -> None:
        await self.io.close()
        self.store.close()
        self.snapshots.close()

    # ------------------------------------------------------------------ submit

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
        try:
            request = codec.decode(msg.data, RunRequest)
        except Exception as exc:
            return await self._reject(msg, bus.decode_error_info(exc))
        header = (msg.headers or {}).get(subjects.TRACEPARENT)
        if header:
            request = msgspec.structs.replace(request, traceparent=header)
        error = _check_request(request)
        if error is not None:
            return await self._reject(msg, error)
        run_id = request.run_id or f"run-{uuid.uuid4().hex[:20]}"
        try:
            produced = await self.host.submit(run_id, request)
        except ConcurrencyConflict:
            produced = []  # another replica created it at the same moment
        except Exception as exc:
            log.exception("submit failed")
            return SubmitRejected(
                error=ErrorInfo(
                    code="unavailable",
                    message=f"the run could not be stored ({type(exc).__name__}); retry",
                    retryable=True,
                )
            )
        return SubmitAccepted(run_id=run_id, existing=not produced)

    async def _reject(self, msg: Msg, error: ErrorInfo) -> SubmitRejected:
        await bus.dead_letter(self.ctx.js, self.name, msg.subject, error, msg.data)
        return SubmitRejected(error=error)

    # ------------------------------------------------------------------ inbox

    async def on_inbox(self, msgs: Sequence[Msg]) -> list[bool | BaseException]:
        works: list[Work | BaseException] = []
        for msg in msgs:
            try:
                message = codec.decode_inbox(msg.data)
            except Exception as exc:
                works.append(bus.Poison(bus.decode_error_info(exc)))
                continue
            work = Work(message.run_id, message)
            self.host.queue.put_nowait(work)
            works.append(work)
        results: list[bool | BaseException] = []
        for item in works:
            if isinstance(item, BaseException):
                results.append(item)
                continue
            try:
                await item.done
                results.append(True)
            except Exception as exc:
                results.append(exc)
        return results

    # ------------------------------------------------------------------ sub-runs

    async def on_sub_run_requested(self, msg: Msg) -> bool | BaseException:
        try:
            record, event = bus.expect_event(msg, SubRunRequested)
        except bus.Poison as poison:
            return poison
        request = RunRequest(
            plan=event.plan,
            input=event.input,
            run_id=event.child_run_id,
            parent=ParentLink(run_id=record.run_id, step_id=event.step_id),
        )
        try:
            await self.host.submit(event.child_run_id, request)  # idempotent by run id
        except ConcurrencyConflict:
            pass  # another replica created it
        except Exception as exc:
            return exc
        return True

    async def on_run_ended(self, msg: Msg) -> bool | BaseException:
        try:
            record = codec.decode_event(msg.data)
        except Exception as exc:
            return bus.Poison(bus.decode_error_info(exc))
        try:
            child = await self.host.state_of(record.run_id)
        except Exception as exc:
            return exc
        if child.parent is None:
            return True
        status = (
            child.status if child.status in ("completed", "failed", "cancelled") else "rejected"
        )
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
            await self.ctx.js.publish(
                routes.inbox_subject(finished),
                codec.encode(finished),
                headers={subjects.MSG_ID: f"subrun:{record.run_id}"},
            )
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
        state = await self.host.state_of(control.run_id)
        if state.version == 0:
            return self._refuse(control, "not_found", f"no run '{control.run_id}'")
        if state.terminal:
            return self._refuse(
                control, "already_finished", f"run '{control.run_id}' already {state.status}"
            )
        try:
            await self.host.submit(control.run_id, control)
        except Exception as exc:
            return self._refuse(control, "unavailable", f"not stored ({type(exc).__name__}); retry")
        status = (await self.host.state_of(control.run_id)).status
        return RunControlReply(run_id=control.run_id, ok=True, status=status)

    async def on_resume(self, msg: Msg) -> None:
        reply = await self._resume(msg)
        if msg.reply:
            await msg.respond(codec.encode(reply))

    async def _resume(self, msg: Msg) -> ResumeReply:
        try:
            request = codec.decode(msg.data, ResumeRun)
        except Exception as exc:
            return ResumeReply(run_id="", ok=False, error=bus.decode_error_info(exc))
        if not request.request_id:
            request = msgspec.structs.replace(request, request_id=uuid.uuid4().hex)
        state = await self.host.state_of(request.run_id)
        if state.version == 0:
            error = ErrorInfo(
                code="not_found", message=f"no run '{request.run_id}'", path="$.run_id"
            )
            return ResumeReply(run_id=request.run_id, ok=False, error=error)
        try:
            await self.host.submit(request.run_id, request)
        except Exception as exc:
            error = ErrorInfo(
                code="unavailable",
                message=f"not stored ({type(exc).__name__}); retry",
                retryable=True,
            )
            return ResumeReply(run_id=request.run_id, ok=False, error=error)
        # The single writer decided it; the state now says who won and why.
        return explain_resume(await self.host.state_of(request.run_id), request)

    @staticmethod
    def _refuse(control: RunControl, code: str, message: str) -> RunControlReply:
        error = ErrorInfo(code=code, message=message, path="$.run_id")
        return RunControlReply(run_id=control.run_id, ok=False, error=error)

    def publish_progress(self, records: list[EventRecord]) -> None:
        """Live progress per run changed by a commit (plain NATS; best effort)."""
        for run_id in dict.fromkeys(r.run_id for r in records):
            state = self.host.actors.get(run_id)
            if state is None:
                continue
            progress = RunProgress(
                run_id=run_id,
                status=state.status,
                steps_total=state.steps_total,
                steps_done=state.steps_done,
                steps_running=state.running,
                at=records[-1].at,
            )
            task = asyncio.ensure_future(
                self._publish(subjects.progress(run_id), codec.encode(progress))
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _publish(self, subject: str, data: bytes) -> None:
        try:
            await self.ctx.nc.publish(subject, data)
        except Exception as exc:  # progress is a convenience; the events are the truth
            log.debug("progress not published: %r", exc)

    # ------------------------------------------------------------------ queries

    async def on_events_query(self, msg: Msg) -> None:
        try:
            query = codec.decode(msg.data, RunEventsQuery)
        except Exception as exc:
            reply = RunEventsReply(run_id="", error=bus.decode_error_info(exc))
        else:
            limit = max(1, min(query.limit, 5000))
            events = await self.io(self.store.load, query.run_id, query.after_seq, limit)
            reply = RunEventsReply(run_id=query.run_id, events=events)
        await msg.respond(codec.encode(reply))


def _check_request(request: RunRequest) -> ErrorInfo | None:
    if request.run_id is not None and not ids.is_token(request.run_id):
        return ErrorInfo(
            code="invalid_run_id",
            message="run_id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-' "
            "(it becomes a NATS subject token)",
            path="$.run_id",
        )
    if request.plan is None and not request.request:
        return ErrorInfo(
            code="missing_plan",
            message="give either `plan` (explicit steps) or `request` (natural language)",
            path="$",
        )
    if request.plan is not None and request.request:
        return ErrorInfo(
            code="ambiguous_request",
            message="give either `plan` or `request`, not both",
            path="$.request",
        )
    return None


def main() -> None:
    run_main(lambda settings: [ExecutorService(settings)])


if __name__ == "__main__":
    main()
