"""A 10 MB value through three tool steps, by reference (issue 9, docs/design.md decision 12):
the embedded stack in this process (real nats-server, the blob bucket an Object Store),
on SQLite and on PostgreSQL.

The run: the client uploads a 10 MB text (``LoomClient.submit`` stores a big input as a
blob), ``a`` = text upper (the tool-runner resolves the reference, stores the 10 MB
output, answers a reference), ``b`` = text reverse of ``{{ steps.a.output.result }}`` (a
projection into a's blob), ``c`` = echo of b's output; the run's output is c's reference.
Then the client downloads the output (10 MB) and checks it.

Prints per store and repetition: upload+submit to completed (wall ms), download (ms), the
process CPU seconds over the run (every service and the client are in this process, so
this is the whole stack's CPU but the nats-server's, given apart from /proc), the largest
stored event and the blob bucket's size.

    python bench/blobs_bench.py                  # both stores, 3 runs each
    python bench/blobs_bench.py --store sqlite --runs 5 --mb 20
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from loom_core import blobs, codec
from loom_core.contracts import Plan, RunRequest, ToolStep
from loom_infra.blobstore import STREAM
from loom_infra.localpg import start_local_postgres
from loom_infra.settings import Settings, StoreSettings
from loom_services.executor import ExecutorService
from loom_services.stack import LocalStack

PLAN = Plan(
    steps=[
        ToolStep(id="a", tool="text", input={"text": "{{ input.doc }}", "op": "upper"}),
        ToolStep(
            id="b", tool="text", input={"text": "{{ steps.a.output.result }}", "op": "reverse"}
        ),  # fmt: skip
        ToolStep(id="c", tool="echo", input={"message": "{{ steps.b.output }}"}),
    ],
    output="{{ steps.c.output }}",
)


def server_cpu_s(stack: LocalStack) -> float:
    """CPU seconds (user + system) of the embedded nats-server so far (/proc)."""
    if stack.nats is None or stack.nats.process is None:
        return 0.0
    fields = Path(f"/proc/{stack.nats.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one(stack: LocalStack, size: int, salt: int) -> dict[str, float]:
    doc = (f"blob {salt} " * (size // 6 + 1))[:size]  # a new value each run (no dedupe)
    async with await stack.client() as client:
        cpu0, t0, nats0 = time.process_time(), time.perf_counter(), server_cpu_s(stack)
        accepted = await client.submit(RunRequest(plan=PLAN, input={"doc": doc}))
        records = await client.wait(accepted.run_id, timeout=300)
        t1 = time.perf_counter()
        assert records[-1].kind == "run_completed", records[-1].event
        output = records[-1].event.output
        got = await client.get_blob(output)
        t2, cpu1, nats1 = time.perf_counter(), time.process_time(), server_cpu_s(stack)
        assert got == {"message": {"result": doc.upper()[::-1]}}
        info = await client.js.stream_info(STREAM)
    assert stack.stack is not None
    executor = next(s for s in stack.stack.services if isinstance(s, ExecutorService))
    stored = await asyncio.to_thread(executor.store.load, accepted.run_id)
    return {
        "run_ms": (t1 - t0) * 1000,
        "download_ms": (t2 - t1) * 1000,
        "cpu_s": cpu1 - cpu0,
        "nats_cpu_s": nats1 - nats0,
        "largest_event": max(len(codec.encode(r)) for r in stored),
        "bucket_mb": info.state.bytes / 1e6,
        "blob_bytes": blobs.parse_ref(output).bytes,
    }


async def bench(store: str, runs: int, size: int) -> None:
    base = Path(tempfile.mkdtemp(prefix=f"loom-blobs-{store}-"))
    stop_pg = None
    if store == "postgres":
        url, stop_pg = start_local_postgres(base / "pg")
        store_settings = StoreSettings(kind="postgres", data_dir=base / "data", postgres_url=url)
    else:
        store_settings = StoreSettings(kind="sqlite", data_dir=base / "data")
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=store_settings)
    try:
        async with LocalStack(settings, nats_port=-1) as stack:
            await one(stack, 100_000, -1)  # warm up
            results = []
            for i in range(runs):
                r = await one(stack, size, i)
                results.append(r)
                print(
                    f"{store:8} run {i + 1}: {size / 1e6:.1f} MB x 3 steps "
                    f"{r['run_ms']:7.0f} ms (upload, 3 steps, stored by reference), "
                    f"download {r['download_ms']:5.0f} ms, CPU {r['cpu_s']:5.2f} s "
                    f"(+ nats-server {r['nats_cpu_s']:.2f} s), "
                    f"largest event {r['largest_event']} B, bucket {r['bucket_mb']:.0f} MB",
                    flush=True,
                )
            med = {k: statistics.median(r[k] for r in results) for k in results[0]}
            print(
                f"{store:8} median: {med['run_ms']:.0f} ms per run, download "
                f"{med['download_ms']:.0f} ms, CPU {med['cpu_s']:.2f} s (+ nats-server "
                f"{med['nats_cpu_s']:.2f} s), largest event "
                f"{med['largest_event']:.0f} B",
                flush=True,
            )
    finally:
        if stop_pg is not None:
            stop_pg()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mb", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    size = int(args.mb * 1024 * 1024)
    for store in ("sqlite", "postgres") if args.store == "both" else (args.store,):
        asyncio.run(bench(store, args.runs, size))


if __name__ == "__main__":
    main()
