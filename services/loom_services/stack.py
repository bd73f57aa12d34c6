"""The whole system in one process: an embedded nats-server (JetStream, fsync always),
the store on SQLite (or PostgreSQL by configuration) and the five services.

This is what ``loom up`` and ``loom demo`` run; on Kubernetes each service runs alone
(``python -m loom_services.<name>``) against shared infrastructure instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from loom_infra.client import LoomClient
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings
from loom_services.executor import ExecutorService
from loom_services.memory import MemoryService
from loom_services.planner import PlannerService
from loom_services.runtime import Service, Stack
from loom_services.toolrunner import ToolRunnerService
from loom_services.tracing import TracingService


def all_services(settings: Settings) -> Sequence[Service]:
    return [
        ExecutorService(settings),
        PlannerService(settings),
        ToolRunnerService(settings),
        MemoryService(settings),
        TracingService(settings),
    ]


class LocalStack:
    """``async with LocalStack(settings) as stack:`` — NATS + all services, ready."""

    def __init__(
        self,
        settings: Settings,
        nats_port: int = 4222,
        embedded_nats: bool = True,
    ) -> None:
        self.nats: EmbeddedNats | None = None
        if embedded_nats:
            self.nats = EmbeddedNats(
                data_dir=Path(settings.store.data_dir) / "nats",
                port=nats_port,
                max_payload=max(1024 * 1024, settings.max_payload * 2),
            )
        self.settings = settings
        self.stack: Stack | None = None

    async def __aenter__(self) -> LocalStack:
        if self.nats is not None:
            self.nats.start()
            self.settings = dataclasses.replace(self.settings, nats_url=self.nats.url)
        self.stack = Stack(all_services(self.settings), self.settings)
        try:
            await self.stack.start()
            async with await LoomClient.connect(self.settings.nats_url) as client:
                await client.wait_ready()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        if self.stack is not None:
            await self.stack.close()
            self.stack = None
        if self.nats is not None:
            self.nats.stop()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return self.settings.nats_url
