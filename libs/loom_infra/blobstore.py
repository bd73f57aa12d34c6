"""The blob store: big values stored once, by the sha256 of their canonical bytes, in a
NATS JetStream Object Store bucket (issue 9, docs/design.md decision 12; references and the pure
parts are in ``loom_core.blobs``).

Why the Object Store and not a table in the run store: the tool-runner, which makes most
big values, is its own process and NATS identity and on Kubernetes has no access to the
executor's database; a value it produced must reach storage without ever travelling in
one over-sized message. The Object Store cuts a blob into chunks (128 KiB, under any
broker's max_payload), is reachable by every service and client with per-identity
permissions (route ``blobs`` in ``loom_core.routes``), and is the standard NATS layout,
so a client in another language can upload with its own NATS library.

- **Content-addressed, stored once, idempotent.** The object's name is the hex sha256 of
  its bytes. ``put`` first looks the name up: present with the same size and digest,
  nothing is written. Two writers racing write the same bytes; the later meta wins and
  both are the same content.
- **Trust no writer.** Several identities may write the bucket, so a reader never
  believes a name: every read recomputes the sha256 of what it got and refuses a
  mismatch (``blob_corrupt``); ``put`` rewrites an entry whose recorded digest is not
  its name (self-healing a poisoned entry).
- **Bounded.** The bucket has ``max_bytes`` (``LOOM_BLOB_BUCKET_MAX_BYTES``, discard
  new): a put that does not fit is refused ``blob_store_full`` (checked before the first
  chunk, and again from the broker's refusal); one blob is at most
  ``LOOM_BLOB_MAX_BYTES`` (``blob_too_large``); a reader takes at most what it is given.
- **Retention.** Every blob expires ``LOOM_BLOB_MAX_AGE_DAYS`` (default 30, as run
  events) after it was first stored (JetStream ``max_age`` on the bucket's stream).
  Events keep their references: replay and fork never need the content, but a tool
  reading an expired blob fails ``blob_not_found``, and ``loom blob get`` says so.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from loom_core import blobs, subjects
from loom_core.blobs import BlobRef, BlobRefError
from loom_core.contracts import ErrorInfo
from loom_infra.settings import BlobSettings

__all__ = ["CHUNK_BYTES", "STREAM", "BlobStore", "ensure_bucket"]

BUCKET = subjects.BLOBS_BUCKET
STREAM = f"OBJ_{BUCKET}"
CHUNK_BYTES = 128 * 1024  # the Object Store's default chunk; under any max_payload
ACK_TIMEOUT_S = 30.0  # for every chunk of one blob to be stored
_ROLLUP: dict[str, Any] = {api.Header.ROLLUP: "sub"}


def _chunk_subject(nuid: str) -> str:
    return f"$O.{BUCKET}.C.{nuid}"


def _meta_subject(name: str) -> str:
    return f"$O.{BUCKET}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def _nats_digest(sha: bytes) -> str:
    return "SHA-256=" + base64.urlsafe_b64encode(sha).decode()


async def ensure_bucket(js: JetStreamContext, settings: BlobSettings, replicas: int = 1) -> None:
    """Create the bucket if it is missing (``admin``, or an insecure stack), with
    ``replicas`` (LOOM_STREAM_REPLICAS). An existing one keeps what an operator set (size,
    age, replicas)."""
    try:
        await js.stream_info(STREAM)
        return
    except NotFoundError:
        pass
    await js.create_object_store(
        BUCKET,
        api.ObjectStoreConfig(
            description="loom blobs: big values, by sha256 of their canonical bytes",
            ttl=settings.max_age_s,
            max_bytes=settings.bucket_max_bytes,
            storage=api.StorageType.FILE,
            replicas=replicas,
        ),
    )


def _error(code: str, message: str, path: str | None = None, **details: Any) -> BlobRefError:
    return BlobRefError(ErrorInfo(code=code, message=message, path=path, details=details))


@dataclass(frozen=True)
class ChunkCursor:
    """Where a page of an object starts reading: the stream sequence of a chunk (0: its
    first chunk) and the byte offset that chunk starts at."""

    seq: int = 0
    start: int = 0


class BlobStore:
    """Reads and writes blobs through one JetStream context."""

    def __init__(self, js: JetStreamContext, settings: BlobSettings) -> None:
        self.js = js
        self.settings = settings

    # ------------------------------------------------------------------ lookups

    async def info(self, ref: BlobRef) -> api.ObjectInfo | None:
        """The bucket's entry for ``ref`` (None: not stored, or expired)."""
        try:
            # direct, by subject: the one read a submit-only client may make here
            msg = await self.js.get_last_msg(STREAM, _meta_subject(ref.hex), direct=True)
        except NotFoundError as exc:
            if exc.err_code == 10059:  # the bucket itself is missing: not provisioned
                raise _unavailable(exc) from None
            return None
        except (APIError, NatsTimeout, NoRespondersError) as exc:
            raise _unavailable(exc) from None
        try:
            info = api.ObjectInfo.from_response(json.loads(msg.data or b"{}"))
        except Exception:
            return None  # an unreadable meta is no entry (put writes a good one)
        return None if info.deleted else info

    async def exists(self, ref: BlobRef) -> bool:
        info = await self.info(ref)
        return info is not None and info.size == ref.bytes

    # ------------------------------------------------------------------ writes

    async def put_value(self, value: Any) -> BlobRef:
        """Store ``value`` (as canonical JSON) and return its reference."""
        return await self.put_bytes(blobs.canonical(value))

    async def put_bytes(self, data: bytes, media_type: str = blobs.JSON_MEDIA_TYPE) -> BlobRef:
        ref = blobs.ref_for(data, media_type)
        limit = self.settings.max_blob_bytes
        if len(data) > limit:
            raise _error(
                "blob_too_large",
                f"a value of {len(data)} bytes is over the largest blob, {limit} bytes "
                "(LOOM_BLOB_MAX_BYTES); pass a URL or an id to fetch it by instead",
                size=len(data),
                limit=limit,
                setting="LOOM_BLOB_MAX_BYTES",
            )
        sha = hashlib.sha256(data).digest()
        existing = await self.info(ref)
        if existing is not None and (existing.size, existing.digest) == (
            len(data),
            _nats_digest(sha),
        ):
            return ref  # stored once: nothing to write (a bad entry is written over)
        await self._check_room(len(data))
        nuid = uuid.uuid4().hex
        subject = _chunk_subject(nuid)
        try:
            # pipelined: every chunk is sent, then every ack awaited (one round trip,
            # not one per chunk); the metadata goes last, once every chunk is stored
            acks = [
                await self.js.publish_async(subject, data[start : start + CHUNK_BYTES])
                for start in range(0, len(data), CHUNK_BYTES)
            ]
            await asyncio.wait_for(asyncio.gather(*acks), ACK_TIMEOUT_S)
            chunks = len(acks)
            info = api.ObjectInfo(
                name=ref.hex,
                bucket=BUCKET,
                nuid=nuid,
                size=len(data),
                chunks=chunks,
                digest=_nats_digest(sha),
                mtime=datetime.now(UTC).isoformat(),
                headers={"Content-Type": [media_type]},
                options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES),
            )
            await self.js.publish(
                _meta_subject(ref.hex), json.dumps(info.as_dict()).encode(), headers=_ROLLUP
            )
        except APIError as exc:
            if "maximum bytes" in (exc.description or "") or exc.err_code == 10047:
                raise self._full(len(data)) from None
            raise _unavailable(exc) from None
        except (NatsTimeout, TimeoutError) as exc:
            raise _unavailable(exc) from None
        return ref

    async def _check_room(self, size: int) -> None:
        info = await self.js.stream_info(STREAM)
        limit = info.config.max_bytes or -1
        used = info.state.bytes
        if limit > 0 and used + size > limit:
            raise self._full(size, used=used, limit=limit)

    def _full(self, size: int, used: int | None = None, limit: int | None = None) -> BlobRefError:
        return _error(
            "blob_store_full",
            f"the blob store has no room for {size} more bytes"
            + (f" ({used} of {limit} used)" if limit else "")
            + "; blobs expire after LOOM_BLOB_MAX_AGE_DAYS, or raise "
            "LOOM_BLOB_BUCKET_MAX_BYTES (the bucket's max_bytes)",
            size=size,
            used=used,
            limit=limit,
            setting="LOOM_BLOB_BUCKET_MAX_BYTES",
        )

    # ------------------------------------------------------------------ reads

    async def chunks(
        self, ref: BlobRef, where: str = "$", limit: int | None = None
    ) -> AsyncIterator[bytes]:
        """The blob's bytes, chunk by chunk, checked against ``ref``'s digest at the end
        (``blob_corrupt`` then: a caller streaming them out must say so).
        ``blob_not_found`` if it is not stored; ``blob_too_large`` over ``limit``."""
        info = await self.info(ref)
        if info is None:
            raise _error(
                "blob_not_found",
                f"{where}: no blob {ref.digest} in the blob store (never stored here, "
                "or expired after LOOM_BLOB_MAX_AGE_DAYS); upload it with `loom blob put`",
                where,
                blob=ref.digest,
            )
        size = info.size or 0
        if size != ref.bytes:
            raise _corrupt(ref, where, f"it holds {size} bytes, the reference says {ref.bytes}")
        if limit is not None and size > limit:
            raise _error(
                "blob_too_large",
                f"{where}: the blob is {size} bytes, over the {limit} bytes this read "
                f"takes ({blobs.MAX_RESOLVED_SETTING} for a tool's input)",
                where,
                blob=ref.digest,
                size=size,
                limit=limit,
            )
        sha = hashlib.sha256()
        got = 0
        if size:
            sub = await self.js.subscribe(
                _chunk_subject(info.nuid), stream=STREAM, ordered_consumer=True
            )
            try:
                while True:
                    msg = await sub.next_msg(timeout=10)
                    got += len(msg.data)
                    if got > size:
                        break
                    sha.update(msg.data)
                    yield msg.data
                    if msg.metadata.num_pending == 0:
                        break
            except NatsTimeout:
                raise _corrupt(ref, where, f"its chunks stopped after {got} bytes") from None
            finally:
                await sub.unsubscribe()
        if got != size or "sha256:" + sha.hexdigest() != ref.digest:
            raise _corrupt(ref, where, "its content does not match its sha256")

    async def page(
        self, info: api.ObjectInfo, digest: str, offset: int, want: int, cursor: ChunkCursor
    ) -> tuple[bytes, ChunkCursor | None]:
        """Bytes ``[offset, offset + want)`` of the stored object ``info``, read from the
        chunk ``cursor`` names (a previous page's next cursor: its stream sequence and the
        byte offset it starts at), so paging through a blob reads each chunk about once
        instead of every chunk before the page. Only this object's chunks are read
        whatever the cursor says (the consumer filters on its chunk subject); a cursor
        that lies about where its chunk starts only misplaces the bytes, which the
        reader's sha256 check of the whole catches. Returns the bytes and the cursor to
        go on from (None: the object ends in this page)."""
        size = info.size or 0
        if want <= 0 or offset >= size:
            return b"", None
        config = None
        if cursor.seq:
            config = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=cursor.seq
            )
        sub = await self.js.subscribe(
            _chunk_subject(info.nuid), stream=STREAM, ordered_consumer=True, config=config
        )
        out = bytearray()
        position = cursor.start
        ref = BlobRef(digest, size)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=10)
                except NatsTimeout:
                    raise _corrupt(ref, "$.digest", f"its chunks stopped at {position}") from None
                data = msg.data
                lo = max(offset - position, 0)
                hi = min(offset + want - position, len(data))
                if hi > lo:
                    out += data[lo:hi]
                seq = msg.metadata.sequence.stream
                end = position + len(data)
                last = msg.metadata.num_pending == 0 or end >= size
                if len(out) >= want:
                    if end > offset + want:  # the page ends inside this chunk
                        return bytes(out), ChunkCursor(seq, position)
                    return bytes(out), None if last else ChunkCursor(seq + 1, end)
                if last:
                    return bytes(out), None
                position = end
        finally:
            await sub.unsubscribe()

    async def read(self, ref: BlobRef, where: str = "$", limit: int | None = None) -> bytes:
        parts = [chunk async for chunk in self.chunks(ref, where, limit)]
        return b"".join(parts)

    async def get_value(self, ref: BlobRef, where: str = "$", limit: int | None = None) -> Any:
        """The JSON value the blob holds (the whole of it, not ``ref.path``)."""
        data = await self.read(ref, where, limit)
        try:
            return msgspec.json.decode(data)
        except msgspec.DecodeError:
            raise _error(
                "blob_not_json",
                f"{where}: blob {ref.digest} is {ref.media_type}, not a JSON value",
                where,
                blob=ref.digest,
            ) from None

    # ------------------------------------------------------------------ values

    async def resolve(self, value: Any, limit: int, base: str = "$") -> Any:
        """``value`` with every reference in it replaced by what it stands for (the
        blob's value, or the part a projection selects). At most ``limit`` bytes of blobs
        in all; each distinct blob is read once."""
        found = blobs.find_refs(value, "$")
        if not found:
            return value
        values: dict[str, Any] = {}
        budget = limit
        replaced: dict[str, Any] = {}
        for path, ref in found:
            where = base + path[1:]
            if ref.digest not in values:
                if ref.media_type != blobs.JSON_MEDIA_TYPE:
                    raise _error(
                        "blob_not_json",
                        f"{where}: blob {ref.digest} is {ref.media_type}; only JSON values "
                        "are put into a tool's input",
                        where,
                    )
                values[ref.digest] = await self.get_value(ref, where, limit=budget)
                budget -= ref.bytes
            replaced[path] = blobs.select(values[ref.digest], ref, where)
        return blobs.replace_refs(value, replaced)

    async def externalize(self, value: Any, threshold: int) -> Any:
        """``value`` itself when its canonical JSON is at most ``threshold`` bytes,
        else the reference of it stored (a reference is never stored again)."""
        if blobs.is_ref(value):
            return value
        data = blobs.canonical(value)
        if len(data) <= threshold:
            return value
        return (await self.put_bytes(data)).as_json()

    async def check_refs(self, value: Any, base: str = "$") -> ErrorInfo | None:
        """None when every reference in ``value`` is well-formed and stored with the
        size it claims; else the typed error naming the first that is not."""
        try:
            found = blobs.find_refs(value, base)
        except BlobRefError as exc:
            return exc.error
        for path, ref in found:
            info = await self.info(ref)
            if info is None or info.size != ref.bytes:
                what = "not stored" if info is None else f"stored with {info.size} bytes"
                return ErrorInfo(
                    code="blob_not_found",
                    message=f"{path} refers to blob {ref.digest} ({ref.bytes} bytes), "
                    f"which is {what}; upload the value first (`loom blob put`, "
                    "LoomClient.put_blob) and pass the reference it returns",
                    path=path,
                    details={"blob": ref.digest},
                )
        return None


def _corrupt(ref: BlobRef, where: str, why: str) -> BlobRefError:
    return _error(
        "blob_corrupt",
        f"{where}: blob {ref.digest} cannot be trusted: {why}. Store the value again "
        "(a put rewrites a bad entry)",
        where,
        blob=ref.digest,
    )


def _unavailable(exc: Exception) -> BlobRefError:
    return BlobRefError(
        ErrorInfo(
            code="blob_store_unavailable",
            message=f"the blob store did not answer ({type(exc).__name__}: {exc}); retry",
            retryable=True,
        )
    )
