"""Regenerate the golden histories: ``python tests/golden/record.py``.

Starts the whole stack in this process (embedded nats-server, SQLite in a temporary
directory, the five services, plus a test tool that asks to suspend), runs every
example in ``examples/`` and the scenarios below through it, and writes each run's
stream to ``tests/golden/<name>.jsonl`` in the export format of ``loom show RUN -o
jsonl`` (one encoded EventRecord per line).

These files are committed. ``tests/unit/test_golden.py`` replays each of them with the
current code and fails when any decision differs: a change to the executor that would
break replay of runs already stored in production breaks the build instead. Regenerate
them only for a deliberate, migrated change (then bump the schema version and add an
upcaster in ``loom_core.codec``, so older files still replay).

Each run is checked before it is written: it ended, and replaying it is identical.
``--only NAME`` (repeatable) writes only those histories (the others are recorded but
left as they are), so adding one scenario does not rewrite every file.

Model calls (agent steps) go to a local fake OpenAI server (``loom_infra.fakemodel``)
through litellm, answering as ``research_model`` and ``HOSTILE`` say.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import msgspec

from loom_cli.app import load_run_request
from loom_core import codec
from loom_core.contracts import (
    TERMINAL_EVENTS,
    AgentStep,
    ApprovalStep,
    EventRecord,
    FinalStep,
    ForeachStep,
    ForkRun,
    ParallelStep,
    Plan,
    Replan,
    RunRequest,
    SleepStep,
    ToolStep,
)
from loom_core.replay import replay
from loom_infra.client import LoomClient
from loom_infra.fakemodel import Fail, FakeModelServer, Reply, ToolCall
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import Settings, StoreSettings
from loom_services.executor import ExecutorService
from loom_services.memory import MemoryService
from loom_services.planner import PlannerService
from loom_services.runtime import Stack
from loom_services.toolrunner import ToolRunnerService
from loom_services.tools import ToolContext, ToolInput, ToolOutput, ToolRegistry, default_registry
from loom_services.tools.registry import ToolSuspend, make_tool
from loom_services.tracing import TracingService

GOLDEN = Path(__file__).resolve().parent
EXAMPLES = GOLDEN.parents[1] / "examples"
MAX_BYTES = 50_000  # keep every golden file small enough to read in a review
BOUND_S = 30.0

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}},
    "required": ["approved"],
    "additionalProperties": False,
}


# ----------------------------------------------------------------------------- a tool


class PaymentIn(ToolInput):
    amount: int


class PaymentOut(ToolOutput):
    paid: bool
    amount: int


async def confirm_payment(inp: PaymentIn, ctx: ToolContext) -> PaymentOut:
    """Asks a person first (suspends); called again with their answer in ctx.resume."""
    if ctx.resume is None:
        raise ToolSuspend("payments", payload={"amount": inp.amount}, schema=ANSWER_SCHEMA)
    return PaymentOut(paid=ctx.resume["approved"], amount=inp.amount)


def registry() -> ToolRegistry:
    from loom_services.tools.memory_tools import MEMORY_TOOLS

    reg = default_registry()
    for memory_tool in MEMORY_TOOLS:  # agent-memory recalls through them
        reg.register(memory_tool)
    reg.register(
        make_tool(
            confirm_payment,
            name="confirm_payment",
            description="Pay after a person confirms (test tool: asks to suspend).",
            idempotent=False,
        )
    )
    return reg


# ----------------------------------------------------------------------------- helpers


async def until(client: LoomClient, run_id: str, kind: str, count: int = 1) -> list[EventRecord]:
    """Follow the run from its first event until ``count`` events of ``kind`` were seen."""
    seen: list[EventRecord] = []
    async with asyncio.timeout(BOUND_S):
        async with aclosing(client.follow(run_id, timeout=BOUND_S)) as stream:
            async for record in stream:
                seen.append(record)
                if sum(r.kind == kind for r in seen) >= count:
                    return seen
    raise RuntimeError(f"{run_id} ended before {count} {kind} event(s)")


async def resume_ok(client: LoomClient, run_id: str, data: Any, **how: Any) -> None:
    reply = await client.resume(run_id, data, by="golden", **how)
    if not reply.ok:
        raise RuntimeError(f"{run_id}: resume {how} refused: {reply.error}")


Scenario = Callable[[LoomClient], Awaitable[dict[str, str]]]  # -> {golden name: run id}


async def example(client: LoomClient, path: Path) -> dict[str, str]:
    run_id = f"golden-{path.stem}"
    await client.submit(msgspec.structs.replace(load_run_request(path, [], None), run_id=run_id))
    if path.stem == "approval":  # needs a person: a refused answer first, then a good one
        await until(client, run_id, "step_suspended")
        refused = await client.resume(run_id, {"approved": "yes"}, label="manager", by="golden")
        assert refused.error is not None and refused.error.code == "invalid_resume_data"
        await resume_ok(
            client, run_id, {"approved": True, "note": "ok"}, label="manager", request_id="ok-1"
        )
    if path.stem == "wait-event":  # needs the payment event
        await until(client, run_id, "event_wait_started")
        await client.signal("payment", "A-17", {"amount": 12}, signal_id="golden-pay")
    await client.wait(run_id, timeout=BOUND_S)
    return {path.stem: run_id}


async def approval_escalate(client: LoomClient) -> dict[str, str]:
    """Nobody answers the manager, then nobody answers the director: the step fails."""
    plan = Plan(
        name="approval-escalate",
        steps=[
            ApprovalStep(
                id="approve",
                label="manager",
                payload={"amount": 120},
                schema=ANSWER_SCHEMA,
                expires_in_s=0.1,
                on_expire="escalate",
                escalate_to="director",
            ),
        ],
    )
    run_id = "golden-approval-escalate"
    await client.submit(RunRequest(plan=plan, run_id=run_id))
    await client.wait(run_id, timeout=BOUND_S)
    return {"approval-escalate": run_id}


async def approval_many(client: LoomClient) -> dict[str, str]:
    """One suspension per foreach item and per parallel branch, each resumed on its own
    (by id or by label), plus a late answer that is refused (already resumed)."""
    boolean = {"type": "boolean"}
    plan = Plan(
        name="approval-many",
        steps=[
            ForeachStep(
                id="fe",
                items=[1, 2, 3],
                do=[
                    ApprovalStep(id="check", label="reviewer", payload="{{ item }}", schema=boolean)
                ],
            ),
            ParallelStep(
                id="par",
                branches={
                    "legal": [ApprovalStep(id="legal_ok", label="legal", schema=boolean)],
                    "finance": [ApprovalStep(id="finance_ok", label="finance", schema=boolean)],
                },
            ),
        ],
    )
    run_id = "golden-approval-many"
    await client.submit(RunRequest(plan=plan, run_id=run_id))
    await until(client, run_id, "step_suspended", 5)
    await resume_ok(client, run_id, True, suspension_id="fe/1/check#1", request_id="a")
    await resume_ok(client, run_id, False, suspension_id="fe/0/check#1", request_id="b")
    late = await client.resume(run_id, False, suspension_id="fe/1/check#1", request_id="c")
    assert late.error is not None and late.error.code == "already_resumed"
    await resume_ok(client, run_id, True, label="reviewer", request_id="d")
    await resume_ok(client, run_id, True, label="legal", request_id="e")
    await resume_ok(client, run_id, False, label="finance", request_id="f")
    await client.wait(run_id, timeout=BOUND_S)
    return {"approval-many": run_id}


async def tool_suspend(client: LoomClient) -> dict[str, str]:
    plan = Plan(
        name="tool-suspend",
        steps=[ToolStep(id="pay", tool="confirm_payment", input={"amount": 120})],
    )
    run_id = "golden-tool-suspend"
    await client.submit(RunRequest(plan=plan, run_id=run_id))
    await until(client, run_id, "step_suspended")
    await resume_ok(client, run_id, {"approved": True}, label="payments", request_id="pay-1")
    await client.wait(run_id, timeout=BOUND_S)
    return {"tool-suspend": run_id}


async def cancel(client: LoomClient) -> dict[str, str]:
    plan = Plan(
        name="cancel",
        steps=[
            ToolStep(id="nap", tool="sleep", input={"seconds": 30}),
            ToolStep(id="after", tool="echo", input={"message": "never"}, depends_on=["nap"]),
        ],
    )
    run_id = "golden-cancel"
    await client.submit(RunRequest(plan=plan, run_id=run_id))
    await until(client, run_id, "tool_call_requested")
    await client.control(run_id, "cancel", by="golden", reason="recording a cancel")
    await client.wait(run_id, timeout=BOUND_S)
    return {"cancel": run_id}


async def pause(client: LoomClient) -> dict[str, str]:
    plan = Plan(
        name="pause",
        steps=[
            ToolStep(id="a", tool="sleep", input={"seconds": 0.3}),
            SleepStep(id="nap", seconds=0.05, depends_on=["a"]),
            ToolStep(id="b", tool="echo", input={"message": "after"}, depends_on=["nap"]),
        ],
    )
    run_id = "golden-pause"
    await client.submit(RunRequest(plan=plan, run_id=run_id))
    await until(client, run_id, "tool_call_requested")
    await client.control(run_id, "pause", by="golden", reason="look first")
    await until(client, run_id, "step_completed")
    await client.control(run_id, "unpause", by="golden")
    await client.wait(run_id, timeout=BOUND_S)
    return {"pause": run_id}


async def queue(client: LoomClient) -> dict[str, str]:
    """A run over its queue's concurrent run limit (QUOTAS: queue `golden`, one run at
    a time) is recorded queued and admitted when the run ahead of it ends."""
    ahead = Plan(name="queue-ahead", steps=[ToolStep(id="a", tool="sleep", input={"seconds": 0.3})])
    behind = Plan(name="queue", steps=[ToolStep(id="b", tool="echo", input={"message": "my turn"})])
    await client.submit(RunRequest(plan=ahead, run_id="golden-queue-ahead", queue="golden"))
    await until(client, "golden-queue-ahead", "tool_call_requested")
    run_id = "golden-queue"
    await client.submit(RunRequest(plan=behind, run_id=run_id, queue="golden", priority=1))
    await client.wait(run_id, timeout=BOUND_S)
    return {"queue": run_id}


# the recorder's quotas: only the `queue` scenario's queue is limited
QUOTAS = "tenants:\n  default:\n    queues:\n      golden: {max_concurrent_runs: 1}\n"


FORK_PLAN = Plan(
    name="fork",
    steps=[
        ToolStep(id="a", tool="math", input={"op": "add", "a": 1, "b": 1}),
        ToolStep(
            id="b",
            tool="math",
            depends_on=["a"],
            input={"op": "mul", "a": "{{ steps.a.output.result }}", "b": 10},
        ),
        ToolStep(id="c", tool="text", input={"text": "{{ input.name }}", "op": "upper"}),
    ],
    output={"b": "{{ steps.b.output.result }}", "c": "{{ steps.c.output.result }}"},
)


async def fork(client: LoomClient) -> dict[str, str]:
    """A run, and a fork of it from ``b`` with ``a``'s output edited."""
    origin = "golden-fork-origin"
    await client.submit(RunRequest(plan=FORK_PLAN, input={"name": "ada"}, run_id=origin))
    await client.wait(origin, timeout=BOUND_S)
    request = ForkRun(
        run_id=origin, from_step="b", set_output={"a": {"result": 5}}, new_run_id="golden-fork"
    )
    await client.fork(request)
    await client.wait("golden-fork", timeout=BOUND_S)
    return {"fork-origin": origin, "fork": "golden-fork"}


NESTED_FORK_PLAN = Plan(
    name="fork-nested",
    steps=[
        ToolStep(id="quote", tool="math", input={"op": "add", "a": 40, "b": 2}),
        ParallelStep(
            id="reviews",
            depends_on=["quote"],
            branches={
                "legal": [
                    ApprovalStep(id="legal_ok", label="legal", schema={"type": "boolean"}),
                    ToolStep(id="file", tool="echo",
                             input={"message": "{{ steps.legal_ok.output }}"}),
                ],
                "finance": [
                    ApprovalStep(id="finance_ok", label="finance", schema={"type": "boolean"}),
                ],
            },
        ),
        ForeachStep(id="each", items=[1, 2], do=[
            ToolStep(id="x", tool="math", input={"op": "mul", "a": "{{ item }}", "b": 10}),
            ToolStep(id="y", tool="math",
                     input={"op": "add", "a": "{{ steps.x.output.result }}", "b": 1}),
        ]),
    ],
)  # fmt: skip


async def fork_nested(client: LoomClient) -> dict[str, str]:
    """A fork from inside a parallel branch with its approval edited, and an edit inside
    a foreach element: the sibling branch and the other element are reused whole."""
    origin = "golden-fork-nested-origin"
    await client.submit(RunRequest(plan=NESTED_FORK_PLAN, run_id=origin))
    await until(client, origin, "step_suspended", 2)
    for label in ("legal", "finance"):
        await resume_ok(client, origin, True, label=label)
    await client.wait(origin, timeout=BOUND_S)
    request = ForkRun(
        run_id=origin,
        from_step="reviews/legal/legal_ok",
        set_output={"reviews/legal/legal_ok": False, "each/1/x": {"result": 7}},
        new_run_id="golden-fork-nested",
    )
    await client.fork(request)
    await client.wait("golden-fork-nested", timeout=BOUND_S)
    return {"fork-nested-origin": origin, "fork-nested": "golden-fork-nested"}


def research_model(body: dict[str, Any]) -> Reply:
    """The model the agent examples meet: agent-intent-routing's classifies (a first
    answer outside the schema, then a good one); agent-research's adds with `math`,
    then answers."""
    last = body["messages"][-1]
    if "plan failed" in str(body["messages"][1]["content"]):  # replan: the rest of it
        return Reply(content=json.dumps(REPLAN_TAIL))
    if "personal assistant" in str(body["messages"][0]["content"]):  # agent-memory
        if last["role"] == "user":
            remember = {"doc": {"cat": "Miso"}, "expected_version": 0}
            return Reply(tool_calls=[ToolCall("working_memory_set", remember, id="call_wm")])
        return Reply(content="Noted: your cat is called Miso.")
    if "Classify" in str(body["messages"][0]["content"]):
        if last["role"] == "user" and "schema" not in str(last["content"]):
            return Reply(content="tracking, I think")
        return Reply(content=json.dumps({"intent": "tracking"}))
    if last["role"] == "user":
        return Reply(tool_calls=[
            ToolCall("math", {"op": "add", "a": 545923, "b": 231962}, id="call_add"),
            ToolCall("text", {"text": "lisbon and porto", "op": "title"}, id="call_title"),
        ], input_tokens=120, output_tokens=30)  # fmt: skip
    answer = {"summary": "Lisbon And Porto", "total": 777885}
    return Reply(content=json.dumps(answer), input_tokens=200, output_tokens=20)


REPLAN_TAIL = {
    "steps": [{"kind": "tool", "id": "shout", "tool": "text",
               "input": {"text": "{{ steps.fetch.output.message }}", "op": "upper"}}],
    "output": "{{ steps.shout.output.result }}",
}  # fmt: skip
# A planner model that never gives a valid tail: malformed, then a kept step's id again
REFUSER = [
    Reply(content="not a plan"),
    Reply(
        content=json.dumps(
            {"steps": [{"kind": "tool", "id": "a", "tool": "echo", "input": {"message": "again"}}]}
        )
    ),  # fmt: skip
    Reply(content="{}"),
]


async def replan_refused(client: LoomClient) -> dict[str, str]:
    plan = Plan(
        name="replan-refused",
        steps=[
            ToolStep(id="a", tool="echo", input={"message": "kept"}),
            ToolStep(
                id="b", tool="flaky", input={"fail_times": 2, "code": "broken"}, depends_on=["a"]
            ),  # fmt: skip
        ],
        replan=Replan(max=1, model="refuser"),
    )
    run_id = "golden-replan-refused"
    await client.submit(RunRequest(plan=plan, run_id=run_id))
    await client.wait(run_id, timeout=BOUND_S)
    return {"replan-refused": run_id}


# A model that sends what a careless or hostile one would: malformed tool-call JSON and
# an unknown tool, then an answer breaking the output schema, then nothing (500s).
HOSTILE = [
    Reply(tool_calls=[ToolCall("echo", "{not json", id="bad"), ToolCall("rm", {}, id="rm")]),
    Reply(content='{"total": "many"}'),
    Fail(500, "model down"),
]


async def agent_hostile(client: LoomClient) -> dict[str, str]:
    plan = Plan(
        name="agent-hostile",
        steps=[
            AgentStep(
                id="think", instructions="Answer with JSON {total: number}.", input="go",
                model="hostile", tools=["echo"], max_turns=4, on_error="continue",
                output_schema={"type": "object", "properties": {"total": {"type": "number"}},
                               "required": ["total"]},
            ),
            FinalStep(id="done", output="the agent gave up"),
        ],
    )  # fmt: skip
    run_id = "golden-agent-hostile"
    await client.submit(RunRequest(plan=plan, run_id=run_id))
    await client.wait(run_id, timeout=BOUND_S)
    return {"agent-hostile": run_id}


MODELS = """
default: main
num_retries: 0
models:
  main: {{model: openai/golden-model, api_base: "{url}",
         input_cost_per_token: 0.000001, output_cost_per_token: 0.000002}}
  hostile: {{model: openai/hostile-model, api_base: "{url}"}}
  refuser: {{model: openai/refuser-model, api_base: "{url}"}}
"""


def scenarios() -> list[Scenario]:
    found: list[Scenario] = [
        (lambda c, p=p: example(c, p)) for p in sorted(EXAMPLES.glob("*.yaml"))
    ]
    return [
        *found, approval_escalate, approval_many, tool_suspend, cancel, pause, fork, fork_nested,
        agent_hostile, replan_refused, queue,
    ]  # fmt: skip


# ----------------------------------------------------------------------------- main


def encode_jsonl(records: list[EventRecord]) -> str:
    """Exactly what ``loom show RUN -o jsonl`` prints."""
    return "".join(codec.encode(r).decode() + "\n" for r in records)


async def record_all(out_dir: Path, only: set[str] | None = None) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix="loom-golden-") as tmp, FakeModelServer() as model:
        model.script("hostile-model", *HOSTILE)
        model.script("refuser-model", *REFUSER)
        os.environ.setdefault("LOOM_EMBEDDER", "hash")  # agent-memory: no model download
        model.default = research_model
        models = Path(tmp) / "models.yaml"
        models.write_text(MODELS.format(url=model.base_url))
        quotas = Path(tmp) / "quotas.yaml"
        quotas.write_text(QUOTAS)
        server = EmbeddedNats(data_dir=Path(tmp) / "nats", port=-1).start()
        settings = Settings(
            nats_url=server.url,
            store=StoreSettings(kind="sqlite", data_dir=Path(tmp) / "data"),
            models_file=models,
            quotas_file=quotas,
        )
        stack = Stack(
            [
                ExecutorService(settings),
                PlannerService(settings),
                ToolRunnerService(settings, registry=registry()),
                MemoryService(settings),
                TracingService(settings),
            ],
            settings,
        )
        try:
            await stack.start()
            async with await LoomClient.connect(server.url) as client:
                await client.wait_ready()
                named: dict[str, str] = {}
                for found in await asyncio.gather(*(s(client) for s in scenarios())):
                    named.update(found)
                written = []
                for name, run_id in sorted(named.items()):
                    if only and name not in only:
                        continue
                    records = await client.events(run_id)
                    written.append(write(out_dir / f"{name}.jsonl", records))
                return written
        finally:
            await stack.close()
            server.stop()


def write(path: Path, records: list[EventRecord]) -> Path:
    if not records or not isinstance(records[-1].event, TERMINAL_EVENTS):
        raise RuntimeError(f"{path.name}: the run did not end ({records[-1:]})")
    report, _ = replay(records)
    if not report.identical:
        raise RuntimeError(f"{path.name}: replay is not identical: {report.divergence}")
    text = encode_jsonl(records)
    if len(text.encode()) > MAX_BYTES:
        raise RuntimeError(f"{path.name}: {len(text)} bytes; keep golden runs small")
    path.write_text(text)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GOLDEN, help="directory to write to")
    parser.add_argument("--only", action="append", help="write only this history (repeatable)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in asyncio.run(record_all(args.out, set(args.only or ()))):
        print(f"{path.name}: {sum(1 for _ in path.open())} events", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
