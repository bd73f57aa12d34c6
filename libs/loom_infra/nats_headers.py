"""A faster parse of NATS message headers for nats-py (issue 10).

nats-py 2.16 parses every received header block with ``Client._parse_header_lines``,
which tests each header name for whitespace one character at a time through a Python
generator (``any(c.isspace() for c in key)``): ~50 generator steps per message of the
relay's (its four loom headers plus JetStream's), 2-4 % of the executor's CPU per step.
``parse_header_lines`` returns exactly what that function returns, for every input (a
property test compares the two, ``tests/unit/test_nats_headers.py``), with the test done
by one ``str.split``. ``install`` puts it in place; nats-py is pinned exactly, and the
test fails first if an upgrade changes the original's behaviour.
"""

from __future__ import annotations

from nats.aio.client import Client

_CRLF = b"\r\n"

ORIGINAL = Client._parse_header_lines


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """``Name: Value`` per CRLF-separated line; lines without a colon, names that are not
    ASCII or hold whitespace are skipped; values are stripped and decoded as UTF-8 with
    replacement (as nats-py's own)."""
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        # whitespace inside the name (str.isspace, as the original tests each character)
        if key.split() != ([key] if key else []):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def install() -> None:
    Client._parse_header_lines = staticmethod(parse_header_lines)  # type: ignore[method-assign]  # nats-py's parser, replaced by an equivalent (module doc)
