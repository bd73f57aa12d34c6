"""Every ``# type: ignore`` in the checked packages names its error code and says why
(issue 16: 35 bare ignores were kept by nothing). mypy keeps each one needed
(``warn_unused_ignores``) and coded (``ignore-without-code``) in ``make lint``; this
test keeps the reason, which no checker can."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `# type: ignore[code, code]` then, in the same comment, `# why`
IGNORE = re.compile(r"#\s*type:\s*ignore(?P<codes>\[[a-z0-9_, -]+\])?(?P<rest>.*)$")


def ignores() -> list[tuple[str, int, str]]:
    found = []
    for base in ("libs", "services"):  # the packages mypy checks (pyproject.toml)
        for path in sorted((ROOT / base).rglob("*.py")):
            tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
            for token in tokens:
                if token.type == tokenize.COMMENT and IGNORE.search(token.string):
                    found.append((str(path.relative_to(ROOT)), token.start[0], token.string))
    return found


def test_every_type_ignore_names_its_code_and_its_reason() -> None:
    found = ignores()
    assert found, "the scan found no ignore at all: is the pattern still right?"
    bad = []
    for path, line, comment in found:
        match = IGNORE.search(comment)
        assert match is not None
        reason = match["rest"].strip().removeprefix("#").strip()
        if not match["codes"] or len(reason.split()) < 3:
            bad.append(f"{path}:{line}: {comment}")
    assert not bad, (
        "write `# type: ignore[code]  # why it is right here` (or fix the type):\n" + "\n".join(bad)
    )
