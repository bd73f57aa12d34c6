"""Agent steps through the whole stack: what the engine adds to each model turn.

The embedded stack in this process (a real nats-server, SQLite or PostgreSQL, the five
services) with the planner's model layer calling a local fake OpenAI server
(``loom_infra.fakemodel``) that answers at once. An agent of T turns calls the ``noop``
tool in every turn but the last, so a turn is: model_call_requested stored and
published -> the planner calls the model through litellm -> model result recorded ->
tool call requested -> tool-runner -> result recorded -> next turn requested.

Prints, per store:
- a direct model call (the planner's model layer, litellm to the fake server): the
  floor a turn cannot go under;
- one agent run of T turns: ms per turn and the engine's overhead per turn (a turn's
  time minus the direct model call; it includes the tool hop);
- R agent runs at once: turns/s;
- CPU seconds of this process per turn (all services, litellm and the fake server run
  here), next to wall time: the machine is shared, wall time is noisy.

    python bench/model_bench.py                          # sqlite, T=20, R=50
    python bench/model_bench.py --store postgres --turns 10 --runs 50
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from loom_core.contracts import (
    AgentStep,
    EventRecord,
    ModelCallCompleted,
    ModelMessage,
    Plan,
    RunCompleted,
    RunRequest,
)
from loom_infra.client import LoomClient
from loom_infra.fakemodel import FakeModelServer, Reply, ToolCall
from loom_infra.localpg import start_local_postgres
from loom_infra.settings import Settings, StoreSettings
from loom_services.models import ModelConfig, ModelLayer
from loom_services.stack import LocalStack


def responder() -> Any:
    """Call ``noop`` until the conversation has ``turns - 1`` answers (the instructions say
    ``work {turns}``), then answer."""

    def answer(body: dict[str, Any]) -> Reply:
        words = str(body["messages"][0]["content"]).split()
        turns = int(words[-1]) if words and words[-1].isdigit() else 1
        done = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if done < turns - 1:
            return Reply(tool_calls=[ToolCall("noop", {})])
        return Reply(content="done")

    return answer


def agent_plan(turns: int) -> Plan:
    return Plan(steps=[
        AgentStep(
            id="a", instructions=f"work {turns}", input="go", tools=["noop"], max_turns=turns
        ),
    ])  # fmt: skip


async def direct_call_ms(base_url: str, n: int = 50) -> float:
    layer = ModelLayer(ModelConfig.from_mapping(
        {"num_retries": 0, "models": {"m": {"model": "openai/bench", "api_base": base_url,
                                            "input_cost_per_token": 0.0000002,
                                            "output_cost_per_token": 0.0000006}}}
    ))  # fmt: skip
    ask = [ModelMessage(role="user", content="hi")]
    await layer.complete("m", ask)
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        await layer.complete("m", ask)
        took.append((time.perf_counter() - t0) * 1000)
    return statistics.median(took)


def turn_times(records: list[EventRecord]) -> list[float]:
    """ms between consecutive model answers of the run (one turn each)."""
    done = [r.at for r in records if isinstance(r.event, ModelCallCompleted)]
    return [(b - a).total_seconds() * 1000 for a, b in zip(done, done[1:], strict=False)]


async def one_run(client: LoomClient, turns: int) -> list[EventRecord]:
    accepted = await client.submit(RunRequest(plan=agent_plan(turns)))
    records = await client.wait(accepted.run_id, timeout=600)
    assert isinstance(records[-1].event, RunCompleted), records[-1]
    return records


async def bench(store: StoreSettings, models: Path, turns: int, runs: int, floor: float) -> None:
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=store, models_file=models)
    async with LocalStack(settings, nats_port=-1) as stack, await stack.client() as client:
        await one_run(client, 3)  # warm: litellm imported, clients built
        cpu0, t0 = time.process_time(), time.perf_counter()
        records = await one_run(client, turns)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        gaps = turn_times(records)
        per_turn = statistics.median(gaps)
        print(f"[{store.kind}] one agent run, {turns} turns: {per_turn:.2f} ms/turn (median), "
              f"engine overhead {per_turn - floor:.2f} ms/turn incl. the tool hop; "
              f"CPU {cpu / turns * 1000:.2f} ms/turn (wall {wall / turns * 1000:.2f})")  # fmt: skip
        if runs:
            cpu0, t0 = time.process_time(), time.perf_counter()
            accepted = await asyncio.gather(
                *(client.submit(RunRequest(plan=agent_plan(turns))) for _ in range(runs))
            )
            results = await asyncio.gather(*(client.wait(a.run_id, timeout=600) for a in accepted))
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            assert all(isinstance(r[-1].event, RunCompleted) for r in results)
            total = runs * turns
            print(f"[{store.kind}] {runs} agent runs at once, {turns} turns each: "
                  f"{total / wall:.1f} turns/s; CPU {cpu / total * 1000:.2f} ms/turn")  # fmt: skip


async def main_async(args: argparse.Namespace) -> None:
    with FakeModelServer() as server, tempfile.TemporaryDirectory(prefix="loom-mb-") as tmp:
        server.keep_bodies = False
        server.default = responder()
        models = Path(tmp) / "models.yaml"
        # priced like a self-hosted model: with no price litellm runs a zero-cost
        # diagnostic over its whole price map on every call (~3 ms of CPU each)
        entry = (f"{{model: openai/bench, api_base: '{server.base_url}', "
                 "input_cost_per_token: 0.0000002, output_cost_per_token: 0.0000006}")  # fmt: skip
        models.write_text(f"num_retries: 0\nmodels:\n  main: {entry}\n")
        floor = await direct_call_ms(server.base_url)
        print(f"direct model call (litellm -> fake server): {floor:.2f} ms (median)")
        for kind in args.store.split(","):
            if kind == "sqlite":
                store = StoreSettings(kind="sqlite", data_dir=Path(tmp) / "sqlite")
                await bench(store, models, args.turns, args.runs, floor)
            else:
                url, stop_pg = start_local_postgres(Path(tmp) / "pg")
                try:
                    store = StoreSettings(kind="postgres", data_dir=Path(tmp) / "pgdata",
                                          postgres_url=url)  # fmt: skip
                    await bench(store, models, args.turns, args.runs, floor)
                finally:
                    stop_pg()
        print(f"model requests served: {server.total}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="sqlite", help="sqlite, postgres or both (comma)")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
