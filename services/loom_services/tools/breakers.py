"""Circuit breakers: one per tool and one per MCP server, on ``purgatory``.

Design notes
- A breaker counts *the dependency's* failures only. A tool's breaker: ``timeout``,
  ``tool_error`` (a crash, an MCP ``is_error``), ``tool_unavailable``,
  ``ambiguous_outcome``; a server's breaker only the transport ones
  (``tool_unavailable``, ``ambiguous_outcome``). A caller's mistake
  (``invalid_input``, ``forbidden``, an unknown tool) or a tool's deliberate typed answer
  never opens it, or one bad plan could switch a tool off for everyone.
- After ``threshold`` consecutive failures it opens: every call fails at once with
  ``circuit_open`` (retryable, with ``retry_after_s``), so the step's own retry policy
  waits out the cool-down; the executor's retries stay the one retry loop. After the
  cool-down the next call goes through (half-open): success closes it, failure reopens.
- Transitions are kept per call and handed back with its outcome, so they reach the
  run's events (``ToolResult.breaker`` / the error's ``details.breaker``) and from there
  its trace (span events ``breaker.<state>``); the current state of every breaker is in
  the tool catalog (``loom tools``).
- purgatory is driven by exceptions: a counted failure is raised inside its context as
  :class:`CountedFailure` and caught right outside; the caller sees only outcomes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from loom_core.contracts import JSON, ErrorInfo
from loom_core.errors import LoomError

# failures of the dependency, not of its caller (see the module doc)
# a tool's breaker: its own failures (a crash or an MCP is_error, a hang, a lost server)
TOOL_FAILURES = frozenset({"timeout", "tool_unavailable", "ambiguous_outcome", "tool_error"})
# an MCP server's breaker: only the transport (one bad tool must not block its siblings)
SERVER_FAILURES = frozenset({"tool_unavailable", "ambiguous_outcome"})

STATE_NAMES = {"closed": "closed", "opened": "open", "half-opened": "half_open"}


@dataclass(frozen=True)
class BreakerSettings:
    threshold: int = 5  # consecutive failures that open a breaker
    cooldown_s: float = 30.0  # how long it stays open before a trial call


def counts_as_failure(error: ErrorInfo | None, breaker: str) -> bool:
    """Whether breaker ``breaker`` (``tool:<name>`` or ``mcp:<server>``) counts this."""
    if error is None:
        return False
    return error.code in (SERVER_FAILURES if breaker.startswith("mcp:") else TOOL_FAILURES)


class CountedFailure(LoomError):
    """Raised inside a breaker's context for a failure it must count."""

    code = "tool_error"


@dataclass
class Transition:
    breaker: str
    from_state: str
    to_state: str
    at: datetime
    failures: int = 0

    def as_json(self) -> dict[str, JSON]:
        return {
            "breaker": self.breaker,
            "from": self.from_state,
            "to": self.to_state,
            "at": self.at.isoformat(),
            "failures": self.failures,
        }


@dataclass
class _Watch:
    """Transitions seen while one call held its breakers."""

    names: set[str]
    seen: list[Transition] = field(default_factory=list)


class Breakers:
    """Named breakers. ``call(names, fn)`` runs ``fn`` under each breaker in ``names``
    (e.g. ``("tool:time.now", "mcp:time")``) and returns ``(outcome, transitions)``."""

    def __init__(
        self,
        settings: BreakerSettings | None = None,
        on_change: Callable[[Transition], None] | None = None,
    ) -> None:
        self.settings = settings or BreakerSettings()
        self._factory = AsyncCircuitBreakerFactory(
            default_threshold=self.settings.threshold,
            default_ttl=self.settings.cooldown_s,
            # a refusal by another breaker of the same call, or a cancellation, says
            # nothing about this dependency
            exclude=[OpenedState, asyncio.CancelledError],
        )
        self._factory.add_listener(self._hook)
        self._states: dict[str, str] = {}
        self._failures: dict[str, int] = {}
        self._watches: list[_Watch] = []
        self.on_change = on_change

    def state(self, name: str) -> str:
        return STATE_NAMES.get(self._states.get(name, "closed"), "closed")

    def states(self) -> dict[str, str]:
        return {name: self.state(name) for name in self._states}

    def _hook(self, name: str, kind: str, event: Any) -> None:
        if kind == "failed":
            self._failures[name] = event.failure_count
            return
        if kind == "recovered":
            self._failures[name] = 0
            return
        if kind != "state_changed":
            return
        before = self._states.get(name, "closed")
        self._states[name] = event.state
        change = Transition(
            breaker=name,
            from_state=STATE_NAMES.get(before, before),
            to_state=STATE_NAMES.get(event.state, event.state),
            at=datetime.now(UTC),
            failures=self._failures.get(name, 0),
        )
        for watch in self._watches:
            if name in watch.names:
                watch.seen.append(change)
        if self.on_change is not None:
            self.on_change(change)

    async def call(
        self,
        names: tuple[str, ...],
        fn: Callable[[], Awaitable[Any]],
        failed: Callable[[Any, str], bool],
    ) -> tuple[Any, list[Transition], ErrorInfo | None]:
        """``(result, transitions, None)`` when ``fn`` ran (``failed(result, name)``
        says whether breaker ``name`` counts it as a failure), or ``(None, transitions,
        circuit_open error)`` when an open breaker refused the call without running it."""
        watch = _Watch(set(names))
        self._watches.append(watch)
        entered: list[tuple[str, Any]] = []
        try:
            for name in names:  # refuse before entering any: a refusal counts nowhere
                refusal = await self._open(name)
                if refusal is not None:
                    return None, watch.seen, refusal
            try:
                for name in names:
                    self._states.setdefault(name, "closed")
                    brk = await self._factory.get_breaker(name)
                    await brk.__aenter__()
                    entered.append((name, brk))
            except OpenedState as open_:  # opened by a concurrent call just now
                for _, brk in reversed(entered):
                    await brk.__aexit__(type(open_), open_, None)  # excluded: not counted
                return None, watch.seen, self._refusal(open_.circuit_name, open_.opened_at)
            try:
                result = await fn()
            except BaseException as exc:
                for _, brk in reversed(entered):
                    await brk.__aexit__(type(exc), exc, None)
                raise
            for name, brk in reversed(entered):
                if failed(result, name):
                    counted = CountedFailure()
                    await brk.__aexit__(CountedFailure, counted, None)
                else:
                    await brk.__aexit__(None, None, None)
            return result, watch.seen, None
        finally:
            self._watches.remove(watch)

    async def _open(self, name: str) -> ErrorInfo | None:
        async with self._factory.uow as uow:
            context = await uow.contexts.get(name)
        if context is None or context.state != "opened" or context.opened_at is None:
            return None
        if time.time() > context.opened_at + context.ttl:
            return None  # cool-down over: this call is the trial (half-open)
        return self._refusal(name, context.opened_at)

    def _refusal(self, name: str, opened_at: float) -> ErrorInfo:
        left = max(0.0, opened_at + self.settings.cooldown_s - time.time())
        return ErrorInfo(
            code="circuit_open",
            message=f"circuit breaker {name!r} is open after repeated failures; the call "
            f"was not made. It lets a trial call through in {left:.1f} s: give the step "
            "a retry policy that waits at least that long, or check the dependency "
            "(`loom tools` shows breaker states)",
            retryable=True,
            details={"breaker_name": name, "retry_after_s": round(left, 3)},
        )
