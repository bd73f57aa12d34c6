"""The tenants' rates as token buckets every replica shares: one key per tenant and kind
(``submit``, ``tool``, ``model``) in the JetStream key-value bucket ``loom_rates``.

A take reads the key, computes the bucket's refill and the take with the pure
``loom_core.quotas.TokenBucket`` at the wall clock, and writes it back on the revision it
read (compare-and-set); another replica writing first means read and compute again. So
a tenant's rate holds whatever the number of executor, tool-runner or planner replicas
(each of them N x the rate before), at the cost of one get and one write per limited
action, paid only when the quotas file sets that rate.

- A call (``reserve=True``) always takes: it reserves a token ahead and waits for it
  (FIFO across replicas, as within one process before).
- A submission (``reserve=False``) takes only a token there is now; refused, it writes
  nothing (its retry-after is the wait a reservation would have had).
- NATS unreachable, or the key moving under every attempt: the caller falls back to a
  bucket of its own process (the old behaviour), logged; a rate never blocks work.
- A value this code did not write is replaced by a full bucket (logged): the store of
  record holds nothing about rates, and a full bucket errs towards letting work run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from loom_core import codec, subjects
from loom_core.contracts import RateBucket
from loom_core.errors import LoomError
from loom_core.quotas import TokenBucket
from loom_infra import bus

log = logging.getLogger("loom.rates")

BUCKET = subjects.RATES_BUCKET
AWAY_S = 5.0
CAS_ATTEMPTS = 64  # replicas racing on one key (a process's own takes queue on a lock)
Kind = Literal["submit", "tool", "model"]


async def ensure_bucket(js: JetStreamContext, replicas: int = 1) -> Any:
    return await bus.ensure_kv(js, BUCKET, replicas)


def key_of(kind: Kind, tenant: str) -> str:
    return f"{kind}-{tenant}"  # one subject token: kinds have no "-", tenants no "."


class RatesBusy(LoomError):
    """No take was written in ``CAS_ATTEMPTS`` rounds: the caller uses its own bucket."""

    code = "unavailable"
    retryable = True


class SharedRates:
    """Takes from the shared buckets; ``kv`` is bound lazily (the first take)."""

    def __init__(self, js: JetStreamContext, wall: Callable[[], float] = time.time) -> None:
        self.js = js
        self.wall = wall
        self.kv: Any = None
        self.takes = 0  # written takes (tests, metrics)
        # one take per key at a time in this process: only replicas race on a key
        self._locks: dict[str, asyncio.Lock] = {}
        self.away_until = 0.0  # after a failure, callers use their own bucket a while

    async def take(self, kind: Kind, tenant: str, rate: float, burst: int,
                   reserve: bool) -> float:  # fmt: skip
        """Seconds to wait for a token of ``tenant``'s ``kind`` (0: now). Raises
        RatesBusy or a NATS error when the shared bucket cannot be reached."""
        if time.monotonic() < self.away_until:
            raise RatesBusy("the shared rates bucket failed a moment ago")
        key = key_of(kind, tenant)
        try:
            if self.kv is None:
                self.kv = await self.js.key_value(BUCKET)
            async with self._locks.setdefault(key, asyncio.Lock()):
                return await self._take(key, rate, burst, reserve)
        except Exception:
            # NATS away or refusing (a refusal arrives as a timeout): not on every call
            self.away_until = time.monotonic() + AWAY_S
            raise

    async def _take(self, key: str, rate: float, burst: int, reserve: bool) -> float:
        for _ in range(CAS_ATTEMPTS):
            try:
                entry = await self.kv.get(key)
                revision, value = entry.revision, entry.value
            except KeyNotFoundError as exc:
                found = getattr(exc, "entry", None)
                revision, value = (found.revision if found is not None else 0), b""
            bucket = TokenBucket(rate=rate, burst=burst)
            if value:
                try:
                    state = codec.decode(value, RateBucket)
                    bucket.tokens, bucket.at = state.tokens, state.at
                except Exception:
                    log.error("rate bucket %s in %s is not a RateBucket: reset to full", key,
                              BUCKET)  # fmt: skip
            # another replica's clock may run ahead: time never goes back for a bucket
            now = max(self.wall(), bucket.at)
            wait = bucket.take(now)
            if wait > 0 and not reserve:
                return wait  # refused: nothing written
            data = codec.encode(RateBucket(tokens=bucket.tokens or 0.0, at=bucket.at))
            try:
                if revision:
                    await self.kv.update(key, data, last=revision)
                else:
                    await self.kv.create(key, data)
            except KeyWrongLastSequenceError:
                continue  # another replica took first: again, on its bucket
            self.takes += 1
            return wait
        raise RatesBusy(key)
