"""Encoders and decoders, built once and reused (msgspec's fast path).

Upcasting: ``EventRecord.schema_version`` names the shape an event was written in.
When a shape changes, bump ``contracts.SCHEMA_VERSION`` and add a step to
``_UPCASTERS`` that rewrites the raw JSON of the older version; stored streams are
never rewritten in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from loom_core.contracts import SCHEMA_VERSION, EventRecord, InboxMessage

T = TypeVar("T")

encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(EventRecord)
_inbox_decoder = msgspec.json.Decoder(InboxMessage)

# version -> function(raw dict) -> raw dict of version + 1
_UPCASTERS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def encode(value: Any) -> bytes:
    return encoder.encode(value)


def decode_event(data: bytes) -> EventRecord:
    try:
        record = _event_decoder.decode(data)
    except msgspec.ValidationError:
        record = None  # maybe an older shape: upcast below, or re-raise
    if record is not None and record.schema_version == SCHEMA_VERSION:
        return record
    raw = msgspec.json.decode(data)
    version = raw.get("schema_version", SCHEMA_VERSION) if isinstance(raw, dict) else SCHEMA_VERSION
    if version == SCHEMA_VERSION:
        _event_decoder.decode(data)  # the current shape, and still invalid: say why
    if version not in _UPCASTERS and version < SCHEMA_VERSION:
        raise msgspec.ValidationError(f"no upcaster from schema_version {version}")
    while version < SCHEMA_VERSION:
        raw = _UPCASTERS[version](raw)
        version += 1
    raw["schema_version"] = SCHEMA_VERSION
    return msgspec.convert(raw, EventRecord)


def decode_inbox(data: bytes) -> InboxMessage:
    return _inbox_decoder.decode(data)


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def decode(data: bytes, type_: type[T]) -> T:
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.json.Decoder(type_)
    return dec.decode(data)


def to_builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)
