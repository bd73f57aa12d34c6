"""The planner's copy of agent conversations (``loom_services.conversations``): a lean
turn extends the copy of the previous turn; without one the run's stored events are read
page by page and folded; an incomplete history is refused typed, never made up. The
executor's events API is a function here (its real route is exercised in
tests/integration/test_lean_turns.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    ModelCallRequested,
    ModelMessage,
    RunEventsQuery,
    RunEventsReply,
    StepStarted,
)
from loom_services.conversations import (
    ConversationMissing,
    Conversations,
    ConversationUnavailable,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def said(text: str, role: str = "user") -> ModelMessage:
    return ModelMessage(role=role, content=text)  # type: ignore[arg-type]


def turn(n: int, *texts: str, step: str = "a") -> ModelCallRequested:
    return ModelCallRequested(step_id=step, turn=n, messages=[said(t) for t in texts],
                              idempotency_key=f"r:{step}:turn{n}", appended=n > 1)  # fmt: skip


HISTORY = [StepStarted(step_id="a", attempt=1), turn(1, "sys", "task"), turn(1, "other", step="b"),
           turn(2, "reply", "result"), turn(3, "reply2")]  # fmt: skip


def pages(history: list, size: int = 2) -> tuple[list[RunEventsQuery], object]:
    asked: list[RunEventsQuery] = []

    async def ask(q: RunEventsQuery) -> RunEventsReply:
        asked.append(q)
        records = [
            EventRecord(run_id="r", seq=i + 1, at=T0, event=e) for i, e in enumerate(history)
        ]
        page = records[q.after_seq : q.after_seq + size]
        more = q.after_seq + size < len(records)
        return RunEventsReply(
            run_id="r", events=page, next_after_seq=q.after_seq + size if more else None
        )

    return asked, ask


def test_a_lean_turn_is_rebuilt_from_stored_pages_then_extended_from_the_copy() -> None:
    asked, ask = pages(HISTORY)
    conv = Conversations(ask)  # type: ignore[arg-type]
    got = asyncio.run(conv.of("r", turn(3, "reply2")))
    assert [m.content for m in got] == ["sys", "task", "reply", "result", "reply2"]
    assert conv.reads == 1 and [q.after_seq for q in asked] == [0, 2, 4]
    got = asyncio.run(conv.of("r", turn(4, "more")))
    assert got[-1].content == "more" and conv.reads == 1 and len(asked) == 3  # the copy


def test_a_history_without_an_earlier_turn_is_refused_typed() -> None:
    _, ask = pages([turn(1, "sys"), turn(3, "x")])
    with pytest.raises(ConversationMissing) as missing:
        asyncio.run(Conversations(ask).of("r", turn(4, "y")))  # type: ignore[arg-type]
    assert missing.value.info.code == "conversation_unavailable"


def test_an_executor_error_is_retryable() -> None:
    async def ask(q: RunEventsQuery) -> RunEventsReply:
        return RunEventsReply(error=ErrorInfo(code="unavailable", message="store down"))

    with pytest.raises(ConversationUnavailable) as down:
        asyncio.run(Conversations(ask).of("r", turn(2, "y")))
    assert down.value.retryable


def test_the_copies_are_bounded() -> None:
    _, ask = pages(HISTORY)
    conv = Conversations(ask, kept=2)  # type: ignore[arg-type]
    for n in range(1, 6):
        asyncio.run(conv.of("r", turn(n, f"m{n}", step="z")))
    assert len(conv._sent) == 2
