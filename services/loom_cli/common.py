"""What every ``loom`` command shares: output formats, the ``--nats`` option, error
exits and the connection to the stack. Command modules import from here (never from
``loom_cli.app``), so there is no import cycle between them."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from enum import StrEnum
from typing import Any

import msgspec
import typer
from rich.markup import escape
from rich.text import Text

from loom_cli.render import progress_line, stderr, stdout
from loom_core import codec, routes
from loom_core.contracts import EventRecord, ModelChunk, RunCompleted, RunRequest
from loom_infra.client import LoomClient, LoomError
from loom_infra.settings import settings_from_env


class Output(StrEnum):
    text = "text"
    json = "json"
    jsonl = "jsonl"


OutputOpt = typer.Option(Output.text, "--output", "-o", help="text, json or jsonl")
UrlOpt = typer.Option(None, "--nats", envvar="LOOM_NATS_URL", help="NATS URL of the stack")
TokenOpt = typer.Option(
    None,
    "--token",
    envvar="LOOM_TOKEN",
    show_default=False,
    help="bearer JWT of the user the run acts for (prefer LOOM_TOKEN: argv is visible)",
)


def dump(value: Any) -> str:
    return json.dumps(msgspec.to_builtins(value), indent=2, ensure_ascii=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print the error (never interpreted as markup) and return the exit to raise."""
    # soft_wrap: one line whatever the width, so it can be grepped and copied
    stderr.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"{what} is not valid JSON: {exc}") from None


async def connect(url: str | None) -> LoomClient:
    settings = settings_from_env()
    if url:
        settings = dataclasses.replace(settings, nats_url=url)
    # the operator's key: LOOM_NKEY_SEED_FILE, else the one `loom up` wrote
    seed = settings.seed_file_for("operator")
    try:
        return await LoomClient.connect(settings.nats_url, seed=seed, identity="operator")
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    except Exception as exc:
        if "authorization" in str(exc).lower():
            raise fail(
                f"NATS at {settings.nats_url} refused "
                + (f"the operator key {seed}" if seed else "a connection without credentials")
                + ": set LOOM_NKEY_SEED_FILE to the operator seed (`loom up` prints where it "
                "is; by default {LOOM_DATA_DIR}/creds/operator.nk)"
            ) from None
        raise fail(
            f"cannot reach NATS at {settings.nats_url} ({exc.__class__.__name__}); "
            "start the stack with `loom up` or set LOOM_NATS_URL"
        ) from None


class _LiveText:
    """Model text streamed while a turn is generated (``loom.stream.{run_id}``), shown
    dim between the event lines; the events stay the truth (a late viewer sees the
    recorded turns as lines)."""

    def __init__(self) -> None:
        self.mid_line = False

    async def on_chunk(self, msg: Any) -> None:
        try:
            chunk = codec.decode(msg.data, ModelChunk)
        except Exception:  # noqa: BLE001 (a live view skips what it cannot read)
            return
        if not self.mid_line:
            stderr.print(Text(f"  {chunk.step_id} turn {chunk.turn}: ", style="magenta"), end="")
        stderr.print(Text(chunk.text, style="dim"), end="")
        self.mid_line = True

    def line(self, text: str) -> None:
        if self.mid_line:
            stderr.print()
            self.mid_line = False
        stderr.print(text)


async def _follow(client: LoomClient, run_id: str, quiet: bool) -> EventRecord:
    started: dict[str, datetime] = {}
    last: EventRecord | None = None
    live = _LiveText()
    sub = None
    if not quiet:
        subject = routes.MODEL_STREAM.subject(run_id=run_id)
        sub = await client.nc.subscribe(subject, cb=live.on_chunk)
    try:
        async for record in client.follow(run_id):
            last = record
            line = progress_line(record, started)
            if line and not quiet:
                live.line(line)
    finally:
        if sub is not None:
            await sub.unsubscribe()
    assert last is not None
    return last


async def run_and_report(
    client: LoomClient, request: RunRequest, output: Output, quiet: bool = False
) -> tuple[int, str | None]:
    """Submit, follow, print; returns (exit code, run id)."""
    try:
        accepted = await client.submit(request)
    except LoomError as exc:
        stderr.print(f"[red]submission refused:[/] {exc}")
        return 2, None
    return await follow_and_report(client, accepted.run_id, output, quiet), accepted.run_id


async def follow_and_report(
    client: LoomClient, run_id: str, output: Output, quiet: bool = False
) -> int:
    """Follow a run to its end and print its result; returns the exit code."""
    last = await _follow(client, run_id, quiet)
    ok = isinstance(last.event, RunCompleted)
    if output is Output.json:
        stdout.print_json(
            json.dumps(
                {
                    "run_id": run_id,
                    "status": "completed" if ok else last.kind,
                    "output": msgspec.to_builtins(last.event.output) if ok else None,  # type: ignore[union-attr]
                    "error": msgspec.to_builtins(getattr(last.event, "error", None)),
                }
            )
        )
    elif ok:
        stdout.print_json(json.dumps(msgspec.to_builtins(last.event.output)))  # type: ignore[union-attr]
    return 0 if ok else 1
