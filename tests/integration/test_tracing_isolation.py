"""One bad run's events cannot hold up the tracing batch (issue 9.2, tracing part).

Reproduced on main first: a run holding an event too large for any reply (stored, over
the broker's max_payload, so the relay skipped it) made the tracing service's history
query fail; the failure failed the *whole fetched batch*, so every other run's events
in it were nak'ed, redelivered with the bad run's and finally dead-lettered as
``max_deliveries``: their traces never appeared. Now each run folds on its own: the
unreadable event is skipped (the run's trace goes on after it) and a run whose folding
fails only retries its own events.

A span-building crash is isolated too: a stored event that makes the span builder
raise is recorded as an error on the run's span, dead-lettered with the reason
(``span_build_failed``), and the run's later events and every other run fold on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js.api import DeliverPolicy
from tests.integration.waiting import eventually

from loom_core import subjects
from loom_core.contracts import (
    Plan,
    RunControl,
    RunRequest,
    RunSummary,
    SleepStep,
    ToolStep,
)
from loom_core.errors import LoomError
from loom_core.spans import TraceBuilder
from loom_infra.client import LoomClient
from loom_infra.cpu_priority import IdleWhileCaughtUp
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings, StoreSettings
from loom_services.executor import ExecutorService
from loom_services.planner import PlannerService
from loom_services.runtime import Stack
from loom_services.toolrunner import ToolRunnerService
from loom_services.tracing import FOLD_BATCH, TracingService

pytestmark = pytest.mark.integration

ECHO = Plan(steps=[ToolStep(id="a", tool="echo", input={"message": "ok"})])
GOOD_RUNS = 6


@pytest.fixture
async def engine(
    tmp_path: Path, sqlite_store_settings: StoreSettings
) -> AsyncIterator[tuple[Settings, ExecutorService, LoomClient]]:
    """Every service but tracing (started by each test once its runs are stored, so its
    first fetch holds all of them in one batch)."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    settings = Settings(nats_url=server.url, store=sqlite_store_settings, insecure=True)
    executor = ExecutorService(settings)
    stack = Stack([executor, PlannerService(settings), ToolRunnerService(settings)], settings)
    await stack.start()
    try:
        async with await LoomClient.connect(server.url) as client:
            await client.wait_ready(["executor", "planner", "toolrunner"])
            yield settings, executor, client
    finally:
        await stack.close()
        server.stop()


async def _good_runs(client: LoomClient) -> list[str]:
    ids = [(await client.submit(RunRequest(plan=ECHO))).run_id for _ in range(GOOD_RUNS)]
    for run_id in ids:
        assert (await client.wait(run_id, timeout=20))[-1].kind == "run_completed"
    return ids


async def _runs(client: LoomClient) -> dict[str, RunSummary]:
    return {r.run_id: r for r in await client.runs(limit=100)}


async def _dead_letters(client: LoomClient, service: str) -> list[dict[str, Any]]:
    sub = await client.js.subscribe(
        subjects.dead_letter(service), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    letters = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except TimeoutError:
                return letters
            letters.append(msgspec.json.decode(msg.data))
    finally:
        await sub.unsubscribe()


async def test_a_run_with_an_unreadable_event_does_not_hold_the_others(
    engine: tuple[Settings, ExecutorService, LoomClient],
) -> None:
    settings, executor, client = engine
    victim = (await client.submit(RunRequest(
        plan=Plan(steps=[SleepStep(id="nap", seconds=600)])
    ))).run_id  # fmt: skip
    async for record in client.follow(victim, timeout=20):
        if record.kind == "timer_started":
            break
    # Past every limit on purpose (the host, not the bus): a 1.5 MB pause reason is
    # stored and is over the broker's max_payload: the relay skips it, the run fails,
    # and the executor's events query cannot carry it either (event_too_large).
    await executor.host.submit(
        victim, RunControl(run_id=victim, action="pause", by="test", reason="r" * 1_500_000)
    )
    good = await _good_runs(client)
    history = await asyncio.to_thread(executor.store.load, victim)
    assert history[-1].kind == "run_failed"

    tracing = Stack([TracingService(settings)], settings)
    await tracing.start()
    try:
        await client.wait_ready(["tracing"])  # its queries are subscribed once it answers

        async def all_folded() -> dict[str, RunSummary] | None:
            runs = await _runs(client)
            done = all(runs.get(r) and runs[r].status == "completed" for r in good)
            return runs if done and victim in runs and runs[victim].status == "failed" else None

        runs = await eventually(all_folded, "every run's trace, the victim's too", bound_s=15)
        assert runs[victim].status == "failed"
        spans = await client.trace(victim)
        root = next(s for s in spans if s.parent_span_id is None)
        assert root.attributes.get("error.type") == "event_too_large"
        # nothing of the good runs was given up
        letters = await _dead_letters(client, "tracing")
        assert not any(letter["error"]["code"] == "max_deliveries" for letter in letters)
    finally:
        await tracing.close()


class _FragileBuilder(TraceBuilder):
    """A span builder with a bug that one kind of stored event triggers (a step id
    no plan can hold): how a span-building crash looks to the service."""

    def _dispatch(self, at: Any, event: Any) -> None:
        if getattr(event, "step_id", "") == "boom":
            raise KeyError("boom")
        super()._dispatch(at, event)


class _FragileTracing(TracingService):
    def _new_builder(self, run_id: str) -> TraceBuilder:
        return _FragileBuilder(run_id, options=self.options)


async def test_a_span_building_crash_is_recorded_and_the_rest_fold(
    engine: tuple[Settings, ExecutorService, LoomClient],
) -> None:
    settings, _, client = engine
    bad = (await client.submit(RunRequest(plan=Plan(steps=[
        ToolStep(id="boom", tool="echo", input={"message": "x"}),
        ToolStep(id="after", tool="echo", input={"message": "y"}, depends_on=["boom"]),
    ])))).run_id  # fmt: skip
    assert (await client.wait(bad, timeout=20))[-1].kind == "run_completed"
    good = await _good_runs(client)

    tracing = Stack([_FragileTracing(settings)], settings)
    await tracing.start()
    try:
        await client.wait_ready(["tracing"])  # its queries are subscribed once it answers

        async def all_folded() -> dict[str, RunSummary] | None:
            runs = await _runs(client)
            done = all(runs.get(r) and runs[r].status == "completed" for r in [*good, bad])
            return runs if done else None

        await eventually(all_folded, "every run folded, the bad one to its end", bound_s=15)
        spans = await client.trace(bad)
        root = next(s for s in spans if s.parent_span_id is None)
        failures = [e for e in root.events if e.name == "span_build_failed"]
        assert failures and failures[0].attributes["error.type"] == "KeyError"
        assert any(s.attributes.get("loom.step.id") == "after" for s in spans)
        letters = await _dead_letters(client, "tracing")
        codes = [letter["error"]["code"] for letter in letters]
        assert "span_build_failed" in codes and "max_deliveries" not in codes
        failed = next(x for x in letters if x["error"]["code"] == "span_build_failed")
        assert failed["error"]["details"]["run_id"] == bad
    finally:
        await tracing.close()


async def test_tracing_leaves_sched_idle_while_behind_and_returns_once_caught_up(
    engine: tuple[Settings, ExecutorService, LoomClient],
) -> None:
    """The embedded stack starts tracing under SCHED_IDLE (loom_infra.cpu_priority):
    a batch that says it is behind (a batch's worth still waiting, or events stored a
    second ago) must put it back on the normal policy, so a busy machine cannot starve
    it, and once it has caught up it idles again. The switch is recorded here, not
    made: this process is the test runner."""
    settings, _, client = engine
    runs = [(await client.submit(RunRequest(plan=ECHO))).run_id for _ in range(80)]
    histories = [await client.wait(run_id, timeout=20) for run_id in runs]
    assert all(h[-1].kind == "run_completed" for h in histories)
    assert sum(map(len, histories)) > 2 * FOLD_BATCH  # behind by more than a batch at first

    switched: list[bool] = []
    service = TracingService(settings)
    service.priority = IdleWhileCaughtUp(FOLD_BATCH, managed=True, switch=switched.append)
    tracing = Stack([service], settings)
    await tracing.start()
    try:
        await client.wait_ready(["tracing"])

        async def folded() -> bool:
            summaries = await _runs(client)
            return all(r in summaries and summaries[r].status == "completed" for r in runs)

        await eventually(folded, "every run's trace", bound_s=15)
        assert switched[0] is False, switched  # the normal policy while it was behind
        # a run now: its events are fresh and few, so tracing has caught up: idle
        runs.append((await client.submit(RunRequest(plan=ECHO))).run_id)
        await eventually(folded, "the last run's trace", bound_s=15)
        assert switched[-1] is True and service.priority.idle, switched
    finally:
        await tracing.close()


class _BehindTracing(TracingService):
    """A tracing service whose consumer has not reached any run yet (its first batch
    waits for ``go``): what a read model behind a busy machine looks like to a reader."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.go = asyncio.Event()

    async def on_events(self, msgs: Any) -> list[bool | BaseException]:
        await self.go.wait()
        return await super().on_events(msgs)


async def test_a_trace_read_before_the_consumer_reached_the_run_comes_from_the_executor(
    engine: tuple[Settings, ExecutorService, LoomClient],
) -> None:
    settings, _, client = engine
    run_id = (await client.submit(RunRequest(plan=ECHO))).run_id
    assert (await client.wait(run_id, timeout=20))[-1].kind == "run_completed"
    service = _BehindTracing(settings)
    tracing = Stack([service], settings)
    await tracing.start()
    try:
        await client.wait_ready(["tracing"])
        spans = await client.trace(run_id)
        assert any(s.name == "execute_tool echo" and s.end for s in spans)
        assert not service.go.is_set()  # the consumer folded nothing: the read did
        with pytest.raises(LoomError) as refused:  # a run no executor holds: still none
            await client.trace("run-held-nowhere")
        assert refused.value.info.code == "not_found"
    finally:
        service.go.set()
        await tracing.close()
