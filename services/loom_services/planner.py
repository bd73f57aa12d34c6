"""The planner: turns a run's request into a validated plan.

It consumes ``run_requested`` events and answers the run's inbox with ``PlanProposed``
or ``PlanRefused``. An explicit plan is validated against the live tool catalog (the
``loom_tools`` KV bucket the tool-runner fills) and the run's input, reporting every
problem at once. A natural-language request is planned by a model (``loom_services.
planning``: catalog and plan language in the prompt, validation errors fed back for a
bounded number of repairs); with no model configured it is refused with a message that
says what to configure.

It also answers every model turn of agent steps: ``model_call_requested`` events, one
model call each through the model layer (``loom_services.models``, litellm), answered
into the run's inbox as a ``ModelResult`` with every attempt, the usage and the cost.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from nats.aio.msg import Msg

from loom_core import codec, routes, subjects, tenancy
from loom_core.contracts import (
    ModelCallRequested,
    ModelChunk,
    ModelResult,
    Plan,
    PlanIssue,
    PlanProposed,
    PlanRefused,
    ReplanRequested,
    RunEventsQuery,
    RunEventsReply,
    RunRequested,
    ToolSpec,
)
from loom_core.errors import LoomError
from loom_core.executor import request_digest
from loom_core.quotas import NO_QUOTAS
from loom_core.tool_access import check_tool_access
from loom_core.validation import validate_plan
from loom_infra import bus, endpoints
from loom_infra.catalog_cache import CatalogCache
from loom_infra.secret_source import SecretSource
from loom_infra.settings import Settings
from loom_services.admission import load_quotas
from loom_services.conversations import (
    ConversationMissing,
    Conversations,
    ConversationUnavailable,
)
from loom_services.models import Answer, ModelConfig, ModelLayer
from loom_services.planning import plan_with_model, replan_with_model
from loom_services.runtime import ServiceContext, run_main
from loom_services.shared_rates import SharedRates
from loom_services.tenant_reads import TenantReads
from loom_services.throttle import CallThrottle, run_tenants

log = logging.getLogger("loom.planner")
ONCE_KEPT = 4096  # model answers kept for redeliveries of the same request


class CatalogUnavailable(LoomError):
    """No tool-runner has published its tools yet: retry later rather than reject."""

    code = "unavailable"
    retryable = True


class PlannerService:
    name: routes.Identity = "planner"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.kv: Any = None
        self.answers: Any = None  # model answers already paid for, by request digest
        self.reused = 0  # answers sent again from the bucket instead of the model
        self.models = ModelConfig.from_settings(settings)
        # model work by request digest: a redelivery while (or shortly after) it runs
        # reuses it instead of paying for the model again (bounded, newest kept)
        self._once: OrderedDict[str, asyncio.Task[Any]] = OrderedDict()
        self.layer = ModelLayer(self.models, SecretSource(settings.secrets))
        self.conversations = Conversations(self._run_events)

    # the tenants' model call rates (loom_services.throttle); none until started
    throttle = CallThrottle(NO_QUOTAS, "model")

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        # the tenant of a run, asked once: for its call rate and its streamed text
        self.tenant_runs = run_tenants(ctx.nc)
        self.throttle = CallThrottle(
            load_quotas(self.settings.quotas_file),
            "model",
            self.tenant_runs,
            shared=SharedRates(ctx.js),  # one rate across replicas (loom_services.shared_rates)
        )
        self.kv = await bus.ensure_tools_bucket(ctx.js)
        self.answers = await bus.ensure_model_answers_bucket(ctx.js)
        self.catalog = CatalogCache(self._read_catalog)  # one bucket read per second, not per run
        # a tenant's reads of the catalog, its runs' blobs and its dead letters
        await TenantReads(ctx, self.tool_catalog, self.tenant_runs).start()
        consumer = endpoints.durable(
            ctx.js, routes.RUN_EVENTS, self.name, "planner", handler=self.on_requests, batch=64
        )
        ctx.spawn(consumer.run(ctx.stop), "planner-requests")
        if self.models.configured:  # import litellm (~3 s) now, off the event loop
            ctx.spawn(asyncio.to_thread(ModelLayer.load), "planner-warm-up")
        turns = endpoints.durable(
            ctx.js, routes.RUN_EVENTS, self.name, "planner-models",
            message_handler=self.on_model_request, concurrency=64, batch=64,
        )  # fmt: skip
        ctx.spawn(turns.run(ctx.stop), "planner-models")
        replans = endpoints.durable(
            ctx.js, routes.RUN_EVENTS, self.name, "planner-replans",
            message_handler=self.on_replan_request, concurrency=8, batch=16,
        )  # fmt: skip
        ctx.spawn(replans.run(ctx.stop), "planner-replans")

    async def close(self) -> None:
        return None

    async def tool_catalog(self, fresh: bool = False) -> Mapping[str, ToolSpec]:
        return await self.catalog.get(fresh)

    async def _read_catalog(self) -> dict[str, ToolSpec]:
        try:
            keys = await self.kv.keys()
        except Exception as exc:  # nats-py raises NoKeysError on an empty bucket
            raise CatalogUnavailable("no tools registered yet") from exc
        specs = await asyncio.gather(*(self.kv.get(k) for k in keys))
        return {s.name: s for s in (codec.decode(e.value, ToolSpec) for e in specs if e.value)}

    async def once(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        task = self._once.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.ensure_future(work())
            self._once[key] = task
            while len(self._once) > ONCE_KEPT:
                self._once.popitem(last=False)
        return await asyncio.shield(task)

    async def tool_specs(self, names: Sequence[str]) -> list[ToolSpec]:
        """The specs of these tools, by direct gets (a model turn names a few tools; listing
        the whole bucket per turn costs a consumer each and fails under load). A tool the
        catalog does not hold is left out: the model cannot call it, and a call to it is
        refused by the executor as ``unknown_tool`` anyway."""

        async def one(name: str) -> ToolSpec | None:
            try:
                # the key, not the name: `demo.add` is stored as `demo/add`
                entry = await self.kv.get(bus.tool_key(name))
            except Exception:  # noqa: BLE001 (nats-py raises KeyNotFoundError; absent is fine)
                return None
            return codec.decode(entry.value, ToolSpec) if entry.value else None

        found = await asyncio.gather(*(one(n) for n in names))
        return [spec for spec in found if spec is not None]

    async def on_requests(self, msgs: Sequence[Msg]) -> list[bool | BaseException]:
        return list(await asyncio.gather(*(self._one(m) for m in msgs)))

    async def _one(self, msg: Msg) -> bool | BaseException:
        try:
            record, event = bus.expect_event(msg, RunRequested)
        except bus.Poison as poison:
            return poison
        try:
            key = f"plan:{request_digest(record.run_id, event)}"
            verdict = await _beating(msg, self.once(key, lambda: self.plan(record.run_id, event)))
        except CatalogUnavailable as exc:
            return exc
        # The verdict names the request it answers (a verdict on a forged request is
        # refused by the executor); no Nats-Msg-Id, which anyone could claim first.
        verdict = msgspec.structs.replace(
            verdict, request_digest=request_digest(record.run_id, event)
        )
        await bus.publish_acked(self.ctx.js, routes.inbox_subject(verdict), codec.encode(verdict))
        return True

    async def plan(self, run_id: str, event: RunRequested) -> PlanProposed | PlanRefused:
        if event.plan is None:
            if not self.models.configured or not event.request:
                return PlanRefused(run_id=run_id, issues=[self._no_model_issue()])
            catalog = await self.tool_catalog()
            plan, issues, record = await plan_with_model(
                self.layer, self.models.planner, event, catalog
            )
            if plan is None:
                return PlanRefused(run_id=run_id, issues=issues, planning=record)
            return PlanProposed(run_id=run_id, plan=plan, planner="model", planning=record)
        issues = self._check(event.plan, event, await self.tool_catalog())
        if any(issue.code == "unknown_tool" for issue in issues):  # registered since?
            issues = self._check(event.plan, event, await self.tool_catalog(fresh=True))
        if issues:
            return PlanRefused(run_id=run_id, issues=issues)
        return PlanProposed(run_id=run_id, plan=event.plan, planner="explicit")

    async def on_replan_request(self, msg: Msg) -> bool | BaseException:
        """A step failed in a plan that opted into re-planning: ask the model for the
        rest, answer the run's inbox with the revised plan or the problems."""
        try:
            record, event = bus.expect_event(msg, ReplanRequested)
        except bus.Poison as poison:
            return poison
        digest = request_digest(record.run_id, event)
        try:
            verdict = await _beating(
                msg, self.once(f"replan:{digest}", lambda: self.replan(record.run_id, event))
            )
        except (CatalogUnavailable, ConversationUnavailable) as exc:
            return exc
        except TimeoutError as exc:  # the executor did not give the run's request: later
            return ConversationUnavailable(f"run {record.run_id}: {exc!r}")
        verdict = msgspec.structs.replace(verdict, request_digest=digest)
        await bus.publish_acked(self.ctx.js, routes.inbox_subject(verdict), codec.encode(verdict))
        return True

    async def replan(self, run_id: str, event: ReplanRequested) -> PlanProposed | PlanRefused:
        if not self.models.configured:
            issue = PlanIssue(code="no_model_configured", path="$.plan.replan",
                              message="re-planning needs a model: set LOOM_MODEL or "
                              "LOOM_MODELS_FILE, or remove replan from the plan")  # fmt: skip
            return PlanRefused(run_id=run_id, issues=[issue])
        reply = await self._run_events(RunEventsQuery(run_id=run_id, limit=1))
        if reply.error is not None:
            raise ConversationUnavailable(reply.error.message)
        first = reply.events[0].event if reply.events else None
        catalog = await self.tool_catalog()
        plan, issues, planning = await replan_with_model(
            self.layer, event.model or self.models.planner, event,
            first if isinstance(first, RunRequested) else None, catalog,
        )  # fmt: skip
        if plan is None:
            return PlanRefused(run_id=run_id, issues=issues, planning=planning)
        return PlanProposed(run_id=run_id, plan=plan, planner="replan", planning=planning)

    @staticmethod
    def _check(plan: Plan, event: RunRequested, catalog: Mapping[str, ToolSpec]) -> list[PlanIssue]:
        issues = validate_plan(plan, catalog, event.input, caps=event.caps, foreign=True)
        # catalog metadata against who the run acts for (loom_core.tool_access)
        return issues + check_tool_access(plan, catalog, event.principal)

    async def on_model_request(self, msg: Msg) -> bool | BaseException:
        """One turn of an agent step: call the model, answer the run's inbox."""
        try:
            record, event = bus.expect_event(msg, ModelCallRequested)
        except bus.Poison as poison:
            return poison
        digest = request_digest(record.run_id, event)
        paid = await self._paid_answer(record.run_id, digest)
        if paid is not None:  # answered before a restart: send it again, do not pay again
            self.reused += 1
            await self.ctx.js.publish(routes.inbox_subject(paid), codec.encode(paid))
            return True
        try:  # a lean turn holds only what is new: the whole conversation, for the model
            messages = await self.conversations.of(record.run_id, event)
        except TimeoutError as exc:  # the executor did not answer: later
            return ConversationUnavailable(f"run {record.run_id}: {exc!r}")
        except ConversationUnavailable as exc:
            return exc
        except ConversationMissing as exc:
            await self._answer(record.run_id, event, Answer(message=None, error=exc.info))
            return True
        specs = await self.tool_specs(event.tools) + list(event.delegates)
        throttled_ms = await self.throttle.wait(record.run_id)  # the tenant's call rate
        started = datetime.now(UTC)
        pieces = itertools.count()
        streamed: list[str] = []  # the subject, looked up at the first piece of text

        async def on_text(text: str) -> None:  # live only: the complete turn is the event
            if not streamed:  # a tenant's run's text goes only to its tenant's twin
                plain = routes.MODEL_STREAM.subject(run_id=record.run_id)
                streamed.append(tenancy.scoped(plain, await self.tenant_runs(record.run_id)))
            chunk = ModelChunk(run_id=record.run_id, step_id=event.step_id, turn=event.turn,
                               seq=next(pieces), text=text)  # fmt: skip
            await self.ctx.nc.publish(streamed[0], codec.encode(chunk))

        key = f"turn:{request_digest(record.run_id, event)}"
        answer = await _beating(msg, self.once(key, lambda: self.layer.complete(
            event.model, messages, specs, json_mode=event.output_schema is not None,
            on_text=on_text,
        )))  # fmt: skip
        await self._answer(record.run_id, event, answer, started, throttled_ms)
        return True

    async def _answer(
        self,
        run_id: str,
        event: ModelCallRequested,
        answer: Answer,
        started: datetime | None = None,
        throttled_ms: float = 0.0,
    ) -> None:
        now = datetime.now(UTC)
        result = ModelResult(
            run_id=run_id, step_id=event.step_id, turn=event.turn,
            idempotency_key=event.idempotency_key, ok=answer.message is not None,
            started_at=started or now, finished_at=now, message=answer.message,
            finish_reason=answer.finish_reason, model=answer.model, provider=answer.provider,
            attempts=answer.attempts, usage=answer.usage, error=answer.error,
            request_digest=request_digest(run_id, event), throttled_ms=throttled_ms,
        )  # fmt: skip
        data = codec.encode(result)
        try:  # kept before it is sent: a crash after the model call loses nothing
            await self.answers.put(result.request_digest, data)
        except Exception as exc:  # noqa: BLE001 (a lost copy costs a model call at worst)
            log.warning("model answer %s not kept: %r", result.idempotency_key, exc)
        await self.ctx.js.publish(routes.inbox_subject(result), data)

    async def _paid_answer(self, run_id: str, digest: str) -> ModelResult | None:
        """The answer this planner (or another replica) already sent for the turn
        request with ``digest``, if it is kept."""
        try:
            entry = await self.answers.get(digest)
        except Exception:  # noqa: BLE001 (nats-py raises KeyNotFoundError; absent is fine)
            return None
        try:
            answer = codec.decode(entry.value, ModelResult) if entry.value else None
        except Exception as exc:  # noqa: BLE001 (a damaged copy: ask the model again)
            log.warning("kept model answer %s unreadable: %r", digest, exc)
            return None
        if answer is None or answer.run_id != run_id or answer.request_digest != digest:
            return None
        return answer

    async def _run_events(self, query: RunEventsQuery) -> RunEventsReply:
        return await bus.request(
            self.ctx.nc, subjects.API_RUN_EVENTS, query, RunEventsReply, timeout=10.0
        )

    def _no_model_issue(self) -> PlanIssue:
        if self.models.configured:
            message = "a run needs either an explicit `plan` or a natural-language `request`"
        else:
            message = (
                "a natural-language request needs a model, and none is configured: set "
                "LOOM_MODEL to a litellm model name (e.g. openai/gpt-4o-mini) and that "
                "provider's API key (e.g. OPENAI_API_KEY), or LOOM_MODELS_FILE to a models "
                "file, or submit an explicit `plan`"
            )
        return PlanIssue(code="no_model_configured", path="$.request", message=message)


T = TypeVar("T")


async def _beating(msg: Msg, work: Awaitable[T]) -> T:
    """``work``, telling JetStream the message is in progress while it runs (a model
    call takes seconds; without this it would be redelivered after the ack wait)."""
    beat = asyncio.create_task(_heartbeat(msg))
    try:
        return await work
    finally:
        beat.cancel()


async def _heartbeat(msg: Msg) -> None:
    while True:
        await asyncio.sleep(bus.delivery().ack_wait_s / 3)  # a timer, not synchronisation
        try:
            await msg.in_progress()
        except Exception:  # noqa: BLE001 (a lost heartbeat means a redelivery at worst)
            return


def main() -> None:
    run_main(lambda settings: [PlannerService(settings)])


if __name__ == "__main__":
    main()
