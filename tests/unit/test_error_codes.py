"""The one list of error codes (``loom_core.error_codes``) covers every code the code
base emits, and ``proto/`` publishes it (issue 16: a client in another language could
not learn the codes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from loom_core import error_codes
from loom_infra import proto_gen

ROOT = Path(__file__).resolve().parents[2]
# the ways a code is written where an error is made
_EMITTED = re.compile(
    r"""(?:\bcode\s*=\s*|\bPlanIssue\(\s*|\b_issue\(\s*|\bself\.issue\(\s*|\bAuthError\(\s*
       |\bExpressionError\(\s*|\bScheduleError\(\s*|\bScheduleRefused\(\s*|\b_too_large\(\s*|\b_transport_failure\(\s*|\b_error\(\s*)
       "([a-z][a-z0-9_]*)\"""",
    re.VERBOSE,
)
# not codes: keyword arguments that happen to be called `code` elsewhere
_NOT_CODES = {"get"}


def emitted_codes() -> dict[str, str]:
    found: dict[str, str] = {}
    for top in ("libs", "services"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for m in _EMITTED.finditer(path.read_text(encoding="utf-8")):
                found.setdefault(m.group(1), str(path.relative_to(ROOT)))
    return {c: p for c, p in found.items() if c not in _NOT_CODES}


def test_every_emitted_code_is_registered() -> None:
    missing = {c: p for c, p in emitted_codes().items() if c not in error_codes.CODES}
    assert not missing, f"add these to loom_core/error_codes.py (code: first file): {missing}"


def test_the_scan_finds_codes_of_every_kind() -> None:
    codes = emitted_codes()
    for code in ("payload_too_large", "unknown_tool", "run_id_conflict", "invalid_expression",
                 "token_invalid", "foreign_template", "output_too_large"):  # fmt: skip
        assert code in codes, code


def test_every_code_has_an_area_and_a_meaning() -> None:
    for code, info in error_codes.CODES.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", code), code
        assert info.area in error_codes.AREAS, code
        assert len(info.meaning) > 10, code


def test_proto_lists_the_codes_and_the_limits() -> None:
    doc = json.loads((ROOT / "proto" / proto_gen.ERRORS_FILE).read_text(encoding="utf-8"))
    assert set(doc["codes"]) == set(error_codes.CODES)
    error = json.loads((ROOT / "proto" / "schemas" / "error.json").read_text(encoding="utf-8"))
    assert "payload_too_large" in error["$defs"]["ErrorInfo"]["properties"]["code"]["examples"]
    issue = json.loads((ROOT / "proto" / "schemas" / "plan_issue.json").read_text("utf-8"))
    plan_codes = issue["$defs"]["PlanIssue"]["properties"]["code"]["examples"]
    assert "unknown_tool" in plan_codes and "payload_too_large" not in plan_codes
    limits = json.loads((ROOT / "proto" / proto_gen.LIMITS_FILE).read_text(encoding="utf-8"))
    message = limits["limits"]["message"]
    assert message["setting"] == "LOOM_MAX_PAYLOAD" and message["code"] == "payload_too_large"
    assert message["default"] > 0


def test_the_submit_contract_says_how_resubmission_works() -> None:
    text = (ROOT / "proto" / proto_gen.ASYNCAPI_FILE).read_text(encoding="utf-8")
    assert "run_id_conflict" in text and "Nats-Msg-Id" in text
    assert "the broker dedupes nothing" in " ".join(text.split())
