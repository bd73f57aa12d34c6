"""Per-call overhead of an MCP tool against a built-in, through the tool-runner's catalog
(``ToolCatalog.execute``: breakers, input validation, the call, output conversion).

Measures, sequentially (one call in flight) and with ``--concurrency`` calls in flight:
- ``echo`` built-in through ``execute_tool`` directly (the floor, no breaker);
- ``echo`` built-in through the catalog (adds the per-tool breaker);
- ``demo.add`` on the test MCP server (tests/mcp_servers/demo_server.py) over stdio;
- ``demo.add`` on the same server over streamable HTTP (uvicorn, JSON responses);
- ``time.get_current_time`` on the published mcp-server-time over stdio.
For each: median and p90 wall time per call, and the CPU seconds per call of this
process (``time.process_time``) and of the server process (``/proc/<pid>/stat``), since
the machine is shared and wall time is noisy.

    .venv/bin/python bench/mcp_bench.py [--calls 500] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.mcp_servers.fixtures import (  # noqa: E402
    DEMO,
    demo_stdio,
    free_port,
    time_stdio,
    wait_listening,
)

from loom_services.tools import ToolContext, default_registry, execute_tool  # noqa: E402
from loom_services.tools.catalog import ToolCatalog  # noqa: E402
from loom_services.tools.config import parse_tools_config  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / TICKS


def server_pid(name: str, exclude: str = "\0") -> int | None:
    """The pid of the server process started for this bench (by command line)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent = int(stat[1])
        if name in cmd and exclude not in cmd and parent == me:
            return int(entry.name)
    return None


def ctx(i: int) -> ToolContext:
    return ToolContext(idempotency_key=f"k{i}", run_id="bench", step_id="s", attempt=1)


async def measure(
    label: str,
    call: Callable[[int], Awaitable[object]],
    calls: int,
    concurrency: int,
    pid: int | None,
) -> dict[str, float]:
    for i in range(20):  # warm up
        await call(i)
    lat: list[float] = []
    cpu0 = time.process_time()
    srv0 = proc_cpu_s(pid) if pid else 0.0
    t0 = time.perf_counter()
    for i in range(calls):
        s = time.perf_counter()
        await call(i)
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    srv = (proc_cpu_s(pid) - srv0) if pid else float("nan")
    # concurrent: `concurrency` calls in flight
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await call(i)

    t1 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(calls)))
    conc_wall = time.perf_counter() - t1
    lat.sort()
    row = {
        "p50_ms": statistics.median(lat) * 1e3,
        "p90_ms": lat[int(len(lat) * 0.9)] * 1e3,
        "calls_s": calls / wall,
        "cpu_ms": cpu / calls * 1e3,
        "server_cpu_ms": srv / calls * 1e3,
        "conc_calls_s": calls / conc_wall,
    }
    print(
        f"{label:34s} p50 {row['p50_ms']:7.3f} ms  p90 {row['p90_ms']:7.3f} ms  "
        f"{row['calls_s']:7.0f}/s  client CPU {row['cpu_ms']:6.3f} ms/call  "
        f"server CPU {row['server_cpu_ms']:6.3f} ms/call  "
        f"x{concurrency}: {row['conc_calls_s']:6.0f}/s",
        flush=True,
    )
    return row


async def main(calls: int, concurrency: int) -> None:
    registry = default_registry()
    port = free_port()
    http = subprocess.Popen(
        [sys.executable, str(DEMO), "http", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_listening(port)
        config = parse_tools_config(
            {
                "mcp_servers": {
                    "demo": demo_stdio(),
                    "web": {"url": f"http://127.0.0.1:{port}/mcp"},
                    "time": time_stdio(),
                },
                "breakers": {"threshold": 1_000_000},
            }
        )
        catalog = ToolCatalog(registry, config)
        catalog.start()
        async with asyncio.timeout(30):
            while not all(s.available for s in catalog.mcp.servers.values()):
                await asyncio.sleep(0.05)  # servers start in the background
        print(f"{calls} calls each, sequential; then {concurrency} in flight")

        async def direct(i: int) -> object:
            return await execute_tool(registry, "echo", {"message": i}, ctx(i))

        async def via_catalog(i: int) -> object:
            return await catalog.execute("echo", {"message": i}, ctx(i), None)

        async def stdio_add(i: int) -> object:
            out = await catalog.execute("demo.add", {"a": i, "b": 1}, ctx(i), None)
            assert out.ok, out.error
            return out

        async def http_add(i: int) -> object:
            out = await catalog.execute("web.add", {"a": i, "b": 1}, ctx(i), None)
            assert out.ok, out.error
            return out

        async def time_now(i: int) -> object:
            out = await catalog.execute("time.get_current_time", {"timezone": "UTC"}, ctx(i), None)
            assert out.ok, out.error
            return out

        demo_pid = server_pid(str(DEMO), exclude=" http ")
        time_pid = server_pid("mcp_server_time")
        rows = {
            "builtin": await measure(
                "built-in echo (execute_tool)", direct, calls, concurrency, None
            ),  # noqa: E501
            "catalog": await measure(
                "built-in echo (catalog+breaker)", via_catalog, calls, concurrency, None
            ),  # noqa: E501
            "stdio": await measure(
                "MCP demo.add over stdio", stdio_add, calls, concurrency, demo_pid
            ),  # noqa: E501
            "http": await measure(
                "MCP demo.add over streamable HTTP", http_add, calls, concurrency, http.pid
            ),  # noqa: E501
            "time": await measure(
                "MCP time.get_current_time (stdio)", time_now, calls, concurrency, time_pid
            ),  # noqa: E501
        }
        base = rows["catalog"]["p50_ms"]
        print(
            f"overhead vs built-in (p50): stdio +{rows['stdio']['p50_ms'] - base:.3f} ms, "
            f"HTTP +{rows['http']['p50_ms'] - base:.3f} ms; breaker "
            f"+{(rows['catalog']['p50_ms'] - rows['builtin']['p50_ms']) * 1e3:.1f} µs"
        )
        await catalog.close()
    finally:
        http.terminate()
        http.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.concurrency))
