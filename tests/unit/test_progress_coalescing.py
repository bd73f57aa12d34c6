"""Live progress is coalesced per run: while a run keeps its status, at most one message
per interval (the first change at once, the latest state at the interval's end); a change
of status at once; the last state is always said."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from loom_core import codec
from loom_core.contracts import RunProgress
from loom_core.executor import RunState
from loom_services.progress import ProgressPublisher

AT = datetime(2026, 12, 5, tzinfo=UTC)


class Published:
    def __init__(self) -> None:
        self.messages: list[RunProgress] = []
        self.arrived = asyncio.Event()

    def __call__(self, messages: list[tuple[str, bytes]]) -> None:
        self.messages += [codec.decode(data, RunProgress) for _, data in messages]
        self.arrived.set()

    async def next(self) -> RunProgress:
        count = len(self.messages)
        while len(self.messages) == count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)
        return self.messages[-1]


def test_steps_of_a_running_run_are_coalesced_and_the_latest_follows() -> None:
    async def scenario() -> None:
        run = RunState(run_id="r1", status="running")
        published = Published()
        progress = ProgressPublisher({"r1": run}.get, published, every_s=0.05)
        progress.changed(["r1"], AT)  # the first change: at once
        assert [m.steps_running for m in published.messages] == [0]
        for running in range(1, 8):  # seven more changes within the interval: held
            run.running = running
            progress.changed(["r1"], AT)
        assert len(published.messages) == 1
        latest = await published.next()  # at the interval's end, the latest state
        assert latest.steps_running == 7 and len(published.messages) == 2
        run.status = "completed"  # a change of status: at once, whatever the interval
        progress.changed(["r1"], AT)
        assert [m.status for m in published.messages] == ["running", "running", "completed"]

    asyncio.run(scenario())


def test_each_run_has_its_own_interval() -> None:
    async def scenario() -> None:
        runs = {r: RunState(run_id=r, status="running") for r in ("a", "b")}
        published = Published()
        progress = ProgressPublisher(runs.get, published, every_s=10)
        progress.changed(["a"], AT)
        progress.changed(["b"], AT)  # another run: not held by a's interval
        progress.changed(["a", "ghost"], AT)  # a held; a run not in memory: nothing
        assert [m.run_id for m in published.messages] == ["a", "b"]

    asyncio.run(scenario())
