"""What answering a direct tool result costs the executor's process, alone: CPU per
result from its arrival (``ExecutorService.on_result``: decode, check, hand to the
writer) to its ``InboxReceipt`` written to NATS, with a stand-in writer that resolves
each work at once (the commit is not measured: ``bench/store_bench.py`` does that), on a
real nats-server (issue 10, hopcpu).

    .venv/bin/python bench/receiptcost.py --results 20000 --rounds 3

To compare with another version of the code, run the same script with that version's
``libs`` and ``services`` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg

from loom_core import codec, routes
from loom_core.contracts import ToolResult
from loom_infra import bus
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings, StoreSettings
from loom_services.executor import ExecutorService

RUN_ID = "run-receiptcost000000000"


async def one_round(url: str, data_dir: Path, results: int) -> float:
    """CPU microseconds per result answered."""
    nc = await nats.connect(url)
    store = StoreSettings(kind="sqlite", data_dir=data_dir)
    executor = ExecutorService(Settings(nats_url=url, store=store))
    answered = 0
    all_answered = asyncio.Event()

    async def on_receipt(_: Msg) -> None:
        nonlocal answered
        answered += 1
        if answered == results:
            all_answered.set()

    await nc.subscribe("receipts.*", cb=on_receipt)

    async def writer() -> None:  # the commit taken out: each work stored at once
        while True:
            work = await executor.host.queue.get()
            work.done.set_result([])

    writing = asyncio.ensure_future(writer())
    now = bus.now()
    result = ToolResult(
        run_id=RUN_ID, step_id="s0", attempt=1, idempotency_key=f"{RUN_ID}:s0:1",
        ok=True, output={"n": 1}, started_at=now, finished_at=now,
    )  # fmt: skip
    subject = routes.TOOL_RESULT.subject(run_id=RUN_ID)
    data = codec.encode(result)
    msgs = [
        Msg(_client=nc, subject=subject, reply=f"receipts.{i}", data=data) for i in range(results)
    ]
    try:
        cpu0 = time.process_time()
        for i, msg in enumerate(msgs):
            await executor.on_result(msg)
            if i % 50 == 49:
                await asyncio.sleep(0)  # a loop turn: the writer and the callbacks run
        await asyncio.wait_for(all_answered.wait(), 120)
        return (time.process_time() - cpu0) / results * 1e6
    finally:
        writing.cancel()
        await executor.close()
        await nc.close()


async def main(results: int, rounds: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="loom-receiptcost-"))
    server = EmbeddedNats(data_dir=base / "nats", port=-1).start()
    try:
        costs = [await one_round(server.url, base / f"data{i}", results) for i in range(rounds)]
    finally:
        server.stop()
    print(
        f"executor CPU per direct result answered: median {statistics.median(costs):.1f} us "
        f"(rounds: {', '.join(f'{c:.1f}' for c in costs)})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.results, args.rounds))
