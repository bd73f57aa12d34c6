"""The whole conversation of a lean agent turn, for the planner service.

A ``model_call_requested`` with ``appended`` holds only the messages new since the
step's previous request (so a run's history grows linearly with its turns). The model
needs all of them: the planner keeps the conversations it sent, by (run, step, turn),
and extends the previous one; when it does not have it (a restart, another replica,
evicted) it reads the run's stored events from the executor (``apiRunEvents``, paged)
and folds the step's requests (``loom_core.agent.conversation``). Only stored events
count: the executor's store is the truth, never what arrived beside it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

from loom_core.agent import conversation, extend
from loom_core.contracts import (
    ModelCallRequested,
    ModelMessage,
    RunEventsQuery,
    RunEventsReply,
)
from loom_core.errors import LoomError

Ask = Callable[[RunEventsQuery], Awaitable[RunEventsReply]]
KEPT = 256  # conversations kept (each at most the step input limit)


class ConversationUnavailable(LoomError):
    """The executor did not give the stored events: retry later."""

    code = "unavailable"
    retryable = True


class ConversationMissing(LoomError):
    """The stored history lacks an earlier turn's request: the turn cannot be asked."""

    code = "conversation_unavailable"


class Conversations:
    def __init__(self, ask: Ask, kept: int = KEPT) -> None:
        self.ask = ask
        self.kept = kept
        self._sent: OrderedDict[tuple[str, str, int], list[ModelMessage]] = OrderedDict()
        self.reads = 0  # histories read from the executor (a miss), for tests and metrics

    async def of(self, run_id: str, event: ModelCallRequested) -> list[ModelMessage]:
        """The conversation ``event`` asks about, whole."""
        if not event.appended:
            messages = list(event.messages)
        else:
            before = self._sent.get((run_id, event.step_id, event.turn - 1))
            if before is None:
                before = await self._read(run_id, event.step_id, event.turn - 1)
            messages = extend(before, event)
        self._keep((run_id, event.step_id, event.turn), messages)
        return messages

    def _keep(self, key: tuple[str, str, int], messages: list[ModelMessage]) -> None:
        self._sent[key] = messages
        self._sent.move_to_end(key)
        while len(self._sent) > self.kept:
            self._sent.popitem(last=False)

    async def _read(self, run_id: str, step_id: str, turn: int) -> list[ModelMessage]:
        self.reads += 1
        requests: list[ModelCallRequested] = []
        after = 0
        while True:
            reply = await self.ask(RunEventsQuery(run_id=run_id, after_seq=after))
            if reply.error is not None:
                raise ConversationUnavailable(reply.error.message)
            requests += [
                r.event
                for r in reply.events
                if isinstance(r.event, ModelCallRequested) and r.event.step_id == step_id
            ]
            if reply.next_after_seq is None or reply.next_after_seq <= after:
                break
            after = reply.next_after_seq
        messages = conversation(requests, turn)
        if messages is None:
            raise ConversationMissing(
                f"run {run_id}: the requests of step {step_id!r} up to turn {turn} are not all "
                "stored; a lean turn cannot be answered without them"
            )
        return messages
