"""The planner: turns a run's request into a validated plan.

It consumes ``run_requested`` events and answers the run's inbox with ``PlanProposed``
or ``PlanRefused``. An explicit plan is validated against the live tool catalog (the
``loom_tools`` KV bucket the tool-runner fills) and the run's input, reporting every
problem at once. A natural-language request needs a model (LOOM_MODEL); without one it
is refused with a message that says what to configure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
from nats.aio.msg import Msg

from loom_core import codec, routes
from loom_core.contracts import PlanIssue, PlanProposed, PlanRefused, RunRequested, ToolSpec
from loom_core.executor import request_digest
from loom_core.tool_access import check_tool_access
from loom_core.validation import validate_plan
from loom_infra import bus, endpoints
from loom_infra.settings import Settings
from loom_services.runtime import ServiceContext, run_main

log = logging.getLogger("loom.planner")


class CatalogUnavailable(Exception):
    """No tool-runner has published its tools yet: retry later rather than reject."""


class PlannerService:
    name: routes.Identity = "planner"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.kv: Any = None

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.kv = await bus.ensure_tools_bucket(ctx.js)
        consumer = endpoints.durable(
            ctx.js, routes.RUN_EVENTS, self.name, "planner", handler=self.on_requests, batch=64
        )
        ctx.spawn(consumer.run(ctx.stop), "planner-requests")

    async def close(self) -> None:
        return None

    async def tool_catalog(self) -> dict[str, ToolSpec]:
        try:
            keys = await self.kv.keys()
        except Exception as exc:  # nats-py raises NoKeysError on an empty bucket
            raise CatalogUnavailable("no tools registered yet") from exc
        specs = await asyncio.gather(*(self.kv.get(k) for k in keys))
        return {s.name: s for s in (codec.decode(e.value, ToolSpec) for e in specs if e.value)}

    async def on_requests(self, msgs: Sequence[Msg]) -> list[bool | BaseException]:
        return list(await asyncio.gather(*(self._one(m) for m in msgs)))

    async def _one(self, msg: Msg) -> bool | BaseException:
        try:
            record, event = bus.expect_event(msg, RunRequested)
        except bus.Poison as poison:
            return poison
        try:
            verdict = await self.plan(record.run_id, event)
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
            return PlanRefused(run_id=run_id, issues=[self._no_model_issue()])
        catalog = await self.tool_catalog()
        issues = validate_plan(event.plan, catalog, event.input, caps=event.caps, foreign=True)
        # catalog metadata against who the run acts for (loom_core.tool_access)
        issues += check_tool_access(event.plan, catalog, event.principal)
        if issues:
            return PlanRefused(run_id=run_id, issues=issues)
        return PlanProposed(run_id=run_id, plan=event.plan, planner="explicit")

    def _no_model_issue(self) -> PlanIssue:
        if self.settings.model:
            message = (
                f"model planning with LOOM_MODEL={self.settings.model} is not available in "
                "this version: submit an explicit plan (see proto/README.md)"
            )
        else:
            message = (
                "a natural-language request needs a model, and none is configured: set "
                "LOOM_MODEL to a litellm model name (e.g. openai/gpt-4o-mini) and that "
                "provider's API key (e.g. OPENAI_API_KEY), or submit an explicit `plan`"
            )
        return PlanIssue(code="no_model_configured", path="$.request", message=message)


def main() -> None:
    run_main(lambda settings: [PlannerService(settings)])


if __name__ == "__main__":
    main()
