"""The tool-runner: executes ``tool_call_requested`` events, exactly once per
idempotency key, and answers the run's inbox with a ``ToolResult``.

Exactly-once effects over at-least-once delivery (DESIGN decision 5):
1. for a tool that is not idempotent, the key is *claimed* in the ledger (a unique
   insert: one claimant wins, across replicas and restarts) before the tool runs;
   an idempotent tool runs first and records claim + result in one commit (a race
   can run it twice, which is harmless by definition, and the first result stands);
2. the result is stored in the ledger, then published with ``Nats-Msg-Id`` =
   ``result:{key}``, then the message is acked.
A redelivered request whose key is finished re-sends the stored result without running
anything. One whose key is claimed but unfinished means the runner that claimed it died
mid-call: an idempotent tool runs again; a non-idempotent one is never re-run, the run
gets an ``ambiguous_outcome`` error instead.

Long calls send ``in_progress`` to JetStream so the request is not redelivered while it
still runs.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import socket
import uuid

from nats.aio.msg import Msg

from loom_core import codec, routes, subjects
from loom_core.contracts import ErrorInfo, ToolCallCancelled, ToolCallRequested, ToolResult
from loom_infra import bus
from loom_infra.blocking import Blocking
from loom_infra.settings import Settings, SettingsError
from loom_infra.store import ToolCallLedger, open_tool_ledger
from loom_services.runtime import ServiceContext, run_main
from loom_services.tools.registry import (
    ToolContext,
    ToolOutcome,
    ToolRegistry,
    ToolSettings,
    default_registry,
    execute_tool,
)

log = logging.getLogger("loom.toolrunner")

# How long a call may go without a heartbeat before JetStream re-dispatches it to another
# runner (a runner that died mid-call is detected this way). Heartbeats go every third.
ACK_WAIT_S = float(os.environ.get("LOOM_TOOL_ACK_WAIT_S", "6"))
# Tool calls one runner process runs at once (each acked when it ends).
MAX_CONCURRENT_CALLS = int(os.environ.get("LOOM_TOOL_CONCURRENCY", "64"))


class ToolRunnerService:
    name = "toolrunner"

    def __init__(
        self,
        settings: Settings,
        registry: ToolRegistry | None = None,
        ledger: ToolCallLedger | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or default_registry()
        for module in settings.tool_modules:
            load_tools(self.registry, module)
        self.ledger = ledger or open_tool_ledger(settings.store)
        self.io = Blocking("toolrunner-ledger")
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.tool_settings = ToolSettings(http_allow_private=tuple(settings.http_allow_private))
        self.inflight: dict[str, asyncio.Future[ToolOutcome]] = {}
        self.cancelled: set[str] = set()
        self.executed = 0

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        kv = await bus.ensure_tools_bucket(ctx.js)
        for spec in self.registry.specs():
            await kv.put(spec.name, codec.encode(spec))
        consumer = bus.PullConsumer(
            js=ctx.js,
            service=self.name,
            stream=subjects.RUN_EVENTS_STREAM,
            durable="toolrunner",
            filter_subjects=[subjects.events_of_kind("tool_call_requested")],
            message_handler=self._one,
            concurrency=MAX_CONCURRENT_CALLS,
            batch=64,
            ack_wait_s=ACK_WAIT_S,
        )
        ctx.spawn(consumer.run(ctx.stop), "toolrunner-requests")
        # Every replica hears cancellations (no queue group): only the one running the
        # call has something to stop.
        await ctx.nc.subscribe(
            subjects.events_of_kind("tool_call_cancelled"), cb=self.on_cancelled
        )

    async def close(self) -> None:
        await self.io.close()
        self.ledger.close()

    async def _one(self, msg: Msg) -> bool | BaseException:
        try:
            record, request = bus.expect_event(msg, ToolCallRequested)
        except bus.Poison as poison:
            return poison
        key = request.idempotency_key
        if key in self.inflight:
            return True  # this process is running it; that task will answer
        try:
            result = await self._result_for(record.run_id, request, msg)
            await self.ctx.js.publish(
                routes.inbox_subject(result),
                codec.encode(result),
                headers={subjects.MSG_ID: f"result:{key}"},
            )
        except Exception as exc:
            log.warning("tool call %s will be retried: %r", key, exc)
            return exc
        return True

    async def _result_for(self, run_id: str, request: ToolCallRequested, msg: Msg) -> ToolResult:
        key = request.idempotency_key
        entry = await self.io(self.ledger.get, key)
        tool = self.registry.get(request.tool)
        idempotent = tool is None or tool.idempotent  # unknown tools only yield an error
        if entry is None and idempotent:
            # Running twice is harmless: skip the claim, record claim + result at once.
            result = await self._execute(run_id, request, msg)
            if await self.io(
                self.ledger.record, key, self.owner, result.started_at, codec.encode(result)
            ):
                return result
            entry = await self.io(self.ledger.get, key)
            if entry is None or entry.result is None:
                return result  # the other claimant has not finished; ours is as good
        elif entry is None:
            claimed = await self.io(self.ledger.claim, key, self.owner, bus.now())
            if claimed:
                result = await self._execute(run_id, request, msg)
                await self.io(self.ledger.finish, key, codec.encode(result))
                return result
            entry = await self.io(self.ledger.get, key)
        assert entry is not None
        if entry.status == "finished" and entry.result is not None:
            return codec.decode(entry.result, ToolResult)
        # Claimed but never finished: whoever claimed it stopped mid-call.
        if idempotent:
            result = await self._execute(run_id, request, msg)
            await self.io(self.ledger.finish, key, codec.encode(result))
            return result
        now = bus.now()
        result = ToolResult(
            run_id=run_id,
            step_id=request.step_id,
            attempt=request.attempt,
            idempotency_key=key,
            ok=False,
            started_at=entry.claimed_at,
            finished_at=now,
            error=ErrorInfo(
                code="ambiguous_outcome",
                message=f"the tool-runner that started '{request.tool}' ({entry.owner}) "
                "stopped before recording a result; the tool is not idempotent, so it was "
                "not run again. Check its effect by hand.",
                details={"owner": entry.owner},
            ),
        )
        await self.io(self.ledger.finish, key, codec.encode(result))
        return result

    async def _execute(self, run_id: str, request: ToolCallRequested, msg: Msg) -> ToolResult:
        key = request.idempotency_key
        ctx = ToolContext(
            idempotency_key=key,
            run_id=run_id,
            step_id=request.step_id,
            attempt=request.attempt,
            settings=self.tool_settings,
            resume=request.resume,
        )
        call = asyncio.ensure_future(
            execute_tool(self.registry, request.tool, request.input, ctx, request.timeout_s)
        )
        self.inflight[key] = call
        heartbeat = asyncio.ensure_future(_heartbeat(msg))
        started = bus.now()
        try:
            outcome = await call
        except asyncio.CancelledError:
            if key not in self.cancelled:
                raise  # the service is stopping, not the call
            outcome = ToolOutcome(
                ok=False,
                error=ErrorInfo(code="cancelled", message="the run cancelled this call"),
            )
        finally:
            heartbeat.cancel()
            self.inflight.pop(key, None)
            self.cancelled.discard(key)
        result = ToolResult(
            run_id=run_id,
            step_id=request.step_id,
            attempt=request.attempt,
            idempotency_key=key,
            ok=outcome.ok,
            started_at=started,
            finished_at=bus.now(),
            output=outcome.output,
            error=outcome.error,
            suspend=outcome.suspend,
        )
        self.executed += 1
        return result


    async def on_cancelled(self, msg: Msg) -> None:
        try:
            _, event = bus.expect_event(msg, ToolCallCancelled)
        except bus.Poison:
            return
        call = self.inflight.get(event.idempotency_key)
        if call is not None and not call.done():
            self.cancelled.add(event.idempotency_key)
            call.cancel()


def load_tools(registry: ToolRegistry, module: str) -> None:
    """Registered Python callables: ``module.register(registry)`` adds its tools.
    The module is named by the operator (LOOM_TOOL_MODULES), never by a plan."""
    register = getattr(importlib.import_module(module), "register", None)
    if not callable(register):
        raise SettingsError(
            "LOOM_TOOL_MODULES", f"module {module!r} has no register(registry) function"
        )
    register(registry)


async def _heartbeat(msg: Msg) -> None:
    while True:
        await asyncio.sleep(ACK_WAIT_S / 3)  # a timer, not synchronisation
        await msg.in_progress()


def main() -> None:
    run_main(lambda settings: [ToolRunnerService(settings)])


if __name__ == "__main__":
    main()
