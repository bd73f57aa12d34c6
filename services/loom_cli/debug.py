"""Debugging runs from their events: ``resume``, ``state --at``, ``replay``, ``fork`` and
``diff``. ``replay``, ``state`` and ``diff`` also work on ``.jsonl`` exports
(``loom show RUN -o jsonl > run.jsonl``) with no services running."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
import typer

from loom_cli.common import (
    ExitCode,
    Output,
    OutputOpt,
    UrlOpt,
    connect,
    dump,
    fail,
    follow_and_report,
    json_arg,
)
from loom_cli.control import operator
from loom_cli.render import stderr, stdout
from loom_core import blobs, codec, ids
from loom_core.contracts import EventRecord, ForkRun
from loom_core.lineage import diff_runs
from loom_core.message_limits import check_signal_payload
from loom_core.replay import replay, state_at, state_view
from loom_infra.client import LoomError
from loom_infra.settings import settings_from_env


def emit(value: Any, output: Output, text: str) -> None:
    """One answer: ``text`` for people, the value as JSON (one line for jsonl)."""
    if output is Output.text:
        stdout.print(text, markup=False, soft_wrap=True)
    elif output is Output.jsonl:
        sys.stdout.write(json.dumps(msgspec.to_builtins(value), ensure_ascii=False) + "\n")
    else:
        stdout.print_json(dump(value))


def read_jsonl(path: Path) -> list[EventRecord]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(codec.decode_event(line.encode()))
            except msgspec.DecodeError as exc:
                raise fail(f"{path}:{n}: not an event record: {exc}") from None
    return records


async def _events(run: str, url: str | None) -> list[EventRecord]:
    """A run id (asked of the stack) or a path to a .jsonl export."""
    path = Path(run)
    if run.endswith(".jsonl") and path.exists():
        return read_jsonl(path)
    async with await connect(url) as c:
        try:
            records = await c.events(run)  # page by page: any length of run
        except LoomError as exc:
            raise fail(str(exc)) from None
    if not records:
        raise fail(f"no run '{run}'")
    return records


def resume(
    run_id: str,
    data: str = typer.Option(..., "--data", help="the answer, as JSON"),
    label: str = typer.Option(None, "--label", "-l", help="which suspension, by label"),
    suspension: str = typer.Option(None, "--id", help="which suspension, by id"),
    request_id: str = typer.Option(None, "--request-id", help="repeat-safe id"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """Answer a suspended step; the data is checked against its schema.

    Example: `loom resume RUN --label manager --data '{"approved": true}'`. Exit 1 when
    refused (wrong data, already answered), with the reason.
    """
    if not label and not suspension:
        raise fail("give --label or --id", ExitCode.USAGE)
    answer = json_arg(data, "--data")

    async def main() -> int:
        async with await connect(url) as c:
            reply = await c.resume(
                run_id, answer, label=label, suspension_id=suspension,
                request_id=request_id or uuid.uuid4().hex, by=operator(),
            )  # fmt: skip
        if reply.ok:
            via = ""
            if reply.answered_run_id and reply.answered_run_id != run_id:
                via = f" of sub-run {reply.answered_run_id}"  # answered through the parent
            emit(reply, output, f"{run_id}: resumed {reply.suspension_id}{via}")
            return 0
        assert reply.error is not None
        if output is not Output.text:
            emit(reply, output, "")
        stderr.print(f"refused: {reply.error.code}: {reply.error.message}", markup=False)
        return 1

    raise typer.Exit(asyncio.run(main()))


def state(
    run: str = typer.Argument(..., help="run id, or a .jsonl export"),
    at: int = typer.Option(None, "--at", help="just after event N (default: the last)"),
    output: Output = typer.Option(Output.json, "--output", "-o", help="json or jsonl"),
    url: str = UrlOpt,
) -> None:
    """The run's state just after event N (time travel), rebuilt from its events.

    Example: `loom state RUN --at 5`, or `loom state run.jsonl` on an export.
    """
    records = asyncio.run(_events(run, url))
    try:
        view = state_view(state_at(records, len(records) if at is None else at))
    except ValueError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    if output is Output.jsonl:
        sys.stdout.write(json.dumps(msgspec.to_builtins(view), ensure_ascii=False) + "\n")
    else:  # the state is a document: text is its JSON too
        stdout.print_json(json.dumps(msgspec.to_builtins(view)))


def replay_cmd(
    run: str = typer.Argument(..., help="run id, or a .jsonl export (no services needed)"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """Re-run the executor's decisions over the recorded events; no tool or model is
    called. Exit 0 when identical, 1 with the first divergence.

    Example: `loom replay RUN`, or `loom replay run.jsonl` with nothing running.
    """
    records = asyncio.run(_events(run, url))
    report, _ = replay(records)
    if report.divergence is None:
        result: dict[str, Any] = {"identical": True, "events": report.events}
        emit(result, output, f"identical: {report.events} events re-decided")
        return
    d = report.divergence
    result = {
        "identical": False,
        "seq": d.seq,
        "message": d.message,
        "recorded": d.recorded,
        "decided": d.decided,
    }
    if output is Output.jsonl:
        emit(result, output, "")
    else:  # text too: the divergence is data to read side by side
        stdout.print_json(json.dumps(result))
    raise typer.Exit(ExitCode.FAILED)


def fork(
    run_id: str,
    from_step: str = typer.Option(
        ..., "--from-step", help="re-execute from this step instance (b, each/2/ok, par/x/s)"
    ),
    set_output: list[str] = typer.Option(
        [], "--set-output", help="INSTANCE=JSON: edit a recorded output (any instance path)"
    ),
    input_json: str = typer.Option(None, "--input", help="replace the run input (JSON)"),
    new_id: str = typer.Option(None, "--run-id", help="the new run's id"),
    follow: bool = typer.Option(True, help="follow the new run to its end"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """A new run reusing every recorded result that depends neither on a step instance
    nor on an edited one (docs/people-in-the-loop.md: forks).

    Example: `loom fork RUN --from-step each/2/ok --set-output each/2/ok='{"ok": true}'`.
    """
    edits: dict[str, Any] = {}
    for item in set_output:
        step, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--set-output expects STEP=JSON, got {item!r}", ExitCode.USAGE)
        edits[step] = json_arg(value, f"--set-output {step}")
    new_input = json_arg(input_json, "--input") if input_json else None

    # The executor computes the fork from its own store (loom.fork): what is reused is
    # never a client's claim.
    request = ForkRun(
        run_id=run_id, from_step=from_step, set_output=edits, input=new_input, new_run_id=new_id
    )

    async def main() -> int:
        async with await connect(url) as c:
            try:
                accepted = await c.fork(request)
            except LoomError as exc:
                raise fail(exc.error.message) from None
            if not follow:
                emit({"run_id": accepted.run_id, "existing": accepted.existing}, output,
                     accepted.run_id)  # fmt: skip
                return 0
            code = await follow_and_report(c, accepted.run_id, output)
            stderr.print(f"fork of {run_id} from {from_step}: {accepted.run_id}", markup=False)
            return code

    raise typer.Exit(asyncio.run(main()))


def diff(
    run_a: str = typer.Argument(..., help="run id or .jsonl export"),
    run_b: str = typer.Argument(..., help="run id or .jsonl export"),
    output: Output = OutputOpt,
    json_out: bool = typer.Option(False, "--json", hidden=True, help="the same as -o json"),
    url: str = UrlOpt,
) -> None:
    """Line two runs up step by step and show what differs.

    Example: `loom diff RUN FORKED_RUN -o json`.
    """

    async def both() -> tuple[list[EventRecord], list[EventRecord]]:
        return await _events(run_a, url), await _events(run_b, url)

    a, b = asyncio.run(both())
    diffs = diff_runs(a, b)
    if json_out:
        output = Output.json
    if output is not Output.text:
        rows = [{"step_id": d.step_id, "changes": d.changes} for d in diffs]
        if output is Output.jsonl:
            for row in rows:
                sys.stdout.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
        else:
            stdout.print_json(json.dumps(rows, default=str))
        return
    if not diffs:
        stdout.print("no step differs", markup=False)
        return
    for d in diffs:
        stdout.print(f"[bold]{d.step_id}[/]")
        for name, (x, y) in d.changes.items():
            stdout.print(
                f"  {name}: {json.dumps(blobs.readable(x), default=str)} → "
                f"{json.dumps(blobs.readable(y), default=str)}",
                markup=False,
            )


def signal(
    name: str = typer.Argument(..., help="the event's name (as the wait_event step says)"),
    key: str = typer.Argument(..., help="its correlation key (e.g. an order id)"),
    data: str = typer.Option("null", "--data", help="the event's payload, as JSON"),
    signal_id: str = typer.Option("", "--id", help="dedupe id for repeats"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """Publish an external event: runs waiting (wait_event) on NAME and KEY get it.

    NAME and KEY are 1-64 letters, digits, `_` or `-` (each is one token of the NATS
    subject). Example: `loom signal payment A-17 --data '{"amount": 12}'`.
    """
    for what, value in (("NAME", name), ("KEY", key)):
        if not ids.is_token(value):
            raise fail(
                f"{what} {value!r} must be 1-64 of A-Z, a-z, 0-9, '_' or '-' (it is a NATS "
                "subject token: no space, no dot); a wait_event step's key renders the same "
                "way, so a key with other characters could never match",
                ExitCode.USAGE,
            )
    if signal_id and len(signal_id) > 256:
        raise fail("--id is at most 256 characters", ExitCode.USAGE)
    payload = json_arg(data, "--data")
    # the router refuses a payload over its limit without a reply: say it here
    too_large = check_signal_payload(payload, settings_from_env().message_limits)
    if too_large is not None:
        raise fail(too_large.message)

    async def main() -> None:
        async with await connect(url) as c:
            await c.signal(name, key, payload, signal_id)
        result = {"published": True, "name": name, "key": key, "signal_id": signal_id}
        emit(result, output, f"published {name}/{key}")

    asyncio.run(main())


def register(app: typer.Typer) -> None:
    app.command()(signal)
    app.command()(resume)
    app.command()(state)
    app.command("replay")(replay_cmd)
    app.command()(fork)
    app.command()(diff)
