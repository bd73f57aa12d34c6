"""What every ``loom`` command shares: output formats, the ``--nats`` option, error
exits and the connection to the stack. Command modules import from here (never from
``loom_cli.app``), so there is no import cycle between them."""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Any

import msgspec
import typer
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from rich.markup import escape
from rich.text import Text

from loom_cli.render import progress_line, stderr, stdout
from loom_core import blobs, codec, routes, tenancy
from loom_core.contracts import (
    ErrorInfo,
    EventRecord,
    ModelChunk,
    PlanRejected,
    RunCancelled,
    RunCompleted,
    RunRequest,
)
from loom_core.statuses import status_after
from loom_infra.client import LoomClient, LoomError
from loom_infra.settings import settings_from_env


class ExitCode(IntEnum):
    """What a ``loom`` exit code means (docs/cli.md)."""

    OK = 0
    FAILED = 1  # the run did not complete; a request was refused; no such run
    USAGE = 2  # the command line, or a file or value given to it, is wrong
    UNAVAILABLE = 3  # the stack cannot be reached, did not answer in time, cannot start
    BUG = 4  # an unexpected error: rerun with --debug and report it
    INTERRUPTED = 130  # Ctrl-C (a submitted run goes on)


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
        raise fail(f"{what} is not valid JSON: {exc}", ExitCode.USAGE) from None
    except RecursionError:
        raise fail(f"{what} is nested too deeply", ExitCode.USAGE) from None


async def connect(url: str | None) -> LoomClient:
    settings = settings_from_env()
    if url:
        settings = dataclasses.replace(settings, nats_url=url)
    # the operator's key: LOOM_NKEY_SEED_FILE, else the one `loom up` wrote (of the
    # tenant LOOM_TENANT names, if any: then everything is scoped to that tenant)
    tenant = settings.tenant
    user = "operator" if tenant is None else tenancy.user("operator", tenant)
    seed = settings.seed_file_for(user)
    try:
        return await LoomClient.connect(
            settings.nats_url, seed=seed, identity="operator", tenant=tenant
        )
    except FileNotFoundError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except Exception as exc:
        if "authorization" in str(exc).lower():
            raise fail(
                f"NATS at {settings.nats_url} refused "
                + (f"the key {seed} of {user}" if seed else "a connection without credentials")
                + ": set LOOM_NKEY_SEED_FILE to the operator seed (`loom up` prints where it "
                "is; by default {LOOM_DATA_DIR}/creds/operator.nk)",
                ExitCode.UNAVAILABLE,
            ) from None
        raise fail(
            f"cannot reach NATS at {settings.nats_url} ({exc.__class__.__name__}); "
            "start the stack with `loom up` or set LOOM_NATS_URL",
            ExitCode.UNAVAILABLE,
        ) from None


class Following:
    """The run a command follows, so Ctrl-C can say which run goes on and how to get
    back to it (``interrupted``)."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id  # the id being submitted, or followed
        self.submitted = False  # the stack said it has the run

    def interrupted(self, again: str | None = None) -> typer.Exit:
        rid = self.run_id
        if rid is None:
            return fail("interrupted before the run was submitted", ExitCode.INTERRUPTED)
        if not self.submitted:
            stderr.print(
                f"interrupted while submitting run {rid}: it may or may not be stored. "
                f"`loom follow {rid}` tells (no run '{rid}': it was not); submitting again "
                f"with --run-id {rid} never starts it twice",
                markup=False,
                soft_wrap=True,
            )
            return typer.Exit(ExitCode.INTERRUPTED)
        follow = again or f"loom follow {rid}"
        stderr.print(
            f"interrupted: run {rid} goes on without you. Follow it again: {follow}; "
            f"its state: loom describe {rid}; stop it: loom cancel {rid}",
            markup=False,
            soft_wrap=True,
        )
        return typer.Exit(ExitCode.INTERRUPTED)


class _LiveText:
    """Model text streamed while a turn is generated (``loom.stream.{run_id}``), shown
    dim between the event lines; the events stay the truth (a late viewer sees the
    recorded turns as lines)."""

    def __init__(self) -> None:
        self.mid_line = False
        self.turn: tuple[str, int] | None = None  # whose text the open line shows

    async def on_chunk(self, msg: Any) -> None:
        try:
            chunk = codec.decode(msg.data, ModelChunk)
        except Exception:  # noqa: BLE001 (a live view skips what it cannot read)
            return
        turn = (chunk.step_id, chunk.turn)
        if self.mid_line and turn != self.turn:
            # another turn's text came before the events that end this one (the text is
            # plain NATS, the events come through the stream): a line of its own
            stderr.print()
            self.mid_line = False
        if not self.mid_line:
            stderr.print(Text(f"  {chunk.step_id} turn {chunk.turn}: ", style="magenta"), end="")
        stderr.print(Text(chunk.text, style="dim"), end="")
        self.mid_line = True
        self.turn = turn

    def line(self, text: str) -> None:
        if self.mid_line:
            stderr.print()
            self.mid_line = False
        stderr.print(text)


async def _follow(client: LoomClient, run_id: str, quiet: bool) -> EventRecord:
    started: dict[str, datetime] = {}
    last: EventRecord | None = None
    live = _LiveText()
    subs = []
    if not quiet:
        # a tenant's run's text comes on its tenant's twin, which only its users (and
        # the platform's operator, who does not know the run's tenant here) hear
        plain = routes.MODEL_STREAM.subject(run_id=run_id)
        wanted = [client.scoped(plain)] if client.tenant else [plain, tenancy.twin(plain, "*")]
        subs = [await client.nc.subscribe(s, cb=live.on_chunk) for s in wanted]
    try:
        # no timeout: a run may wait days for a person or an event; Ctrl-C leaves it running
        async for record in client.follow(run_id, timeout=None):
            last = record
            line = progress_line(record, started)
            if line and not quiet:
                live.line(line)
    finally:
        for sub in subs:
            await sub.unsubscribe()
    assert last is not None
    return last


async def run_and_report(
    client: LoomClient,
    request: RunRequest,
    output: Output,
    quiet: bool = False,
    following: Following | None = None,
) -> tuple[int, str | None]:
    """Submit, follow, print; returns (exit code, run id)."""
    try:
        accepted = await client.submit(request)
    except LoomError as exc:
        _print_refusal(exc.error, output)
        return ExitCode.USAGE, None
    except (NatsTimeoutError, TimeoutError, NoRespondersError) as exc:
        again = f"--run-id {request.run_id}" if request.run_id else "the same --run-id"
        raise fail(
            f"the executor did not answer the submission ({exc.__class__.__name__}): is the "
            "stack up (`loom up`, `loom runs`)? The run may have been stored: submit again "
            f"with {again}, it is never started twice",
            ExitCode.UNAVAILABLE,
        ) from None
    if following is not None:
        following.run_id, following.submitted = accepted.run_id, True
    if accepted.existing:
        stderr.print(f"run {accepted.run_id} exists already: following it", markup=False)
    return await follow_and_report(client, accepted.run_id, output, quiet), accepted.run_id


def _print_refusal(error: ErrorInfo, output: Output) -> None:
    """A refused submission: every problem (``details.issues``) on its own line."""
    if output is not Output.text:
        body = {"run_id": None, "status": "refused", "output": None,
                "error": msgspec.to_builtins(error)}  # fmt: skip
        if output is Output.jsonl:
            sys.stdout.write(json.dumps(body, ensure_ascii=False) + "\n")
        else:
            stdout.print_json(json.dumps(body))
    stderr.print(f"[red]submission refused:[/] {escape(error.code)}: {escape(error.message)}")
    issues = (error.details or {}).get("issues")
    for issue in issues if isinstance(issues, list) else []:
        if isinstance(issue, dict):
            stderr.print(
                f"  [red]✗[/] {escape(str(issue.get('code')))} at "
                f"{escape(str(issue.get('path')))}: {escape(str(issue.get('message')))}"
            )


async def follow_and_report(
    client: LoomClient, run_id: str, output: Output, quiet: bool = False
) -> int:
    """Follow a run to its end and print its result; returns the exit code."""
    last = await _follow(client, run_id, quiet)
    return report_end(run_id, last, output)


def report_end(run_id: str, last: EventRecord, output: Output) -> int:
    """Print how a run ended (its output on stdout); the exit code. ``-o json``: one
    object with ``status`` (the words of ``loom_core.statuses``), ``output``, ``error``
    and, for a rejected plan, every ``issues`` entry."""
    event = last.event
    status = status_after(event) or last.kind
    ok = isinstance(event, RunCompleted)
    if output is Output.text:
        if isinstance(event, RunCompleted):
            value = msgspec.to_builtins(event.output)
            stdout.print_json(json.dumps(blobs.readable(value)))
            try:
                found = blobs.find_refs(value)
            except blobs.BlobRefError:
                found = []
            for _, ref in found:
                stderr.print(
                    f"fetch {blobs.describe(ref)} with: loom blob get {ref.digest} --run {run_id}"
                )
        return ExitCode.OK if ok else ExitCode.FAILED
    error = getattr(event, "error", None)
    body: dict[str, Any] = {
        "run_id": run_id,
        "status": status,
        "output": msgspec.to_builtins(event.output) if isinstance(event, RunCompleted) else None,
        "error": msgspec.to_builtins(error) if error is not None else None,
    }
    if isinstance(event, PlanRejected):
        body["error"] = {
            "code": "plan_rejected",
            "message": f"the plan has {len(event.issues)} problem(s); see issues",
        }
        body["issues"] = msgspec.to_builtins(event.issues)
    if isinstance(event, RunCancelled):
        body["error"] = {"code": "cancelled", "message": f"cancelled by {event.by}"
                         + (f": {event.reason}" if event.reason else "")}  # fmt: skip
    if output is Output.jsonl:
        sys.stdout.write(json.dumps(body, ensure_ascii=False) + "\n")
    else:
        stdout.print_json(json.dumps(body))
    return ExitCode.OK if ok else ExitCode.FAILED
