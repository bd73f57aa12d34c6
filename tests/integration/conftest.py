"""Fixtures for tests against real servers: a real nats-server (JetStream) per test and
the five services in this process on SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from loom_infra import bus
from loom_infra.client import LoomClient
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings, StoreSettings
from loom_services.stack import LocalStack


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Any]:
    """A plain connection to ``nats_server`` with the stack's streams created (a test
    module may define its own ``nc``: a service's connection, streams of its own)."""
    conn = await nats.connect(nats_server.url)
    await bus.ensure_streams(conn.jetstream())
    yield conn
    await conn.close()


@pytest.fixture
async def js(nats_server: EmbeddedNats) -> AsyncIterator[Any]:
    """A JetStream context on ``nats_server`` with the stack's streams created."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    yield js
    await nc.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_store_settings")
    return request.getfixturevalue("pg_store_settings")


def make_settings(store: StoreSettings, **overrides: object) -> Settings:
    values: dict[str, object] = {"nats_url": "nats://127.0.0.1:4222", "store": store}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def stack(store_settings: StoreSettings) -> AsyncIterator[LocalStack]:
    async with LocalStack(
        make_settings(store_settings, max_payload=64 * 1024), nats_port=-1, read_models="inline"
    ) as s:
        yield s


@pytest.fixture
async def client(stack: LocalStack) -> AsyncIterator[LoomClient]:
    async with await stack.client() as c:
        yield c
