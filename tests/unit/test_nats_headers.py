"""The faster header parse returns what nats-py's own returns, for any input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from loom_infra import nats_headers

# the bytes that matter to the parse, often: separators, whitespace of every kind
# (str.isspace is true for \x1c-\x1f too), colons, non-ASCII and broken UTF-8
PIECES = st.sampled_from(
    [b"\r\n", b":", b": ", b" ", b"\t", b"\x0b", b"\x0c", b"\x1c", b"\x1f", b"\r", b"\n",
     b"Nats-Msg-Id", b"Loom-Event", b"v", b"\xc3\xa9", b"\xff", b"\xe2\x80\xa8", b""]
)  # fmt: skip
BLOCKS = st.lists(st.one_of(PIECES, st.binary(max_size=6)), max_size=30).map(b"".join)


@given(BLOCKS)
@settings(max_examples=2000)
def test_same_headers_as_nats_py(raw: bytes) -> None:
    assert nats_headers.parse_header_lines(raw) == nats_headers.ORIGINAL(raw)


def test_a_relay_header_block() -> None:
    raw = b"Nats-Msg-Id: run-1/3/ab\r\nLoom-Notification-Id: 7\r\nLoom-Event: step_started\r\n\r\n"
    expected = {
        "Nats-Msg-Id": "run-1/3/ab",
        "Loom-Notification-Id": "7",
        "Loom-Event": "step_started",
    }
    assert nats_headers.parse_header_lines(raw) == expected == nats_headers.ORIGINAL(raw)


def test_installed_on_the_client() -> None:
    from nats.aio.client import Client

    import loom_infra.bus  # noqa: F401  # installs it

    assert Client._parse_header_lines is nats_headers.parse_header_lines
