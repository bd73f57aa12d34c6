"""``-o json`` on ``resume`` and ``fork`` (issue 16: these verbs had no ``-o``): as OS
processes against a real stack, the answer is one JSON document on stdout, progress on
stderr, exit 0, and a refused resume is JSON too, exit 1 (docs/cli.md)."""

from __future__ import annotations

import json

import pytest
from test_cli_as_new_user import EXAMPLES, Live, aloom, clean, live  # type: ignore[import-not-found]  # noqa: F401
from waiting import having, until  # type: ignore[import-not-found]

from loom_cli.app import load_run_request

pytestmark = pytest.mark.integration


async def test_resume_and_fork_answer_in_json(live: Live) -> None:  # noqa: F811
    accepted = await live.client.submit(load_run_request(EXAMPLES / "approval.yaml", [], None))
    run_id = accepted.run_id
    await until(live.client, run_id, having("step_suspended"))

    wrong = await aloom(live.env, "resume", run_id, "--label", "manager",
                        "--data", '{"approved": "yes"}', "-o", "json")  # fmt: skip
    clean(wrong)
    assert wrong.returncode == 1
    refused = json.loads(wrong.stdout)
    assert refused["error"]["code"] and "$.data.approved" in json.dumps(refused)

    resumed = await aloom(live.env, "resume", run_id, "--label", "manager",
                          "--data", '{"approved": true, "note": "ok"}', "-o", "json")  # fmt: skip
    clean(resumed)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["suspension_id"]
    records = await live.client.wait(run_id, timeout=30)
    assert records[-1].kind == "run_completed"

    forked = await aloom(live.env, "fork", run_id, "--from-step", "quote", "--no-follow",
                         "-o", "json")  # fmt: skip
    clean(forked)
    assert forked.returncode == 0, forked.stderr
    body = json.loads(forked.stdout)
    assert body["run_id"] != run_id and body["existing"] is False
