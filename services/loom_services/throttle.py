"""Call rates per tenant (``tool_calls_per_s``, ``model_calls_per_s`` in
``LOOM_QUOTAS_FILE``): a call over its tenant's rate waits for a token before it runs,
and how long it waited is recorded with its result (``throttled_ms`` in
``tool_call_completed`` / ``model_call_completed`` and their failures). It never
fails for it: the wait is the limit.

Tokens are reserved in arrival order (``loom_core.quotas.TokenBucket``), so a burst is
served first come, first served. The tenant of a call is its run's (the principal of
its ``run_requested``, asked once per run from the executor and remembered). The
buckets are shared by every tool-runner (and planner) replica: one key per tenant in
the KV bucket ``loom_rates`` (``loom_services.shared_rates``), so N replicas still
give a tenant its rate, not N times it. When that bucket cannot be reached the call
takes from this process's own bucket instead (logged), never fails for it.
Pure built-ins the executor answers itself (``loom_services.local_tools``) have no
effect to protect and are not limited.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Literal

from nats.aio.client import Client as NATS

from loom_core import quotas, subjects
from loom_core.contracts import RunEventsQuery, RunEventsReply, RunRequested
from loom_core.quotas import Quotas, TokenBucket
from loom_infra import bus
from loom_services.shared_rates import SharedRates
from loom_services.tenants import tenant_of

log = logging.getLogger("loom.rates")

Kind = Literal["tool", "model"]
REMEMBERED_RUNS = 10_000


def run_tenants(nc: NATS) -> Callable[[str], Awaitable[str]]:
    """The tenant of a run, asked once from the executor's events API (the platform's
    plain subject) and remembered."""
    known: OrderedDict[str, str] = OrderedDict()

    async def tenant(run_id: str) -> str:
        if run_id not in known:
            query = RunEventsQuery(run_id=run_id, limit=1)
            reply = await bus.request(nc, subjects.API_RUN_EVENTS, query, RunEventsReply)
            first = reply.events[0].event if reply.events else None
            known[run_id] = tenant_of(first.principal if isinstance(first, RunRequested) else None)
            while len(known) > REMEMBERED_RUNS:
                known.popitem(last=False)
        return known[run_id]

    return tenant


class CallThrottle:
    def __init__(
        self,
        quota: Quotas,
        kind: Kind,
        tenant_of_run: Callable[[str], Awaitable[str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedRates | None = None,
    ) -> None:
        self.quotas = quota
        self.shared = shared
        self.kind = kind
        self.tenant_of_run = tenant_of_run
        self.clock = clock
        self.buckets: dict[str, TokenBucket | None] = {}
        limits = [*quota.tenants.values()]
        self.active = any(self._rate(limit) is not None for limit in limits)

    def _rate(self, limits: quotas.Limits) -> float | None:
        return limits.tool_calls_per_s if self.kind == "tool" else limits.model_calls_per_s

    async def wait(self, run_id: str) -> float:
        """Wait for a token of ``run_id``'s tenant; the milliseconds waited."""
        if not self.active or self.tenant_of_run is None:
            return 0.0  # no call rate configured: not even the tenant is looked up
        tenant = await self.tenant_of_run(run_id)
        rate = self._rate(self.quotas.of(tenant))
        if rate is not None and self.shared is not None:
            try:
                burst = max(1, math.ceil(rate))
                delay = await self.shared.take(self.kind, tenant, rate, burst, reserve=True)
            except Exception as exc:  # NATS away: this process's own bucket, as before
                log.warning("shared %s rate of %s not reached (%r): local bucket", self.kind,
                            tenant, exc)  # fmt: skip
            else:
                return await _waited(delay)
        if tenant not in self.buckets:
            self.buckets[tenant] = quotas.bucket(self._rate(self.quotas.of(tenant)), None)
        bucket = self.buckets[tenant]
        return await _waited(bucket.take(self.clock()) if bucket is not None else 0.0)


async def _waited(delay: float) -> float:
    if delay <= 0:
        return 0.0
    await asyncio.sleep(delay)  # the limit itself: a timed wait, not a poll
    return round(delay * 1000.0, 3)
