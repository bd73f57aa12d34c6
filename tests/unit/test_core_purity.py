"""The pure core (``loom_core``) has no I/O, clock or randomness (docs/design.md decision 4): its
decisions must replay exactly. Read from the source, so a new import of the file
system, the clock, the network or a service layer into the core fails here, function-
level imports included. (``proto_gen``, which writes files, moved to ``loom_infra``.)"""

from __future__ import annotations

import ast
from pathlib import Path

import loom_core

CORE = Path(loom_core.__file__).parent

# Modules whose import in the core means I/O, a clock, randomness or a layer above it.
FORBIDDEN = {
    "asyncio", "http", "io", "logging", "os", "pathlib", "random", "secrets", "shutil",
    "socket", "sqlite3", "subprocess", "sys", "tempfile", "threading", "time", "uuid",
    "urllib.request", "loom_infra", "loom_services", "loom_cli", "nats", "httpx",
    "psycopg", "eventsourcing", "qdrant_client", "litellm", "yaml",
}  # fmt: skip
# Calls that read the world whatever was imported.
FORBIDDEN_CALLS = {"open", "input", "print", "eval", "exec", "now", "utcnow", "today"}


def _forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)


def _offences(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if called in FORBIDDEN_CALLS:
                found.append(f"{path.name}:{node.lineno} calls {called}()")
        found += [f"{path.name}:{node.lineno} imports {n}" for n in names if _forbidden(n)]
    return found


def test_the_core_imports_no_io_clock_or_randomness() -> None:
    offences = [o for path in sorted(CORE.glob("*.py")) for o in _offences(path)]
    assert offences == []


def test_the_check_sees_what_it_forbids(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\nfrom pathlib import Path\ndef f():\n"
        "    import loom_infra.settings\n    return open('x'), datetime.now()\n"
    )
    assert _offences(bad) == [
        "bad.py:1 imports os",
        "bad.py:2 imports pathlib",
        "bad.py:4 imports loom_infra.settings",
        "bad.py:5 calls open()",
        "bad.py:5 calls now()",
    ]


def test_proto_gen_is_not_in_the_core() -> None:
    assert not (CORE / "proto_gen.py").exists()
