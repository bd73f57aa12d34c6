"""Rates shared by replicas (``loom_services.shared_rates``) on a real nats-server: two
connections stand for two replicas (of the executor, the tool-runner or the planner)
taking from one tenant's bucket at once. Together they get the tenant's rate, not twice
it: submissions past the burst are refused with the right retry-after and write
nothing; calls reserve tokens in one order across both, each waiting its turn; a
bucket value nobody could have written is replaced by a full one; with the bucket
gone, a call throttle falls back to its own process's bucket instead of failing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from loom_core import codec, subjects
from loom_core.contracts import RateBucket
from loom_core.quotas import Limits, Quotas
from loom_infra.natsserver import EmbeddedNats
from loom_services.shared_rates import SharedRates, ensure_bucket, key_of
from loom_services.throttle import CallThrottle

pytestmark = pytest.mark.integration


@pytest.fixture
async def replicas(nats_server: EmbeddedNats) -> AsyncIterator[list[Any]]:
    conns = [await nats.connect(nats_server.url) for _ in range(2)]
    await ensure_bucket(conns[0].jetstream())
    yield [c.jetstream() for c in conns]
    for c in conns:
        await c.close()


async def test_two_replicas_share_one_submission_rate(replicas: list[Any]) -> None:
    a, b = (SharedRates(js) for js in replicas)
    # 1 a second, burst 4: twelve submissions at once across both replicas
    waits = await asyncio.gather(*(
        (a if n % 2 else b).take("submit", "acme", 1.0, 4, reserve=False) for n in range(12)
    ))  # fmt: skip
    granted = [w for w in waits if w <= 0]
    assert len(granted) == 4  # the burst, not twice it
    assert all(0 < w <= 1.0 for w in waits if w > 0)  # retry-after: the next token
    assert a.takes + b.takes == 4  # a refusal writes nothing
    kv = await replicas[0].key_value(subjects.RATES_BUCKET)
    state = codec.decode((await kv.get(key_of("submit", "acme"))).value, RateBucket)
    assert state.tokens < 1.0


async def test_calls_reserve_their_turns_in_one_order_across_replicas(
    replicas: list[Any],
) -> None:
    a, b = (SharedRates(js) for js in replicas)
    rate, burst, calls = 20.0, 5, 30
    started = time.time()
    waits = await asyncio.gather(*(
        (a if n % 2 else b).take("tool", "acme", rate, burst, reserve=True) for n in range(calls)
    ))  # fmt: skip
    spent = time.time() - started
    # the k-th token past the burst is due k/rate after the first take (less the time
    # the takes themselves took, which refilled some)
    for k, wait in enumerate(sorted(waits)):
        due = max(0.0, (k - burst + 1) / rate)
        assert due - spent - 0.01 <= wait <= due + 0.01, (k, wait, due)
    assert a.takes + b.takes == calls


async def test_a_bucket_value_nobody_wrote_is_replaced_by_a_full_one(
    replicas: list[Any],
) -> None:
    kv = await replicas[0].key_value(subjects.RATES_BUCKET)
    await kv.put(key_of("model", "acme"), b"\xff garbage")
    rates = SharedRates(replicas[1])
    assert await rates.take("model", "acme", 1.0, 2, reserve=True) == 0.0
    state = codec.decode((await kv.get(key_of("model", "acme"))).value, RateBucket)
    assert state.tokens == pytest.approx(1.0, abs=0.01)


async def test_a_call_throttle_uses_its_own_bucket_when_the_shared_one_is_away(
    nats_server: EmbeddedNats,
) -> None:
    nc = await nats.connect(nats_server.url)  # no rates bucket on this server
    try:
        quota = Quotas(tenants={"acme": Limits(tool_calls_per_s=1000.0)})

        async def tenant(_run: str) -> str:
            return "acme"

        throttle = CallThrottle(quota, "tool", tenant, shared=SharedRates(nc.jetstream()))
        assert await throttle.wait("run-1") == 0.0  # not refused, not stuck
        assert throttle.buckets["acme"] is not None  # the local fallback took it
    finally:
        await nc.close()
