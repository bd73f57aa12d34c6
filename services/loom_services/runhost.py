"""The run host: the executor's actor cache and its one writer loop.

Every change to a run goes through ``RunHost.run``: it takes all work waiting
(submissions and inbox messages of many runs), lets each run's pure ``decide`` produce
events, folds them into the in-memory actor with ``evolve``, and appends the whole batch
in ONE store transaction. Only then are submitters answered and inbox messages acked,
and the listeners (the relay, progress, admission) told. A step therefore costs one
commit however many runs share it (docs/design.md: performance budget).

Actors stay in memory; a run is loaded from the store only on a cache miss (restart,
eviction, or a run written by another replica). A concurrency conflict (another replica
wrote the run) evicts the run and the messages are redelivered, which is safe because
``decide`` ignores what no longer applies. The executor service (``executor.py``) feeds
it from the bus; this module has no NATS in it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from loom_core.contracts import (
    Caps,
    ErrorInfo,
    EventRecord,
    InboxMessage,
    ParentLink,
    SizeLimits,
    SubRunFinished,
)
from loom_core.errors import LoomError
from loom_core.executor import (
    SNAPSHOT_EVERY,
    Message,
    RunState,
    Submission,
    advance,
    evolve,
    initial_state,
    restore,
    snapshot,
    unexpected,
)
from loom_core.replay import replay
from loom_infra import bus, collector
from loom_infra.blocking import Blocking
from loom_infra.ownership import NotOwner
from loom_infra.store import (
    ConcurrencyConflict,
    EventStore,
    SnapshotStore,
)
from loom_services.local_tools import LocalTools

log = logging.getLogger("loom.executor")

MAX_BATCH = 512
MAX_ACTORS = 10_000
# a run loaded without a snapshot and with at most this many events is rebuilt on the
# loop (``RunHost._rebuilt``)
INLINE_LOAD_EVENTS = 200


class WriterStopped(LoomError):
    """Work for a run host whose writer loop has ended (its service is stopping). What
    was queued is not written by this loop; a batch the stop cut may or may not be
    stored. Retryable: a redelivered message or a resubmitted request is checked against
    what is stored (the request's run id, the run's expectations)."""

    code = "unavailable"
    retryable = True

    def __init__(self, run_id: str) -> None:
        self.details = {"run_id": run_id}
        super().__init__(
            f"the executor writing run '{run_id}' is stopping and did not confirm storing "
            "this (it may be stored): retry, another replica or the restarted one takes it"
        )


class _Unrestorable(Exception):
    """The run's snapshot does not restore (its cause says why)."""


def _rebuild(
    run_id: str, snapshot: bytes | None, records: list[EventRecord], verify: bool
) -> RunState:
    """Restore ``snapshot`` (or start empty) and fold ``records`` into it. With
    ``verify``, re-decide them first (the code may have changed since they were decided,
    a deploy): a replay that decides every one of them the same folds them as recorded,
    so the state it reaches is the fold, and the snapshot is decoded once (it was
    decoded twice, a start for the replay and one for the fold, and the events folded
    twice). A replay that stops early (the run parked on a recorded ``run_diverged``, or
    this code deciding differently) is rare: the history is then folded from a fresh
    restore, and a new divergence recorded on the state. Pure but for the collector,
    paused meanwhile (``loom_infra.collector``)."""
    with collector.paused():
        state = _restored(run_id, snapshot)
        if not (records and verify):
            for record in records:
                evolve(state, record.event, record.at)
            return state
        report, replayed = replay(records, start=state)
        if report.divergence is None and report.events == len(records):
            return replayed
        state = _restored(run_id, snapshot)
        for record in records:
            evolve(state, record.event, record.at)
        if report.divergence is not None and state.status != "diverged":
            log.error("run %s diverged on replay: %s", run_id, report.divergence.message)
            state.divergence = report.divergence.as_event()
    return state


def _restored(run_id: str, snapshot: bytes | None) -> RunState:
    if snapshot is None:
        return initial_state(run_id)
    try:
        return restore(snapshot)
    except Exception as exc:
        raise _Unrestorable() from exc


@dataclass
class Work:
    run_id: str
    message: Message
    done: asyncio.Future[list[EventRecord]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # a message from the bus: believed only if the run is waiting for it (``refusal``)
    checked: bool = False
    refused: ErrorInfo | None = None


class RunHost:
    """Actors in memory + the single writer loop."""

    def __init__(
        self,
        store: EventStore,
        io: Blocking,
        snapshots: SnapshotStore | None = None,
        verify_on_load: bool = True,
        limits: SizeLimits | None = None,
        caps: Caps | None = None,
        local: LocalTools | None = None,
    ) -> None:
        self.local = local  # pure built-ins answered in the batch (loom_services.local_tools)
        self.limits = limits  # recorded in each new run's run_requested (loom_core.sizes)
        self.caps = caps  # likewise (loom_core.caps)
        self.store = store
        self.io = io
        # long rebuilds (``_rebuilt``) apart from the store calls: they hold the GIL, and
        # two at once would gain nothing over one
        self.loader = Blocking("run-loader", workers=1)
        self.snapshots = snapshots
        self.verify_on_load = verify_on_load
        self.actors: OrderedDict[str, RunState] = OrderedDict()
        self.queue: asyncio.Queue[Work] = asyncio.Queue()
        self.loading: dict[str, asyncio.Future[RunState]] = {}
        self._saving: set[asyncio.Future[None]] = set()  # snapshot writes under way
        # run after each commit with (notification ids, records), in commit order
        self.listeners: list[Callable[[list[int], list[EventRecord]], None]] = []
        # told each batch's records just before their commit (the executor's direct
        # dispatch of tool requests: the call and the commit overlap); what it sends must
        # not count on the commit, which may still fail
        self.before_commit: Callable[[list[EventRecord]], Awaitable[None]] | None = None
        # partitions (loom_services.partitioned): whether this replica writes a run now,
        # and the error for one it does not; None: it writes every run
        self.owns: Callable[[str], bool] | None = None
        self.owner_error: Callable[[str], Exception] = lambda run_id: NotOwner(run_id, 0, None)
        self._ended = False  # the writer loop ended: new work is refused, not queued
        self._batch: list[Work] = []  # the batch the writer loop is on

    async def submit(self, run_id: str, message: Message) -> list[EventRecord]:
        if isinstance(message, Submission) and message.limits is None:
            message = dataclasses.replace(message, limits=self.limits)
        if isinstance(message, Submission) and message.caps is None:
            message = dataclasses.replace(message, caps=self.caps)
        if self._ended:
            raise WriterStopped(run_id)
        work = Work(run_id, message)
        self.queue.put_nowait(work)
        return await work.done

    async def state_of(self, run_id: str) -> RunState:
        state = self.actors.get(run_id)
        if state is not None:
            self.actors.move_to_end(run_id)
            return state
        if self.owns is not None and not self.owns(run_id):
            # another replica writes it: read what is stored now, keep no copy that
            # would go stale
            return await self._load(run_id, keep=False)
        # One load per run at a time: two readers must share one actor object.
        loading = self.loading.get(run_id)
        if loading is None:
            loading = self.loading[run_id] = asyncio.ensure_future(self._load(run_id))
            loading.add_done_callback(lambda _: self.loading.pop(run_id, None))
        return await asyncio.shield(loading)

    async def _load(self, run_id: str, keep: bool = True) -> RunState:
        # From the latest snapshot (if any): the cost is the events after it, not the
        # whole history.
        taken = await self.io(self.snapshots.latest, run_id) if self.snapshots else None
        records = await self.io(self.store.load, run_id, taken[0] if taken else 0)
        verify = keep and self.verify_on_load
        try:
            state = await self._rebuilt(run_id, taken[1] if taken else None, records, verify)
        except _Unrestorable as exc:
            # A snapshot is a cache: one that no longer restores (the state's shape
            # changed in a deploy, or it is damaged) must not stop the run; the whole
            # history is the truth.
            assert taken is not None
            log.warning("snapshot of %s at %d not restored (%r); folding its history",
                        run_id, taken[0], exc.__cause__)  # fmt: skip
            records = await self.io(self.store.load, run_id, 0)
            state = await self._rebuilt(run_id, None, records, verify)
        if not keep or (self.owns is not None and not self.owns(run_id)):
            return state  # (its partition may have moved while it loaded)
        self.actors[run_id] = state
        if len(self.actors) > MAX_ACTORS:
            self.actors.popitem(last=False)
        return state

    async def _rebuilt(
        self, run_id: str, snapshot: bytes | None, records: list[EventRecord], verify: bool
    ) -> RunState:
        """The run's state from its snapshot and the events after it. A large one is
        rebuilt in the loader's own thread (a 20,000-step chain's snapshot takes ~0.1 s
        to decode): the loop, which runs every other run's steps, keeps getting the GIL
        at each switch interval instead of waiting for the whole rebuild, and the store
        pool stays free for appends. A small one (most loads: a new run, a short one) is
        rebuilt here, where the hand-off to a thread would cost more than the work."""
        if snapshot is None and len(records) <= INLINE_LOAD_EVENTS:
            return _rebuild(run_id, snapshot, records, verify)
        return await self.loader(_rebuild, run_id, snapshot, records, verify)

    async def refusal(self, state: RunState, message: Message, now: datetime) -> ErrorInfo | None:
        """Why ``state``'s run does not take ``message`` from the bus (None: it does).
        The pure ``unexpected`` plus what only the host can see: its clock (a timer that
        is not yet due) and the child run a sub-run's end claims to report."""
        if not isinstance(message, InboxMessage):
            return None
        error = unexpected(state, message, now)
        if error is None and isinstance(message, SubRunFinished):
            error = child_mismatch(await self.state_of(message.child_run_id), message)
        return error

    async def _answer_locally(
        self, state: RunState, run_id: str, produced: list[EventRecord], at: datetime
    ) -> list[EventRecord]:
        """Answer the local tool calls ``produced`` asks for (and those their results
        ask for, up to the budget) in this batch: the events they add."""
        assert self.local is not None
        added: list[EventRecord] = []
        todo = [r.event for r in produced if self.local.takes(r.event)]
        budget = self.local.budget
        while todo and budget > 0:
            budget -= 1
            result = await self.local.answer(run_id, todo.pop(0))  # type: ignore[arg-type]  # takes() admits ToolCallRequested only
            if result is None:  # big output: the tool-runner stores it by reference
                continue
            more = _advanced(state, run_id, result, at)
            added += more
            todo += [r.event for r in more if self.local.takes(r.event)]
        return added

    async def _before_commit(self, records: list[EventRecord]) -> None:
        assert self.before_commit is not None
        try:
            await self.before_commit(records)
        except Exception:  # a shortcut only: the commit and its relay do not depend on it
            log.exception("the before-commit hook failed; the batch is committed anyway")

    async def _snapshot(self, records: list[EventRecord]) -> None:
        """Snapshot runs whose history just crossed a multiple of SNAPSHOT_EVERY. The
        state is encoded here (it changes with the next batch); the write goes on in the
        background, off the writer loop (issue 10: a large snapshot's INSERT stalled
        every run for 20-35 ms on PostgreSQL)."""
        assert self.snapshots is not None
        crossed = {r.run_id for r in records if r.seq % SNAPSHOT_EVERY == 0}
        for run_id in crossed:
            state = self.actors.get(run_id)
            if state is None:
                continue
            data = snapshot(state)
            saving = asyncio.ensure_future(self._save_snapshot(run_id, state.version, data))
            self._saving.add(saving)
            saving.add_done_callback(self._saving.discard)

    async def _save_snapshot(self, run_id: str, version: int, data: bytes) -> None:
        assert self.snapshots is not None
        try:
            await self.io(self.snapshots.save, run_id, version, data)
        except Exception as exc:  # a snapshot is a cache: the run is fine without it
            log.warning("snapshot of %s not saved: %r", run_id, exc)

    async def _load_missing(self, batch: list[Work]) -> None:
        """Load the batch's runs that are not in memory together, before deciding any:
        one after another, a burst of new runs (each a snapshot and an events read in
        the I/O pool, absent) cost the batch one pool round trip per run. Only a cache:
        decisions still take each state in the batch's order, and a load that failed
        here fails again there, as before."""
        missing = {
            work.run_id
            for work in batch
            if work.run_id not in self.actors and (self.owns is None or self.owns(work.run_id))
        }
        if len(missing) > 1:
            await asyncio.gather(*(self.state_of(run_id) for run_id in missing),
                                 return_exceptions=True)  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                first = await self.queue.get()
                self._batch = batch = [first]
                while len(batch) < MAX_BATCH and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                await self._process(batch)
                self._batch = []
        finally:
            self._ended_with(self._batch)

    def _ended_with(self, batch: list[Work]) -> None:
        """The writer loop ended (a stop, a cancel): nothing queued or submitted later
        would ever be written, so each waiter gets ``WriterStopped`` instead of waiting
        for ever. A batch the end cut may have advanced its runs' actors past the store:
        they are forgotten (reloaded from the store if this host is asked again)."""
        self._ended = True
        left = [w for w in batch if not w.done.done()]
        while not self.queue.empty():
            left.append(self.queue.get_nowait())
        for work in left:
            self.actors.pop(work.run_id, None)
            if not work.done.done():
                work.done.set_exception(WriterStopped(work.run_id))

    async def _process(self, batch: list[Work]) -> None:
        at = bus.now()
        records: list[EventRecord] = []
        per_work: list[list[EventRecord]] = []
        touched: set[str] = set()
        try:
            await self._load_missing(batch)
            for work in batch:
                if self.owns is not None and not self.owns(work.run_id):
                    # only the partition's owner writes a run (the caller forwards it)
                    work.done.set_exception(self.owner_error(work.run_id))
                    per_work.append([])
                    continue
                state = await self.state_of(work.run_id)
                touched.add(work.run_id)
                if work.checked:
                    # checked against the state as it is now, in the writer: of a forged
                    # and a genuine answer, only the first that fits is recorded
                    work.refused = await self.refusal(state, work.message, at)
                    if work.refused is not None:
                        per_work.append([])
                        continue
                produced = _advanced(state, work.run_id, work.message, at)
                if self.local is not None:
                    produced += await self._answer_locally(state, work.run_id, produced, at)
                per_work.append(produced)
                records.extend(produced)
            if records:
                if self.before_commit is not None:
                    await self._before_commit(records)
                # On the loop, not in the pool: no thread's wake-up and GIL passes
                # around the commit (issue 10). SQLite commits in place (perf3: ~0.3 ms
                # locally; nothing else writes events.db but the relay's position, once
                # a second, so it does not wait on a lock); PostgreSQL awaits it on
                # this loop's own connection (pgloop).
                notification_ids = await self.store.append_on_loop(records)
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
        if records:
            # first: what they schedule (the relay's publish of the step's command) then
            # runs before the answers and acks below (issue 10, perf3)
            for listener in self.listeners:
                try:
                    listener(notification_ids, records)
                except Exception:  # the commit stands: its answers below must still go
                    log.exception("a commit listener failed; the commit stands")
        for work, produced in zip(batch, per_work, strict=True):
            if not work.done.done():
                work.done.set_result(produced)
        if self.snapshots is not None:
            await self._snapshot(records)


def _advanced(state: RunState, run_id: str, message: Message, at: datetime) -> list[EventRecord]:
    base = state.version
    return [
        EventRecord(run_id=run_id, seq=base + i, at=at, event=event)
        for i, event in enumerate(advance(state, message, at), start=1)
    ]


def child_status(child: RunState) -> str | None:
    """How a child run ended, as its parent's inbox says it (None: it has not)."""
    ended = child.status in ("completed", "failed", "cancelled", "rejected")
    return child.status if ended else None


def child_mismatch(child: RunState, finished: SubRunFinished) -> ErrorInfo | None:
    """A sub-run's end is believed only if the child run in this executor's own store
    says the same: started by that parent step, ended, with that status and output."""
    link = ParentLink(run_id=finished.run_id, step_id=finished.step_id)
    status = child_status(child)
    if (
        child.parent == link
        and status == finished.status
        and (status != "completed" or child.output == finished.output)
    ):
        return None
    stored = (
        "no such run" if child.version == 0
        else f"status {child.status}, started by "
        + (f"{child.parent.run_id}/{child.parent.step_id}" if child.parent else "a client")
    )  # fmt: skip
    return ErrorInfo(
        code="unexpected_message",
        message=f"run '{finished.run_id}' expects the end of child run "
        f"'{finished.child_run_id}' as stored ({stored}); got status {finished.status} "
        "with another outcome",
        path="$.child_run_id",
        details={"expected": stored, "received": finished.status},
    )
