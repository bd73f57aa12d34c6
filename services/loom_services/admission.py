"""The executor's admission: submission rate limits and concurrent run limits per
tenant and queue (``loom_core.quotas``), decided at submit and recorded as events.

- A submission over its tenant's rate is refused ``too_many_submissions`` with
  ``details.retry_after_s`` (retryable): nothing is stored, so the client's retry is the
  queue. Refusing keeps decision 9 simple (an acknowledged run is a stored run) and
  costs a rate-limited client one round trip, where holding the request would hold the
  client's connection and the executor's memory for as long as the burst lasts.
- A run over its tenant's or queue's concurrent run limit is stored queued
  (``run_requested.queued`` and ``run_queued``): it is planned, but starts no step until
  a slot frees and the host records ``run_admitted``. Waiting runs start highest
  priority first, then in submission order; none is dropped.
- The book of who runs and who waits is shared by every executor replica: one key per
  tenant in the KV bucket ``loom_admission``, changed by compare-and-set
  (``loom_services.shared_admission``), so a tenant's limits and queue order hold across
  replicas. Whoever frees a slot (the owner of the ended run) picks the next runs in
  the book; each picked run's owner, watching the bucket, records its ``run_admitted``.
- The store is the truth, the book follows it: when a replica takes partitions (at
  start, or from a replica that died) it books the live runs of those partitions the
  book lacks and drops the slots of their runs that ended or were never stored (a
  replica that died between booking and storing); a sweep every few seconds does the
  same for the runs holding slots in its partitions, so no slot leaks.
- Sub-runs and forks are made by the engine from a run that holds a slot: they are not
  limited (a child waiting for its parent's slot would deadlock).
- With no run limit configured nothing here touches the bucket (not even on a commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loom_core import partitions, quotas
from loom_core.contracts import (
    TERMINAL_EVENTS,
    AdmissionBook,
    ErrorInfo,
    EventRecord,
    Principal,
    RunAdmitted,
    RunRequest,
    RunRequested,
)
from loom_core.executor import Admit
from loom_core.quotas import Quotas, TokenBucket
from loom_infra.bus import wait_or_timeout
from loom_infra.ownership import NotOwner
from loom_infra.settings import SettingsError
from loom_services.shared_admission import SharedBooks, ensure_bucket
from loom_services.shared_rates import SharedRates
from loom_services.tenants import tenant_of

log = logging.getLogger("loom.admission")

RECOVERY_PAGE = 2000
SWEEP_S = 5.0  # how often the slots of this replica's runs are checked against the store
UNSTORED_GRACE_S = 60.0  # a booking whose run is not stored after this was never created


def load_quotas(path: Path | None) -> Quotas:
    """The quotas of ``LOOM_QUOTAS_FILE`` (none: no limits); SettingsError naming the
    field when the file is not valid, so the executor refuses to start."""
    if path is None:
        return quotas.NO_QUOTAS
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        return quotas.parse(doc)
    except OSError as exc:
        raise SettingsError("LOOM_QUOTAS_FILE", f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError("LOOM_QUOTAS_FILE", f"{path} is not YAML: {exc}") from None
    except quotas.QuotaError as exc:
        raise SettingsError("LOOM_QUOTAS_FILE", f"{path}: {exc}") from None


def _limited(request: RunRequest) -> bool:
    """Whether the quotas apply: runs a client submitted, not the engine's own."""
    return request.parent is None and request.fork is None


@dataclass(frozen=True)
class Live:
    """A run the store shows alive (submitted, not ended): what its book entry must be."""

    tenant: str
    queue: str
    priority: int
    queued: bool


class AdmissionControl:
    def __init__(
        self,
        quota: Quotas,
        admit: Callable[[str, Admit], Any],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.quotas = quota
        self.admit = admit  # host.submit: records run_admitted and starts the steps
        self.clock = clock
        self.wall = wall  # booking times are compared across replicas
        self.buckets: dict[str, TokenBucket | None] = {}
        self._pending: set[asyncio.Future[Any]] = set()
        self.limits_runs = quota.limits_runs  # once: on_commit runs after every commit
        self.books: SharedBooks | None = None
        self.rates: SharedRates | None = None
        # whether any quota applies to a submission (else submit does no quota work)
        self.active = quota != quotas.NO_QUOTAS
        self._gained: set[int] = set()  # partitions taken and not reconciled yet
        self._reconcile: asyncio.Event = asyncio.Event()
        self._checking: set[str] = set()  # runs whose admission is being looked at
        # runs holding a slot that the store shows started (pruned as the books change)
        self._confirmed: set[str] = set()

    # ------------------------------------------------------------------ life

    async def start(self, js: Any, host: Any, ownership: Any, read: Any, io: Any,
                    report: Callable[[str, ErrorInfo, bytes], None], stop: asyncio.Event,
                    spawn: Callable[[Any, str], None], replicas: int = 1) -> None:  # fmt: skip
        """Join the shared books (only with a run limit configured): watch them, and
        reconcile the partitions this replica owns (``gained``) with the store."""
        self.rates = SharedRates(js)  # used only by a tenant with a submission rate
        if not self.limits_runs:
            return
        self.host, self.ownership, self.read, self.io = host, ownership, read, io
        kv = await ensure_bucket(js, replicas)
        self.books = SharedBooks(kv, self._rebuilt, report)
        self.books.on_change = self._on_book
        self.books.on_corrupt = self._repair_corrupt
        await self.books.start()
        spawn(self._keep(stop), "executor-admission")

    async def close(self) -> None:
        if self.books is not None:
            await self.books.close()

    def gained(self, partition: int) -> None:
        """This replica took ``partition``: its runs are reconciled with the book."""
        if self.limits_runs:
            self._gained.add(partition)
            self._reconcile.set()

    def owns(self, run_id: str) -> bool:
        owns = self.host.owns
        return owns is None or owns(run_id)

    async def _keep(self, stop: asyncio.Event) -> None:
        """Reconcile taken partitions as they come; sweep this replica's slots."""
        while not stop.is_set():
            # not asyncio.wait_for: on 3.11 it may swallow the stop's cancel (bus)
            await wait_or_timeout(self._reconcile, SWEEP_S)
            self._reconcile.clear()
            taken, self._gained = self._gained, set()
            try:
                if taken:
                    await self._reconcile_partitions(taken)
                await self.sweep(waiting_too=bool(taken))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS or the store away: the next round retries
                log.warning("admission reconcile failed (%r); retried in %.0fs", exc, SWEEP_S)
                self._gained |= taken

    # ------------------------------------------------------------------ submit

    async def refusal(self, principal: Principal | None, request: RunRequest
                      ) -> ErrorInfo | None:  # fmt: skip
        """Why this submission is refused now (a bad queue name, over the tenant's
        submission rate), or None. The rate's bucket is shared by the replicas
        (``loom_services.shared_rates``); this process's own only when it is away."""
        error = quotas.check_queue(request.queue)
        if error is not None or not _limited(request):
            return error
        tenant = tenant_of(principal)
        if tenant not in self.buckets:
            limits = self.quotas.of(tenant)
            self.buckets[tenant] = quotas.bucket(limits.submissions_per_s, limits.submission_burst)
        bucket = self.buckets[tenant]
        if bucket is None:
            return None
        wait = await self._shared_take(tenant, bucket)
        if wait is None:  # the shared bucket is away: this process's own
            wait = bucket.take(self.clock())
            if wait > 0:
                bucket.give_back()
        if wait <= 0:
            return None
        return ErrorInfo(
            code="too_many_submissions",
            message=f"tenant {tenant!r} submits more than {bucket.rate:g} runs a second "
            f"(burst {bucket.burst}): retry in {wait:.2f} s",
            retryable=True,
            details={"retry_after_s": round(wait, 3), "tenant": tenant},
        )

    async def _shared_take(self, tenant: str, bucket: TokenBucket) -> float | None:
        if self.rates is None:
            return None
        try:
            return await self.rates.take("submit", tenant, bucket.rate, bucket.burst,
                                         reserve=False)  # fmt: skip
        except Exception as exc:
            log.warning("shared submission rate of %s not reached (%r): local bucket",
                        tenant, exc)  # fmt: skip
            return None

    def applies(self, principal: Principal | None, request: RunRequest) -> bool:
        """Whether the run takes a slot: a client's run of a tenant or queue with a
        concurrent run limit (the others are not booked at all)."""
        if not self.limits_runs or not _limited(request):
            return False
        tenant = tenant_of(principal)
        limited = self.quotas.of(tenant).max_concurrent_runs is not None
        return (
            limited or self.quotas.of_queue(tenant, request.queue).max_concurrent_runs is not None
        )

    async def book(self, run_id: str, principal: Principal | None, request: RunRequest
                   ) -> tuple[bool, bool]:  # fmt: skip
        """Book the run ``run_id`` in its tenant's shared book: (whether it must wait for
        a slot, whether this booked it: False for a run booked already, a repeated
        submission, which must not be unbooked). ``unbook`` undoes a new booking if the
        run was not created. Raises QueueFull (too many waiting) or AdmissionBusy, both
        typed and retryable."""
        assert self.books is not None
        now = self.wall()

        def step(book: AdmissionBook) -> tuple[AdmissionBook, tuple[bool, bool]]:
            new, waits = quotas.book_offer(self.quotas, book, run_id, request.queue,
                                           request.priority, now)  # fmt: skip
            return new, (waits, new is not book)

        return await self.books.change(tenant_of(principal), step)

    async def unbook(self, run_id: str, principal: Principal | None) -> None:
        """``run_id`` was booked and not created (a repeat, a failed store)."""
        with contextlib.suppress(Exception):  # else the sweep drops it after the grace
            await self.release(tenant_of(principal), [run_id])

    async def after_stored(self, run_id: str) -> None:
        """A queued run is stored: if a slot came free while it was being stored, the
        book already gave it one (the watcher could not start a run not yet stored)."""
        self._confirmed.discard(run_id)
        await self._check(run_id)

    # ------------------------------------------------------------------ ends

    def on_commit(self, _ids: list[int], records: list[EventRecord]) -> None:
        """After each commit: a run that ended frees its slot for the next waiting."""
        if not self.limits_runs or self.books is None:
            return
        for record in records:
            if isinstance(record.event, TERMINAL_EVENTS):
                # only a booked run frees anything (this replica booked its own runs,
                # and sees the others' through the watch); a leftover is the sweep's
                tenant = self.books.where.get(record.run_id)
                if tenant is not None:
                    self._spawn(self.release(tenant, [record.run_id]))

    async def release(self, tenant: str, run_ids: list[str]) -> None:
        """Free the slots (or places) of ``run_ids``; the runs picked to take them start
        here if this replica owns them, else on their owners (watching the book)."""
        assert self.books is not None

        def step(book: AdmissionBook) -> tuple[AdmissionBook, list[str]]:
            return quotas.book_release(self.quotas, book, run_ids)

        for attempt in range(5):
            try:
                admitted = await self.books.change(tenant, step)
                break
            except Exception as exc:  # NATS away: the sweep frees it later anyway
                log.warning("slot of %s not freed (%r), attempt %d", run_ids, exc, attempt + 1)
                await asyncio.sleep(0.2 * (attempt + 1))  # backoff of a plumbing retry
        else:
            return
        self._confirmed.difference_update(run_ids)
        for run_id in admitted:
            if self.owns(run_id):
                self._spawn(self._check(run_id))

    def _on_book(self, book: AdmissionBook) -> None:
        """A book changed (any replica): start the runs of this replica it admitted."""
        for slot in book.running:
            if slot.run_id not in self._confirmed and self.owns(slot.run_id):
                self._spawn(self._check(slot.run_id))
        if len(self._confirmed) > 4 * quotas.MAX_WAITING:  # runs freed by other replicas
            assert self.books is not None
            holding = {s.run_id for b in self.books.books.values() for s in b.running}
            self._confirmed &= holding

    async def _check(self, run_id: str) -> None:
        """``run_id`` holds a slot: record its admission if it is stored queued."""
        if run_id in self._checking or run_id in self._confirmed or not self._holds(run_id):
            return
        self._checking.add(run_id)
        try:
            state = await self.host.state_of(run_id)
            if state.status == "new":
                return  # not stored yet: its submission looks again once stored
            if state.queued and not state.terminal:
                await self.admit(run_id, Admit())
            self._confirmed.add(run_id)
        except NotOwner:
            pass  # moved: the new owner reconciles it
        except Exception as exc:  # the sweep looks again
            log.warning("admission of %s not recorded (%r); the sweep retries", run_id, exc)
        finally:
            self._checking.discard(run_id)

    def _holds(self, run_id: str) -> bool:
        """Whether the latest books give ``run_id`` a slot (once given, a slot stays
        until the run ends, so a stale book never shows one that was not given)."""
        assert self.books is not None
        tenant = self.books.where.get(run_id)
        book = self.books.books.get(tenant) if tenant is not None else None
        return book is not None and any(s.run_id == run_id for s in book.running)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # ------------------------------------------------------------------ the store is the truth

    async def sweep(self, waiting_too: bool) -> None:
        """Check the slots of this replica's runs against the store: drop those of runs
        that ended or were never stored (their replica died before freeing or storing),
        hold a slot for a waiting run the store shows admitted, admit what is stored
        queued yet holds a slot. ``waiting_too``: the waiting runs as well (after taking
        partitions; the waiting runs' own ends free them otherwise)."""
        assert self.books is not None
        now = self.wall()
        for tenant, book in list(self.books.books.items()):
            drop: list[str] = []
            started: list[tuple[str, str, int]] = []
            slots = [(s, True) for s in book.running]
            if waiting_too:
                slots += [(s, False) for s in book.waiting]
            for slot, holds in slots:
                if not self.owns(slot.run_id):
                    continue
                try:
                    state = await self.host.state_of(slot.run_id)
                except NotOwner:
                    continue
                if state.terminal:
                    drop.append(slot.run_id)
                elif state.status == "new":
                    if now - slot.booked_at > UNSTORED_GRACE_S:
                        drop.append(slot.run_id)
                elif holds and state.queued:
                    self._spawn(self._check(slot.run_id))
                elif not holds and not state.queued:
                    started.append((slot.run_id, slot.queue, slot.priority))
            if drop or started:
                log.info("admission: tenant %s: %d slots freed, %d runs held (store)",
                         tenant, len(drop), len(started))  # fmt: skip
                await self._repair(tenant, drop=drop, running=started)

    async def _repair(self, tenant: str, drop: Iterable[str] = (),
                      running: Iterable[tuple[str, str, int]] = (),
                      waiting: Iterable[tuple[str, str, int]] = ()) -> None:  # fmt: skip
        assert self.books is not None
        drop, running, waiting = list(drop), list(running), list(waiting)
        now = self.wall()

        def step(book: AdmissionBook) -> tuple[AdmissionBook, list[str]]:
            return quotas.book_repair(self.quotas, book, drop=drop, running=running,
                                      waiting=waiting, now=now)  # fmt: skip

        admitted = await self.books.change(tenant, step)
        self._confirmed.difference_update(drop)
        for run_id in admitted:
            if self.owns(run_id):
                self._spawn(self._check(run_id))

    def _scan(self, wanted: Callable[[str, str], bool]) -> dict[str, Live]:
        """The live runs of the notification log whose (run id, tenant) is ``wanted``, in
        submission order (blocking: run in ``io``)."""
        found: dict[str, Live] = {}
        after = 0
        while True:
            page = self.read(after, RECOVERY_PAGE)
            for _, record in page:
                event = record.event
                if isinstance(event, RunRequested):
                    if event.parent is None and event.fork is None:
                        tenant = tenant_of(event.principal)
                        if wanted(record.run_id, tenant):
                            found[record.run_id] = Live(tenant, event.queue, event.priority,
                                                        event.queued)  # fmt: skip
                elif isinstance(event, RunAdmitted) and record.run_id in found:
                    live = found[record.run_id]
                    found[record.run_id] = Live(live.tenant, live.queue, live.priority, False)
                elif isinstance(event, TERMINAL_EVENTS):
                    found.pop(record.run_id, None)
            if len(page) < RECOVERY_PAGE:
                return found
            after = page[-1][0]

    async def _reconcile_partitions(self, taken: set[int]) -> None:
        """Book the live runs of partitions just taken that the books lack (a book lost,
        or a replica that died between storing and booking). Reads the notification log
        once for every partition taken together (at start: all this replica's)."""
        count = self.ownership.count

        def wanted(run_id: str, _tenant: str) -> bool:
            return partitions.partition_of(run_id, count) in taken

        live = await self.io(self._scan, wanted)
        await self._book_missing(live)
        log.info("admission: partitions %s reconciled (%d live runs)", sorted(taken), len(live))

    async def _book_missing(self, live: dict[str, Live]) -> None:
        assert self.books is not None
        by_tenant: dict[str, list[tuple[str, Live]]] = {}
        for run_id, run in live.items():
            by_tenant.setdefault(run.tenant, []).append((run_id, run))
        for tenant, runs in by_tenant.items():
            book = self.books.books.get(tenant) or AdmissionBook(tenant=tenant)
            known = {s.run_id for s in (*book.running, *book.waiting)}
            missing = [(r, v) for r, v in runs if r not in known]
            if missing:
                await self._repair(
                    tenant,
                    running=[(r, v.queue, v.priority) for r, v in missing if not v.queued],
                    waiting=[(r, v.queue, v.priority) for r, v in missing if v.queued],
                )

    async def _rebuilt(self, tenant: str) -> AdmissionBook:
        """``tenant``'s book from the store alone (its value in the bucket is corrupt)."""
        live = await self.io(self._scan, lambda _run, t: t == tenant)
        book, _ = quotas.book_repair(
            self.quotas, AdmissionBook(tenant=tenant),
            running=[(r, v.queue, v.priority) for r, v in live.items() if not v.queued],
            waiting=[(r, v.queue, v.priority) for r, v in live.items() if v.queued],
            now=self.wall(),
        )  # fmt: skip
        return book

    def _repair_corrupt(self, tenant: str) -> None:
        assert self.books is not None
        books = self.books

        async def repair() -> None:
            with contextlib.suppress(Exception):  # the next change repairs it
                await books.change(tenant, lambda book: (book, None))

        self._spawn(repair())
