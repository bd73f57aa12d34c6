"""A typed client for agentloom over NATS: what the CLI, the tests and the benchmarks use.

Anything here can be done from another language with the subjects and schemas in
``proto/``; this module is only a convenience for Python callers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from loom_core import blobs, codec, errors, routes, secrets, subjects, tenancy
from loom_core.blobs import BlobRef
from loom_core.contracts import (
    TERMINAL_EVENTS,
    BlobQuery,
    BlobReply,
    DeadLettersQuery,
    DeadLettersReply,
    ErrorInfo,
    EventRecord,
    ForkReply,
    ForkRun,
    Ping,
    Pong,
    ResumeReply,
    ResumeRun,
    RunControl,
    RunControlReply,
    RunEventsQuery,
    RunEventsReply,
    RunRequest,
    RunsQuery,
    RunsReply,
    RunSummary,
    Signal,
    SpanRecord,
    SubmitAccepted,
    SubmitRejected,
    SubmitReply,
    ThreadEntry,
    ThreadQuery,
    ThreadReply,
    ToolSpec,
    ToolsQuery,
    ToolsReply,
    TraceQuery,
    TraceReply,
)
from loom_infra import bus
from loom_infra.blobstore import BlobStore
from loom_infra.settings import BlobSettings, blob_settings_from_env

T = TypeVar("T")
log = logging.getLogger("loom.client")

# request subjects a tenant's user asks on its tenant's twin (loom_core.tenancy)
_TENANT_SUBJECTS = frozenset(
    r.pattern for r in routes.ROUTES if r.tenant_scoped and r.kind == "request" and not r.params
)


async def is_stored(nc: NATS, record: EventRecord, timeout: float = 5.0) -> bool:
    """Is ``record`` exactly the event the executor stored at its run and seq? How a
    consumer of ``loom.run.>`` tells an event the relay published from one anybody
    published (with NATS credentials off), for commands it cannot undo. Raises when the
    executor cannot answer."""
    query = RunEventsQuery(run_id=record.run_id, after_seq=max(0, record.seq - 1), limit=1)
    reply = await bus.request(nc, subjects.API_RUN_EVENTS, query, RunEventsReply, timeout)
    if reply.error is not None:
        raise RuntimeError(f"executor: {reply.error.code}: {reply.error.message}")
    return bool(reply.events) and codec.encode(reply.events[0]) == codec.encode(record)


def _stuck(what: str, run_id: str, cursor: str) -> ErrorInfo:
    return ErrorInfo(
        code="bad_cursor",
        message=f"the {what} of run '{run_id}' answered a next page at the cursor it was "
        f"asked ({cursor!r}): the service is out of date or faulty",
    )


class ReplyError(errors.LoomError):
    """An error reply from a service: ``error`` is the typed ErrorInfo (also ``info``).
    ``loom_infra.client.LoomError`` is the old name of this class, kept for callers."""

    def __init__(self, error: ErrorInfo) -> None:
        where = f" at {error.path}" if error.path else ""
        super().__init__(f"{error.code}{where}: {error.message}")
        self.error = error


# the public name this class had before the root existed: ``except LoomError`` on a
# client call still catches exactly the error replies
LoomError = ReplyError


class LoomClient:
    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str = "loom-client",
        persistent: bool = False,
        *,
        seed: str | os.PathLike[str] | None = None,
        identity: str = "operator",
        on_error: Callable[[Exception], None] | None = None,
        tenant: str | None = None,
    ) -> LoomClient:
        """Connect as ``identity`` (``operator``: the CLI; ``client``: submit only)
        with its nkey ``seed`` (a file or the value; None: no credentials). With a
        ``tenant`` (not ``default``), as that tenant's user of that role: every request
        goes on the tenant's twin subjects and sees only the tenant's runs."""
        if tenant == tenancy.DEFAULT_TENANT:
            tenant = None
        user = identity if tenant is None else tenancy.user(identity, tenant)
        nc = await bus.connect(
            url, name, persistent=persistent, seed=seed, identity=user, on_error=on_error
        )
        client = cls(nc)
        client.blob_settings = blob_settings_from_env()
        client.tenant = tenant
        if identity in ("client", "operator"):
            client.via = identity  # the submit subject it may publish on
        return client

    # the tenant this client acts in (None: the platform's own client/operator)
    tenant: str | None = None

    def scoped(self, subject: str) -> str:
        """Where this client sends what is addressed to the plain ``subject``."""
        return tenancy.scoped(subject, self.tenant)

    async def ask(self, subject: str, message: object, reply_type: type[T], timeout: float) -> T:
        """A request on a route (its tenant twin for a tenant's client)."""
        return await self._ask(subject, message, reply_type, timeout)

    async def close(self) -> None:
        try:
            await self.nc.flush(timeout=2)
        finally:
            await self.nc.close()

    async def __aenter__(self) -> LoomClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _ask(self, subject: str, message: object, reply_type: type[T], timeout: float) -> T:
        if subject in _TENANT_SUBJECTS:
            subject = self.scoped(subject)
        return await bus.request(self.nc, subject, message, reply_type, timeout)

    # The NATS identity this client submits as: the executor reads it from the subject
    # (loom.submit.{via}), and the server lets each identity publish only its own.
    via = "operator"
    # A bearer JWT naming the user runs act for (the Authorization header); None: anonymous.
    token: str | None = None

    async def submit(
        self, request: RunRequest, timeout: float = 10.0, token: str | None = None
    ) -> SubmitAccepted:
        payload = codec.encode(request)
        # a tenant's user cannot upload blobs (no JetStream access): its input stays
        # inline, bounded by the broker's max_payload
        if len(payload) > self.blob_settings.threshold_bytes and self.tenant is None:
            payload = codec.encode(await self.inputs_by_reference(request))
        reply = await self.submit_raw(payload, timeout, token)
        if isinstance(reply, SubmitRejected):
            raise LoomError(reply.error)
        return reply

    async def submit_raw(
        self, payload: bytes, timeout: float = 10.0, token: str | None = None
    ) -> SubmitReply:
        token = token or self.token
        headers = {subjects.AUTHORIZATION: f"Bearer {token}"} if token else None
        msg = await self.nc.request(
            self.scoped(subjects.submit(self.via)), payload, timeout=timeout, headers=headers
        )
        return codec.decode(msg.data, SubmitReply)  # type: ignore[arg-type]  # a union alias is no type[T] to mypy; msgspec decodes it

    async def fork(self, request: ForkRun, timeout: float = 10.0) -> ForkReply:
        """Fork a recorded run; the executor computes what is reused from its store.
        Raises LoomError when refused (no such run or step, a bad new run id)."""
        reply = await self._ask(routes.FORK.subject(), request, ForkReply, timeout)
        if reply.error is not None:
            raise LoomError(reply.error)
        return reply

    async def follow(
        self, run_id: str, timeout: float | None = 300.0
    ) -> AsyncIterator[EventRecord]:
        """Every event of the run from the first, live, until a terminal event.
        Raises TimeoutError when the run shows no progress for ``timeout`` seconds
        (None: no limit; a run may wait days for a person).

        Anyone may publish on the run's subjects when NATS runs without credentials: a
        message that is not the run's next event (garbage, another run's, a repeat, one
        far ahead) is skipped, and the terminal event, which decides what the caller is
        told, is believed only if the executor stored it."""
        if self.tenant is not None:  # no stream access: from the store, woken by progress
            async for record in self._follow_stored(run_id, timeout):
                yield record
            return
        sub = await self.js.subscribe(
            subjects.run_events_of(run_id),
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        last = 0
        try:
            while True:
                msg = await sub.next_msg(timeout=timeout)
                try:
                    record = codec.decode_event(msg.data)
                except Exception as exc:  # not an event: someone else's message
                    log.debug("follow %s: skipped a message on %s: %r", run_id, msg.subject, exc)
                    continue
                if record.run_id != run_id or record.seq <= last:
                    continue
                if record.seq != last + 1:
                    # A gap: an event the relay could not publish (too large for the
                    # broker; the run then fails). Believed only if the executor stored
                    # the event after it; the gap is read from the store where it can be.
                    if not await is_stored(self.nc, record):
                        continue
                    async for missing in self._stored_between(run_id, last, record.seq):
                        last = missing.seq
                        yield missing
                terminal = isinstance(record.event, TERMINAL_EVENTS)
                if terminal and not await is_stored(self.nc, record):
                    continue
                last = record.seq
                yield record
                if terminal:
                    return
        finally:
            await sub.unsubscribe()

    async def _follow_stored(
        self, run_id: str, timeout: float | None
    ) -> AsyncIterator[EventRecord]:
        """A tenant's ``follow``: the run's stored events, read again each time its
        progress (the tenant's twin subject, sent after every commit) says it changed.
        A tenant's user reads no stream (its runs cannot be told apart by subject there)."""
        changed = asyncio.Event()

        async def woken(_msg: object) -> None:
            changed.set()

        sub = await self.nc.subscribe(self.scoped(subjects.progress(run_id)), cb=woken)
        last = 0
        try:
            while True:
                changed.clear()  # before reading: a commit after the read wakes us
                async for record in self.iter_events(run_id, after_seq=last):
                    last = record.seq
                    yield record
                    if isinstance(record.event, TERMINAL_EVENTS):
                        return
                try:
                    await asyncio.wait_for(changed.wait(), timeout)
                except TimeoutError:
                    raise TimeoutError(f"run {run_id} showed no progress in {timeout}s") from None
        finally:
            await sub.unsubscribe()

    async def _stored_between(
        self, run_id: str, after: int, before: int
    ) -> AsyncIterator[EventRecord]:
        """Stored events with ``after`` < seq < ``before``; stops quietly at one that
        cannot be read (an event too large for any reply)."""
        pages = self.iter_events(run_id, after_seq=after)
        try:
            async for record in pages:
                if record.seq >= before:
                    return
                yield record
        except LoomError as exc:
            log.warning("follow %s: events after %d not readable: %s", run_id, after, exc)
        finally:
            await pages.aclose()

    async def wait(self, run_id: str, timeout: float = 300.0) -> list[EventRecord]:
        return [r async for r in self.follow(run_id, timeout)]

    async def events(self, run_id: str, timeout: float = 10.0) -> list[EventRecord]:
        """Every stored event of the run, read page by page (``[]``: no such run)."""
        return [r async for r in self.iter_events(run_id, timeout=timeout)]

    async def iter_events(
        self, run_id: str, after_seq: int = 0, timeout: float = 10.0, page: int = 1000
    ) -> AsyncGenerator[EventRecord, None]:
        """The run's stored events after ``after_seq``, one page per request (each
        bounded in count and bytes by the executor), yielded as they arrive.
        ``timeout`` is per page."""
        while True:
            query = RunEventsQuery(run_id=run_id, after_seq=after_seq, limit=page)
            reply = await self._ask(subjects.API_RUN_EVENTS, query, RunEventsReply, timeout)
            if reply.error is not None:
                raise LoomError(reply.error)
            for record in reply.events:
                yield record
            if reply.next_after_seq is None:
                return
            if reply.next_after_seq <= after_seq:  # a cursor that does not move: never loop
                raise LoomError(_stuck("events", run_id, str(after_seq)))
            after_seq = reply.next_after_seq

    async def runs(
        self, limit: int = 50, status: str | None = None, after: str = ""
    ) -> list[RunSummary]:
        """Up to ``limit`` runs, newest first, after the cursor ``after``."""
        found, _ = await self.runs_page(limit, status, after)
        return found

    async def runs_page(
        self, limit: int = 50, status: str | None = None, after: str = "", timeout: float = 10.0
    ) -> tuple[list[RunSummary], str | None]:
        """Up to ``limit`` runs after the cursor ``after`` ("" from the newest), asked
        page by page (each bounded in count and bytes by the tracing service), and the
        cursor to continue after them (None: no more runs)."""
        found: list[RunSummary] = []
        cursor: str | None = after
        while cursor is not None and len(found) < limit:
            query = RunsQuery(limit=limit - len(found), status=status, after=cursor)
            reply = await self._ask(subjects.API_RUNS, query, RunsReply, timeout)
            if reply.error is not None:
                raise LoomError(reply.error)
            found.extend(reply.runs)
            if reply.next_after is not None and reply.next_after == cursor:
                raise LoomError(
                    ErrorInfo(
                        code="bad_cursor",
                        message=f"the run list answered a next page at the cursor it was "
                        f"asked ({cursor!r}): the tracing service is out of date or faulty",
                    )
                )
            cursor = reply.next_after
        return found, cursor

    async def trace(self, run_id: str, rebuild: bool = False) -> list[SpanRecord]:
        """The run's spans (by start), read page by page; ``rebuild`` recomputes them
        from its events first. Raises LoomError ``not_found`` when it has none."""
        return [s async for s in self.iter_trace(run_id, rebuild=rebuild)]

    async def iter_trace(
        self, run_id: str, rebuild: bool = False, timeout: float = 30.0, page: int = 10_000
    ) -> AsyncIterator[SpanRecord]:
        """The run's spans, one page per request (bounded in count and bytes by the
        tracing service), yielded as they arrive. ``timeout`` is per page."""
        after = ""
        while True:
            query = TraceQuery(run_id=run_id, rebuild=rebuild and not after, after=after,
                               limit=page)  # fmt: skip
            reply = await self._ask(subjects.API_TRACE, query, TraceReply, timeout)
            if reply.error is not None:
                raise LoomError(reply.error)
            for span in reply.spans:
                yield span
            if reply.next_after is None:
                return
            if reply.next_after == after:
                raise LoomError(_stuck("trace", run_id, after))
            after = reply.next_after

    async def thread(self, thread_id: str) -> list[ThreadEntry]:
        reply = await self._ask(
            subjects.API_THREAD, ThreadQuery(thread_id=thread_id), ThreadReply, 10.0
        )
        return reply.entries

    async def control(
        self, run_id: str, action: str, by: str = "operator", reason: str = ""
    ) -> RunControlReply:
        """Cancel, pause or unpause a run; raises LoomError when refused."""
        request = RunControl(run_id=run_id, action=action, by=by, reason=reason)  # type: ignore[arg-type]  # callers pass a RunControl action; the executor refuses others
        reply = await self._ask(subjects.CONTROL, request, RunControlReply, 10.0)
        if not reply.ok and reply.error is not None:
            raise LoomError(reply.error)
        return reply

    async def resume(
        self,
        run_id: str,
        data: object,
        label: str | None = None,
        suspension_id: str | None = None,
        request_id: str = "",
        by: str = "operator",
    ) -> ResumeReply:
        """Answer a suspension. Returns the reply as is (``ok`` false says why: invalid
        data naming the field, or already resumed by whom)."""
        request = ResumeRun(
            run_id=run_id, data=data, label=label, suspension_id=suspension_id,
            request_id=request_id, by=by,
        )  # fmt: skip
        return await self._ask(subjects.RESUME, request, ResumeReply, 10.0)

    async def signal(
        self, name: str, key: str, payload: object = None, signal_id: str = ""
    ) -> None:
        """Publish an external event for runs waiting on (name, key) (stored: a wait
        that starts later still sees the latest one)."""
        body = Signal(name=name, key=key, payload=payload, signal_id=signal_id)
        headers = {subjects.MSG_ID: signal_id} if signal_id else None
        subject = self.scoped(subjects.signal(name, key))
        await self.js.publish(subject, codec.encode(body), headers=headers)

    # ------------------------------------------------------------------ blobs

    # LOOM_BLOB_THRESHOLD_BYTES etc. of this process (the client's own side of the limits)
    blob_settings: BlobSettings = BlobSettings()

    @property
    def blobs(self) -> BlobStore:
        return BlobStore(self.js, self.blob_settings)

    async def put_blob(self, value: Any) -> dict[str, Any]:
        """Store ``value`` once (by the sha256 of its canonical JSON) and return the
        reference to pass in a run's input. Inline secrets are redacted first, as the
        executor does to a submitted input (``loom_core.secrets``): a blob holds none."""
        redacted, _ = secrets.redact_value(value)
        return (await self.blobs.put_value(redacted)).as_json()

    async def inputs_by_reference(self, request: RunRequest) -> RunRequest:
        """``request`` with each top-level input value over the blob threshold uploaded
        and replaced by its reference (what ``submit`` does to a large input)."""
        threshold = self.blob_settings.threshold_bytes
        new_input = dict(request.input)
        for key, value in request.input.items():
            if not blobs.is_ref(value) and len(blobs.canonical(value)) > threshold:
                new_input[key] = await self.put_blob(value)
        return msgspec.structs.replace(request, input=new_input)

    def blob_chunks(self, ref: dict[str, Any] | str) -> AsyncIterator[bytes]:
        """The stored bytes of ``ref`` (a reference, or ``"sha256:<hex>"``), chunk by
        chunk; the sha256 is checked at the end (``LoomError`` ``blob_corrupt``)."""
        return self._blob_chunks(ref)

    async def _blob_chunks(self, ref: dict[str, Any] | str) -> AsyncIterator[bytes]:
        store = self.blobs
        try:
            parsed = await self.blob_ref(ref)
            async for chunk in store.chunks(parsed.whole()):
                yield chunk
        except blobs.BlobRefError as exc:
            raise LoomError(exc.error) from None

    async def blob_ref(self, ref: dict[str, Any] | str) -> BlobRef:
        """A reference from its JSON or its digest alone (the size is looked up)."""
        try:
            if isinstance(ref, str):
                probe = blobs.parse_ref({blobs.BLOB_KEY: ref, "bytes": 0}, "REF")
                info = await self.blobs.info(probe)
                if info is None:
                    raise blobs.BlobRefError(
                        ErrorInfo(
                            code="blob_not_found",
                            message=f"no blob {ref} in the blob store (never stored, or "
                            "expired after LOOM_BLOB_MAX_AGE_DAYS)",
                        )
                    )
                return blobs.BlobRef(probe.digest, info.size or 0)
            return blobs.parse_ref(ref, "REF")
        except blobs.BlobRefError as exc:
            raise LoomError(exc.error) from None

    async def get_blob(self, ref: dict[str, Any] | str) -> Any:
        """The value ``ref`` stands for (the part its ``path`` selects)."""
        parsed = await self.blob_ref(ref)
        data = b"".join([chunk async for chunk in self.blob_chunks(parsed.as_json())])
        try:
            return blobs.select(msgspec.json.decode(data), parsed, "REF")
        except blobs.BlobRefError as exc:
            raise LoomError(exc.error) from None

    async def run_blob_chunks(
        self, run_id: str, digest: str, page: int = 512 * 1024, timeout: float = 30.0
    ) -> AsyncIterator[bytes]:
        """The bytes of blob ``digest`` (``sha256:<hex>``) read through run ``run_id``,
        whose events refer to it (``apiBlob``: how a tenant's user reads its runs' blobs;
        the platform may too), a page per request; the sha256 of the whole is checked at
        the end (``blob_corrupt``)."""
        sha = hashlib.sha256()
        offset: int | None = 0
        after = ""
        while offset is not None:
            query = BlobQuery(run_id=run_id, digest=digest, offset=offset, limit=page, after=after)
            reply = await self._ask(subjects.API_BLOB, query, BlobReply, timeout)
            if reply.error is not None:
                raise LoomError(reply.error)
            if reply.next_offset is not None and reply.next_offset <= offset:
                raise LoomError(_stuck("blob", run_id, str(offset)))
            sha.update(reply.data)
            yield reply.data
            offset, after = reply.next_offset, reply.next_after or ""
        if "sha256:" + sha.hexdigest() != digest.lower():
            raise LoomError(
                ErrorInfo(
                    code="blob_corrupt",
                    message=f"the bytes read of blob {digest} do not match its sha256: "
                    "read it again; if it persists, the stored blob is damaged",
                )
            )

    async def run_blob_size(self, run_id: str, digest: str, timeout: float = 10.0) -> int:
        """The size of blob ``digest`` of run ``run_id`` (``blob_not_found`` raised as
        LoomError when the run is not the caller's or does not refer to it)."""
        query = BlobQuery(run_id=run_id, digest=digest, limit=0)
        reply = await self._ask(subjects.API_BLOB, query, BlobReply, timeout)
        if reply.error is not None:
            raise LoomError(reply.error)
        return reply.size

    async def tools(self, timeout: float = 10.0) -> list[ToolSpec]:
        """The tool catalog (``apiTools``), page by page, by name."""
        found: list[ToolSpec] = []
        after: str | None = ""
        while after is not None:
            reply = await self._ask(
                subjects.API_TOOLS, ToolsQuery(limit=1000, after=after), ToolsReply, timeout
            )
            if reply.error is not None:
                raise LoomError(reply.error)
            found.extend(reply.tools)
            if reply.next_after is not None and reply.next_after <= after:
                raise LoomError(_stuck("tool catalog", "-", after))
            after = reply.next_after
        return found

    async def dead_letters(
        self, after_seq: int = 0, limit: int = 50, rejects: bool = False, timeout: float = 30.0
    ) -> DeadLettersReply:
        """One page of the dead letters (``rejects``: rejected requests) the caller may
        see, after stream sequence ``after_seq`` (``apiDeadLetters``)."""
        query = DeadLettersQuery(after_seq=after_seq, limit=limit, rejects=rejects)
        reply = await self._ask(subjects.API_DEAD_LETTERS, query, DeadLettersReply, timeout)
        if reply.error is not None:
            raise LoomError(reply.error)
        return reply

    async def ping(self, service: str, timeout: float = 1.0) -> Pong:
        return await self._ask(subjects.health(service), Ping(), Pong, timeout)

    async def wait_ready(
        self, services: Iterable[str] = subjects.SERVICES, timeout: float = 30.0
    ) -> None:
        """Wait until every service answers its health subject (bounded)."""
        deadline = time.monotonic() + timeout
        for service in services:
            while True:
                try:
                    await self.ping(service, timeout=0.5)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"service '{service}' not ready in {timeout}s") from None
                    await asyncio.sleep(0.05)  # retry interval of a bounded readiness probe
