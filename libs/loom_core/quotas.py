"""Quotas per tenant and per queue: concurrent runs, submission rate, call rates.

The quotas file (``LOOM_QUOTAS_FILE``, YAML or JSON)::

    tenants:
      "*":                       # any tenant not named below
        max_concurrent_runs: 50
      acme:
        max_concurrent_runs: 4   # runs admitted and not ended, all its queues together
        submissions_per_s: 5     # a token bucket: this rate ...
        submission_burst: 10     # ... and this many at once (default: the rate, >= 1)
        tool_calls_per_s: 20     # tool calls wait for a token (recorded), never fail
        model_calls_per_s: 2
        queues:
          batch: {max_concurrent_runs: 1}   # RunRequest.queue "batch" of acme

Everything here is pure (no clock, no I/O): the time is an argument. ``Admission`` is
the bookkeeping of who runs and who waits; ``book_offer`` / ``book_release`` /
``book_repair`` apply it to one tenant's shared book (an ``AdmissionBook``, a key of
the KV bucket ``loom_admission`` that every executor replica changes by
compare-and-set: ``loom_services.shared_admission``). The executor records the
decisions as events (``run_queued``, ``run_admitted``), so replay never consults it.
"""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loom_core.contracts import AdmissionBook, AdmissionSlot, ErrorInfo
from loom_core.errors import LoomError

ANY_TENANT = "*"
_QUEUE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_LIMIT_KEYS = (
    "max_concurrent_runs", "submissions_per_s", "submission_burst",
    "tool_calls_per_s", "model_calls_per_s",
)  # fmt: skip


class QuotaError(LoomError, ValueError):
    """The quotas file is not valid (``path`` names the field)."""

    code = "invalid_quotas"

    def __init__(self, message: str, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True)
class Limits:
    """One tenant's (or one queue's) limits; None: unlimited."""

    max_concurrent_runs: int | None = None
    submissions_per_s: float | None = None
    submission_burst: int | None = None
    tool_calls_per_s: float | None = None
    model_calls_per_s: float | None = None


@dataclass(frozen=True)
class Quotas:
    tenants: Mapping[str, Limits] = field(default_factory=dict)
    queues: Mapping[tuple[str, str], Limits] = field(default_factory=dict)

    def of(self, tenant: str) -> Limits:
        return self.tenants.get(tenant) or self.tenants.get(ANY_TENANT) or Limits()

    def of_queue(self, tenant: str, queue: str) -> Limits:
        return self.queues.get((tenant, queue)) or Limits()

    @property
    def limits_runs(self) -> bool:
        """Whether any concurrent run limit is set (else admission has nothing to do)."""
        every = [*self.tenants.values(), *self.queues.values()]
        return any(limit.max_concurrent_runs is not None for limit in every)


NO_QUOTAS = Quotas()


def check_queue(queue: str) -> ErrorInfo | None:
    """A run request's queue name: "" or 1-64 of A-Z a-z 0-9 _ -."""
    if queue == "" or _QUEUE.fullmatch(queue):
        return None
    return ErrorInfo(
        code="invalid_shape",
        message=f"queue {queue[:80]!r} is not a queue name: 1-64 of A-Z a-z 0-9 _ -",
        path="$.queue",
    )


def _number(value: Any, path: str, whole: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise QuotaError("must be a number", path)
    if value <= 0:
        raise QuotaError(f"must be positive, got {value}", path)
    if whole and value != int(value):
        raise QuotaError(f"must be a whole number, got {value}", path)
    return int(value) if whole else float(value)


def _limits(doc: Any, path: str, keys: Iterable[str], tenant_level: bool = False) -> Limits:
    if not isinstance(doc, Mapping):
        raise QuotaError("must be a mapping of limits", path)
    allowed = set(keys)
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "queues" and tenant_level:
            continue  # a tenant's queues: read by the caller
        if key not in allowed:
            raise QuotaError(f"unknown limit {key!r}; known: {', '.join(sorted(allowed))}", path)
        whole = key in ("max_concurrent_runs", "submission_burst")
        values[key] = _number(value, f"{path}.{key}", whole)
    return Limits(**values)


def parse(doc: Any) -> Quotas:
    """The quotas a loaded file holds; QuotaError naming the first bad field."""
    if doc is None:
        return NO_QUOTAS
    if not isinstance(doc, Mapping) or set(doc) - {"tenants"}:
        raise QuotaError("the file holds one key, `tenants`", "$")
    tenants_doc = doc.get("tenants") or {}
    if not isinstance(tenants_doc, Mapping):
        raise QuotaError("must map tenant names to limits", "$.tenants")
    tenants: dict[str, Limits] = {}
    queues: dict[tuple[str, str], Limits] = {}
    for name, body in tenants_doc.items():
        path = f"$.tenants.{name}"
        tenants[str(name)] = _limits(body, path, _LIMIT_KEYS, tenant_level=True)
        queues_doc = body.get("queues") or {}
        if not isinstance(queues_doc, Mapping):
            raise QuotaError("must map queue names to limits", f"{path}.queues")
        for queue, queue_body in queues_doc.items():
            if check_queue(str(queue)) is not None:
                raise QuotaError("not a queue name: 1-64 of A-Z a-z 0-9 _ -", f"{path}.queues")
            queues[(str(name), str(queue))] = _limits(
                queue_body, f"{path}.queues.{queue}", ("max_concurrent_runs",)
            )
    return Quotas(tenants, queues)


# ----------------------------------------------------------------------------- rates


@dataclass
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved. ``take(now)`` takes one and
    returns how long the caller must wait first (0: at once); the token is reserved, so
    waiters queue up in order instead of racing."""

    rate: float
    burst: int
    tokens: float | None = None  # full at the first take; negative: reserved ahead
    at: float = 0.0

    def take(self, now: float) -> float:
        if self.tokens is None:
            self.tokens, self.at = float(self.burst), now
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def give_back(self) -> None:
        """Undo a take whose caller will not wait (a refused submission)."""
        if self.tokens is not None:
            self.tokens = min(float(self.burst), self.tokens + 1.0)


def bucket(rate: float | None, burst: int | None) -> TokenBucket | None:
    if rate is None:
        return None
    return TokenBucket(rate=rate, burst=burst or max(1, math.ceil(rate)))


# ----------------------------------------------------------------------------- admission


@dataclass(frozen=True)
class Ticket:
    run_id: str
    tenant: str
    queue: str
    priority: int
    order: int  # submission order (the store's notification order after a restart)


@dataclass
class Admission:
    """Which runs hold a slot (admitted, not ended) and which wait, per tenant and
    queue. A run waits when its tenant or its queue is at its limit; when a slot frees,
    the waiting runs of that tenant whose queue has room start highest priority first,
    then in submission order. Nothing is ever dropped: a waiting run leaves only by
    being admitted or by ending (cancelled while it waits)."""

    quotas: Quotas
    running: dict[str, Ticket] = field(default_factory=dict)
    waiting: dict[str, Ticket] = field(default_factory=dict)
    # tenant -> heap of (-priority, order, run_id); entries of runs gone are skipped
    _heaps: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)
    _per_tenant: Counter[str] = field(default_factory=Counter)
    _per_queue: Counter[tuple[str, str]] = field(default_factory=Counter)

    def _tenant_full(self, tenant: str) -> bool:
        most = self.quotas.of(tenant).max_concurrent_runs
        return most is not None and self._per_tenant[tenant] >= most

    def has_room(self, tenant: str, queue: str) -> bool:
        most = self.quotas.of_queue(tenant, queue).max_concurrent_runs
        if self._tenant_full(tenant):
            return False
        return most is None or self._per_queue[(tenant, queue)] < most

    def hold(self, ticket: Ticket) -> None:
        """``ticket``'s run holds a slot (admitted now, or found running at recovery)."""
        if ticket.run_id not in self.running:
            self.running[ticket.run_id] = ticket
            self._per_tenant[ticket.tenant] += 1
            self._per_queue[(ticket.tenant, ticket.queue)] += 1

    def _release(self, run_id: str) -> Ticket | None:
        ticket = self.running.pop(run_id, None)
        if ticket is not None:
            self._per_tenant[ticket.tenant] -= 1
            self._per_queue[(ticket.tenant, ticket.queue)] -= 1
        return ticket

    def wait(self, ticket: Ticket) -> None:
        """``ticket``'s run waits for a slot (queued now, or found queued at recovery)."""
        self.waiting[ticket.run_id] = ticket
        heap = self._heaps.setdefault(ticket.tenant, [])
        heapq.heappush(heap, (-ticket.priority, ticket.order, ticket.run_id))

    def offer(self, ticket: Ticket) -> bool:
        """Admit ``ticket`` now (True) or make it wait (False). A run waits also when
        others of its tenant and queue wait already: nobody overtakes the queue."""
        if ticket.run_id in self.running:
            return True
        if ticket.run_id in self.waiting:
            return False
        ahead = any(
            t.tenant == ticket.tenant and t.queue == ticket.queue for t in self.waiting.values()
        )
        if not ahead and self.has_room(ticket.tenant, ticket.queue):
            self.hold(ticket)
            return True
        self.wait(ticket)
        return False

    def forget(self, run_id: str) -> None:
        """Undo an ``offer`` for a run that was not created (a repeated submission)."""
        self._release(run_id)
        self.waiting.pop(run_id, None)

    def ended(self, run_id: str) -> list[Ticket]:
        """``run_id`` ended: the waiting runs to admit now (their slots are taken)."""
        gone = self._release(run_id) or self.waiting.pop(run_id, None)
        if gone is None:
            return []
        return self.admit_waiting(gone.tenant)

    def admit_waiting(self, tenant: str) -> list[Ticket]:
        """Admit ``tenant``'s waiting runs while there is room, best first."""
        heap = self._heaps.get(tenant, [])
        admitted: list[Ticket] = []
        skipped: list[tuple[int, int, str]] = []
        while heap and not self._tenant_full(tenant):
            entry = heapq.heappop(heap)
            ticket = self.waiting.get(entry[2])
            if ticket is None:
                continue  # ended while it waited
            if self.has_room(tenant, ticket.queue):
                del self.waiting[ticket.run_id]
                self.hold(ticket)
                admitted.append(ticket)
            else:
                skipped.append(entry)  # its queue is full; another queue may have room
        for entry in skipped:
            heapq.heappush(heap, entry)
        return admitted


# ----------------------------------------------------------------------------- the shared book

# A tenant's book is one key of the admission bucket, rewritten whole at each change: its
# size is bounded so a change stays one small write (~40 bytes a slot) far below the
# broker's max_payload. A submission that would wait beyond it is refused ``queue_full``
# (retryable), so nothing accepted is ever dropped.
MAX_WAITING = 2000
MAX_RUNNING = 10_000  # a book holding more is not one this code wrote


class QueueFull(LoomError):
    """A tenant already has ``MAX_WAITING`` runs waiting: the submission is refused
    (nothing stored); retry once some have started."""

    code = "queue_full"
    retryable = True

    def __init__(self, tenant: str, waiting: int) -> None:
        self.details = {"tenant": tenant, "waiting": waiting, "limit": MAX_WAITING}
        super().__init__(
            f"tenant {tenant!r} has {waiting} runs waiting for a slot, the most a queue "
            f"holds ({MAX_WAITING}): retry once some have started, or raise its "
            "max_concurrent_runs in LOOM_QUOTAS_FILE"
        )


def book_problem(book: AdmissionBook, tenant: str) -> str | None:
    """Why a decoded book cannot be trusted (another writer, a careless hand), or None."""
    if book.tenant != tenant:
        return f"holds tenant {book.tenant!r}, not {tenant!r}"
    if len(book.running) > MAX_RUNNING or len(book.waiting) > MAX_WAITING:
        return (f"holds {len(book.running)} running and {len(book.waiting)} waiting runs "
                f"(at most {MAX_RUNNING} and {MAX_WAITING})")  # fmt: skip
    ids = [s.run_id for s in (*book.running, *book.waiting)]
    if len(set(ids)) != len(ids):
        return "names a run twice"
    if any(not s.run_id or s.order < 0 or s.order > book.next_order for s in book.waiting):
        return "has a waiting run with no id or an order past next_order"
    return None


def _ticket(tenant: str, slot: AdmissionSlot) -> Ticket:
    return Ticket(slot.run_id, tenant, slot.queue, slot.priority, slot.order)


def _loaded(quota: Quotas, book: AdmissionBook) -> tuple[Admission, dict[str, float]]:
    admission = Admission(quota)
    for slot in book.running:
        admission.hold(_ticket(book.tenant, slot))
    for slot in book.waiting:
        admission.wait(_ticket(book.tenant, slot))
    booked_at = {s.run_id: s.booked_at for s in (*book.running, *book.waiting)}
    return admission, booked_at


def _dumped(admission: Admission, book: AdmissionBook, booked_at: Mapping[str, float],
            next_order: int) -> AdmissionBook:  # fmt: skip
    def slot(t: Ticket) -> AdmissionSlot:
        return AdmissionSlot(t.run_id, t.queue, t.priority, t.order, booked_at.get(t.run_id, 0))

    running = sorted(admission.running.values(), key=lambda t: t.order)
    waiting = sorted(admission.waiting.values(), key=lambda t: (-t.priority, t.order))
    return AdmissionBook(tenant=book.tenant, running=[slot(t) for t in running],
                         waiting=[slot(t) for t in waiting], next_order=next_order)  # fmt: skip


def book_offer(quota: Quotas, book: AdmissionBook, run_id: str, queue: str, priority: int,
               now: float) -> tuple[AdmissionBook, bool]:  # fmt: skip
    """The book with ``run_id`` booked (holding a slot, or waiting behind its tenant's
    queue) and whether it waits. A run booked already keeps its place. QueueFull when it
    would wait behind ``MAX_WAITING`` others."""
    admission, booked_at = _loaded(quota, book)
    if run_id in admission.running:
        return book, False
    if run_id in admission.waiting:
        return book, True
    order = book.next_order + 1
    ticket = Ticket(run_id, book.tenant, queue, priority, order)
    admitted = admission.offer(ticket)
    if not admitted and len(book.waiting) >= MAX_WAITING:
        raise QueueFull(book.tenant, len(book.waiting))
    booked_at = {**booked_at, run_id: now}
    return _dumped(admission, book, booked_at, order), not admitted


def book_release(quota: Quotas, book: AdmissionBook, run_ids: Iterable[str]
                 ) -> tuple[AdmissionBook, list[str]]:  # fmt: skip
    """The book without ``run_ids`` (ended, or never created), and the waiting runs
    that take the freed slots (best first): they now hold them."""
    admission, booked_at = _loaded(quota, book)
    for run_id in run_ids:
        admission.forget(run_id)
    admitted = [t.run_id for t in admission.admit_waiting(book.tenant)]
    return _dumped(admission, book, booked_at, book.next_order), admitted


def book_repair(quota: Quotas, book: AdmissionBook, *, drop: Iterable[str] = (),
                running: Iterable[tuple[str, str, int]] = (),
                waiting: Iterable[tuple[str, str, int]] = (),
                now: float = 0.0) -> tuple[AdmissionBook, list[str]]:  # fmt: skip
    """The book made to agree with the store (the truth) for some runs: ``drop`` the
    ones that ended or were never stored, book the stored ones it lacks (``running``:
    admitted runs, ``waiting``: queued runs, each ``(run_id, queue, priority)``, placed
    after every run booked already), then admit whatever has room. A waiting run the
    store shows admitted holds a slot even past the limit: the store's decision stands."""
    admission, booked_at = _loaded(quota, book)
    booked_at = dict(booked_at)
    for run_id in drop:
        admission.forget(run_id)
    order = book.next_order
    for run_id, queue, priority in running:
        admission.waiting.pop(run_id, None)
        if run_id not in admission.running:
            order += 1
            admission.hold(Ticket(run_id, book.tenant, queue, priority, order))
            booked_at[run_id] = now
    for run_id, queue, priority in waiting:
        if run_id in admission.running or run_id in admission.waiting:
            continue
        order += 1
        admission.wait(Ticket(run_id, book.tenant, queue, priority, order))
        booked_at[run_id] = now
    admitted = [t.run_id for t in admission.admit_waiting(book.tenant)]
    return _dumped(admission, book, booked_at, order), admitted
