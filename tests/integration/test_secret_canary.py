"""The secret canary: a random value placed everywhere a secret can enter a run never
reaches a store file, a stream, a trace, a dead letter or a log.

The canary enters (a) inline in a run's input under ``api_key`` and
``headers.Authorization``, (b) as ``{{ secrets.CANARY }}`` in a tool input, resolved by the
tool-runner from its secret directory, (c) in that tool's output under a plain key
(``text``), and (d) in rejected submissions (malformed JSON, and JSON of the wrong shape),
which are dead-lettered. A full stack runs them (credentials on, I/O captured in spans),
stops, and then every byte under the data directory (SQLite files and their WAL, the
JetStream store with its raw message blocks, snapshots; the nkey seeds excluded) and every
log record at DEBUG is searched: zero hits. On PostgreSQL every row of every table is
searched too. The tool reports a hash of what it received, so the test fails if
resolution were skipped; a control value under a plain key must be found, so the search
itself is shown to work.

A second test forges a ``tool_call_requested`` naming the secret (credentials off): the
tool-runner resolves secrets only for requests the executor stored, so the tool never runs.

This module is also the tool module the stack loads (``LOOM_TOOL_MODULES``-style):
``register`` adds ``echo_secret``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import waiting  # type: ignore[import-not-found]
from nats.js.api import DeliverPolicy
from psycopg import sql

from loom_core import codec, routes, subjects
from loom_core.contracts import (
    DeadLetter,
    EventRecord,
    RunCompleted,
    RunFailed,
    RunRequested,
    SubmitRejected,
    ToolCallFailed,
    ToolCallRequested,
    ToolResult,
)
from loom_infra.settings import SecretSettings, Settings, StoreSettings
from loom_services.stack import LocalStack
from loom_services.tools.registry import ToolContext, ToolInput, ToolOutput, ToolRegistry, tool

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- the tool


class EchoSecretInput(ToolInput):
    value: str
    header: str
    expect_sha256: str


class EchoSecretOutput(ToolOutput):
    text: str  # a plain key: only the scrub of resolved values can catch the canary here
    header: str
    sha256: str  # of what the tool received: proves it got the resolved value
    matches: bool
    header_ok: bool


RECEIVED: list[str] = []  # sha256 of every value the tool was called with


@tool("echo_secret", "Echo a secret back (test only): the tool-runner must scrub it.")
async def echo_secret(inp: EchoSecretInput, ctx: ToolContext) -> EchoSecretOutput:
    digest = hashlib.sha256(inp.value.encode()).hexdigest()
    RECEIVED.append(digest)
    return EchoSecretOutput(
        text=f"tool saw {inp.value}",
        header=inp.header,
        sha256=digest,
        matches=digest == inp.expect_sha256,
        header_ok=inp.header == f"Bearer {inp.value}",
    )


def register(registry: ToolRegistry) -> None:
    registry.register(echo_secret)


# --------------------------------------------------------------------------- helpers


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 20.0) -> Any:
    """Await ``check`` until it returns something truthy (bounded; polls a query)."""
    return await waiting.eventually(check, what, timeout, every_s=0.05)


def files_holding(root: Path, needles: list[bytes], skip: Path) -> dict[str, list[Path]]:
    """For each needle, the files under ``root`` (not under ``skip``) that contain it."""
    found: dict[str, list[Path]] = {n.decode(): [] for n in needles}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_relative_to(skip):
            continue
        data = path.read_bytes()
        for needle in needles:
            if needle in data:
                found[needle.decode()].append(path)
    return found


def rows_holding(postgres_url: str, needles: list[str]) -> dict[str, list[str]]:
    """For each needle, the tables of the run's PostgreSQL database holding it in any row
    (as text, or hex-encoded inside a bytea column)."""
    found: dict[str, list[str]] = {n: [] for n in needles}
    with psycopg.connect(postgres_url) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            )
        ]
        for table in tables:
            query = sql.SQL("SELECT t::text FROM {} AS t").format(sql.Identifier(table))
            text = "\n".join(row for (row,) in conn.execute(query))
            for needle in needles:
                if needle in text or needle.encode().hex() in text:
                    found[needle].append(table)
    return found


# --------------------------------------------------------------------------- the test


async def test_secret_canary_is_never_stored_streamed_traced_or_logged(
    store_settings: StoreSettings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("LOOM_TRACE_CAPTURE_IO", "1")  # spans carry step inputs/outputs
    canary = "cnry" + os.urandom(16).hex()
    control = "ctrl" + os.urandom(16).hex()  # plain data: must be found (the search works)
    secret_dir = tmp_path / "secrets"  # outside the data dir, like a mounted Secret
    secret_dir.mkdir()
    (secret_dir / "CANARY").write_text(canary)
    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=store_settings,
        tool_modules=(__name__,),
        secrets=SecretSettings(dir=secret_dir),
    )
    expected_sha = hashlib.sha256(canary.encode()).hexdigest()
    plan = {
        "steps": [
            {
                "kind": "tool",
                "id": "echo_in",
                "tool": "echo",
                "input": {
                    "message": {"headers": "{{ input.headers }}", "key": "{{ input.api_key }}"}
                },
            },
            {
                "kind": "tool",
                "id": "resolve",
                "tool": "echo_secret",
                "input": {
                    "value": "{{ secrets.CANARY }}",
                    "header": "Bearer {{ secrets.CANARY }}",
                    "expect_sha256": expected_sha,
                },
            },
        ],
        "output": {
            "echoed": "{{ steps.echo_in.output }}",
            "resolved": "{{ steps.resolve.output }}",
            "note": "{{ input.note }}",
        },
    }
    request = {
        "run_id": "canary-run",
        "plan": plan,
        "input": {
            "api_key": canary,
            "headers": {"Authorization": f"Bearer {canary}"},
            "note": control,
        },
    }
    missing = {
        "run_id": "missing-secret",
        "plan": {
            "steps": [
                {
                    "kind": "tool",
                    "id": "resolve",
                    "tool": "echo_secret",
                    "input": {
                        "value": "{{ secrets.NOT_THERE }}",
                        "header": "-",
                        "expect_sha256": "-",
                    },
                }
            ]
        },
    }
    async with LocalStack(settings, nats_port=-1) as stack:
        data_dir = Path(stack.settings.store.data_dir)
        creds_dir = Path(stack.settings.credentials_dir)
        async with await stack.client() as client:
            # (a), (b), (c): inline, referenced, echoed back
            reply = await client.submit_raw(json.dumps(request).encode())
            assert not isinstance(reply, SubmitRejected), reply
            records = await client.wait("canary-run", timeout=30)
            end = records[-1].event
            assert isinstance(end, RunCompleted), end
            first = records[0].event
            assert isinstance(first, RunRequested)
            assert first.redacted == ["$.input.api_key", "$.input.headers.Authorization"]
            assert first.input["api_key"] == "[redacted]"
            resolved = end.output["resolved"]
            assert resolved["sha256"] == expected_sha and resolved["matches"] is True
            assert resolved["header_ok"] is True  # resolved inside a larger string too
            assert resolved["text"] == "tool saw [redacted]"
            assert resolved["header"] == "Bearer [redacted]"
            assert end.output["echoed"] == {
                "message": {"headers": {"Authorization": "[redacted]"}, "key": "[redacted]"}
            }

            # a reference to a secret the tool-runner does not have: typed, not retried
            await client.submit_raw(json.dumps(missing).encode())
            failed = await client.wait("missing-secret", timeout=30)
            assert isinstance(failed[-1].event, RunFailed)
            errors = [r.event.error for r in failed if isinstance(r.event, ToolCallFailed)]
            assert [e.code for e in errors] == ["secret_not_found"]
            assert "'NOT_THERE'" in errors[0].message and errors[0].path == "$.value"

            # (d): rejected submissions are recorded (apart from poison), redacted
            malformed = (
                b'{"input": {"api_key": "' + canary.encode() + b'", "headers": '
                b'{"Authorization": "Bearer ' + canary.encode() + b'"}}, "plan": {"steps": ['
            )
            wrong_shape = json.dumps({"input": {"password": canary}, "plan": 5}).encode()
            for payload in (malformed, wrong_shape):
                rejected = await client.submit_raw(payload)
                assert isinstance(rejected, SubmitRejected)
            rejects = await client.js.subscribe(
                routes.REJECTED.subject(service="executor"),
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
            )  # recorded off the submit path: wait for the second (bounded)
            await rejects.next_msg(timeout=10)
            dead = codec.decode((await rejects.next_msg(timeout=10)).data, DeadLetter)
            await rejects.unsubscribe()
            assert '"password":"[redacted]"' in dead.payload

            # the read models have folded the run: memory's thread, tracing's spans
            async def thread_done() -> bool:
                return len(await client.thread("canary-run")) >= 2

            async def trace_done() -> bool:
                runs = await client.runs()
                return any(r.run_id == "canary-run" and r.status == "completed" for r in runs)

            await until(thread_done, "the memory thread of the run")
            await until(trace_done, "the traced run")
            spans = await client.trace("canary-run")
            captured = [s.attributes.get("loom.step.input", "") for s in spans]
            assert any("{{ secrets.CANARY }}" in str(c) for c in captured)

    # the stack is stopped: every file is complete and closed
    found = files_holding(data_dir, [canary.encode(), control.encode()], skip=creds_dir)
    assert found[canary] == [], found[canary]
    jetstream = [p for p in found[control] if "jetstream" in p.parts]
    assert jetstream, f"the control value is in no JetStream file: {found[control]}"
    if store_settings.kind == "sqlite":
        assert any(p.name.startswith("events.db") for p in found[control]), found[control]
    else:
        assert store_settings.postgres_url is not None
        rows = rows_holding(store_settings.postgres_url, [canary, control])
        assert rows[canary] == [], rows[canary]
        assert rows[control], "the control value is in no PostgreSQL table"

    logged = [caplog.text]
    for record in caplog.records:
        logged.append(record.getMessage())
        logged.append(record.exc_text or "")
    assert all(canary not in text for text in logged)


async def test_a_forged_request_gets_no_secret(
    sqlite_store_settings: StoreSettings, tmp_path: Path
) -> None:
    """With NATS credentials off anybody can publish a tool_call_requested naming any
    secret and any destination. The tool-runner resolves secrets only for a request the
    executor stored (it asks), so the forged call fails and the tool never runs."""
    canary = "cnry" + os.urandom(16).hex()
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    (secret_dir / "CANARY").write_text(canary)
    settings = Settings(
        nats_url="nats://127.0.0.1:4222",
        store=sqlite_store_settings,
        tool_modules=(__name__,),
        secrets=SecretSettings(dir=secret_dir),
    )
    forged = ToolCallRequested(
        step_id="a", attempt=1, tool="echo_secret", idempotency_key="forged:a:1",
        input={"value": "{{ secrets.CANARY }}", "header": "-", "expect_sha256": "-"},
        secret_refs={"$.value": ["CANARY"]},
    )  # fmt: skip
    record = EventRecord(run_id="forged", seq=3, at=datetime.now(UTC), event=forged)
    stack = LocalStack(settings, nats_port=-1, secure=False)
    async with stack, await stack.client() as client:
        sub = await client.js.subscribe(
            subjects.dead_letter("executor"),
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        await client.js.publish(
            subjects.run_event("forged", "tool_call_requested"), codec.encode(record)
        )
        # its result reaches the executor, which refuses it (no such run): the letter
        # holds the tool-runner's answer
        while True:
            letter = codec.decode((await sub.next_msg(timeout=20)).data, DeadLetter)
            if '"type":"tool_result"' in letter.payload:
                break
        await sub.unsubscribe()
    answer = codec.decode(letter.payload.encode(), ToolResult)
    assert answer.error is not None and answer.error.code == "untrusted_secret_reference"
    assert hashlib.sha256(canary.encode()).hexdigest() not in RECEIVED
    assert not answer.ok and answer.output is None
