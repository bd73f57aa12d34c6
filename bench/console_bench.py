"""The console on a long run: a run of ~10,000 events (a foreach of no-op tool steps),
then the console's API and, when Chromium is installed, the run's page in a real browser.

Prints, for the cold read (the console has not seen the run: it reads every event, page
by page, from the executor) and the warm one (only events after the last known):
wall time and this process's CPU for each API call the run page makes, and the page
load (open the run until its timeline shows; the event list shows one page of 100).
The stack runs in this process too, idle once the run has ended, so the CPU is the
console's (and the executor's answers to its reads).

    python bench/console_bench.py                 # 10,000 events
    python bench/console_bench.py --items 3000    # ~21,000 events
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from loom_console.server import ConsoleServer
from loom_core.contracts import ForeachStep, Plan, RunRequest, ToolStep
from loom_infra.settings import Settings, StoreSettings
from loom_services.stack import LocalStack

CALLS = ("", "/timeline?limit=200", "/events?after={after}&limit=100", "/state", "/trace?limit=300")


async def timed(http: httpx.AsyncClient, path: str) -> dict[str, Any]:
    cpu, wall = time.process_time(), time.perf_counter()
    reply = await http.get(path)
    reply.raise_for_status()
    return {
        "call": path.split("?")[0].rsplit("/", 1)[-1] if "/" in path else path,
        "wall_ms": round((time.perf_counter() - wall) * 1000, 1),
        "cpu_ms": round((time.process_time() - cpu) * 1000, 1),
        "bytes": len(reply.content),
    }


async def page_load(url: str, run_id: str) -> dict[str, float] | None:
    chromium = os.environ.get("LOOM_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        return None
    from playwright.async_api import async_playwright

    out: dict[str, float] = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium)
        page = await browser.new_page()
        for label in ("page_load_s", "page_reload_s"):
            cpu, wall = time.process_time(), time.perf_counter()
            if label == "page_load_s":
                await page.goto(f"{url}#/run/{run_id}")
            else:
                await page.reload()
            await page.locator("#timeline tbody tr").first.wait_for(timeout=120_000)
            out[label] = round(time.perf_counter() - wall, 3)
            out[label.replace("_s", "_console_cpu_s")] = round(time.process_time() - cpu, 3)
        await browser.close()
    return out


async def main(items: int) -> None:
    data = Path(tempfile.mkdtemp(prefix="loom-console-bench-"))
    store = StoreSettings(kind="sqlite", data_dir=data / "data", postgres_url=None)
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=store)
    async with LocalStack(settings, nats_port=-1) as stack, await stack.client() as client:
        await client.wait_ready()
        plan = Plan(name="bench", steps=[ForeachStep(
            id="each", items=list(range(items)), concurrency=64,
            do=[ToolStep(id="t", tool="noop", input={})],
        )])  # fmt: skip
        run_id = (await client.submit(RunRequest(plan=plan))).run_id
        events = len(await client.wait(run_id, timeout=600))
        async with (
            await stack.client() as console_client,
            ConsoleServer(console_client, port=0) as server,
            httpx.AsyncClient(base_url=server.url, timeout=120) as http,
        ):
            result: dict[str, Any] = {"events": events}
            for label in ("cold", "warm"):
                paths = [f"/api/runs/{run_id}{c.format(after=events - 100)}" for c in CALLS]
                result[label] = [await timed(http, p) for p in paths]
            server.console.source._events.clear()  # cold again, for the browser
            server.console._derived.clear()
            result["browser"] = await page_load(server.url, run_id)
    print(json.dumps(result, indent=2))
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1428, help="foreach elements (7 events each)")
    asyncio.run(main(parser.parse_args().items))
