"""Local calls: trusted, pure built-in tools run inside the executor, as Temporal runs
local activities (issue 10).

A ``tool_call_requested`` for one of these tools is answered in the same writer batch
that decided it: the host runs the tool, turns the outcome into the ``ToolResult`` the
tool-runner would have sent, and feeds it to ``advance`` like any inbox message. The
request and its ``tool_call_completed``/``failed`` are then stored in the one commit of
that batch, so a run's history is exactly what a tool-runner would have produced
(replay feeds the recorded result back, as for any tool), and the step costs no hop,
no ledger and no inbox message.

Why this keeps every guarantee:
- the store is the truth, and nothing is half done: request and result are committed
  together or not at all; after a crash before the commit, neither exists and the run
  re-decides the same request when its message is redelivered;
- exactly once: these tools have no effect outside their output (pure functions of
  their input, bounded work: no I/O, no sleeping, no unbounded CPU), so "ran but not
  recorded" is indistinguishable from "did not run";
- the tool-runner does not run them again: the relay marks a request whose answer is in
  the same published batch (``subjects.ANSWERED``) and the runner acks it unread. If a
  batch boundary ever splits them, the runner runs the pure tool once more and the
  executor refuses the second result (the attempt is over): harmless;
- untrusted input stays confined: the input was validated by the plan and is again by
  the tool's input type; an output over the run's limit becomes ``output_too_large`` as
  in the tool-runner (``bounded_outcome``); requests naming secrets are never local
  (secrets are resolved only in the tool-runner);
- big data stays by reference: a request whose input holds a blob reference is never
  local (only the tool-runner resolves references), and a local output over the blob
  threshold is dropped and the request left to the tool-runner, which stores it as a blob
  (running a pure tool twice is harmless).

Which tools: ``LOOM_LOCAL_TOOLS`` (comma-separated built-in names; empty: none), by
default the pure built-ins below. A tool is local only if it is a built-in of this code
version: an operator's module cannot make its own tool run in the executor.

``LOOM_LOCAL_BUDGET`` bounds the local calls one run may make in one batch (a chain of
local steps advances that many steps per commit, then yields the writer to other runs;
a request past the budget goes to the tool-runner like any other).
"""

from __future__ import annotations

import msgspec

from loom_core import blobs
from loom_core.contracts import RunEvent, SizeLimits, ToolCallRequested, ToolResult
from loom_infra import bus
from loom_infra.settings import DeliverySettings
from loom_services.tools.library import default_registry
from loom_services.tools.registry import ToolContext, ToolSettings, execute_tool

# pure, bounded, no I/O: their output is a function of their input alone
PURE_BUILTINS = ("noop", "echo", "text", "concat", "math")


class LocalTools:
    def __init__(
        self,
        names: tuple[str, ...],
        limits: SizeLimits,
        budget: int,
        blob_threshold: int = blobs.DEFAULT_THRESHOLD_BYTES,
    ) -> None:
        registry = default_registry()
        unknown = [n for n in names if n not in PURE_BUILTINS]
        if unknown:
            raise ValueError(
                f"LOOM_LOCAL_TOOLS: {', '.join(unknown)} cannot run in the executor; only "
                f"these pure built-ins can: {', '.join(PURE_BUILTINS)}"
            )
        self.registry = registry
        self.names = frozenset(n for n in names if registry.get(n) is not None)
        self.limits = limits
        self.budget = budget
        self.blob_threshold = blob_threshold
        self.calls = 0

    @classmethod
    def from_settings(
        cls,
        limits: SizeLimits,
        delivery: DeliverySettings,
        blob_threshold: int = blobs.DEFAULT_THRESHOLD_BYTES,
    ) -> LocalTools:
        """LOOM_LOCAL_TOOLS (unset: every pure built-in) and LOOM_LOCAL_BUDGET, as the
        settings module read them at start."""
        names = PURE_BUILTINS if delivery.local_tools is None else delivery.local_tools
        return cls(names, limits, delivery.local_budget, blob_threshold)

    def takes(self, event: RunEvent) -> bool:
        return (
            isinstance(event, ToolCallRequested)
            and event.tool in self.names
            and not event.secret_refs
            and event.resume is None
            and b'"$blob"' not in msgspec.json.encode(event.input)
        )

    async def answer(self, run_id: str, request: ToolCallRequested) -> ToolResult | None:
        """The result the tool-runner would send for ``request``; None when the output
        must be stored by reference (the tool-runner's work: it gets the request)."""
        from loom_services.toolrunner import bounded_outcome, tool_result  # as there

        ctx = ToolContext(
            idempotency_key=request.idempotency_key,
            run_id=run_id,
            step_id=request.step_id,
            attempt=request.attempt,
            settings=ToolSettings(),
        )
        started = bus.now()
        outcome = await execute_tool(
            self.registry, request.tool, request.input, ctx, request.timeout_s
        )
        if outcome.ok and len(msgspec.json.encode(outcome.output)) > self.blob_threshold:
            return None
        outcome = bounded_outcome(outcome, self.limits, request.step_id)
        self.calls += 1
        return tool_result(run_id, request, outcome, started)
