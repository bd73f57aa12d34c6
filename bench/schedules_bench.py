"""What schedules cost: the pure fire-time functions, and a firing on the real stack.

1. ``next_fire`` for a few cron expressions (UTC and Europe/Lisbon) and an interval, and
   ``due`` after a day of missed minutes: CPU microseconds per call (``process_time``).
2. The embedded stack on SQLite in this process: ``N`` schedules ``every 1s`` firing a
   one-step noop run for ``--seconds``; per firing, how late its run_requested was
   stored after the fire time (p50, p95, max ms), and the process CPU seconds per firing
   (every service is in this process; the noop runs are included).

    python bench/schedules_bench.py
    python bench/schedules_bench.py --schedules 20 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loom_cli.schedule import ask
from loom_core import schedules as sched
from loom_core.contracts import (
    Plan,
    RunRequest,
    ScheduleControl,
    ScheduleCreate,
    ScheduleSpec,
    ToolStep,
)
from loom_infra.settings import Settings, StoreSettings
from loom_services.stack import LocalStack


def pure() -> None:
    now = datetime(2026, 3, 29, 0, 17, 33, tzinfo=UTC)
    cases = {
        "*/5 * * * * UTC": sched.When(sched.parse_cron("*/5 * * * *"), sched.zone("UTC")),
        "0 9 * * 1-5 Lisbon": sched.When(
            sched.parse_cron("0 9 * * 1-5"), sched.zone("Europe/Lisbon")
        ),  # fmt: skip
        "30 1 * * * Lisbon (DST gap)": sched.When(
            sched.parse_cron("30 1 * * *"), sched.zone("Europe/Lisbon")
        ),  # fmt: skip
        "0 0 29 2 *": sched.When(sched.parse_cron("0 0 29 2 *"), sched.zone("UTC")),
        "every 10m": sched.When(sched.Every(timedelta(minutes=10), now), sched.zone("UTC")),
    }
    n = 2000
    for name, when in cases.items():
        start = time.process_time()
        for _ in range(n):
            sched.next_fire(when, now)
        print(f"next_fire {name:<30} {(time.process_time() - start) / n * 1e6:8.1f} µs CPU")
    minute = sched.When(sched.parse_cron("* * * * *"), sched.zone("Europe/Lisbon"))
    for policy in sched.CATCH_UPS:
        start = time.process_time()
        for _ in range(50):
            sched.due(minute, now - timedelta(days=1), now, policy)
        cost = (time.process_time() - start) / 50 * 1e6
        print(f"due after a day of missed minutes, {policy:<6}        {cost:8.1f} µs CPU")


async def live(schedules: int, seconds: float) -> None:
    plan = RunRequest(plan=Plan(steps=[ToolStep(id="a", tool="noop")]))
    with tempfile.TemporaryDirectory() as tmp:
        store = StoreSettings(kind="sqlite", data_dir=Path(tmp) / "data", postgres_url=None)
        settings = Settings(nats_url="nats://127.0.0.1:4222", store=store)
        async with LocalStack(settings, nats_port=-1) as stack, await stack.client() as client:
            cpu0 = time.process_time()
            for i in range(schedules):
                spec = ScheduleSpec(every="1s", catch_up="all")
                reply = await ask(client, ScheduleCreate(name=f"b{i}", when=spec, run=plan))
                assert reply.error is None, reply.error
            await asyncio.sleep(seconds)  # the measured period: firings happen meanwhile
            for i in range(schedules):
                await ask(client, ScheduleControl(name=f"b{i}", action="pause"))
            cpu = time.process_time() - cpu0
            late: list[float] = []
            for i in range(schedules):
                s = (await ask(client, ScheduleControl(name=f"b{i}", action="describe"))).schedule
                assert s is not None and s.last_fire_at is not None
                t = sched.next_fire(sched.When(sched.Every(timedelta(seconds=1), s.anchor),
                                               sched.zone("UTC")), s.anchor)  # fmt: skip
                while t is not None and t <= s.last_fire_at:
                    records = await client.events(sched.run_id_for(s.schedule_id, t))
                    late.append((records[0].at - t).total_seconds() * 1000)
                    t += timedelta(seconds=1)
            late.sort()
            # the same number of noop runs submitted directly: what a run costs without
            # a schedule, so the difference is the firing's own cost
            cpu1 = time.process_time()
            accepted = await asyncio.gather(*(client.submit(plan) for _ in late))
            await asyncio.gather(*(client.wait(a.run_id, timeout=60) for a in accepted))
            direct = (time.process_time() - cpu1) / len(late) * 1000
            print(f"{schedules} schedules every 1s for {seconds:.0f}s: {len(late)} firings; "
                  f"stored after the fire time p50 {statistics.median(late):.1f} ms, "
                  f"p95 {late[int(len(late) * 0.95) - 1]:.1f} ms, max {late[-1]:.1f} ms; "
                  f"process CPU {cpu / len(late) * 1000:.2f} ms per firing with its run; "
                  f"{direct:.2f} ms per run submitted directly")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedules", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    pure()
    asyncio.run(live(args.schedules, args.seconds))


if __name__ == "__main__":
    main()
