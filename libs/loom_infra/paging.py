"""Pages that always fit in one NATS message.

A read reply (a run's events, a trace's spans) is filled item by item up to a count
*and* a byte budget well under the connection's ``max_payload``, so a reply too large
to send cannot be built: the reader asks for the next page with the cursor the reply
gives. One item bigger than the budget is still sent, alone, when it fits the message;
only an item that could never be sent (alone over ``max_payload``) is refused, and the
caller answers with a typed error naming it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

# Room left for the reply's envelope around the items (its type tag, run id, error
# and cursor fields): ids are short, so this is generous; a quarter of a (test-sized)
# tiny max_payload at most.
ENVELOPE = 8 * 1024


def envelope(max_payload: int) -> int:
    return min(ENVELOPE, max_payload // 4)


def budget(max_payload: int) -> int:
    """Bytes of items one page carries: well under ``max_payload`` (an eighth spare,
    at least the envelope), so a page never sits at the edge of what NATS accepts."""
    return max(1, max_payload - max(envelope(max_payload), max_payload // 8))


def alone_limit(max_payload: int) -> int:
    """The largest item that can still travel alone in one reply."""
    return max(1, max_payload - envelope(max_payload))


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    # something follows the last item (the reader asks again after it)
    more: bool
    # the first item and its size, when it alone could never be sent (items is empty)
    too_large: tuple[T, int] | None = None


def fill(items: Iterable[T], size: Callable[[T], int], *, limit: int, max_payload: int) -> Page[T]:
    """Take ``items`` in order until ``limit`` of them or the byte budget of
    ``max_payload`` is reached. ``items`` may be lazy (a store read chunk by chunk): at
    most one item past the page is drawn, to tell whether more follow."""
    cap = budget(max_payload)
    it = iter(items)
    taken: list[T] = []
    used = 0
    for item in it:
        n = size(item) + 1  # the comma that separates items in a JSON array
        if not taken and n > cap:
            if n > alone_limit(max_payload):
                return Page([], more=True, too_large=(item, n))
            return Page([item], more=_peek(it))
        if used + n > cap:
            return Page(taken, more=True)
        taken.append(item)
        used += n
        if len(taken) >= limit:
            return Page(taken, more=_peek(it))
    return Page(taken, more=False)


_END = object()


def _peek(it: Iterator[T]) -> bool:
    return next(it, _END) is not _END


# ----------------------------------------------------------------------------- cursors
# A keyset cursor names the last item a page held by its sort key, never by an offset:
# items added or removed before it do not shift what the next page starts with. It is
# opaque to readers (pass ``next_after`` back unchanged); the version prefix lets a
# later layout be told from this one.
_KEYSET = "k1."


def keyset_cursor(number: int, ident: str) -> str:
    """An opaque cursor for the sort key ``(number, ident)``."""
    raw = json.dumps([number, ident], separators=(",", ":")).encode()
    return _KEYSET + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_keyset_cursor(cursor: str) -> tuple[int, str]:
    """The sort key of a :func:`keyset_cursor`; ValueError when it is not one."""
    if not cursor.startswith(_KEYSET) or len(cursor) > 4096:
        raise ValueError(cursor)
    body = cursor[len(_KEYSET) :]
    try:
        key = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(cursor) from None
    if (
        not isinstance(key, list)
        or len(key) != 2
        or type(key[0]) is not int
        or not isinstance(key[1], str)
    ):
        raise ValueError(cursor)
    return key[0], key[1]
