"""Services listen only through the route registry (``loom_core.routes``).

- ``serve``: answer a request route. One reply style everywhere: the request is decoded
  as the route's message type; the handler returns a reply Struct; anything that goes
  wrong (a malformed request, a store error, a bug, an answer over ``max_payload``)
  becomes the route's error reply, a reply whose ``error`` is a typed ErrorInfo. A
  malformed request is also recorded, off the request path, with the other client
  mistakes (``loom.rejects.{service}``, bounded), apart from real poison in the
  dead-letter stream. No caller ever waits for a timeout because a service could not
  answer.
- ``durable``: a JetStream pull consumer built from a route's consumer declaration (its
  stream, durable name and event filters), so a service cannot consume what the
  registry does not say it consumes.
- ``subscribe``: a plain subscription declared on a route (broadcasts, cancellations).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from loom_core import codec, partitions
from loom_core.contracts import ErrorInfo
from loom_core.errors import LoomError
from loom_core.routes import Consumer, Identity, Route
from loom_infra import bus
from loom_infra.store import StoreError

log = logging.getLogger("loom.endpoints")

Q = TypeVar("Q")
R = TypeVar("R")


class ServiceError(LoomError):
    """Raised by a handler to answer with this typed error instead of a result."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def error_reply(route: Route, error: ErrorInfo) -> msgspec.Struct:
    """The route's reply that carries ``error`` (every other field at its default)."""
    for reply in reversed(route.replies):
        if "error" in reply.__struct_fields__:
            return reply(error=error)
    raise TypeError(f"route {route.name}: no reply type has an `error` field")


def _declared(route: Route, identity: Identity, durable: str | None = None) -> Consumer:
    try:
        return route.consumer(identity, durable)
    except KeyError:
        raise LookupError(
            f"{identity} is not declared as a consumer of route {route.name} "
            f"(durable={durable}); declare it in loom_core/routes.py"
        ) from None


async def serve(
    nc: NATS,
    rejects: bus.RejectRecorder | None,
    route: Route,
    identity: Identity,
    handle: Callable[[Msg, Any], Awaitable[msgspec.Struct]],
    **subscribe: Any,
) -> Any:
    """Answer ``route`` as ``identity`` (in its declared queue group)."""
    consumer = _declared(route, identity)
    request_type = route.messages[0]

    async def answer(msg: Msg) -> None:
        reply = await _reply(msg)
        data = codec.encode(reply)
        limit = nc.max_payload
        if limit and len(data) > limit:
            # NATS would refuse to send it and the asker would only see a timeout.
            data = codec.encode(
                error_reply(
                    route,
                    ErrorInfo(
                        code="reply_too_large",
                        message=f"the answer is {len(data)} bytes, over the NATS max_payload "
                        f"of {limit} bytes: ask for less (a lower limit, a page at a time)",
                        details={"bytes": len(data), "max_payload": limit},
                    ),
                )
            )
        if msg.reply:
            await msg.respond(data)

    async def _reply(msg: Msg) -> msgspec.Struct:
        try:
            request = codec.decode(msg.data, request_type)
        except Exception as exc:
            error = bus.decode_error_info(exc)
            if rejects is not None:  # a caller's mistake: recorded off the request path
                rejects.offer(msg.subject, error, msg.data)
            return error_reply(route, error)
        try:
            return await handle(msg, request)
        except LoomError as exc:  # a typed failure (ServiceError, StoreError, ...): as is
            if isinstance(exc, StoreError):
                log.warning("%s: store error on %s: %s", identity, msg.subject, exc)
            return error_reply(route, exc.info)
        except Exception as exc:
            log.exception("%s failed on %s", identity, msg.subject)
            retryable = bool(getattr(exc, "retryable", False))
            return error_reply(
                route,
                ErrorInfo(
                    code="internal_error",
                    message=f"{identity} could not answer ({type(exc).__name__}); retry, and "
                    "if it persists read that service's log",
                    retryable=retryable,
                ),
            )

    # the plain subject and, on a tenant-scoped route, every tenant's twin
    subs = [
        await nc.subscribe(subject, queue=consumer.queue or "", cb=answer, **subscribe)
        for subject in route.filters(consumer)
    ]
    return subs[0] if len(subs) == 1 else subs


def durable(
    js: JetStreamContext,
    route: Route,
    identity: Identity,
    name: str,
    **options: Any,
) -> bus.PullConsumer:
    """The pull consumer ``identity`` declared on ``route`` under durable ``name``."""
    consumer = _declared(route, identity, name)
    assert route.stream is not None, route.name
    return bus.PullConsumer(
        js=js,
        service=identity,
        stream=route.stream,
        durable=name,
        filter_subjects=route.filters(consumer),
        replaces=consumer.replaces,
        **options,
    )


def inbox_consumer(
    js: JetStreamContext, routes: tuple[Route, ...], partition: int, **options: Any
) -> bus.PullConsumer:
    """The executor's durable consumer of one partition of every inbox route (each route
    its own filter, as the stream stores it: ``loom.inbox.{partition}.*.{source}``)."""
    names = {r.consumer("executor").durable for r in routes}
    streams = {r.stream for r in routes}
    assert len(names) == 1 and len(streams) == 1, (names, streams)
    durable = (names.pop() or "").format(partition=partition)
    return bus.PullConsumer(
        js=js,
        service="executor",
        stream=streams.pop() or "",
        durable=durable,
        filter_subjects=[partitions.stored_filter(r.wildcard, partition) for r in routes],
        **options,
    )


async def subscribe(
    nc: NATS,
    route: Route,
    identity: Identity,
    cb: Callable[[Msg], Awaitable[None]],
    events: tuple[type[msgspec.Struct], ...] = (),
) -> list[Any]:
    """Plain subscriptions ``identity`` declared on ``route`` (one per event filter), in
    the declared queue group if any."""
    consumer = _plain(route, identity, events)
    return [
        await nc.subscribe(s, queue=consumer.queue or "", cb=cb) for s in route.filters(consumer)
    ]


def _plain(route: Route, identity: Identity, events: tuple[type[msgspec.Struct], ...]) -> Consumer:
    """The plain (not durable) subscription ``identity`` declares on ``route`` (with
    ``events``: the one taking exactly those event types)."""
    consumer = next(
        (c for c in route.consumers if c.identity == identity and not c.durable
         and (not events or c.events == events)),
        None,
    )  # fmt: skip
    if consumer is None:
        raise LookupError(f"{identity} has no plain subscription declared on {route.name}")
    return consumer


async def listen(
    nc: NATS, route: Route, identity: Identity, cb: Callable[[Msg], Awaitable[None]]
) -> Any:
    """Subscribe ``cb`` to a request route as declared (its subject and queue group), for
    handlers that decode and answer themselves (submit, control, resume)."""
    consumer = _declared(route, identity)
    subs = [
        await nc.subscribe(subject, queue=consumer.queue or "", cb=cb)
        for subject in route.filters(consumer)
    ]
    return subs[0] if len(subs) == 1 else subs


async def stream_copies(
    nc: NATS,
    route: Route,
    identity: Identity,
    cb: Callable[[Msg], Awaitable[None]],
    events: tuple[type[msgspec.Struct], ...] = (),
) -> list[Any]:
    """The plain subscription ``identity`` declares on a stream route beside its durable
    consumer (in its declared queue group): each publish as it reaches the server, before
    the stream has stored it and before the pull consumer hands it over (issue 10: a
    latency shortcut, ``LOOM_DIRECT_DISPATCH``). The durable consumer still delivers
    every message: it stays the fallback that survives crashes, and ``cb`` must make
    the two deliveries one. ``cb`` runs on the connection's delivery task: it must not
    wait for long."""
    if route.stream is None:
        raise LookupError(f"{route.name} is not a stream route: it has no stream copies")
    return await subscribe(nc, route, identity, cb, events)
