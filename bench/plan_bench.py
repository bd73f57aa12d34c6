"""What checking one submitted plan costs, piece by piece (issue 10, startcost).

A chain of N ``noop`` calls (``bench/steps.py``'s ``chain``), checked as the services
check it: the executor's submit (JSON depth, decode, secrets), the planner's check
against the live tool catalog (the built-in tools' specs), the executor's re-check of
the proposal and its dependency graph. Best of several repeats, garbage collection on
(its cost is part of the work), microseconds per plan and per plan step.

    python bench/plan_bench.py --steps 200
"""

from __future__ import annotations

import argparse
import gc
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import msgspec  # noqa: E402

from loom_core import codec, limits, secrets  # noqa: E402
from loom_core.contracts import RunRequest  # noqa: E402
from loom_core.foreign import foreign_syntax_issues  # noqa: E402
from loom_core.tool_access import check_tool_access  # noqa: E402
from loom_core.validation import dependencies, validate_plan  # noqa: E402
from loom_services.tools.builtins import BUILTIN_TOOLS  # noqa: E402
from steps import chain  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--number", type=int, default=20)
    args = parser.parse_args()
    n = args.steps
    plan = chain(n)
    data = codec.encode(RunRequest(plan=plan))
    doc = msgspec.json.decode(data)
    request = codec.decode(data, RunRequest)
    catalog = {spec.name: spec for spec in (t.spec() for t in BUILTIN_TOOLS)}
    pieces = {
        "executor submit: JSON depth (limits.check_json)": lambda: limits.check_json(doc),
        "executor submit: decode RunRequest": lambda: codec.decode(data, RunRequest),
        "executor submit: secrets.redact_request": lambda: secrets.redact_request(request),
        "planner: validate_plan (catalog, foreign)": lambda: validate_plan(
            plan, catalog, {}, foreign=True
        ),
        "  of which foreign_syntax_issues": lambda: foreign_syntax_issues(plan),
        "planner: check_tool_access": lambda: check_tool_access(plan, catalog, None),
        "executor: validate_plan (re-check)": lambda: validate_plan(plan, None, {}),
        "executor: dependencies (root graph)": lambda: dependencies(plan),
    }
    print(f"a chain of {n} noop calls; best of 7 x {args.number}, garbage collection on")
    for name, work in pieces.items():
        timer = timeit.Timer(work, setup="gc.enable()", globals={"gc": gc})
        best = min(timer.repeat(repeat=7, number=args.number)) / args.number
        print(f"  {name:48s} {best * 1e6:9.0f} us  {best * 1e6 / n:6.2f} us/step")


if __name__ == "__main__":
    main()
