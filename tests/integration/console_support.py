"""A real stack (nats-server, SQLite, the five services) with the console served over
real HTTP on a free port: what the console's API and browser tests share."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from nats.errors import ConnectionClosedError

from loom_console.server import ConsoleServer
from loom_core.contracts import Plan, RunRequest, ToolStep
from loom_infra.client import LoomClient
from loom_infra.settings import Settings, StoreSettings
from loom_services.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BOUND_S = 10.0

# approval.yaml's form: a boolean that must be given and a note of at most 200 characters
APPROVAL = (EXAMPLES / "approval.yaml").read_text()

FORK_PLAN = Plan(
    name="forkable",
    steps=[
        ToolStep(id="a", tool="math", input={"op": "add", "a": 1, "b": 1}),
        ToolStep(
            id="b",
            tool="math",
            depends_on=["a"],
            input={"op": "mul", "a": "{{ steps.a.output.result }}", "b": 10},
        ),
        ToolStep(id="c", tool="text", input={"text": "{{ input.name }}", "op": "upper"}),
    ],
    output={"b": "{{ steps.b.output.result }}", "c": "{{ steps.c.output.result }}"},
)


def fork_request() -> RunRequest:
    return RunRequest(plan=FORK_PLAN, input={"name": "ada"}, labels={"team": "blue"})


@dataclass
class Console:
    stack: LocalStack
    client: LoomClient  # the test's own operator connection (submits, waits)
    server: ConsoleServer
    http: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def csrf(self) -> dict[str, str]:
        return {"X-Loom-CSRF": self.server.console.csrf}

    async def post(self, path: str, body: object) -> httpx.Response:
        return await self.http.post(path, json=body, headers=self.csrf)


@contextlib.asynccontextmanager
async def serving(store: StoreSettings) -> AsyncIterator[Console]:
    """The stack on ``store`` and the console in front of it, on a free port."""
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=store)
    async with LocalStack(settings, nats_port=-1) as stack, await stack.client() as client:
        await client.wait_ready()
        console_client = await stack.client()
        try:
            async with (
                ConsoleServer(console_client, port=0) as server,
                httpx.AsyncClient(base_url=server.url, timeout=BOUND_S) as http,
            ):
                yield Console(stack, client, server, http)
        finally:
            with contextlib.suppress(ConnectionClosedError):  # a test may close it
                await console_client.close()


@pytest.fixture(name="console")
async def console_fixture(sqlite_store_settings: StoreSettings) -> AsyncIterator[Console]:
    async with serving(sqlite_store_settings) as console:
        yield console
