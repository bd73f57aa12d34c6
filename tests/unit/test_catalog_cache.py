"""The planner's tool-catalog cache (loom_infra.catalog_cache): one bucket read shared by
the runs that arrive together, reused for max_age_s, read again on request (a tool
registered since), never replaced by an older read, and a failed read is not kept."""

from __future__ import annotations

import asyncio

import pytest

from loom_infra.catalog_cache import CatalogCache


class Bucket:
    """What the cache reads: a dict that tests change, a read that can be held open."""

    def __init__(self) -> None:
        self.tools = {"noop": 1}
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def read(self) -> dict[str, int]:
        snapshot = dict(self.tools)  # what the bucket held when the read started
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return snapshot


async def settle() -> None:
    """Let every task started so far run up to its first wait (the shared read too)."""
    for _ in range(3):
        await asyncio.sleep(0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_runs_arriving_together_share_one_read() -> None:
    bucket, clock = Bucket(), Clock()
    cache = CatalogCache(bucket.read, max_age_s=1.0, clock=clock)
    bucket.gate = asyncio.Event()
    waiting = [asyncio.ensure_future(cache.get()) for _ in range(50)]
    await settle()
    bucket.gate.set()
    assert all(v == {"noop": 1} for v in await asyncio.gather(*waiting))
    assert cache.reads == 1


async def test_the_catalog_is_reused_for_max_age_then_read_again() -> None:
    bucket, clock = Bucket(), Clock()
    cache = CatalogCache(bucket.read, max_age_s=1.0, clock=clock)
    assert await cache.get() == {"noop": 1}
    bucket.tools["echo"] = 2
    clock.now += 0.9
    assert await cache.get() == {"noop": 1}  # within the age: the cached read
    clock.now += 0.2
    assert await cache.get() == {"noop": 1, "echo": 2}
    assert cache.reads == 2


async def test_fresh_reads_again_and_never_joins_an_older_read() -> None:
    bucket, clock = Bucket(), Clock()
    cache = CatalogCache(bucket.read, max_age_s=1.0, clock=clock)
    bucket.gate = asyncio.Event()
    older = asyncio.ensure_future(cache.get())
    await settle()  # a read started before the tool was registered
    bucket.tools["new"] = 3
    clock.now += 0.01
    fresh = asyncio.ensure_future(cache.get(fresh=True))
    await settle()
    bucket.gate.set()
    assert await older == {"noop": 1}
    assert await fresh == {"noop": 1, "new": 3}
    assert cache.reads == 2
    assert await cache.get() == {"noop": 1, "new": 3}  # the newer read is kept


async def test_an_older_read_finishing_last_does_not_replace_a_newer_one() -> None:
    bucket, clock = Bucket(), Clock()
    cache = CatalogCache(bucket.read, max_age_s=1.0, clock=clock)
    slow_gate = asyncio.Event()
    bucket.gate = slow_gate
    older = asyncio.ensure_future(cache.get())
    await settle()
    bucket.gate = None
    bucket.tools["new"] = 3
    clock.now += 0.01
    assert await cache.get(fresh=True) == {"noop": 1, "new": 3}
    slow_gate.set()
    assert await older == {"noop": 1}
    assert await cache.get() == {"noop": 1, "new": 3}


async def test_a_failed_read_is_not_kept() -> None:
    bucket, clock = Bucket(), Clock()
    cache = CatalogCache(bucket.read, max_age_s=1.0, clock=clock)
    bucket.fail = LookupError("no tools registered yet")
    with pytest.raises(LookupError):
        await cache.get()
    bucket.fail = None
    assert await cache.get() == {"noop": 1}
    assert cache.reads == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_read() -> None:
    bucket, clock = Bucket(), Clock()
    cache = CatalogCache(bucket.read, max_age_s=1.0, clock=clock)
    bucket.gate = asyncio.Event()
    first = asyncio.ensure_future(cache.get())
    second = asyncio.ensure_future(cache.get())
    await settle()
    first.cancel()
    bucket.gate.set()
    assert await second == {"noop": 1}
    assert cache.reads == 1
