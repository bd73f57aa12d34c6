"""One bounded-wait helper (issue 16): a test that waits for something uses
``tests/integration/waiting.py`` (``until``/``first`` on a run's events, ``eventually``
on anything else), not a loop of its own around a sleep. This test reads every test
module and fails on such a loop outside that module and the places named below."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
HELPER = "integration/waiting.py"

# Loops around a sleep that are not waits for a condition, each with why.
NOT_WAITS = {
    ("integration/test_jetstream_cluster.py", "_publish"):
        "a publish retried (same Nats-Msg-Id) while the cluster elects a leader",
    ("integration/test_jetstream_cluster.py",
     "test_a_consumer_started_without_quorum_is_created_once_quorum_returns"):
        "a publish retried while leaders are elected (the wait before it is eventually)",
    ("integration/test_mcp_agent.py", "submit_when_listed"):
        "a submission retried until the catalog lists the MCP tools",
    ("integration/test_mcp_stack.py", "submit_when_listed"):
        "a submission retried until the catalog lists the MCP tools",
    ("mcp_servers/fixtures.py", "wait_listening"):
        "a connect retried; imported by MCP server processes, where waiting.py is not",
    ("e2e/test_crash.py", "until_effect_in_flight"):
        "polls a file a killed process writes, to kill at that instant (5 ms); e2e tests "
        "do not have tests/integration on their path",
    ("unit/test_catalog_cache.py", "settle"): "sleep(0): yields to other tasks, waits for none",
}  # fmt: skip


def loops_around_a_sleep() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(TESTS.rglob("*.py")):
        where = str(path.relative_to(TESTS))
        if where == HELPER:
            continue
        tree = ast.parse(path.read_text(), str(path))
        functions = [n for n in ast.walk(tree)
                     if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]  # fmt: skip
        for loop in ast.walk(tree):
            if not isinstance(loop, ast.While | ast.For | ast.AsyncFor):
                continue
            sleeps = any(
                isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                and n.func.attr == "sleep" for n in ast.walk(loop)
            )  # fmt: skip
            if sleeps:
                around = [f.name for f in functions
                          if f.lineno <= loop.lineno <= (f.end_lineno or f.lineno)]  # fmt: skip
                found.add((where, around[-1] if around else "<module>"))
    return found


def test_waits_use_the_one_helper() -> None:
    found = loops_around_a_sleep()
    home_made = found - set(NOT_WAITS)
    assert not home_made, (
        "wait with tests/integration/waiting.py (until, first, eventually), not a loop "
        f"of your own: {sorted(home_made)}"
    )
    assert set(NOT_WAITS) <= found, f"stale entries: {set(NOT_WAITS) - found}"
