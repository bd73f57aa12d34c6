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
- The book of who runs and who waits lives in this process and is rebuilt from the
  store's notification log at start (only when a run limit is configured), so a restart
  loses no queued run and admits whatever freed meanwhile. Sub-runs and forks are made
  by the engine from a run that holds a slot: they are not limited (a child waiting for
  its parent's slot would deadlock).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from loom_core import quotas
from loom_core.contracts import (
    TERMINAL_EVENTS,
    ErrorInfo,
    EventRecord,
    Principal,
    RunAdmitted,
    RunRequest,
    RunRequested,
)
from loom_core.executor import Admit
from loom_core.quotas import Admission, Quotas, Ticket, TokenBucket
from loom_infra.settings import SettingsError
from loom_services.tenants import tenant_of

log = logging.getLogger("loom.admission")

RECOVERY_PAGE = 2000


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


class AdmissionControl:
    def __init__(
        self,
        quota: Quotas,
        admit: Callable[[str, Admit], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quotas = quota
        self.book = Admission(quota)
        self.admit = admit  # host.submit: records run_admitted and starts the steps
        self.clock = clock
        self.buckets: dict[str, TokenBucket | None] = {}
        self.order = 0  # submission order; recovery starts it after the store's last
        self._pending: set[asyncio.Future[Any]] = set()
        self.limits_runs = quota.limits_runs  # once: on_commit runs after every commit

    # ------------------------------------------------------------------ submit

    def refusal(self, principal: Principal | None, request: RunRequest) -> ErrorInfo | None:
        """Why this submission is refused now (a bad queue name, over the tenant's
        submission rate), or None."""
        error = quotas.check_queue(request.queue)
        if error is not None or not _limited(request):
            return error
        tenant = tenant_of(principal)
        if tenant not in self.buckets:
            limits = self.quotas.of(tenant)
            self.buckets[tenant] = quotas.bucket(limits.submissions_per_s, limits.submission_burst)
        bucket = self.buckets[tenant]
        wait = bucket.take(self.clock()) if bucket is not None else 0.0
        if wait <= 0:
            return None
        assert bucket is not None
        bucket.give_back()
        return ErrorInfo(
            code="too_many_submissions",
            message=f"tenant {tenant!r} submits more than {bucket.rate:g} runs a second "
            f"(burst {bucket.burst}): retry in {wait:.2f} s",
            retryable=True,
            details={"retry_after_s": round(wait, 3), "tenant": tenant},
        )

    def offer(self, run_id: str, principal: Principal | None, request: RunRequest) -> bool:
        """Whether the new run ``run_id`` must wait for a slot (it is booked either way;
        ``forget`` undoes it if the run was not created)."""
        if not self.limits_runs or not _limited(request):
            return False
        self.order += 1
        ticket = Ticket(run_id, tenant_of(principal), request.queue, request.priority, self.order)
        return not self.book.offer(ticket)

    def knows(self, run_id: str) -> bool:
        return run_id in self.book.running or run_id in self.book.waiting

    def forget(self, run_id: str) -> None:
        self.book.forget(run_id)

    # ------------------------------------------------------------------ ends

    def on_commit(self, _ids: list[int], records: list[EventRecord]) -> None:
        """After each commit: a run that ended frees its slot for the next waiting."""
        if not self.limits_runs:
            return
        for record in records:
            if isinstance(record.event, TERMINAL_EVENTS):
                for ticket in self.book.ended(record.run_id):
                    self._admit(ticket)

    def _admit(self, ticket: Ticket) -> None:
        task = asyncio.ensure_future(self._record_admission(ticket))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record_admission(self, ticket: Ticket) -> None:
        try:
            await self.admit(ticket.run_id, Admit())
        except Exception as exc:  # the book holds the slot; a restart re-admits it
            log.warning("admission of %s not recorded (%r); retried at restart",
                        ticket.run_id, exc)  # fmt: skip

    # ------------------------------------------------------------------ recovery

    def recover(self, read: Callable[[int, int], list[tuple[int, EventRecord]]]) -> list[Ticket]:
        """Rebuild the book from the store's notification log (``read(after, limit)``);
        returns the waiting runs that may start now (admit them with ``admit_now``)."""
        if not self.limits_runs:
            return []
        tickets: dict[str, tuple[Ticket, bool]] = {}  # run -> (ticket, still queued)
        after = 0
        while True:
            page = read(after, RECOVERY_PAGE)
            for notification_id, record in page:
                event = record.event
                if isinstance(event, RunRequested):
                    if event.parent is None and event.fork is None:
                        ticket = Ticket(record.run_id, tenant_of(event.principal), event.queue,
                                        event.priority, notification_id)  # fmt: skip
                        tickets[record.run_id] = (ticket, event.queued)
                elif isinstance(event, RunAdmitted) and record.run_id in tickets:
                    tickets[record.run_id] = (tickets[record.run_id][0], False)
                elif isinstance(event, TERMINAL_EVENTS):
                    tickets.pop(record.run_id, None)
            if len(page) < RECOVERY_PAGE:
                break
            after = page[-1][0]
        for ticket, queued in tickets.values():
            (self.book.wait if queued else self.book.hold)(ticket)
            self.order = max(self.order, ticket.order)
        startable = [t for tenant in {t.tenant for t, _ in tickets.values()}
                     for t in self.book.admit_waiting(tenant)]  # fmt: skip
        log.info("admission: %d runs hold slots, %d wait, %d start now",
                 len(self.book.running), len(self.book.waiting), len(startable))  # fmt: skip
        return startable

    def admit_now(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            self._admit(ticket)
