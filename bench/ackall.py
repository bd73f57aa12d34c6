"""What an ack per message costs against one ack per batch (``PullConsumer(ack_all=True)``),
alone: a real nats-server, N run events stored, then consumed by a pull consumer whose
handler only says True, once with explicit acks and once with one cumulative ack per
batch, alternately. Prints the CPU per message of nats-server (/proc) and of this
process (``time.process_time``), and the acks sent. The hop step's tracing consumer
acks 5 run events per step (issue 10, traceack).

    .venv/bin/python bench/ackall.py [--messages 20000] [--rounds 3] [--batch 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import nats
from nats.js.errors import NotFoundError

from loom_core import codec, subjects
from loom_infra import bus
from loom_infra.natsserver import EmbeddedNats

STREAM = subjects.RUN_EVENTS_STREAM
TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def consume(js: object, durable: str, ack_all: bool, batch: int, last: int) -> int:
    acks = 0

    async def handle(msgs: object) -> list[bool | BaseException]:
        return [True] * len(msgs)  # type: ignore[arg-type]

    consumer = bus.PullConsumer(
        js=js, service="bench", stream=STREAM, durable=durable,  # type: ignore[arg-type]
        filter_subjects=["loom.run.>"], handler=handle, batch=batch, ack_all=ack_all,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.ensure_future(consumer.run(stop))
    while True:
        try:
            info = await js.consumer_info(STREAM, durable)  # type: ignore[attr-defined]
        except NotFoundError:  # not created yet
            await asyncio.sleep(0.05)
            continue
        if info.ack_floor.stream_seq >= last and info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.05)  # a benchmark's poll of the consumer's state
    stop.set()
    await task
    if consumer._acks is not None:
        acks = len(consumer._acks.acked)
    return acks


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(data_dir=Path(tmp) / "nats", port=-1).start()
        try:
            assert server.process is not None
            pid = server.process.pid
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await bus.ensure_streams(js)
            payload = codec.encode({"kind": "step_completed", "pad": "x" * 200})
            for i in range(args.messages):
                await js.publish(f"loom.run.r{i % 50}.e", payload)
            last = (await js.stream_info(STREAM)).state.last_seq
            results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for r in range(args.rounds):
                for ack_all in (False, True) if r % 2 == 0 else (True, False):
                    durable = f"b{r}{'all' if ack_all else 'each'}"
                    n0, p0 = cpu_of(pid), time.process_time()
                    await consume(js, durable, ack_all, args.batch, last)
                    n1, p1 = cpu_of(pid), time.process_time()
                    results[ack_all].append((n1 - n0, p1 - p0))
                    await js.delete_consumer(STREAM, durable)
            for ack_all, runs in results.items():
                name = "ack per batch  " if ack_all else "ack per message"
                per = [(n * 1e6 / last, p * 1e6 / last) for n, p in runs]
                text = "  ".join(f"nats {n:5.1f} us, consumer {p:5.1f} us" for n, p in per)
                print(f"{name}: per message {text}")
            await nc.close()
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
