"""Debugging runs from their events: ``resume``, ``state --at``, ``replay``, ``fork`` and
``diff``. ``replay``, ``state`` and ``diff`` also work on ``.jsonl`` exports
(``loom show RUN -o jsonl > run.jsonl``) with no services running."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import msgspec
import typer

from loom_cli.common import Output, UrlOpt, connect, fail, follow_and_report, json_arg
from loom_cli.control import operator
from loom_cli.render import stderr, stdout
from loom_core import codec
from loom_core.contracts import EventRecord, ForkRun
from loom_core.lineage import diff_runs
from loom_core.message_limits import check_signal_payload
from loom_core.replay import replay, state_at, state_view
from loom_infra.client import LoomError
from loom_infra.settings import settings_from_env


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
    url: str = UrlOpt,
) -> None:
    """Answer a suspended step; the data is checked against its schema."""
    if not label and not suspension:
        raise fail("give --label or --id", 2)
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
            stdout.print(f"{run_id}: resumed {reply.suspension_id}{via}", markup=False)
            return 0
        assert reply.error is not None
        stderr.print(f"refused: {reply.error.code}: {reply.error.message}", markup=False)
        return 1

    raise typer.Exit(asyncio.run(main()))


def state(
    run: str = typer.Argument(..., help="run id, or a .jsonl export"),
    at: int = typer.Option(None, "--at", help="just after event N (default: the last)"),
    url: str = UrlOpt,
) -> None:
    """The run's state just after event N (time travel), rebuilt from its events."""
    records = asyncio.run(_events(run, url))
    try:
        view = state_view(state_at(records, len(records) if at is None else at))
    except ValueError as exc:
        raise fail(str(exc)) from None
    stdout.print_json(json.dumps(msgspec.to_builtins(view)))


def replay_cmd(
    run: str = typer.Argument(..., help="run id, or a .jsonl export (no services needed)"),
    url: str = UrlOpt,
) -> None:
    """Re-run the executor's decisions over the recorded events; no tool or model is
    called. Exit 0 when identical, 1 with the first divergence."""
    records = asyncio.run(_events(run, url))
    report, _ = replay(records)
    if report.divergence is None:
        stdout.print(f"identical: {report.events} events re-decided", markup=False)
        return
    d = report.divergence
    stdout.print_json(
        json.dumps(
            {
                "identical": False,
                "seq": d.seq,
                "message": d.message,
                "recorded": d.recorded,
                "decided": d.decided,
            }
        )  # fmt: skip
    )
    raise typer.Exit(1)


def fork(
    run_id: str,
    from_step: str = typer.Option(..., "--from-step", help="re-execute from this step"),
    set_output: list[str] = typer.Option([], "--set-output", help="STEP=JSON: edit an output"),
    input_json: str = typer.Option(None, "--input", help="replace the run input (JSON)"),
    new_id: str = typer.Option(None, "--run-id", help="the new run's id"),
    follow: bool = typer.Option(True, help="follow the new run to its end"),
    url: str = UrlOpt,
) -> None:
    """A new run reusing the recorded results of everything before a step."""
    edits: dict[str, Any] = {}
    for item in set_output:
        step, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--set-output expects STEP=JSON, got {item!r}", 2)
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
                stdout.print(accepted.run_id, markup=False)
                return 0
            code = await follow_and_report(c, accepted.run_id, Output.text)
            stderr.print(f"fork of {run_id} from {from_step}: {accepted.run_id}", markup=False)
            return code

    raise typer.Exit(asyncio.run(main()))


def diff(
    run_a: str = typer.Argument(..., help="run id or .jsonl export"),
    run_b: str = typer.Argument(..., help="run id or .jsonl export"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
    url: str = UrlOpt,
) -> None:
    """Line two runs up step by step and show what differs."""

    async def both() -> tuple[list[EventRecord], list[EventRecord]]:
        return await _events(run_a, url), await _events(run_b, url)

    a, b = asyncio.run(both())
    diffs = diff_runs(a, b)
    if json_out:
        stdout.print_json(
            json.dumps([{"step_id": d.step_id, "changes": d.changes} for d in diffs], default=str)
        )
        return
    if not diffs:
        stdout.print("no step differs", markup=False)
        return
    for d in diffs:
        stdout.print(f"[bold]{d.step_id}[/]")
        for name, (x, y) in d.changes.items():
            stdout.print(
                f"  {name}: {json.dumps(x, default=str)} → {json.dumps(y, default=str)}",
                markup=False,
            )


def signal(
    name: str,
    key: str,
    data: str = typer.Option("null", "--data", help="the event's payload, as JSON"),
    signal_id: str = typer.Option("", "--id", help="dedupe id for repeats"),
    url: str = UrlOpt,
) -> None:
    """Publish an external event: runs waiting (wait_event) on NAME and KEY get it."""
    payload = json_arg(data, "--data")
    # the router refuses a payload over its limit without a reply: say it here
    too_large = check_signal_payload(payload, settings_from_env().message_limits)
    if too_large is not None:
        raise fail(too_large.message)

    async def main() -> None:
        async with await connect(url) as c:
            await c.signal(name, key, payload, signal_id)
        stdout.print(f"published {name}/{key}", markup=False)

    asyncio.run(main())


def register(app: typer.Typer) -> None:
    app.command()(signal)
    app.command()(resume)
    app.command()(state)
    app.command("replay")(replay_cmd)
    app.command()(fork)
    app.command()(diff)
