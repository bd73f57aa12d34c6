"""Big data travels by reference (issue 9, docs/design.md decision 12), on a real stack: real
nats-server with JetStream (the blob bucket is an Object Store), SQLite and PostgreSQL.

A 10 MB value passes through three tool steps and out as the run's output, and no event
or inbox message comes near the broker's max_payload; then every hostile case: a
forged, malformed or corrupted reference, a blob too large to resolve, a full store, a
template that needs a blob's content, a secret that must not reach a blob."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tests.integration.conftest import make_settings
from typer.testing import CliRunner

from loom_cli.app import app
from loom_cli.blobs import write_range
from loom_cli.render import events_table
from loom_core import blobs, codec, subjects
from loom_core.contracts import EventRecord, ForkRun, Plan, RunRequest, ToolStep
from loom_core.replay import replay
from loom_infra.blobstore import CHUNK_BYTES, STREAM
from loom_infra.client import LoomClient, LoomError
from loom_infra.settings import BlobSettings, SecretSettings, StoreSettings
from loom_services.executor import ExecutorService
from loom_services.stack import LocalStack
from loom_services.tools.registry import ToolContext, ToolInput, ToolOutput, ToolRegistry

pytestmark = pytest.mark.integration

TEN_MB = 10 * 1024 * 1024
EVENT_BOUND = 16 * 1024  # no stored event and no inbox message of these runs is larger
FORGED = "sha256:" + "ab" * 32


# ----------------------------------------------------------------------------- tools


class MakeIn(ToolInput):
    size: int


class MakeOut(ToolOutput):
    text: str


async def make_text(inp: MakeIn, ctx: ToolContext) -> MakeOut:
    """A text of ``size`` characters (a tool making a big value)."""
    return MakeOut(text=("0123456789abcdef" * (inp.size // 16 + 1))[: inp.size])


class ForgeIn(ToolInput):
    digest: str = FORGED


class ForgeOut(ToolOutput):
    blob: str = msgspec.field(name="$blob")
    bytes: int = 12


async def forge_ref(inp: ForgeIn, ctx: ToolContext) -> ForgeOut:
    """A tool claiming its output is a stored blob it never stored."""
    return ForgeOut(blob=inp.digest)


def register(registry: ToolRegistry) -> None:
    registry.tool("make_text", "Make a text of the given size.")(make_text)
    registry.tool("forge_ref", "Answer with a reference to a blob that is not there.")(forge_ref)


# ----------------------------------------------------------------------------- fixtures


def _settings(store: StoreSettings, tmp_path: Path, **blob: Any) -> Any:
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "BLOB_CANARY").write_text("cnry-" + "5e" * 16)
    return make_settings(
        store,
        tool_modules=(__name__,),
        secrets=SecretSettings(dir=secrets),
        blobs=BlobSettings(**blob),
    )


@pytest.fixture
async def any_stack(store_settings: StoreSettings, tmp_path: Path) -> AsyncIterator[LocalStack]:
    """SQLite and PostgreSQL."""
    async with LocalStack(_settings(store_settings, tmp_path), nats_port=-1) as s:
        yield s


@pytest.fixture
async def any_client(any_stack: LocalStack) -> AsyncIterator[LoomClient]:
    async with await any_stack.client() as c:
        yield c


@pytest.fixture
async def blob_stack(
    sqlite_store_settings: StoreSettings, tmp_path: Path
) -> AsyncIterator[LocalStack]:
    async with LocalStack(_settings(sqlite_store_settings, tmp_path), nats_port=-1) as s:
        yield s


@pytest.fixture
async def blob_client(blob_stack: LocalStack) -> AsyncIterator[LoomClient]:
    async with await blob_stack.client() as c:
        yield c


@pytest.fixture
async def small_stack(
    sqlite_store_settings: StoreSettings, tmp_path: Path
) -> AsyncIterator[LocalStack]:
    """A stack whose blob limits are small enough to reach: 1 KiB threshold, 200 KB
    resolved per tool input, 1 MB per blob, a 3 MB bucket."""
    settings = _settings(
        sqlite_store_settings,
        tmp_path,
        threshold_bytes=1024,
        max_resolved_bytes=200_000,
        max_blob_bytes=1_000_000,
        bucket_max_bytes=3_000_000,
    )
    async with LocalStack(settings, nats_port=-1) as s:
        yield s


@pytest.fixture
async def small_client(small_stack: LocalStack) -> AsyncIterator[LoomClient]:
    async with await small_stack.client() as c:
        c.blob_settings = small_stack.settings.blobs
        yield c


async def _run(client: LoomClient, plan: Plan, run_input: dict[str, Any] | None = None) -> Any:
    accepted = await client.submit(RunRequest(plan=plan, input=run_input or {}))
    return await client.wait(accepted.run_id, timeout=60)


def _stored(stack: LocalStack, run_id: str) -> list[EventRecord]:
    assert stack.stack is not None
    executor = next(s for s in stack.stack.services if isinstance(s, ExecutorService))
    return executor.store.load(run_id)


def _failure(records: list[EventRecord]) -> Any:
    assert records[-1].kind == "run_failed", [r.kind for r in records]
    return next(r.event.error for r in records if r.kind == "step_failed")


async def _tool_results(stack: LocalStack) -> tuple[list[int], LoomClient]:
    """The sizes of the tool results the tool-runner sends from now on, straight to the
    executor (heard as an executor replica hears them), and the client hearing them."""
    sizes: list[int] = []

    async def seen(msg: Any) -> None:
        sizes.append(len(msg.data))

    listener = await stack.client("executor")
    await listener.nc.subscribe(subjects.tool_result("*"), cb=seen)
    return sizes, listener


# ----------------------------------------------------------------------------- 10 MB


THREE_TOOLS = Plan(
    steps=[
        ToolStep(id="a", tool="text", input={"text": "{{ input.doc }}", "op": "upper"}),
        # a field of a stored value: a projection, resolved by the tool-runner
        ToolStep(
            id="b", tool="text", input={"text": "{{ steps.a.output.result }}", "op": "reverse"}
        ),  # fmt: skip
        ToolStep(id="c", tool="echo", input={"message": "{{ steps.b.output }}"}),
    ],
    output={"final": "{{ steps.c.output }}"},
)


async def test_ten_megabytes_pass_through_three_tools_by_reference(
    any_stack: LocalStack, any_client: LoomClient
) -> None:
    blob_stack, blob_client = any_stack, any_client
    doc = ("loom blob " * (TEN_MB // 10 + 1))[:TEN_MB]
    results, listener = await _tool_results(blob_stack)
    # the client uploads the big input itself and submits its reference
    records = await _run(blob_client, THREE_TOOLS, {"doc": doc})
    assert records[-1].kind == "run_completed", records[-1].event
    final = records[-1].event.output["final"]
    assert blobs.is_ref(final)
    assert await blob_client.get_blob(final) == {"message": {"result": doc.upper()[::-1]}}
    # every step's request and result carried a reference, not the value
    requested = [r.event.input for r in records if r.kind == "tool_call_requested"]
    assert blobs.is_ref(requested[0]["text"])
    assert requested[1]["text"]["path"] == ["result"]  # a projection into a's output
    assert all(blobs.is_ref(r.event.output) for r in records if r.kind == "tool_call_completed")
    # no event and no message near max_payload
    stored = await asyncio.to_thread(_stored, blob_stack, records[0].run_id)
    largest = max(len(codec.encode(r)) for r in stored)
    assert largest < EVENT_BOUND, largest
    await listener.close()
    assert len(results) == 3 and max(results) < EVENT_BOUND, results
    info = await blob_client.blobs.info(blobs.parse_ref(final))
    assert info is not None and info.chunks * CHUNK_BYTES >= info.size > TEN_MB
    # replay needs no blob content: references are data in the events
    report, _ = replay(stored)
    assert report.identical, report
    # people see references readably
    rendered = io.StringIO()
    from rich.console import Console

    Console(file=rendered, width=200).print(events_table(stored))
    assert "<blob sha256:" in rendered.getvalue()


async def test_a_fork_reuses_a_blob_output_by_its_reference(
    any_client: LoomClient,
) -> None:
    blob_client = any_client
    records = await _run(blob_client, THREE_TOOLS, {"doc": "x" * 200_000})
    assert records[-1].kind == "run_completed"
    a_out = next(r.event.output for r in records if r.kind == "step_completed")
    reply = await blob_client.fork(ForkRun(run_id=records[0].run_id, from_step="c"))
    forked = await blob_client.wait(reply.run_id, timeout=60)
    assert forked[-1].kind == "run_completed", [r.kind for r in forked]
    reused = [r.event for r in forked if r.kind == "step_completed" and r.event.step_id == "a"]
    assert reused and reused[0].output == a_out  # the same reference, not a copy
    assert forked[-1].event.output == records[-1].event.output  # same content, same ref
    # an edited output naming a blob that is not stored is refused, naming it
    with pytest.raises(LoomError) as caught:
        await blob_client.fork(ForkRun(
            run_id=records[0].run_id, from_step="b",
            set_output={"a": {"$blob": FORGED, "bytes": 9}},
        ))  # fmt: skip
    assert caught.value.error.code == "blob_not_found"
    assert caught.value.error.path == "$.set_output.a"


async def test_the_submit_only_client_uploads_a_big_input_itself(blob_stack: LocalStack) -> None:
    plan = Plan(steps=[ToolStep(id="n", tool="text", input={"text": "{{ input.doc }}",
                                                           "op": "length"})])  # fmt: skip
    async with await blob_stack.client("client") as client:  # submit + upload, no reads
        accepted = await client.submit(RunRequest(plan=plan, input={"doc": "d" * 500_000}))
    async with await blob_stack.client() as operator:
        records = await operator.wait(accepted.run_id, timeout=60)
    assert records[-1].kind == "run_completed", records[-1].event
    assert records[-1].event.output == {"n": {"result": 500_000}}
    assert blobs.is_ref(records[0].event.input["doc"])


# ----------------------------------------------------------------------------- CLI


async def test_blob_get_streams_a_byte_range_and_checks_the_digest(
    blob_client: LoomClient,
) -> None:
    value = {"rows": list(range(100_000))}
    ref = await blob_client.put_blob(value)
    assert ref == await blob_client.put_blob(value)  # stored once, same reference
    whole = io.BytesIO()
    assert await write_range(blob_client, ref[blobs.BLOB_KEY], whole) == ref["bytes"]
    assert json.loads(whole.getvalue()) == value
    page = io.BytesIO()
    assert await write_range(blob_client, ref, page, offset=200_000, length=1000) == 1000
    assert page.getvalue() == whole.getvalue()[200_000:201_000]


async def test_loom_blob_put_get_and_info_on_the_command_line(
    blob_stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_NKEY_SEED_FILE", str(blob_stack.seed_file("operator")))
    value = {"password": "hunter2-is-my-password", "rows": ["r" * 50] * 4000}
    source = tmp_path / "value.json"
    source.write_text(json.dumps(value))

    def cli(*args: str) -> Any:
        return CliRunner().invoke(app, [*args, "--nats", blob_stack.url])

    put = await asyncio.to_thread(cli, "blob", "put", str(source))
    assert put.exit_code == 0, put.output
    ref = json.loads(put.stdout)
    assert blobs.is_ref(ref)
    target = tmp_path / "out.json"
    got = await asyncio.to_thread(cli, "blob", "get", ref[blobs.BLOB_KEY], "-O", str(target))
    assert got.exit_code == 0, got.output
    fetched = json.loads(target.read_bytes())
    assert fetched["rows"] == value["rows"]
    assert fetched["password"] == "[redacted]"  # an upload is redacted like a run input
    page = await asyncio.to_thread(
        cli, "blob", "get", json.dumps(ref), "--offset", "2", "--length", "8"
    )
    assert page.exit_code == 0 and page.stdout == target.read_text()[2:10]
    info = await asyncio.to_thread(cli, "blob", "info", ref[blobs.BLOB_KEY])
    assert info.exit_code == 0 and "<blob sha256:" in info.stdout
    missing = await asyncio.to_thread(cli, "blob", "get", FORGED)
    assert missing.exit_code == 1 and "blob_not_found" in missing.output
    assert "Traceback" not in missing.output


# ----------------------------------------------------------------------------- hostile


async def test_a_forged_or_malformed_reference_in_a_run_input_is_refused_naming_it(
    blob_client: LoomClient,
) -> None:
    plan = Plan(steps=[ToolStep(id="a", tool="echo", input={"message": "{{ input.doc }}"})])
    forged = {"doc": {"nested": [{"$blob": FORGED, "bytes": 12}]}}
    with pytest.raises(LoomError) as caught:
        await _run(blob_client, plan, forged)
    assert caught.value.error.code == "blob_not_found"
    assert caught.value.error.path == "$.input.doc.nested[0]"
    with pytest.raises(LoomError) as caught:
        await _run(blob_client, plan, {"doc": {"$blob": "sha256:nothex", "bytes": 1}})
    assert caught.value.error.code == "bad_blob_reference"
    assert caught.value.error.path == "$.input.doc"
    # one the plan writes is checked too
    in_plan = Plan(steps=[ToolStep(id="a", tool="echo",
                                   input={"message": {"$blob": FORGED, "bytes": 3}})])  # fmt: skip
    with pytest.raises(LoomError) as caught:
        await _run(blob_client, in_plan)
    assert caught.value.error.code == "blob_not_found"
    assert caught.value.error.path == "$.plan.steps[0].input.message"


async def test_a_forged_reference_in_a_tool_output_fails_the_step(
    blob_client: LoomClient,
) -> None:
    records = await _run(blob_client, Plan(steps=[ToolStep(id="f", tool="forge_ref", input={})]))
    error = _failure(records)
    assert error.code == "blob_not_found"
    assert error.path == "$.steps.f.output"
    assert "tool_call_completed" not in [r.kind for r in records]


async def test_a_blob_whose_content_is_not_its_name_is_refused(
    blob_stack: LocalStack, blob_client: LoomClient
) -> None:
    # any writer of the bucket can store other bytes under a name: readers check
    real = blobs.canonical({"v": "y" * 100_000})
    ref = blobs.ref_for(real)
    fake = real.replace(b"y", b"z")
    await _write_object(blob_client, ref.hex, fake)
    plan = Plan(steps=[ToolStep(id="a", tool="echo", input={"message": "{{ input.doc }}"})])
    records = await _run(blob_client, plan, {"doc": ref.as_json()})
    error = _failure(records)
    assert error.code == "blob_corrupt"
    assert error.path == "$.input.message"
    # storing the real value again heals the entry
    assert await blob_client.put_blob({"v": "y" * 100_000}) == ref.as_json()
    assert await blob_client.get_blob(ref.as_json()) == {"v": "y" * 100_000}


async def _write_object(client: LoomClient, name: str, data: bytes) -> None:
    """Bytes stored under ``name`` the way a careless writer could, with NATS alone."""
    obs = await client.js.object_store(subjects.BLOBS_BUCKET)
    await obs.put(name, data)


async def test_selecting_a_missing_field_of_a_blob_or_reading_one_inline_fails_typed(
    blob_client: LoomClient,
) -> None:
    missing = Plan(steps=[
        ToolStep(id="a", tool="make_text", input={"size": 100_000}),
        ToolStep(id="b", tool="text", input={"text": "{{ steps.a.output.nope }}",
                                             "op": "length"}),
    ])  # fmt: skip
    error = _failure(await _run(blob_client, missing))
    assert error.code == "missing_field"
    assert error.path == "$.input.text"
    assert "output.nope" in error.message
    inline = Plan(steps=[
        ToolStep(id="a", tool="make_text", input={"size": 100_000}),
        ToolStep(id="b", tool="echo", input={"message": "got: {{ steps.a.output.text }}"}),
    ])  # fmt: skip
    error = _failure(await _run(blob_client, inline))
    assert error.code == "blob_not_inline"
    assert error.path == "$.steps.b.input.message"
    assert "Pass it whole to a tool" in error.message


async def test_a_secret_a_tool_returns_never_reaches_a_blob(blob_client: LoomClient) -> None:
    plan = Plan(steps=[
        ToolStep(id="a", tool="echo", input={"message": {
            "leak": "{{ secrets.BLOB_CANARY }}", "pad": "{{ input.pad }}",
        }}),
    ])  # fmt: skip
    records = await _run(blob_client, plan, {"pad": "p" * 100_000})
    assert records[-1].kind == "run_completed", [r.kind for r in records]
    output = next(r.event.output for r in records if r.kind == "tool_call_completed")
    assert blobs.is_ref(output)
    chunks = [c async for c in blob_client.blob_chunks(output)]
    stored = b"".join(chunks)
    assert b"cnry-" not in stored and b"[redacted]" in stored


async def test_a_blob_over_the_resolve_limit_fails_the_step(small_client: LoomClient) -> None:
    ref = await small_client.put_blob("q" * 300_000)
    plan = Plan(steps=[ToolStep(id="a", tool="echo", input={"message": "{{ input.doc }}"})])
    error = _failure(await _run(small_client, plan, {"doc": ref}))
    assert error.code == "blob_too_large"
    assert error.details["limit"] == 200_000
    assert error.path == "$.input.message"
    # and one over the largest blob is refused at upload
    with pytest.raises(Exception) as caught:
        await small_client.put_blob("r" * 1_100_000)
    assert getattr(caught.value, "error", None) is not None
    assert caught.value.error.code == "blob_too_large"  # type: ignore[attr-defined]


async def test_a_full_store_fails_typed_and_other_runs_go_on(small_client: LoomClient) -> None:
    plan = Plan(steps=[ToolStep(id="a", tool="make_text", input={"size": "{{ input.n }}"})])
    first = await _run(small_client, plan, {"n": 900_000})
    assert first[-1].kind == "run_completed"
    codes = []
    for n in (900_001, 900_002, 900_003):  # three more do not fit in 3 MB
        records = await _run(small_client, plan, {"n": n})
        if records[-1].kind == "run_failed":
            codes.append(_failure(records).code)
    assert codes and set(codes) == {"blob_store_full"}
    small = await _run(small_client, plan, {"n": 10})  # small values need no blob
    assert small[-1].kind == "run_completed"
    assert small[-1].event.output == {"a": {"text": "0123456789"}}


def test_the_blob_reference_matches_its_published_schema() -> None:
    from loom_core.contracts import BlobReference

    ref = blobs.ref_for(b'"x"').project("k").as_json()
    decoded = msgspec.json.decode(msgspec.json.encode(ref), type=BlobReference)
    assert decoded.blob == ref["$blob"] and decoded.path == ["k"]
    assert f"OBJ_{subjects.BLOBS_BUCKET}" == STREAM
