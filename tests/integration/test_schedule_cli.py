"""``loom schedule ...`` as a user types it, against a real stack (nats-server with
credentials, SQLite, every service): create, list, describe, trigger, pause, resume,
delete; a schedule's runs show in ``loom runs`` with the label schedule=NAME; a mistake is
one line naming the field, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.integration.waiting import eventually

from loom_cli.common import ExitCode
from loom_infra.client import LoomClient
from loom_infra.settings import Settings, StoreSettings
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOOM = str(Path(sys.executable).parent / "loom")
PLAN = str(ROOT / "examples" / "hello-dag.yaml")


@pytest.fixture
async def live(
    sqlite_store_settings: StoreSettings,
) -> AsyncIterator[tuple[LoomClient, dict[str, str]]]:
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=sqlite_store_settings)
    async with LocalStack(settings, nats_port=-1) as stack:
        env = {**os.environ, "LOOM_NATS_URL": stack.url, "LOOM_LOG_LEVEL": "WARNING",
               "LOOM_NKEY_SEED_FILE": str(stack.seed_file("operator")),
               "COLUMNS": "250"}  # fmt: skip
        async with await stack.client() as client:
            yield client, env


async def loom(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = await asyncio.to_thread(
        subprocess.run, [LOOM, *args], env=env, capture_output=True, text=True, timeout=60,
        cwd=ROOT,
    )  # fmt: skip
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    return done


async def test_the_schedule_commands_end_to_end(
    live: tuple[LoomClient, dict[str, str]],
) -> None:
    client, env = live
    made = await loom(env, "schedule", "create", "daily", PLAN, "--cron", "0 9 * * mon-fri",
                      "--tz", "Europe/Lisbon", "-i", "name=Ada", "-o", "json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)["schedule"]
    assert created["when"]["cron"] == "0 9 * * mon-fri" and created["next_at"]

    listed = await loom(env, "schedule", "list")
    assert listed.returncode == 0 and "daily" in listed.stdout and "active" in listed.stdout

    fired = await loom(env, "schedule", "trigger", "daily", "-o", "json")
    assert fired.returncode == 0, fired.stderr
    run_id = json.loads(fired.stdout)["run_id"]
    records = await client.wait(run_id, timeout=20)
    assert records[-1].kind == "run_completed"
    assert records[0].event.input["name"] == "Ada"  # type: ignore[union-attr]

    async def shown() -> str | None:
        out = (await loom(env, "runs", "--limit", "5")).stdout
        return out if run_id in out and "schedule=daily" in out else None

    await eventually(shown, "the run with its label in `loom runs`", bound_s=20, every_s=0.2)

    paused = await loom(env, "schedule", "pause", "daily")
    assert paused.returncode == 0 and "paused" in paused.stdout
    resumed = await loom(env, "schedule", "resume", "daily")
    assert resumed.returncode == 0 and "active" in resumed.stdout
    described = await loom(env, "schedule", "describe", "daily")
    assert "acts for anonymous" in described.stdout and "schedule=daily" in described.stdout

    gone = await loom(env, "schedule", "delete", "daily")
    assert gone.returncode == 0
    missing = await loom(env, "schedule", "describe", "daily")
    assert missing.returncode == ExitCode.FAILED
    assert "schedule_not_found" in missing.stderr


async def test_mistakes_are_one_line_naming_the_field(
    live: tuple[LoomClient, dict[str, str]],
) -> None:
    _, env = live
    bad = await loom(env, "schedule", "create", "x", PLAN, "--cron", "0 0 31 2 *")
    assert bad.returncode == ExitCode.FAILED
    assert "invalid_cron at $.when.cron.day_of_month" in bad.stderr
    zone = await loom(env, "schedule", "create", "x", PLAN, "--every", "1h", "--tz", "Nowhere/X")
    assert zone.returncode == ExitCode.FAILED and "$.when.tz" in zone.stderr
    name = await loom(env, "schedule", "create", "a.b", PLAN, "--every", "1h")
    assert name.returncode == ExitCode.FAILED and "$.name" in name.stderr
    both = await loom(env, "schedule", "create", "x", PLAN, "--every", "1h", "--cron", "* * * * *")
    assert both.returncode == ExitCode.USAGE
    when = await loom(env, "schedule", "create", "x", PLAN, "--at", "tomorrow")
    assert when.returncode == ExitCode.USAGE and "--at" in when.stderr
    policy = await loom(env, "schedule", "create", "x", PLAN, "--every", "1h", "--catch-up", "some")
    assert policy.returncode == ExitCode.USAGE
