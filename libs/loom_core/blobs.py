"""Big values travel by reference (issue 9, docs/design.md decision 12). Pure: no I/O.

A value whose canonical JSON is over the blob threshold is stored once, in the blob store
(``loom_infra.blobstore``: a NATS JetStream Object Store bucket), under the sha256 of
its canonical bytes, and events carry a *reference* in its place::

    {"$blob": "sha256:<64 hex>", "bytes": 10485772, "media_type": "application/json"}

optionally with ``"path": ["message", "text"]``: a *projection*, the part of the blob's
JSON value found by following those keys/indexes (what ``{{ fetch.output.message.text }}``
renders to when ``fetch.output`` is a reference; see ``loom_core.templating``).

- The blob holds the value's canonical JSON (:func:`canonical`: msgspec, keys sorted,
  compact), so the same value always gets the same reference, wherever it was stored.
- A reference is data: the executor passes it on whole, records it, replays it and forks
  it without ever reading the blob. Only the tool-runner resolves references (in a tool's
  input, right before the call: tools see plain values), and the CLI reads blobs for
  people.
- A dict with a ``"$blob"`` key *is* a reference claim: one that is malformed is an
  error (``bad_blob_reference``) naming its JSON path, never a value passed on silently.
- The walkers are iterative: they never recurse on user data.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec

from loom_core.contracts import ErrorInfo
from loom_core.errors import LoomError
from loom_core.limits import json_path

__all__ = [
    "BLOB_KEY",
    "DEFAULT_MAX_RESOLVED_BYTES",
    "DEFAULT_THRESHOLD_BYTES",
    "JSON_MEDIA_TYPE",
    "MAX_RESOLVED_SETTING",
    "THRESHOLD_SETTING",
    "BlobRef",
    "BlobRefError",
    "canonical",
    "describe",
    "digest_of",
    "find_refs",
    "is_ref",
    "parse_ref",
    "readable",
    "ref_for",
    "replace_refs",
    "select",
]

BLOB_KEY = "$blob"
JSON_MEDIA_TYPE = "application/json"
THRESHOLD_SETTING = "LOOM_BLOB_THRESHOLD_BYTES"
MAX_RESOLVED_SETTING = "LOOM_BLOB_MAX_RESOLVED_BYTES"
# 64 KiB: half the step limits (loom_core.sizes), so a value is stored by reference well
# before it could fail a step; a reference itself is ~120 bytes.
DEFAULT_THRESHOLD_BYTES = 65_536
# What the tool-runner puts back into one tool input at most (every reference resolved).
DEFAULT_MAX_RESOLVED_BYTES = 64 * 1024 * 1024

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
_KEYS = frozenset({BLOB_KEY, "bytes", "media_type", "path", "type"})
_encode_sorted = msgspec.json.Encoder(order="sorted").encode


class BlobRef(msgspec.Struct, frozen=True, omit_defaults=True):
    """A reference as data (its JSON form is :meth:`as_json`)."""

    digest: str  # "sha256:<hex>"
    bytes: int  # size of the whole blob
    media_type: str = JSON_MEDIA_TYPE
    path: tuple[str | int, ...] = ()  # a projection into the blob's JSON value

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            BLOB_KEY: self.digest,
            "bytes": self.bytes,
            "media_type": self.media_type,
        }
        if self.path:
            out["path"] = list(self.path)
        return out

    def whole(self) -> BlobRef:
        """The reference to the whole blob (what is stored and fetched)."""
        return BlobRef(self.digest, self.bytes, self.media_type)

    def project(self, segment: str | int) -> BlobRef:
        return BlobRef(self.digest, self.bytes, self.media_type, (*self.path, segment))


class BlobRefError(LoomError):
    """A reference that is malformed, unknown, unreadable or too large; ``error`` is the
    typed error with the JSON path of the reference."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def canonical(value: Any) -> bytes:
    """The bytes a value is stored as: compact JSON, object keys sorted."""
    return _encode_sorted(value)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def ref_for(data: bytes, media_type: str = JSON_MEDIA_TYPE) -> BlobRef:
    return BlobRef(digest_of(data), len(data), media_type)


def is_ref(value: Any) -> bool:
    """True for anything claiming to be a reference (a dict with a ``"$blob"`` key),
    well-formed or not (:func:`parse_ref` says which)."""
    return isinstance(value, Mapping) and BLOB_KEY in value


def parse_ref(value: Any, path: str = "$") -> BlobRef:
    """The reference ``value`` claims to be, or ``BlobRefError`` (``bad_blob_reference``)
    naming ``path`` and what is wrong."""
    problem = _problem(value)
    if problem is not None:
        raise BlobRefError(
            ErrorInfo(
                code="bad_blob_reference",
                message=f"{path} is not a valid blob reference: {problem}. A reference is "
                '{"$blob": "sha256:<64 hex>", "bytes": N, "media_type": "..."} as '
                "`loom blob put` prints it",
                path=path,
            )
        )
    raw_path = value.get("path") or ()
    return BlobRef(
        digest=value[BLOB_KEY],
        bytes=value["bytes"],
        media_type=value.get("media_type", JSON_MEDIA_TYPE),
        path=tuple(raw_path),
    )


def _problem(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return "not an object"
    extra = sorted(str(k) for k in value if k not in _KEYS)
    if extra:
        return f"unexpected keys {extra}"
    if value.get("type", "blob_ref") != "blob_ref":
        return '"type", when given, must be "blob_ref"'
    digest = value.get(BLOB_KEY)
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        return '"$blob" must be "sha256:" and 64 lowercase hex digits'
    size = value.get("bytes")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return '"bytes" must be a whole number >= 0'
    media = value.get("media_type", JSON_MEDIA_TYPE)
    if not isinstance(media, str) or not media or len(media) > 255:
        return '"media_type" must be a non-empty string'
    raw_path = value.get("path", [])
    if not isinstance(raw_path, list) or not all(
        (isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool) and s >= 0))
        for s in raw_path
    ):
        return '"path" must be a list of keys and indexes'
    if raw_path and media != JSON_MEDIA_TYPE:
        return f'"path" selects into JSON, but the blob is {media}'
    return None


def _children(value: Any) -> Iterator[tuple[str | int, Any]]:
    if isinstance(value, Mapping):
        yield from value.items()
    elif isinstance(value, list | tuple):
        yield from enumerate(value)


def find_refs(value: Any, base: str = "$") -> list[tuple[str, BlobRef]]:
    """Every reference in ``value`` with its JSON path, depth-first in document order
    (iterative). A malformed one raises ``BlobRefError`` naming its path. A reference's
    own fields are not searched."""
    found: list[tuple[str, BlobRef]] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        keys, item = stack.pop()
        if is_ref(item):
            found.append((json_path(base, keys), parse_ref(item, json_path(base, keys))))
            continue
        children = list(_children(item))
        for key, child in reversed(children):
            if isinstance(child, Mapping | list | tuple):
                stack.append(((*keys, key), child))
    return found


def replace_refs(value: Any, resolved: Mapping[str, Any]) -> Any:
    """``value`` with each reference replaced by ``resolved[path]`` (paths as
    :func:`find_refs` gives them). Iterative; unchanged parts are shared, not copied."""
    if not resolved:
        return value
    if "$" in resolved:
        return resolved["$"]
    root: list[Any] = [value]
    # rebuild only the containers on the way to a replaced reference
    for path_keys, new in _keyed(value, resolved):
        holder: Any = root
        key: str | int = 0
        for step in path_keys:
            child = holder[key]
            copy = dict(child) if isinstance(child, Mapping) else list(child)
            holder[key] = copy
            holder, key = copy, step
        holder[key] = new
    return root[0]


def _keyed(value: Any, resolved: Mapping[str, Any]) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        keys, item = stack.pop()
        if is_ref(item):
            path = json_path("$", keys)
            if path in resolved:
                yield keys, resolved[path]
            continue
        for key, child in _children(item):
            if isinstance(child, Mapping | list | tuple):
                stack.append(((*keys, key), child))


def select(value: Any, ref: BlobRef, where: str) -> Any:
    """The part of a blob's decoded JSON ``value`` that ``ref.path`` names, or
    ``BlobRefError`` ``missing_field`` naming the reference's place ``where``."""
    current = value
    for i, seg in enumerate(ref.path):
        if isinstance(seg, str):
            ok = isinstance(current, Mapping) and seg in current
        else:
            ok = isinstance(current, list) and seg < len(current)
        if not ok:
            shown = json_path("output", ref.path[: i + 1])
            raise BlobRefError(
                ErrorInfo(
                    code="missing_field",
                    message=f"{where}: the stored value {ref.digest[:15]}… has no {shown} "
                    "(the template selected a field the blob's value does not have)",
                    path=where,
                    details={"blob": ref.digest, "path": list(ref.path)},
                )
            )
        current = current[seg]
    return current


def describe(ref: BlobRef) -> str:
    """How people see a reference: ``<blob sha256:1a2b3c4d… 10.0 MB application/json>``."""
    size = float(ref.bytes)
    unit = "B"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            break
        size /= 1000
    shown = f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
    tail = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in ref.path)
    return f"<blob {ref.digest[:15]}… {shown} {ref.media_type}{tail}>"


def readable(value: Any) -> Any:
    """``value`` with every well-formed reference replaced by :func:`describe`'s text
    (for people; malformed ones are left as they are)."""
    try:
        found = find_refs(value)
    except BlobRefError:
        return value
    return replace_refs(value, {path: describe(ref) for path, ref in found})
