"""End to end: nats-server and the five services as separate OS processes
(``python -m loom_services.<name>``), driven by raw JSON as a client in another
language would, and by the ``loom`` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom_core import subjects
from loom_core.contracts import RunCompleted
from loom_infra.client import LoomClient
from loom_infra.credentials import ADMIN, ensure_credentials
from loom_infra.natsserver import EmbeddedNats
from loom_infra.settings import StoreSettings

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LOOM = str(Path(sys.executable).parent / "loom")


class Processes:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, service: str) -> None:
        # each process holds its own key only, as a Kubernetes pod does
        seed = Path(self.env["LOOM_CREDS_DIR"]) / f"{service}.nk"
        self.procs[service] = subprocess.Popen(
            [sys.executable, "-m", f"loom_services.{service}"],
            env={**self.env, "LOOM_NKEY_SEED_FILE": str(seed)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(params=["sqlite", "postgres"])
def deployment(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, dict[str, str]]]:
    store: StoreSettings = request.getfixturevalue(
        f"{'sqlite' if request.param == 'sqlite' else 'pg'}_store_settings"
    )
    creds = ensure_credentials(tmp_path / "creds")
    server = EmbeddedNats(
        data_dir=tmp_path / "nats", port=-1, authorization=creds.authorization()
    ).start()
    env = {
        **os.environ,
        "LOOM_NATS_URL": server.url,
        "LOOM_STORE": store.kind,
        "LOOM_DATA_DIR": str(store.data_dir),
        "LOOM_LOG_LEVEL": "WARNING",
        "LOOM_CREDS_DIR": str(creds.directory),
        "LOOM_NKEY_SEED_FILE": str(creds.seed_file("operator")),  # the CLI's key
    }
    if store.postgres_url:
        env["LOOM_POSTGRES_URL"] = store.postgres_url
    admin = {**env, "LOOM_NKEY_SEED_FILE": str(creds.seed_file(ADMIN))}
    provisioned = loom(admin, "provision")  # as the Kubernetes Job does
    assert provisioned.returncode == 0, provisioned.stderr
    procs = Processes(env)
    for service in subjects.SERVICES:
        procs.start(service)
    try:
        yield server.url, env
    finally:
        procs.stop_all()
        server.stop()


def loom(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LOOM, *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )


async def test_five_processes_run_a_raw_json_submission_and_the_cli(
    deployment: tuple[str, dict[str, str]],
) -> None:
    url, env = deployment
    seeds = Path(env["LOOM_CREDS_DIR"])
    async with (
        await LoomClient.connect(url, seed=seeds / "operator.nk") as client,
        await LoomClient.connect(url, seed=seeds / "client.nk", identity="client") as app,
    ):
        await client.wait_ready(timeout=60)
        # another language: publish the documented JSON, read JSON events back
        raw = (ROOT / "proto" / "examples" / "run_request.json").read_bytes()
        answer = await app.nc.request(subjects.submit("client"), raw, timeout=10)
        reply = json.loads(answer.data)
        assert reply["type"] == "submit_accepted", reply
        run_id = reply["run_id"]
        records = await client.wait(run_id, timeout=60)
        assert isinstance(records[-1].event, RunCompleted)

    # the CLI against the same processes
    done = await asyncio.to_thread(loom, env, "run", "examples/hello-dag.yaml", "-o", "json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "completed"
    assert result["output"]["city_loud"] == "LISBON"
    assert "✓ greet" in done.stderr  # live progress on stderr

    shown = await asyncio.to_thread(loom, env, "show", result["run_id"], "-o", "jsonl")
    lines = [json.loads(x) for x in shown.stdout.splitlines()]
    assert [x["seq"] for x in lines] == list(range(1, len(lines) + 1))
    assert lines[-1]["event"]["type"] == "run_completed"

    listed = await asyncio.to_thread(loom, env, "runs", "-o", "json")
    assert listed.returncode == 0
    assert {r["run_id"] for r in json.loads(listed.stdout)} >= {run_id}

    traced = await asyncio.to_thread(loom, env, "trace", result["run_id"], "--rebuild")
    assert traced.returncode == 0, traced.stderr
    assert "execute_tool concat" in traced.stdout

    failed = await asyncio.to_thread(loom, env, "run", "examples/invalid-plan.yaml")
    assert failed.returncode == 1
    assert "dependency_cycle" in failed.stderr
