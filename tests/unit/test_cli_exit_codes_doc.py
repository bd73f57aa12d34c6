"""docs/cli.md documents every exit code the CLI uses (``ExitCode``), with its meaning,
and no other (issue 16: "exit codes mean something: document them")."""

from __future__ import annotations

import re
from pathlib import Path

from loom_cli.common import ExitCode

CLI_DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_the_exit_code_table_is_the_enum() -> None:
    text = CLI_DOC.read_text()
    table = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", table, re.MULTILINE)
    assert {int(code) for code, _ in rows} == {int(c) for c in ExitCode}
    assert all(meaning.strip() for _, meaning in rows)
