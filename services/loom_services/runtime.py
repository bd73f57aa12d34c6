"""How a service runs: one connection, the streams it needs, its tasks, a health
responder, and a clean stop. The same code runs a service alone
(``python -m loom_services.<name>``) and all five in one process (``loom up``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from loom_core import codec, subjects
from loom_core.contracts import Pong
from loom_infra import bus
from loom_infra.settings import Settings, settings_from_env

log = logging.getLogger("loom.runtime")


@dataclass
class ServiceContext:
    nc: NATS
    js: JetStreamContext
    settings: Settings
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        self.tasks.append(asyncio.ensure_future(coro))
        self.tasks[-1].set_name(name)


class Service(Protocol):
    name: str

    async def start(self, ctx: ServiceContext) -> None: ...

    async def close(self) -> None: ...


async def serve_health(ctx: ServiceContext, service: str) -> None:
    instance = f"{socket.gethostname()}:{os.getpid()}"

    async def answer(msg: Msg) -> None:
        await msg.respond(codec.encode(Pong(service=service, instance=instance)))

    await ctx.nc.subscribe(subjects.health(service), queue=service, cb=answer)


class Stack:
    """Services sharing one event loop, each with its own NATS connection (so one
    service's slow callback never blocks another's)."""

    def __init__(self, services: Sequence[Service], settings: Settings) -> None:
        self.services = list(services)
        self.settings = settings
        self.stop = asyncio.Event()
        self.contexts: list[ServiceContext] = []

    async def start(self) -> None:
        for service in self.services:
            nc = await bus.connect(self.settings.nats_url, name=f"loom-{service.name}")
            js = nc.jetstream()
            await bus.ensure_streams(js)
            ctx = ServiceContext(nc=nc, js=js, settings=self.settings, stop=self.stop)
            await service.start(ctx)
            await serve_health(ctx, service.name)
            self.contexts.append(ctx)
            log.info("%s started", service.name)

    async def close(self) -> None:
        self.stop.set()
        for ctx in self.contexts:
            for task in ctx.tasks:
                task.cancel()
            for task in ctx.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for service in self.services:
            with contextlib.suppress(Exception):
                await service.close()
        for ctx in self.contexts:
            # Every task is stopped and its acks were sent: flush and close (a drain
            # would wait on pull subscriptions whose fetches were just cancelled).
            with contextlib.suppress(Exception):
                await ctx.nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await ctx.nc.close()
        self.contexts.clear()


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("LOOM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_main(factory: Callable[[Settings], Sequence[Service]]) -> None:
    """Entry point of ``python -m loom_services.<name>``: run until SIGINT/SIGTERM."""
    configure_logging()
    settings = settings_from_env()

    async def main() -> None:
        stack = Stack(factory(settings), settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stack.stop.set)
        await stack.start()
        print(f"ready: {', '.join(s.name for s in stack.services)}", flush=True)
        await stack.stop.wait()
        await stack.close()

    asyncio.run(main())
