"""Run blocking store calls off the event loop, in a pool a service owns.

Why not ``asyncio.to_thread``: cancelling the awaiting task does not stop the thread,
so a service that closes its store on shutdown could close a connection under a query
still running (SQLite then crashes the process). A service's own pool is drained
(``close``) before its store is closed.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class Blocking:
    def __init__(self, name: str, workers: int = 4) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    async def __call__(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
        return await loop.run_in_executor(self.pool, call)

    async def close(self) -> None:
        """Wait for calls already running, refuse new ones."""
        await asyncio.to_thread(self.pool.shutdown, True)
