"""Bytes of an agent run's history, whole vs lean turn requests (pure core, no servers).

An agent of T turns calls ``echo`` in every turn but the last (each call's input and
output ~``--payload`` bytes). With whole turn requests (runs stored before lean turns,
``turn_messages: whole``) every ``model_call_requested`` repeats the conversation so
far, so the history grows with T^2; lean requests hold only what is new since the
previous turn. Prints the bytes of the turn requests and of the whole history, and the
CPU time to fold the history (``time.process_time``; the fold is what a restart pays).

    python bench/agent_history_bytes.py --turns 20 --payload 200
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from loom_core import codec
from loom_core.contracts import (
    AgentStep,
    EventRecord,
    ModelCallRequested,
    ModelMessage,
    ModelResult,
    ModelToolCall,
    ModelUsage,
    Plan,
    PlanProposed,
    RunRequest,
    ToolCallRequested,
    ToolResult,
)
from loom_core.executor import Submission, advance, fold, initial_state

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def run(turns: int, payload: int, mode: str) -> list[EventRecord]:
    plan = Plan(steps=[AgentStep(id="a", instructions="Echo until done.", input="go",
                                 tools=["echo"], max_turns=turns)])  # fmt: skip
    state, now, records = initial_state("r"), T0, []

    def send(message: Any) -> list[Any]:
        nonlocal now
        now += timedelta(milliseconds=1)
        produced = advance(state, message, now)
        records.extend(EventRecord(run_id="r", seq=len(records) + 1, at=now, event=e)
                       for e in produced)  # fmt: skip
        return produced

    send(Submission(RunRequest(plan=plan), turn_messages=mode))  # type: ignore[arg-type]
    pending = send(PlanProposed(run_id="r", plan=plan))
    while pending:
        event = pending.pop(0)
        if isinstance(event, ModelCallRequested):
            last = event.turn == turns
            args = json.dumps({"message": f"turn {event.turn} " + "x" * payload})
            message = ModelMessage(
                role="assistant",
                content="done" if last else None,
                tool_calls=[] if last else [ModelToolCall(id=f"c{event.turn}", name="echo",
                                                          arguments=args)],
            )  # fmt: skip
            pending += send(ModelResult(
                run_id="r", step_id="a", turn=event.turn, idempotency_key=event.idempotency_key,
                ok=True, started_at=now, finished_at=now, message=message,
                usage=ModelUsage(input_tokens=10, output_tokens=10, calls=1),
            ))  # fmt: skip
        elif isinstance(event, ToolCallRequested):
            pending += send(ToolResult(
                run_id="r", step_id=event.step_id, attempt=1,
                idempotency_key=event.idempotency_key, ok=True, started_at=now,
                finished_at=now, output=event.input,
            ))  # fmt: skip
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--payload", type=int, default=200)
    args = parser.parse_args()
    print(f"agent of {args.turns} turns, ~{args.payload} B per tool input/output")
    print(
        f"{'mode':>6} {'events':>7} {'turn requests B':>16} {'history B':>10} {'fold ms cpu':>12}"
    )
    for mode in ("whole", "new"):
        records = run(args.turns, args.payload, mode)
        asked = sum(len(codec.encode(r)) for r in records if r.kind == "model_call_requested")
        total = sum(len(codec.encode(r)) for r in records)
        events = [r.event for r in records]
        start = time.process_time()
        for _ in range(20):
            fold("r", events)
        cpu_ms = (time.process_time() - start) / 20 * 1000
        print(f"{mode:>6} {len(records):>7} {asked:>16,} {total:>10,} {cpu_ms:>12.2f}")


if __name__ == "__main__":
    main()
