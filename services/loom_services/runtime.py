"""How a service runs: one connection, the streams it needs, its tasks, a health
responder, and a clean stop. The same code runs a service alone
(``python -m loom_services.<name>``) and all five in one process (``loom up``).

Each service connects as its own NATS identity (``Settings.seed_file_for``), so in one
process too every service holds only its own rights. An authenticated service never
creates streams: it waits (bounded) for the provisioning step (``provision``, run with
the ``admin`` key by ``loom up``/``LocalStack`` and by the Kubernetes Job) to have made
them. Only a connection without credentials (an insecure development server, where
anyone may do anything anyway) provisions for itself.
"""

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

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from loom_core import routes
from loom_core.contracts import Ping, Pong
from loom_core.errors import LoomError
from loom_infra import blobstore, bus, collector, credentials, endpoints, ownership
from loom_infra.httpserver import HealthServer
from loom_infra.settings import (
    BlobSettings,
    OpsSettings,
    Settings,
    SettingsError,
    blob_settings_from_env,
    log_level_from_env,
    ops_settings_from_env,
    settings_from_env,
)
from loom_services import observe, schedules, shared_admission, shared_rates

log = logging.getLogger("loom.runtime")

STREAMS_WAIT_S = 60.0  # then exit: Kubernetes restarts the pod, the Job may be late


@dataclass
class ServiceContext:
    nc: NATS
    js: JetStreamContext
    settings: Settings
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # where a request the client got wrong is recorded, off the request path
    rejects: bus.RejectRecorder | None = None

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        self.tasks.append(asyncio.ensure_future(coro))
        self.tasks[-1].set_name(name)


class Service(Protocol):
    @property
    def name(self) -> str:  # its route identity too, unless it says otherwise with ``identity``
        ...

    async def start(self, ctx: ServiceContext) -> None: ...

    async def close(self) -> None: ...


async def serve_health(ctx: ServiceContext, service: str) -> None:
    instance = f"{socket.gethostname()}:{os.getpid()}"

    async def answer(msg: Msg, ping: Ping) -> Pong:
        return Pong(service=service, instance=instance)

    await endpoints.serve(ctx.nc, None, routes.HEALTH, service, answer)  # type: ignore[arg-type]  # service is a str; HEALTH accepts every identity


class Stack:
    """Services sharing one event loop, each with its own NATS connection (so one
    service's slow callback never blocks another's)."""

    def __init__(self, services: Sequence[Service], settings: Settings) -> None:
        self.services = list(services)
        self.settings = settings
        self.stop = asyncio.Event()
        self.contexts: list[ServiceContext] = []
        ops = settings.ops
        # LOOM_HTTP_PORT=0: no endpoint (``loom up`` runs without one unless it is set)
        self.health = HealthServer(ops.http_host, ops.http_port) if ops.http_port else None
        self.started = False

    async def _starting(self) -> str | None:
        return None if self.started else "starting (connecting, waiting for streams)"

    async def start(self) -> None:
        # ack waits and consumer creation for every consumer the services make (read
        # at start by the settings module; bus reads nothing itself)
        bus.configure(self.settings.delivery)
        if self.health is not None:
            # up first: /livez answers and /readyz says why not while the start waits
            self.health.add_check("stack", self._starting)
            await self.health.start()
        for service in self.services:
            identity = identity_of(service)
            seed = self.settings.seed_file_for(identity)
            if seed is None and not self.settings.insecure:
                log.warning(
                    "%s: no NATS credentials (no LOOM_NKEY_SEED_FILE, no %s): connecting "
                    "without authentication, which only an insecure server accepts",
                    identity,
                    self.settings.credentials_dir / f"{identity}.nk",
                )
            nc = await bus.connect(
                self.settings.nats_url, name=f"loom-{service.name}", seed=seed, identity=identity
            )
            js = nc.jetstream()
            if seed is None:
                await bus.ensure_streams(js, self.settings.ops)
                await blobstore.ensure_bucket(
                    js, self.settings.blobs, self.settings.ops.stream_replicas
                )
                await schedules.ensure_bucket(js, self.settings.ops.stream_replicas)
                await ownership.ensure_bucket(js, replicas=self.settings.ops.stream_replicas)
                await shared_admission.ensure_bucket(js, self.settings.ops.stream_replicas)
                await shared_rates.ensure_bucket(js, self.settings.ops.stream_replicas)
            else:
                await wait_for_streams(js, credentials.streams_of(identity), identity)
            ctx = ServiceContext(nc=nc, js=js, settings=self.settings, stop=self.stop)
            ctx.rejects = bus.RejectRecorder(js, identity, self.settings.ops.rejects_queue)
            ctx.spawn(ctx.rejects.run(self.stop), f"{service.name}-rejects")
            await service.start(ctx)
            if service.name in routes.SERVICES:  # not the relay run alone: no route of its own
                await serve_health(ctx, service.name)
            if self.health is not None:
                observe.watch_service(
                    self.health, service.name, identity, nc, js, ctx.tasks, self.stop
                )
                observe.watch_internals(self.health, service.name, service, self.settings.ops)
            self.contexts.append(ctx)
            log.info("%s started", service.name)
        freeze_startup_objects()
        self.started = True

    async def close(self) -> None:
        self.stop.set()
        if self.health is not None:
            await self.health.close()
        # A stop is bounded like everything else: whatever does not end in time is
        # named in the log, and the stop goes on.
        tasks = [task for ctx in self.contexts for task in ctx.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=CLOSE_STEP_S)
            for task in done:  # retrieve outcomes: no "exception never retrieved"
                if not task.cancelled():
                    task.exception()
            if pending:
                names = ", ".join(sorted(t.get_name() for t in pending))
                log.warning("tasks still running %.0fs after cancel: %s", CLOSE_STEP_S, names)
        for service in self.services:
            await _bounded(service.close(), f"{service.name} close")
        for ctx in self.contexts:
            # Every task is stopped and its acks were sent: flush and close (a drain
            # would wait on pull subscriptions whose fetches were just cancelled).
            with contextlib.suppress(Exception):
                await ctx.nc.flush(timeout=2)
            await _bounded(ctx.nc.close(), "NATS close")
        self.contexts.clear()


CLOSE_STEP_S = 10.0


def freeze_startup_objects() -> None:
    """Move everything alive after the start (modules, classes, functions: ~200k objects
    once MCP, Qdrant, NumPy and pydantic are imported) out of the garbage collector's
    sight. They live as long as the process, yet every full collection walked them:
    145 ms each, a stall of every run and 0.1-0.2 ms of CPU per step at 50 runs. Frozen,
    a full collection walks only what the runs create (3 ms). Objects created later are
    collected as usual; a cycle among frozen objects is never freed (they are the
    process's own, kept anyway). Through ``loom_infra.collector``, which then knows the
    heap is frozen without walking it at every large load."""
    collector.freeze_heap()


async def _bounded(step: Awaitable[None], what: str) -> None:
    try:
        await asyncio.wait_for(step, CLOSE_STEP_S)
    except TimeoutError:
        log.warning("%s did not finish in %.0fs; stopping anyway", what, CLOSE_STEP_S)
    except Exception as exc:  # a failing close must not stop the others
        log.debug("%s failed: %r", what, exc)


def identity_of(service: Service) -> str:
    return getattr(service, "identity", service.name)


class ProvisioningError(LoomError, RuntimeError):
    """A stream a service needs does not exist (or may not be looked at)."""

    code = "stream_missing"


async def wait_for_streams(
    js: JetStreamContext, streams: Sequence[str], who: str, timeout: float = STREAMS_WAIT_S
) -> None:
    """Until every stream in ``streams`` exists, at most ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    warned: set[str] = set()
    for stream in streams:
        while True:
            try:
                await js.stream_info(stream)
                break
            except NotFoundError:
                reason = "does not exist yet"
            except TimeoutError:
                # a denied JetStream call looks like this; the refusal is logged above
                reason = "cannot be looked up (no answer: a permission refusal?)"
            if loop.time() > deadline:
                raise ProvisioningError(
                    f"{who}: stream {stream} {reason} after {timeout:.0f}s: provision the "
                    "streams with the admin key (`loom provision`; `loom up` does it)"
                )
            if stream not in warned:
                warned.add(stream)
                log.warning("%s: waiting for stream %s, which %s", who, stream, reason)
            await asyncio.sleep(0.5)  # poll interval of a bounded wait for the provisioner


async def provision(
    url: str,
    seed: str | os.PathLike[str] | None,
    ops: OpsSettings | None = None,
    blobs: BlobSettings | None = None,
) -> None:
    """Create or update every stream and the tool bucket, as ``admin`` (the only
    identity allowed to; None: an insecure server). An existing stream keeps what an
    operator set (``bus.merge_stream``). ``ops``: retention limits, default from the
    environment (``LOOM_RUNS_MAX_AGE_DAYS``, ...)."""
    ops = ops or ops_settings_from_env()
    nc = await bus.connect(
        url, "loom-provision", persistent=False, seed=seed, identity=credentials.ADMIN
    )
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js, ops)
        await bus.ensure_tools_bucket(js, ops.stream_replicas)
        await bus.ensure_model_answers_bucket(js, ops.stream_replicas)
        await schedules.ensure_bucket(js, ops.stream_replicas)
        await blobstore.ensure_bucket(js, blobs or blob_settings_from_env(), ops.stream_replicas)
        await ownership.ensure_bucket(js, replicas=ops.stream_replicas)
        await shared_admission.ensure_bucket(js, ops.stream_replicas)
        await shared_rates.ensure_bucket(js, ops.stream_replicas)
    finally:
        await nc.close()


def configure_logging() -> None:
    logging.basicConfig(
        level=log_level_from_env(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_main(factory: Callable[[Settings], Sequence[Service]]) -> None:
    """Entry point of ``python -m loom_services.<name>``: run until SIGINT/SIGTERM. A
    setting with a bad value is one logged line naming it, exit 2 (no traceback)."""
    try:
        configure_logging()
        settings = settings_from_env()
    except SettingsError as exc:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log.error("cannot start: %s; fix it and start again", exc)
        raise SystemExit(2) from None
    if settings.insecure:
        log.warning("LOOM_INSECURE is set: connecting to NATS without credentials")

    async def main() -> None:
        stack = Stack(factory(settings), settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stack.stop.set)
        # a stop signal during start (NATS unreachable, streams not provisioned yet)
        # ends the wait instead of being ignored until the start gives up
        starting = asyncio.ensure_future(stack.start())
        stopping = asyncio.ensure_future(stack.stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            await stack.close()
            return
        try:
            starting.result()
        except (ProvisioningError, FileNotFoundError, nats.errors.Error) as exc:
            # a refused key, a missing seed file or missing streams: say which, no traceback
            log.error("cannot start: %s", str(exc) or type(exc).__name__)
            await stack.close()
            raise SystemExit(1) from None
        print(f"ready: {', '.join(s.name for s in stack.services)}", flush=True)
        await stack.stop.wait()
        await stack.close()

    try:
        asyncio.run(main())
    except SettingsError as exc:  # one read when a service is built (OTEL_* for tracing)
        log.error("cannot start: %s; fix it and start again", exc)
        raise SystemExit(2) from None
