"""Tool requests and results taken from their publish (LOOM_DIRECT_DISPATCH, issue 10):
the tool-runner starts a call from the relay's publish, the executor records a result
(and the planner's verdict, and a model turn) from its sender's publish, and each
stream copy, which always follows, is settled as that handling was: every call runs
once, is recorded once, nothing is dead-lettered or left unacked. With two tool-runner
replicas the stream copy of a publish one of them took usually reaches the other, which
puts it back instead of running the call again. With the setting off, the streams alone
carry them, as before."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from waiting import eventually  # type: ignore[import-not-found]

from loom_core import codec, routes, subjects
from loom_core.contracts import (
    EventRecord,
    InboxReceipt,
    Plan,
    PlanProposed,
    RunCompleted,
    RunRequest,
    ToolCallCompleted,
    ToolCallRequested,
    ToolResult,
    ToolStep,
)
from loom_infra import bus
from loom_infra.client import LoomClient
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings, StoreSettings
from loom_services.executor import ExecutorService
from loom_services.memory import MemoryService
from loom_services.planner import PlannerService
from loom_services.runtime import Stack
from loom_services.toolrunner import ToolRunnerService, ledger_key
from loom_services.tools import (
    ToolContext,
    ToolInput,
    ToolOutput,
    ToolRegistry,
    default_registry,
    tool,
)
from loom_services.tracing import TracingService

pytestmark = pytest.mark.integration

RAN: list[str] = []
STEPS = 12


class TickIn(ToolInput):
    n: int = 0


class TickOut(ToolOutput):
    n: int


@tool("tick", "Counts its executions by idempotency key (test tool).")
async def tick(args: TickIn, ctx: ToolContext) -> TickOut:
    RAN.append(ctx.idempotency_key)
    return TickOut(n=args.n + 1)


def registry() -> ToolRegistry:
    reg = default_registry()
    reg.register(tick)
    return reg


def chain() -> Plan:
    return Plan(
        steps=[
            ToolStep(id=f"s{i}", tool="tick", depends_on=[f"s{i - 1}"] if i else [])
            for i in range(STEPS)
        ]
    )


@dataclasses.dataclass
class Running:
    url: str
    executor: ExecutorService
    runners: list[ToolRunnerService]


async def stack_of(
    tmp_path: Path, store: StoreSettings, replicas: int, direct: bool
) -> AsyncIterator[Running]:
    RAN.clear()
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    settings = Settings(nats_url=server.url, store=store, direct_dispatch=direct)
    executor = ExecutorService(settings)
    runners = [ToolRunnerService(settings, registry=registry()) for _ in range(replicas)]
    stack = Stack(
        [executor, PlannerService(settings), *runners, MemoryService(settings),
         TracingService(settings)],
        settings,
    )  # fmt: skip
    await stack.start()
    try:
        yield Running(server.url, executor, runners)
    finally:
        await stack.close()
        server.stop()


@pytest.fixture(params=[True, False], ids=["direct", "streams-only"])
async def one_runner(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_store_settings: StoreSettings
) -> AsyncIterator[Running]:
    async for running in stack_of(tmp_path, sqlite_store_settings, 1, request.param):
        yield running


def direct_stack(replicas: int) -> Any:
    """A fixture: the stack with direct dispatch on and ``replicas`` tool-runners."""

    @pytest.fixture
    async def running(
        tmp_path: Path, sqlite_store_settings: StoreSettings
    ) -> AsyncIterator[Running]:
        async for each in stack_of(tmp_path, sqlite_store_settings, replicas, True):
            yield each

    return running


two_runners = direct_stack(2)
direct_runner = direct_stack(1)


async def settled(client: LoomClient) -> None:
    """Every stream copy acked (none waiting or to be redelivered), and no dead letter."""

    async def quiet() -> bool:
        # the tool-runner's durable, and the executor's one per partition it owns
        infos = [await client.js.consumer_info(subjects.RUN_EVENTS_STREAM, "toolrunner")]
        infos += [
            info
            for info in await client.js.consumers_info(subjects.INBOX_STREAM)
            if (info.name or "").startswith("executor-p")
        ]
        assert len(infos) > 1, "no executor partition consumer"
        return not any(info.num_ack_pending or info.num_pending for info in infos)

    await eventually(quiet, "the tool-runner's and the executor's consumers to settle")
    dlq = await client.js.stream_info(subjects.DLQ_STREAM)
    assert dlq.state.messages == 0


async def run_chain(client: LoomClient) -> list[ToolCallCompleted]:
    accepted = await client.submit(RunRequest(plan=chain()))
    records = await client.wait(accepted.run_id, timeout=60)
    assert isinstance(records[-1].event, RunCompleted), records[-1]
    return [r.event for r in records if isinstance(r.event, ToolCallCompleted)]


async def test_each_call_runs_and_is_recorded_once(one_runner: Running) -> None:
    async with await LoomClient.connect(one_runner.url) as client:
        completed = await run_chain(client)
        await settled(client)
    keys = [c.idempotency_key for c in completed]
    assert len(keys) == STEPS and sorted(RAN) == sorted(keys)  # once each, recorded once
    (runner,) = one_runner.runners
    direct = runner.settings.direct_dispatch
    # with direct dispatch every request and result was taken from its publish
    assert runner.from_publish == (STEPS if direct else 0)
    assert runner.put_back == 0  # it saw every dispatch: no stream copy waited
    # each stream copy was known by its dispatch's bytes and settled without a task
    assert runner.copies_known == (STEPS if direct else 0)
    assert one_runner.executor.results_from_publish == (STEPS if direct else 0)
    # so was the planner's verdict (the run's start)
    assert one_runner.executor.answers_from_publish == ({"plan": 1} if direct else {})
    assert not one_runner.executor.taken  # every stream copy came and was settled
    # with direct dispatch the results were stored by the executor before it answered
    # the runner: none was written to the inbox stream
    async with await LoomClient.connect(one_runner.url) as client:
        info = await client.js.stream_info(subjects.INBOX_STREAM, "loom.inbox.*.*.tool")
    assert sum((info.state.subjects or {}).values()) == (0 if direct else STEPS)
    # the verdict's stream copy stays stored: the durable path a restart reads
    async with await LoomClient.connect(one_runner.url) as client:
        info = await client.js.stream_info(subjects.INBOX_STREAM, "loom.inbox.*.*.plan")
    assert sum((info.state.subjects or {}).values()) == 1


async def test_two_replicas_run_each_call_once(two_runners: Running) -> None:
    async with await LoomClient.connect(two_runners.url) as client:
        completed = await run_chain(client)
        await settled(client)
    keys = [c.idempotency_key for c in completed]
    assert sorted(RAN) == sorted(keys)
    assert sum(r.from_publish for r in two_runners.runners) == STEPS


async def test_a_call_the_run_stored_has_no_ledger_entry_and_a_copy_runs_nothing(
    direct_runner: Running,
) -> None:
    """An idempotent call whose result the run stored (the direct receipt said so) is not
    written to the ledger: the run's store holds it. Another copy of its request (as a
    redelivery after a lost ack, to a runner that does not remember answering it) then
    finds no entry, asks the run, which has the result, and runs nothing, sends nothing,
    dead-letters nothing. A call answered through the
    inbox stream is still recorded (``test_a_request_decided_again_...``)."""
    (runner,) = direct_runner.runners
    async with await LoomClient.connect(direct_runner.url) as client:
        accepted = await client.submit(RunRequest(plan=chain()))
        records = await client.wait(accepted.run_id, timeout=60)
        assert isinstance(records[-1].event, RunCompleted), records[-1]
        await settled(client)
        requested = [r for r in records if isinstance(r.event, ToolCallRequested)]
        assert len(requested) == STEPS
        for r in requested:
            key = ledger_key(r.run_id, r.event)
            assert runner.ledger.get(key) is None, key  # the run holds it, not the ledger
        again = requested[5]
        assert isinstance(again.event, ToolCallRequested)
        runner.answered.clear()  # as a restarted runner, which remembers no answer
        await client.js.publish(
            subjects.run_event(again.run_id, "tool_call_requested"),
            codec.encode(again),
            headers={subjects.MSG_ID: f"{again.event.idempotency_key}/again"},
        )
        await eventually(lambda: runner.put_back == 1, "the copy to be put back once")
        await settled(client)  # redelivered, asked the run, acked: nothing dead-lettered
        assert [r.seq for r in await client.events(again.run_id)] == [r.seq for r in records]
    assert RAN.count(again.event.idempotency_key) == 1


@pytest.mark.parametrize("redispatch", ["sent", "lost"])
async def test_a_dispatched_request_whose_commit_failed_is_answered_once_stored(
    direct_runner: Running, redispatch: str
) -> None:
    """The executor dispatches a request before its commit; here that commit fails once
    (injected), after the runner got the dispatch. The runner answers it, the run refuses
    that result (it never stored the request), the executor decides the request again and
    stores it. Whether that second dispatch reaches the runner (it is answered from the
    ledger, after asking the run) or is lost (the stream copy of the stored request is
    not the event first dispatched, so it is answered the same way, not acked as done),
    the run gets its result: every step recorded once, nothing stuck."""
    executor = direct_runner.executor
    store = executor.host.store
    append, dispatch = store.append, executor.host.before_commit
    assert dispatch is not None
    failed: list[str] = []

    def failing_append(records: list) -> list[int]:  # type: ignore[type-arg]
        steps = {r.event.step_id for r in records if type(r.event).__name__ == "ToolCallRequested"}
        if "s3" in steps and not failed:
            failed.append("s3")
            raise RuntimeError("injected: the commit of s3's request failed")
        return append(records)

    async def dispatch_unless_lost(records: list) -> None:  # type: ignore[type-arg]
        if failed and redispatch == "lost":
            return
        await dispatch(records)

    store.append = failing_append  # type: ignore[method-assign]
    executor.host.before_commit = dispatch_unless_lost
    async with await LoomClient.connect(direct_runner.url) as client:
        completed = await run_chain(client)
        await eventually(lambda: not executor.taken, "the executor's stream copies to settle")
    assert failed == ["s3"]
    steps = [c.step_id for c in completed]
    assert sorted(steps) == sorted(f"s{i}" for i in range(STEPS))  # each recorded once
    keys = {c.step_id: c.idempotency_key for c in completed}
    assert RAN.count(keys["s3"]) in (1, 2)  # idempotent: a second run is allowed, no more
    assert all(RAN.count(keys[s]) == 1 for s in steps if s != "s3")


async def test_a_request_decided_again_is_answered_from_the_ledger(direct_runner: Running) -> None:
    """What the runner does when the event it answered from a dispatch is not the event
    stored: the executor dispatched a decision (decided at t1) whose commit failed, then
    decided and stored the same request again (at t2). Both the second dispatch and the
    stream copy of the stored event are answered again, from the ledger (the tool does
    not run again), because the run may have refused the first answer; the stream copy
    of the very event dispatched is acked as answered. Driven by hand on a run the
    executor does not know, so only the runner's rules are at work."""
    (runner,) = direct_runner.runners
    run_id = "run-redecided0000000001"
    key = f"{run_id}:s0:1"
    request = ToolCallRequested(
        step_id="s0", attempt=1, tool="tick", input={"n": 1}, idempotency_key=key
    )
    t1 = bus.now()
    first = EventRecord(run_id=run_id, seq=3, at=t1, event=request)
    again = EventRecord(run_id=run_id, seq=3, at=t1 + timedelta(milliseconds=2), event=request)
    async with await LoomClient.connect(direct_runner.url) as client:
        results = await client.nc.subscribe(subjects.inbox(run_id, "tool"))

        async def result() -> ToolResult:
            return codec.decode((await results.next_msg(timeout=10)).data, ToolResult)

        dispatch = routes.TOOL_DISPATCH.subject(run_id=run_id)
        stored = subjects.run_event(run_id, "tool_call_requested")
        await client.nc.publish(dispatch, codec.encode(first))
        assert (await result()).idempotency_key == key  # ran once, from the dispatch
        await eventually(lambda: bool(runner.answered), "the runner to remember its answer")
        # the stored event is another decision: answered again, from the ledger
        await client.js.publish(stored, codec.encode(again), headers={subjects.MSG_ID: "a"})
        resent = await result()
        await eventually(lambda: not runner.handling, "the runner to finish that answer")
        # a second dispatch of the first decision's key: answered again too
        await client.nc.publish(dispatch, codec.encode(again))
        resent_again = await result()
        assert resent.output == resent_again.output == {"n": 2}
        assert RAN.count(key) == 1  # the tool ran once; the answers came from the ledger
        await results.unsubscribe()


async def test_a_result_sent_straight_is_checked_like_an_inbox_message(
    direct_runner: Running,
) -> None:
    """What a careless or hostile sender gets on the direct result route: a typed
    receipt saying why nothing was recorded (the tool-runner would then publish to the
    inbox stream, where a refusal is dead-lettered); the run is not touched."""
    async with await LoomClient.connect(direct_runner.url) as client:
        accepted = await client.submit(RunRequest(plan=chain()))
        run_id = accepted.run_id
        await client.wait(run_id, timeout=60)

        async def receipt(data: bytes, run: str = run_id) -> InboxReceipt:
            reply = await client.nc.request(
                routes.TOOL_RESULT.subject(run_id=run), data, timeout=10
            )
            return codec.decode(reply.data, InboxReceipt)

        now = bus.now()
        result = ToolResult(
            run_id=run_id, step_id="s0", attempt=1, idempotency_key=f"{run_id}:s0:1",
            ok=True, output={"n": 1}, started_at=now, finished_at=now,
        )  # fmt: skip
        cases = {
            b"{not json": "malformed_json",
            codec.encode(PlanProposed(run_id=run_id, plan=chain())): "wrong_subject",
            codec.encode(result): "unexpected_message",  # the run is over: not waited for
        }
        for data, code in cases.items():
            got = await receipt(data)
            assert not got.recorded and got.error is not None, got
            assert got.error.code == code, got.error
        other = await receipt(codec.encode(result), run="run-someone0000000000else")
        assert other.error is not None and other.error.code == "wrong_subject"
        assert other.error.path == "$.run_id"
        before = await client.events(run_id)
        assert [r.seq for r in await client.events(run_id)] == [r.seq for r in before]


async def test_a_result_whose_writer_never_answers_goes_to_the_inbox_within_the_ack_wait(
    tmp_path: Path, sqlite_store_settings: StoreSettings
) -> None:
    """A writer killed after it took a direct result never sends the receipt. The
    tool-runner then publishes the result to the inbox stream after waiting no longer
    than the executor's ack wait (0.15 s with the documented 100 ms settings; it was a
    fixed 1 s, the slowest part of such an executor's recovery)."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", port=-1).start()
    base = Settings(nats_url=server.url, store=sqlite_store_settings, direct_dispatch=True)
    settings = dataclasses.replace(
        base, delivery=dataclasses.replace(base.delivery, ack_wait_s=0.15)
    )
    runner = ToolRunnerService(settings, registry=registry())
    stack = Stack([runner], settings)
    await stack.start()
    try:
        async with await LoomClient.connect(server.url) as client:
            run_id = "run-writerkilled000000000"
            taken = await client.nc.subscribe(routes.TOOL_RESULT.subject(run_id=run_id))
            await client.nc.flush()  # the server knows the writer before the result goes
            now = bus.now()
            result = ToolResult(
                run_id=run_id, step_id="s0", attempt=1, idempotency_key=f"{run_id}:s0:1",
                ok=True, output={"n": 1}, started_at=now, finished_at=now,
            )  # fmt: skip
            t0 = time.monotonic()
            assert not await runner._recorded_directly(result)  # the inbox stream takes it
            waited = time.monotonic() - t0
            assert (await taken.next_msg(timeout=5)).data  # the writer did take it
            assert 0.1 <= waited < 0.9, waited  # its ack wait, not the 1 s cap
    finally:
        await stack.close()
        server.stop()
