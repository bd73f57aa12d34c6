"""A cancel is never lost in the bus's waits (tests/integration/test_clean_stop.py has
the consumers against a real server): Python 3.11's ``asyncio.wait_for`` returns the
result when the cancel comes in the same loop iteration as the awaited thing's end."""

from __future__ import annotations

import asyncio

import pytest

from loom_infra import bus


async def test_a_wait_cancelled_as_its_event_is_set_is_cancelled() -> None:
    event = asyncio.Event()
    waiting = asyncio.ensure_future(bus.wait_or_timeout(event, 5.0))
    await asyncio.sleep(0)  # yields once: it now waits on the event
    event.set()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):  # on main it returned True
        await waiting


async def test_a_task_whose_cancel_was_swallowed_ends_at_its_next_check() -> None:
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            # the await that swallows the cancel (the 3.11 wait_for, as nats-py uses it)
            await asyncio.wait_for(event.wait(), 5.0)
            event.clear()
            bus.raise_if_cancelled()

    task = asyncio.ensure_future(loop())
    await asyncio.sleep(0)
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)
