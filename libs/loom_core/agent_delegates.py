"""Plans (other agents) an agent step's model calls as tools (``AgentStep.delegates``),
pure.

A call to a delegate is not run by the tool-runner: the executor checks its arguments
(a JSON object matching the delegate's ``input_schema``, else the refusal is told to the
model) and records ``sub_run_requested`` at the call's instance path
(``{step}/c{turn}-{k}``). The executor's sub-run consumer starts the child with the
parent link, as for a ``sub_run`` step; the child's end comes back to the parent's
inbox and is recorded as ``sub_run_ended``, whose output (or error) is the tool's
answer in the next turn. Replay reads both from the history: no child is started again.
"""

from __future__ import annotations

from loom_core import agent_memory
from loom_core.contracts import AgentDelegate, AgentStep, ErrorInfo, PlanIssue, ToolSpec
from loom_core.ids import is_token
from loom_core.schemas import problems

MAX_DELEGATES = 16
MAX_CHILD_RUNS = 64  # delegate calls one agent step may make in all (each is a whole run)


def specs(step: AgentStep) -> list[ToolSpec]:
    """The delegates as the planner describes them to the model."""
    return [
        ToolSpec(
            name=name,
            description=d.description,
            input_schema=d.input_schema,
            output_schema={},
            source="delegate",
        )  # fmt: skip
        for name, d in sorted(step.delegates.items())
    ]


def argument_problem(
    delegate: AgentDelegate, args: dict, where: str, started: int
) -> ErrorInfo | None:
    """Why a delegate call is refused (told to the model), or None. ``started``: child
    runs the step started so far."""
    if started >= MAX_CHILD_RUNS:
        return ErrorInfo(code="too_many_delegate_calls", path=where,
                         message=f"this agent step started {MAX_CHILD_RUNS} delegate runs, "
                         "its limit; answer with what you have")  # fmt: skip
    found = problems(delegate.input_schema, args)
    if not found:
        return None
    text = "; ".join(f"{p}: {m}" for p, m in found[:5])
    return ErrorInfo(code="invalid_input", path=where,
                     message=f"the arguments do not match the input schema: {text}",
                     details={"problems": [list(p) for p in found[:5]]})  # fmt: skip


def issues(path: str, step: AgentStep) -> list[PlanIssue]:
    out = []
    if len(step.delegates) > MAX_DELEGATES:
        out.append(PlanIssue(code="invalid_step", path=f"{path}.delegates",
                             message=f"agent step {step.id!r}: at most {MAX_DELEGATES} "
                             "delegates"))  # fmt: skip
    for name in step.delegates:
        where = f"{path}.delegates.{name}"
        if not is_token(name):
            out.append(PlanIssue(code="invalid_step", path=where,
                                 message=f"delegate name {name[:80]!r}: 1-64 of A-Z, a-z, "
                                 "0-9, '_' or '-' (the model calls it by this name)"))  # fmt: skip
        if name in agent_memory.tools(step):
            out.append(PlanIssue(code="invalid_step", path=where,
                                 message=f"{name!r} is both a tool and a delegate of agent "
                                 f"step {step.id!r}: rename the delegate"))  # fmt: skip
        if step.delegates[name].input_schema.get("type", "object") != "object":
            out.append(PlanIssue(code="invalid_step", path=f"{where}.input_schema",
                                 message="a delegate's input is the child run's input: its "
                                 "schema must be of type object"))  # fmt: skip
    return out
