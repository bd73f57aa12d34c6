"""Pipelined JetStream publishes of a batch, acked through one inbox (issue 10).

``js.publish_async`` costs ~40 µs of CPU per message in nats-py 2.16: a semaphore, a
random token, a future and a done-callback each, headers checked with a regex and
encoded key by key, and each PubAck parsed with ``json`` into a dataclass. The relay
publishes every committed event (five per step), all in the executor's process, so
that was ~0.2 ms of the step's CPU. Here a whole batch is written as HPUB commands with
headers encoded once as one string, on replies ``{inbox}.{batch}.{index}`` of one
subscription, acks decoded with msgspec, and one future per batch: half the CPU per
event (bench/relaycost.py).

JetStream's batch publishing does not fit the relay (measured on nats-server 2.15.1,
docs/decisions.md, "Performance, eighth part"): an atomic batch is refused on a stream with
``persist_mode: async`` (LOOM_RUNS) and refuses a whole batch when one message is a
duplicate, and a fast batch (``allow_batched``) drops duplicates without saying which,
and acks only the last stream sequence, where the relay needs each event's sequence and
duplicate flag. Neither saved CPU over this pipe.

It writes through nats-py's outgoing buffer (``_send_command``, ``_flush_pending``):
nats-py is pinned exactly (pyproject); tests/integration/test_publish_pipe.py pins its
behaviour on a real server and test_relay*.py exercise it with reconnects and kills.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.errors import (
    BadSubjectError,
    ConnectionClosedError,
    ConnectionDrainingError,
    OutboundBufferLimitError,
)
from nats.js.errors import APIError, NoStreamResponseError

from loom_infra.bus import BAD_SUBJECT, subscribe_inline

# a line break in a header value would start a header of the sender's choosing
_NO_BREAKS = str.maketrans("", "", "\r\n")
_NO_RESPONDERS = "503"


class PubAck(msgspec.Struct):
    """The stream's answer to one publish (the fields the relay reads)."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(PubAck).decode


def bad_subject(subject: str) -> bool:
    """True for a subject nats-py refuses to publish to (a space, a tab, a line break)."""
    return BAD_SUBJECT.search(subject) is not None


def header_block(headers: Sequence[tuple[str, str]]) -> bytes:
    """The NATS header block of ``headers`` (keys are the caller's constants; line
    breaks in a value are removed, as nats-py does)."""
    lines = "".join(f"{key}: {clean(value)}\r\n" for key, value in headers)
    return f"NATS/1.0\r\n{lines}\r\n".encode()


def clean(value: str) -> str:
    """A header value without line breaks (one would start a header of its own)."""
    if "\r" in value or "\n" in value:
        return value.translate(_NO_BREAKS).strip()
    return value


class _Batch:
    __slots__ = ("acks", "future", "left")

    def __init__(self, size: int, future: asyncio.Future[list[Any]]) -> None:
        self.acks: list[Any] = [None] * size
        self.left = size
        self.future = future


class PublishPipe:
    """Publishes to JetStream in batches; ``send`` returns one future per batch, with
    each message's ``PubAck`` or exception (``APIError``) in order."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._prefix = ""
        self._batches: dict[int, _Batch] = {}
        self._next = 0

    def pending(self) -> int:
        """Batches sent whose acks have not all come (nor been given up)."""
        return sum(not batch.future.done() for batch in self._batches.values())

    async def _open(self) -> None:
        inbox = self.nc.new_inbox()
        # each ack handled as it is parsed, not queued for a task (issue 10, stackcpu)
        await subscribe_inline(self.nc, f"{inbox}.*.*", self._on_ack)
        self._prefix = f"{inbox}."

    async def send(self, messages: Sequence[tuple[str, bytes, bytes]]) -> asyncio.Future[list[Any]]:
        """Write every (subject, header block, payload), flush once. Raises what nats-py's
        publish raises (connection closed or draining, its reconnect buffer full, a bad
        subject) before anything is written."""
        if not self._prefix:
            await self._open()
        nc = self.nc
        if nc.is_closed:
            raise ConnectionClosedError
        if nc.is_draining_pubs:
            raise ConnectionDrainingError
        size = 0
        for subject, headers, data in messages:
            if bad_subject(subject):
                raise BadSubjectError
            size += len(headers) + len(data)
        if not nc.is_connected and (
            nc._max_pending_size <= 0 or size + nc._pending_data_size > nc._max_pending_size
        ):
            raise OutboundBufferLimitError  # as nats-py: no buffering beyond its limit
        number = self._next
        self._next += 1
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if not messages:
            future.set_result([])
            return future
        self._batches[number] = _Batch(len(messages), future)
        future.add_done_callback(lambda _: self._batches.pop(number, None))
        reply = f"{self._prefix}{number}."
        # one HPUB per message (nats-py's hpub_cmd, written out), all in one buffer write
        parts: list[bytes] = []
        for index, (subject, headers, data) in enumerate(messages):
            parts += (
                f"HPUB {subject} {reply}{index} {len(headers)} "
                f"{len(headers) + len(data)}\r\n".encode(),
                headers,
                data,
                b"\r\n",
            )
        try:
            await nc._send_command(b"".join(parts))
            nc.stats["out_msgs"] += len(messages)
            nc.stats["out_bytes"] += size
            if nc._flush_queue is not None and nc._flush_queue.empty():
                await nc._flush_pending()  # else a flush is queued: it writes ours too
        except BaseException:
            future.cancel()  # nothing waits for it: no batch left pending
            raise
        return future

    def _on_ack(self, msg: Any) -> None:
        number, _, index = msg.subject[len(self._prefix) :].partition(".")
        try:
            batch, slot = self._batches.get(int(number)), int(index)
        except ValueError:
            return  # not an answer to us
        if batch is None or batch.future.done():
            return  # a batch given up (timeout, reconnect): retried under a new number
        if not 0 <= slot < len(batch.acks) or batch.acks[slot] is not None:
            return
        batch.acks[slot] = _answer(msg)
        batch.left -= 1
        if batch.left == 0:
            batch.future.set_result(batch.acks)


def _answer(msg: Any) -> Any:
    """The PubAck, or the exception the stream's answer stands for."""
    if not msg.data and msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
        return NoStreamResponseError()
    try:
        ack = _decode_ack(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return APIError(description=f"unreadable publish ack: {exc}")
    if ack.error is not None:
        try:
            APIError.from_error(ack.error)  # raises the typed error of its code
        except APIError as error:
            return error
        except TypeError:  # fields nats-py does not know
            return APIError(description=str(ack.error))
    return ack
