"""The admission books every executor replica shares: one key per tenant in the
JetStream key-value bucket ``loom_admission``, changed only by compare-and-set.

A tenant's book says which of its runs hold a slot of its concurrent run limits and
which wait, in the tenant's own order (``loom_core.quotas.book_*``, pure). Whoever
changes it (a submission booking a run, the owner of an ended run freeing its slot, a
repair from the store) reads the key, computes the new book and writes it on the
revision it read; a write that finds the key moved on reads again. So the limit and the
queue order hold across replicas with no consensus of our own: the CAS is JetStream's
(its Raft in a cluster), as for the partition leases.

Every replica watches the bucket (``watch``) and keeps the latest book of each tenant:
that is how the owner of a run picked by another replica learns it may start it.

A value this code did not write (undecodable, another tenant's, past the bounds) is
never trusted: it is recorded as a reject with ``admission_book_corrupt`` and the book
is rebuilt from the store, which holds every run's submission and admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from loom_core import codec, subjects
from loom_core.contracts import AdmissionBook, ErrorInfo
from loom_core.errors import LoomError
from loom_core.quotas import book_problem
from loom_infra import bus

log = logging.getLogger("loom.admission")

BUCKET = subjects.ADMISSION_BUCKET
CAS_ATTEMPTS = 64  # writers of one tenant racing; each lost round costs one get
T = TypeVar("T")


class AdmissionBusy(LoomError):
    """A tenant's book kept moving under every attempt: the submission is refused,
    retryable (nothing stored)."""

    code = "admission_busy"
    retryable = True


def key_of(tenant: str) -> str:
    return f"t-{tenant}"


def corrupt(tenant: str, why: str) -> ErrorInfo:
    return ErrorInfo(
        code="admission_book_corrupt",
        message=f"the admission book of tenant {tenant!r} ({BUCKET}, key {key_of(tenant)}) "
        f"{why}; it was rebuilt from the store. Only executors may write this bucket",
        details={"tenant": tenant, "key": key_of(tenant)},
    )


async def ensure_bucket(js: JetStreamContext, replicas: int = 1) -> Any:
    return await bus.ensure_kv(js, BUCKET, replicas)


@dataclass
class Decoded:
    book: AdmissionBook | None  # None: the key holds no book (yet, or deleted)
    revision: int  # 0: the key does not exist
    problem: ErrorInfo | None = None  # a value that cannot be trusted
    raw: bytes = b""


def decode(tenant: str, value: bytes | None, revision: int) -> Decoded:
    if not value:
        return Decoded(None, revision)
    try:
        book = codec.decode(value, AdmissionBook)
    except Exception as exc:
        return Decoded(None, revision, corrupt(tenant, f"is not an AdmissionBook ({exc})"), value)
    why = book_problem(book, tenant)
    if why is not None:
        return Decoded(None, revision, corrupt(tenant, why), value)
    return Decoded(book, revision)


Rebuild = Callable[[str], Awaitable[AdmissionBook]]
Report = Callable[[str, ErrorInfo, bytes], None]


class SharedBooks:
    """Read, change (CAS) and watch the tenants' books."""

    def __init__(self, kv: Any, rebuild: Rebuild, report: Report) -> None:
        self.kv = kv
        self.rebuild = rebuild  # a tenant's book from the store (for a corrupt value)
        self.report = report  # where a corrupt value is recorded (rejects)
        self.books: dict[str, AdmissionBook] = {}  # tenant -> latest seen (watch)
        self.where: dict[str, str] = {}  # run id -> tenant, of every run in the books
        self.on_change: Callable[[AdmissionBook], None] = lambda book: None
        self.on_corrupt: Callable[[str], None] = lambda tenant: None
        self._watcher: Any = None
        self._task: asyncio.Future[None] | None = None

    async def read(self, tenant: str) -> Decoded:
        try:
            entry = await self.kv.get(key_of(tenant))
        except KeyNotFoundError as exc:
            # a deleted key has a revision the next write must name
            entry = getattr(exc, "entry", None)
            return Decoded(None, entry.revision if entry is not None else 0)
        return decode(tenant, entry.value, entry.revision)

    async def change(self, tenant: str, step: Callable[[AdmissionBook], tuple[AdmissionBook, T]]
                     ) -> T:  # fmt: skip
        """Apply ``step`` (pure: book -> (new book, result)) by compare-and-set, again on
        the fresh book whenever another writer was first; ``step``'s result."""
        for _ in range(CAS_ATTEMPTS):
            found = await self.read(tenant)
            book = found.book
            if found.problem is not None:
                self.report(f"$KV.{BUCKET}.{key_of(tenant)}", found.problem, found.raw)
                log.error("%s", found.problem.message)
                book = await self.rebuild(tenant)
            new, result = step(book or AdmissionBook(tenant=tenant))
            if new == book and found.problem is None:
                return result
            try:
                await self._write(tenant, new, found.revision)
            except KeyWrongLastSequenceError:
                continue  # another replica wrote first: again, on its book
            self._remember(tenant, new)
            return result
        raise AdmissionBusy(
            f"the admission book of tenant {tenant!r} changed under {CAS_ATTEMPTS} attempts "
            "in a row; retry"
        )

    async def _write(self, tenant: str, book: AdmissionBook, revision: int) -> int:
        data = codec.encode(book)
        if revision:
            return int(await self.kv.update(key_of(tenant), data, last=revision))
        return int(await self.kv.create(key_of(tenant), data))

    # ------------------------------------------------------------ watch

    async def start(self) -> None:
        """The current books, then every change as it is written."""
        self._watcher = await bus.watch_from_now(self.kv, self._apply)
        self._task = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(Exception):
            await self._watcher.stop()

    async def _watch(self) -> None:
        while True:
            bus.raise_if_cancelled()  # a cancel nats-py's wait_for swallowed (see bus)
            try:
                entry = await self._watcher.updates(timeout=60.0)
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken watch: the sweep still finds every slot
                log.warning("admission book watch failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            if entry is None:
                continue
            if not hasattr(entry, "key"):  # the watcher was stopped
                return
            book = self._apply(entry)
            if book is not None:
                try:
                    self.on_change(book)
                except Exception:
                    log.exception("admission book change not handled")

    def _apply(self, entry: Any) -> AdmissionBook | None:
        tenant = entry.key.removeprefix("t-")
        if entry.operation is not None or not entry.value:
            self._remember(tenant, None)
            return None
        found = decode(tenant, entry.value, entry.revision)
        if found.book is None:
            self.on_corrupt(tenant)  # repaired from the store at once
            return None
        self._remember(tenant, found.book)
        return found.book

    def _remember(self, tenant: str, book: AdmissionBook | None) -> None:
        old = self.books.pop(tenant, None)
        if old is not None:
            for slot in (*old.running, *old.waiting):
                self.where.pop(slot.run_id, None)
        if book is not None:
            self.books[tenant] = book
            self.where.update((s.run_id, tenant) for s in (*book.running, *book.waiting))
