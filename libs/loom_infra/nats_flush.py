"""``flush()`` as a barrier again: a PING sent after what is pending, not before it.

nats-py 2.16's ``flush()`` (and ``rtt()``, and the keep-alive ping) sends its PING with
``Client._send_ping``, which writes it straight to the socket, while a ``subscribe`` or
``publish`` just before it sits in the connection's pending buffer until the flusher task
next runs. So the PING can reach the server first, the PONG can come back before the
server has read the SUB, and ``flush()`` returns with the subscription not yet there: a
message another connection publishes right after is not delivered to it. Measured here
(subscribe, flush, publish from a second connection, wait): 46 of 2,000 messages never
arrived. nats-py's own docstring promises the opposite ("ensuring what we have written so
far has made it to the server").

``install`` replaces ``_send_ping`` with one that appends the PING to the pending buffer
and kicks the flusher, so the server reads everything queued before it and answers only
then. ``tests/integration/test_flush_order.py`` fails without it; nats-py is pinned
exactly, and that test fails first if an upgrade changes the flusher.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import PING_PROTO, Client


async def send_ping_in_order(self: Client, future: asyncio.Future[bool] | None = None) -> None:
    """The PING queued behind what is pending (module doc); its PONG resolves ``future``
    as nats-py's own does (the read loop pops ``_pongs`` in order)."""
    if future is None:
        future = asyncio.get_running_loop().create_future()
    self._pongs.append(future)
    await self._send_command(PING_PROTO)
    await self._flush_pending()


def install() -> None:
    Client._send_ping = send_ping_in_order  # type: ignore[method-assign]  # nats-py's PING, sent in order (module doc)
