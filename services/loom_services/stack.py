"""The whole system on one machine: an embedded nats-server (JetStream, fsync always),
the store on SQLite (or PostgreSQL by configuration) and the five services: executor,
planner and tool-runner in this process, the read models (tracing, memory) each in a
child process of its own (``LOOM_READ_MODELS=process``, the default;
``loom_services.readmodels``) or in this one too (``inline``).

This is what ``loom up`` and ``loom demo`` run; on Kubernetes each service runs alone
(``python -m loom_services.<name>``) against shared infrastructure instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from loom_core import tenancy
from loom_infra import cpu_priority
from loom_infra.client import LoomClient
from loom_infra.credentials import (
    ADMIN,
    IDENTITIES,
    Credentials,
    ensure_credentials,
    tenant_identities,
)
from loom_infra.datalock import DataDirLock
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import ReadModelsMode, Settings, check_read_models, service_process_env
from loom_services.executor import ExecutorService
from loom_services.memory import MemoryService
from loom_services.planner import PlannerService
from loom_services.readmodels import READ_MODELS, ReadModelProcess
from loom_services.runtime import Service, Stack, provision
from loom_services.toolrunner import ToolRunnerService
from loom_services.tracing import TracingService

log = logging.getLogger("loom.stack")


SERVICES: dict[str, Callable[[Settings], Service]] = {
    "executor": ExecutorService,
    "planner": PlannerService,
    "toolrunner": ToolRunnerService,
    "memory": MemoryService,
    "tracing": TracingService,
}


def all_services(settings: Settings, leave_out: Collection[str] = ()) -> Sequence[Service]:
    """The services of one process, all five unless some are ``leave_out`` (those are
    not even built: a read model opens its stores when built)."""
    return [make(settings) for name, make in SERVICES.items() if name not in leave_out]


class LocalStack:
    """``async with LocalStack(settings) as stack:`` — NATS + all services, ready.

    Secure by default: nkey seeds for every identity are generated (or reused) in
    ``settings.credentials_dir`` (``{data_dir}/creds``), the embedded server admits only
    those keys with the permissions generated from the route registry, the streams are
    provisioned with the ``admin`` key, and each service connects with its own key.
    ``secure=False`` (or ``settings.insecure``) runs everything without authentication,
    loudly logged. ``await stack.client()`` is a ``LoomClient`` connected as ``operator``.

    ``read_models`` (default ``settings.read_models``, ``LOOM_READ_MODELS``): ``process``
    runs tracing and memory each in a child process (``self.children``), ``inline`` in
    this one (``self.stack.services`` then holds all five). ``without``: services not run
    at all (a benchmark's ablation, or a tool-runner started elsewhere); the stack does
    not wait for them to be ready.
    """

    def __init__(
        self,
        settings: Settings,
        nats_port: int = 4222,
        embedded_nats: bool = True,
        secure: bool | None = None,
        read_models: ReadModelsMode | str | None = None,
        without: Collection[str] = (),
    ) -> None:
        self.read_models = check_read_models(
            settings.read_models if read_models is None else read_models
        )
        unknown = set(without) - set(SERVICES)
        if unknown:
            raise ValueError(f"without: no such service {sorted(unknown)}; one of {list(SERVICES)}")
        self.without = frozenset(without)
        self.children: dict[str, ReadModelProcess] = {}
        self.secure = not settings.insecure if secure is None else secure
        # every service of this process picks its own seed from the directory, never
        # a process-wide LOOM_NKEY_SEED_FILE (that names one identity)
        self.settings = dataclasses.replace(
            settings,
            nkey_seed_file=None,
            creds_dir=settings.credentials_dir,
            insecure=not self.secure,
        )
        self.credentials: Credentials | None = None
        if self.secure:
            # the platform's identities and each tenant's users (LOOM_TENANTS)
            identities = (*IDENTITIES, *tenant_identities(settings.tenants))
            if embedded_nats:
                self.credentials = ensure_credentials(self.settings.credentials_dir, identities)
            else:  # someone else's server: its keys must already be here
                self.credentials = Credentials(self.settings.credentials_dir, identities)
        # one embedded stack per data dir: a second would share its SQLite files and
        # JetStream store with another nats-server
        self.lock = DataDirLock(Path(settings.store.data_dir)) if embedded_nats else None
        self.nats: EmbeddedNats | None = None
        if embedded_nats:
            self.nats = EmbeddedNats(
                data_dir=Path(settings.store.data_dir) / "nats",
                port=nats_port,
                max_payload=max(1024 * 1024, settings.max_payload * 2),
                authorization=self.credentials.authorization() if self.credentials else None,
            )
        self.stack: Stack | None = None

    async def __aenter__(self) -> LocalStack:
        if self.lock is not None:
            self.lock.acquire()
        if self.nats is not None:
            try:
                self.nats.start()
            except BaseException:
                await self.close()
                raise
            self.settings = dataclasses.replace(self.settings, nats_url=self.nats.url)
        if not self.secure:
            log.warning(
                "INSECURE development mode: NATS at %s accepts any connection with every "
                "right; any local process can say any fact (drop --insecure/LOOM_INSECURE "
                "to run with per-service credentials)",
                self.settings.nats_url,
            )
        apart = READ_MODELS if self.read_models == "process" else ()
        self.stack = Stack(all_services(self.settings, {*apart, *self.without}), self.settings)
        try:
            admin = self.seed_file(ADMIN)
            if admin is None or admin.exists():  # an external server may be provisioned
                await provision(self.settings.nats_url, admin, blobs=self.settings.blobs)
            # the children start (Python, imports: the other core) while this process
            # starts its own services
            for name in apart:
                if name not in self.without:
                    await self._start_child(name)
            await self.stack.start()
            async with await self.client() as client:
                for child in self.children.values():
                    await child.wait_ready(client)
                await client.wait_ready([s for s in SERVICES if s not in self.without])
        except BaseException:
            await self.close()
            raise
        return self

    async def _start_child(self, name: str) -> None:
        env = service_process_env(self.settings, self.seed_file(name))
        nice = self.settings.read_models_nice
        # tracing's folds come in bursts: SCHED_IDLE while it keeps up, where the child
        # may leave it when it falls behind (loom_infra.cpu_priority); memory also
        # answers recalls on a step's path, so it keeps the normal policy
        idle = (
            name == "tracing"
            and nice > 0
            and cpu_priority.may_leave_idle(min(19, os.nice(0) + nice))
        )
        child = self.children[name] = ReadModelProcess(name, env, nice, idle)
        await child.start()
        if self.stack is not None and self.stack.health is not None:
            self.stack.health.add_check(f"{name}-process", child.problem)

    async def close(self) -> None:
        # the children first (side by side, each bounded): a read model asks the
        # executor (tracing catches up from its store), which must still answer; then
        # this process's services; the NATS server last
        stops = [child.close() for child in self.children.values()]
        for failed in await asyncio.gather(*stops, return_exceptions=True):
            if isinstance(failed, BaseException):  # the stop goes on: services, NATS, lock
                log.warning("stopping a read model's process: %r", failed)
        self.children.clear()
        if self.stack is not None:
            await self.stack.close()
            self.stack = None
        if self.nats is not None:
            self.nats.stop()
        if self.lock is not None:
            self.lock.release()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return self.settings.nats_url

    def seed_file(self, identity: str) -> Path | None:
        """The seed file of ``identity`` (None when running without credentials)."""
        return self.credentials.seed_file(identity) if self.credentials else None

    async def client(
        self, identity: str = "operator", tenant: str | None = None, **options: Any
    ) -> LoomClient:
        """A ``LoomClient`` connected as ``identity`` (``operator`` by default; e.g.
        ``client`` for the submit-only user), of ``tenant`` if given (one of
        ``settings.tenants``)."""
        user = identity if tenant is None else tenancy.user(identity, tenant)
        return await LoomClient.connect(
            self.url, seed=self.seed_file(user), identity=identity, tenant=tenant, **options
        )
