"""The tracing service moving from its old durable (``tracing``, an ack per event) to
``tracing-fold`` (one ack per fold batch, AckPolicy.ALL; issue 10, traceack), on a real
nats-server and SQLite: the new durable starts right after the old one's ack floor and
deletes it; events the old one had acked are not taken again, events it had not are
folded (those already folded, harmlessly: the fold skips a seq it holds) and none are
skipped. And the tracing identity may read and delete the old durable, nothing more.

Synchronisation: on the runs' events and on the read model polled within a bound."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from tests.integration.waiting import eventually

from loom_core import routes, subjects
from loom_core.contracts import Plan, RunRequest, SpanRecord, ToolStep
from loom_infra import credentials
from loom_infra.client import LoomClient
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings, StoreSettings
from loom_services.executor import ExecutorService
from loom_services.planner import PlannerService
from loom_services.runtime import Stack
from loom_services.toolrunner import ToolRunnerService
from loom_services.tracing import FOLD_DURABLE, TracingService

pytestmark = pytest.mark.integration

STREAM = subjects.RUN_EVENTS_STREAM
PLAN = Plan(steps=[
    ToolStep(id="a", tool="echo", input={"message": "one"}),
    ToolStep(id="b", tool="echo", input={"message": "two"}, depends_on=["a"]),
])  # fmt: skip


@pytest.fixture
async def engine(
    tmp_path: Path, sqlite_store_settings: StoreSettings
) -> AsyncIterator[tuple[Settings, LoomClient]]:
    """Every service but tracing (each test starts and stops it)."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    settings = Settings(nats_url=server.url, store=sqlite_store_settings, insecure=True)
    stack = Stack(
        [ExecutorService(settings), PlannerService(settings), ToolRunnerService(settings)],
        settings,
    )
    await stack.start()
    try:
        async with await LoomClient.connect(server.url) as client:
            await client.wait_ready(["executor", "planner", "toolrunner"])
            yield settings, client
    finally:
        await stack.close()
        server.stop()


async def _runs(client: LoomClient, n: int) -> list[str]:
    ids = [(await client.submit(RunRequest(plan=PLAN))).run_id for _ in range(n)]
    for run_id in ids:
        assert (await client.wait(run_id, timeout=20))[-1].kind == "run_completed"
    return ids


async def _traced(settings: Settings, client: LoomClient, runs: list[str]) -> Stack:
    """A started tracing service, once it has folded every one of ``runs`` to its end."""
    tracing = Stack([TracingService(settings)], settings)
    await tracing.start()
    await client.wait_ready(["tracing"])

    async def folded() -> bool:
        have = {r.run_id: r.status for r in await client.runs(limit=100)}
        return all(have.get(r) == "completed" for r in runs)

    await eventually(folded, "every run folded to its end", bound_s=20.0)
    return tracing


def _key(spans: list[SpanRecord]) -> list[tuple[str, str, str, str]]:
    return sorted((s.span_id, s.name, s.status, str(s.attributes)) for s in spans)


async def test_the_new_durable_takes_over_after_the_old_ones_ack_floor(
    engine: tuple[Settings, LoomClient],
) -> None:
    settings, client = engine
    assert FOLD_DURABLE == "tracing-fold" and FOLD_DURABLE != "tracing"
    first = await _runs(client, 3)
    tracing = await _traced(settings, client, first)
    before = {r: _key(await client.trace(r)) for r in first}
    await tracing.close()
    js = client.js
    # what the previous version leaves: its durable with explicit acks, acked up to a
    # floor in the middle of what was folded; no tracing-fold yet
    await js.delete_consumer(STREAM, FOLD_DURABLE)
    await js.add_consumer(STREAM, ConsumerConfig(
        durable_name="tracing", ack_policy=AckPolicy.EXPLICIT, filter_subject="loom.run.>",
    ))  # fmt: skip
    stored = (await js.stream_info(STREAM)).state.last_seq
    floor = stored // 2
    old = await js.pull_subscribe_bind("tracing", STREAM)
    acked = 0
    while acked < floor:
        for msg in await old.fetch(floor - acked, timeout=5.0):
            await msg.ack_sync()
            acked += 1
    await old.unsubscribe()
    assert (await js.consumer_info(STREAM, "tracing")).ack_floor.stream_seq == floor
    second = await _runs(client, 2)  # stored while no tracing ran: none may be skipped

    tracing = await _traced(settings, client, second)
    try:
        info = await js.consumer_info(STREAM, FOLD_DURABLE)
        assert info.config.ack_policy == AckPolicy.ALL
        assert info.config.deliver_policy == DeliverPolicy.BY_START_SEQUENCE
        assert info.config.opt_start_seq == floor + 1  # nothing the old one acked again
        with pytest.raises(NotFoundError):
            await js.consumer_info(STREAM, "tracing")
        last = (await js.stream_info(STREAM)).state.last_seq

        async def settled() -> bool:
            now = await js.consumer_info(STREAM, FOLD_DURABLE)
            return now.ack_floor.stream_seq == last and now.num_ack_pending == 0

        await eventually(settled, "every event after the floor folded and acked")
        # folded again after the floor (the first runs' later events): the same traces
        for run_id in first:
            assert _key(await client.trace(run_id)) == before[run_id]
        # the runs it had never seen: whole, and what a rebuild from the executor gives
        for run_id in second:
            live = _key(await client.trace(run_id))
            assert live and live == _key(await client.trace(run_id, rebuild=True))
        letters = await js.stream_info(subjects.DLQ_STREAM)
        assert letters.state.messages == 0  # nothing refused, nothing out of deliveries
    finally:
        await tracing.close()


def test_the_tracing_identity_may_read_and_delete_the_durable_it_took_over() -> None:
    assert routes.replaced_durables() == {(STREAM, "tracing"): "tracing"}
    rights = credentials.permissions("tracing").publish
    assert f"$JS.API.CONSUMER.INFO.{STREAM}.tracing" in rights
    assert f"$JS.API.CONSUMER.DELETE.{STREAM}.tracing" in rights
    # not consume from, create or ack it: only its ack floor read, then deleted
    assert not any(r.endswith(f".{STREAM}.tracing") and ("CREATE" in r or "NEXT" in r)
                   for r in rights)  # fmt: skip
    assert f"$JS.ACK.{STREAM}.tracing.>" not in rights
    assert f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{FOLD_DURABLE}" in rights
    for other in ("executor", "planner", "toolrunner", "memory", "client", "operator"):
        assert f"$JS.API.CONSUMER.DELETE.{STREAM}.tracing" not in (
            credentials.permissions(other).publish
        )
