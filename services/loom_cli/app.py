"""``loom``: start the stack, submit and follow runs, look at their events and traces.

Data goes to stdout (``-o json`` / ``-o jsonl`` for scripts), progress to stderr; the
exit code is non-zero when a run fails or a request is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import typer
from rich.markup import escape

from loom_cli import planfile
from loom_cli.blobs import register as register_blob_commands
from loom_cli.common import (
    Output,
    OutputOpt,
    TokenOpt,
    UrlOpt,
    connect,
    dump,
    fail,
    run_and_report,
)
from loom_cli.control import register as register_control_commands
from loom_cli.creds import register as register_creds_commands
from loom_cli.debug import register as register_debug_commands
from loom_cli.memory import register as register_memory_commands
from loom_cli.render import (
    events_table,
    lineage_members,
    lineage_tree,
    principal_line,
    runs_table,
    span_tree,
    stderr,
    stdout,
)
from loom_cli.traces import register as register_trace_commands
from loom_core import codec
from loom_core.contracts import RunRequest
from loom_infra.client import LoomClient, LoomError
from loom_infra.datalock import DataDirLocked
from loom_infra.settings import settings_from_env

app = typer.Typer(
    name="loom",
    help="agentloom: AI-agent runs as event-sourced actors over NATS JetStream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# ---------------------------------------------------------------------- run files


def load_run_request(path: Path, inputs: list[str], input_json: str | None) -> RunRequest:
    """A run file is a RunRequest (``plan:`` + ``input:``) or a bare plan (``steps:``)."""
    doc = planfile.read_run_file(path)  # no recursion on what the file holds
    if not isinstance(doc, dict):
        raise fail(f"{path}: expected a mapping with `plan:` or `steps:`")
    if "steps" in doc:
        doc = {"plan": doc}
    run_input = dict(doc.get("input") or {})
    if input_json:
        run_input.update(planfile.parse_json(input_json, "--input-json"))
    for item in inputs:
        key, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--input expects KEY=VALUE, got {item!r}")
        run_input[key] = value
    doc["input"] = run_input
    planfile.check(doc, str(path), *planfile.limits())
    try:
        return msgspec.convert(doc, RunRequest)
    except msgspec.ValidationError as exc:
        raise fail(f"{path}: {exc}") from None


# ---------------------------------------------------------------------- commands


@app.command()
def up(
    port: int = typer.Option(4222, help="NATS client port (embedded server)"),
    data_dir: Path = typer.Option(None, envvar="LOOM_DATA_DIR", help="where state lives"),
    insecure: bool = typer.Option(
        False, "--insecure", help="no NATS authentication (development only; LOOM_INSECURE=1)"
    ),
) -> None:
    """Start nats-server (JetStream), the store and all five services; Ctrl-C stops.

    Each service connects with its own NATS key (generated in DATA_DIR/creds)."""
    from loom_services.runtime import configure_logging
    from loom_services.stack import LocalStack

    configure_logging()
    settings = settings_from_env()
    if data_dir is not None:
        settings = dataclasses.replace(
            settings, store=dataclasses.replace(settings.store, data_dir=data_dir)
        )
    if insecure:
        settings = dataclasses.replace(settings, insecure=True)

    async def main() -> None:
        import signal

        async with LocalStack(settings, nats_port=port) as stack:
            stderr.print(
                f"[green]agentloom is up[/]: NATS {stack.url}, store {settings.store.kind} "
                f"in {settings.store.data_dir}. Ctrl-C to stop."
            )
            if stack.credentials is None:
                stderr.print("[red bold]INSECURE[/]: NATS accepts anyone, with every right.")
            else:
                operator = stack.seed_file("operator")
                stderr.print(
                    f"NATS keys in {stack.credentials.directory}: operator (this CLI: "
                    f"LOOM_NKEY_SEED_FILE={operator}, the default under this data dir), "
                    f"client (submit only, for applications): {stack.seed_file('client')}"
                )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()

    try:
        asyncio.run(main())
    except DataDirLocked as exc:
        raise fail(exc.error.message) from None


@app.command()
def run(
    file: Path = typer.Argument(..., help="run file (YAML/JSON): a plan, or plan + input"),
    input: list[str] = typer.Option([], "--input", "-i", help="KEY=VALUE run input"),
    input_json: str = typer.Option(None, "--input-json", help="run input as JSON"),
    run_id: str = typer.Option(None, "--run-id", help="choose the run id (idempotent)"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
    token: str = TokenOpt,
) -> None:
    """Submit a run, show each step live, print the output (exit 1 if the run fails)."""
    request = load_run_request(file, input, input_json)
    if run_id:
        request = msgspec.structs.replace(request, run_id=run_id)

    async def main() -> int:
        client = await connect(url)
        client.token = token or None  # sent as `Authorization: Bearer`, never stored
        async with client:
            code, _ = await run_and_report(client, request, output)
            return code

    raise typer.Exit(asyncio.run(main()))


@app.command()
def runs(
    status: str = typer.Option(None, help="only runs with this status"),
    suspended: bool = typer.Option(False, "--suspended", help="only runs waiting for people"),
    lineage: str = typer.Option(None, "--lineage", help="the fork tree RUN belongs to"),
    limit: int = typer.Option(50),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """List runs, newest first, with status and duration (and what they wait for)."""

    async def main() -> None:
        async with await connect(url) as client:
            wanted = "suspended" if suspended else status
            found = await client.runs(limit=1000 if lineage else limit, status=wanted)
        if lineage:
            members = lineage_members(found, lineage)
            if not members:
                raise fail(f"no run '{lineage}' among the {len(found)} most recent runs")
            if output is Output.text:
                stdout.print(lineage_tree(found, lineage))
                return
            found = members  # json/jsonl: the tree's runs, root first (forked_from links)
        if output is Output.text:
            stdout.print(runs_table(found))
        elif output is Output.jsonl:
            for r in found:
                sys.stdout.write(codec.encode(r).decode() + "\n")
        else:
            stdout.print_json(dump(found))

    asyncio.run(main())


@app.command()
def show(run_id: str, output: Output = OutputOpt, url: str = UrlOpt) -> None:
    """The run's full event stream (``-o jsonl`` is the export format)."""

    async def main() -> None:
        async with await connect(url) as client:
            try:
                if output is Output.jsonl:  # streamed: a page is printed as it arrives
                    if not await _write_jsonl(client.iter_events(run_id)):
                        raise fail(f"no run '{run_id}'")
                    return
                records = await client.events(run_id)
            except LoomError as exc:
                raise fail(str(exc)) from None
        if not records:
            raise fail(f"no run '{run_id}'")
        if output is Output.json:
            stdout.print_json(dump(records))
        else:
            if (who := principal_line(records)) is not None:
                stdout.print(who)
            stdout.print(events_table(records))

    asyncio.run(main())


@app.command()
def trace(
    run_id: str,
    rebuild: bool = typer.Option(False, help="recompute spans from the run's events"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """The run's span tree with durations, rebuilt from its events."""

    async def main() -> None:
        async with await connect(url) as client:
            try:
                if output is Output.jsonl:  # streamed: a page is printed as it arrives
                    await _write_jsonl(client.iter_trace(run_id, rebuild=rebuild))
                    return
                spans = await client.trace(run_id, rebuild=rebuild)
            except LoomError as exc:
                raise fail(str(exc)) from None
        if output is Output.text:
            stdout.print(span_tree(spans))
        else:
            stdout.print_json(dump(spans))

    asyncio.run(main())


async def _write_jsonl(items: AsyncIterator[Any]) -> int:
    """Print each item as one JSON line as it arrives; how many were printed."""
    n = 0
    async for item in items:
        sys.stdout.write(codec.encode(item).decode() + "\n")
        n += 1
    sys.stdout.flush()
    return n


@app.command()
def thread(thread_id: str, output: Output = OutputOpt, url: str = UrlOpt) -> None:
    """A conversation thread from memory (a run's thread id defaults to its run id)."""

    async def main() -> None:
        async with await connect(url) as client:
            entries = await client.thread(thread_id)
        if output is Output.text:
            for e in entries:
                stdout.print(
                    f"[bold]{e.role}[/] ({e.run_id}): {json.dumps(msgspec.to_builtins(e.content))}"
                )
        else:
            stdout.print_json(dump(entries))

    asyncio.run(main())


@app.command()
def demo(
    file: Path = typer.Option(EXAMPLES / "hello-dag.yaml", help="run file to demo"),
    data_dir: Path = typer.Option(Path(".loom/demo"), help="scratch state (wiped first)"),
) -> None:
    """Start the embedded stack, run the demo plan, print its output and trace, stop."""
    from loom_services.stack import LocalStack

    request = load_run_request(file, [], None)
    if data_dir.exists():
        shutil.rmtree(data_dir)
    base = settings_from_env()
    settings = dataclasses.replace(
        base, store=dataclasses.replace(base.store, kind="sqlite", data_dir=data_dir)
    )

    async def main() -> int:
        stderr.print("starting nats-server (JetStream), SQLite and five services…")
        async with LocalStack(settings, nats_port=-1) as stack:
            async with await stack.client() as client:
                stderr.print(f"[green]stack up[/] at {stack.url}; submitting {file.name}")
                code, run_id = await run_and_report(client, request, Output.text)
                if run_id is not None:
                    spans = await _wait_trace(client, run_id)
                    stderr.print(f"\ntrace of {run_id}:")
                    stdout.print(span_tree(spans))
            return code

    raise typer.Exit(asyncio.run(main()))


async def _wait_trace(client: LoomClient, run_id: str, timeout: float = 10.0) -> list[Any]:
    """The tracing service consumes events asynchronously: wait (bounded) until it has
    folded the run's terminal event."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        runs_found = [r for r in await client.runs(limit=20) if r.run_id == run_id]
        if runs_found and runs_found[0].status in ("completed", "failed", "rejected"):
            return await client.trace(run_id)
        if loop.time() > deadline:
            return await client.trace(run_id, rebuild=True)
        await asyncio.sleep(0.05)  # poll interval of a bounded wait on a read model


register_blob_commands(app)
register_memory_commands(app)
register_control_commands(app)
register_creds_commands(app)
register_debug_commands(app)
register_trace_commands(app)


def main() -> None:
    """Run the CLI. No traceback reaches a user unless they ask for it (``--debug`` or
    ``LOOM_DEBUG=1``): an unexpected failure is one line saying what to do."""
    debug = "--debug" in sys.argv or os.environ.get("LOOM_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        app(standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BaseException as exc:
        if debug:
            raise
        stderr.print(f"[red]error:[/] {escape(explain(exc))}", soft_wrap=True)
        raise SystemExit(1) from None


def explain(exc: BaseException) -> str:
    """One line for an unexpected failure, with what to do about it."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return (
            "no answer from the stack in time: check it is up (`loom up`), and if a "
            "'permissions violation' warning is shown above, this key lacks that right "
            "(the CLI needs the operator key). Add --debug for details"
        )
    name = type(exc).__name__
    if "nats" in type(exc).__module__:
        return f"NATS failed ({name}: {exc}); check LOOM_NATS_URL and that the stack is up"
    return f"{name}: {exc}. This is a bug if it persists: rerun with --debug and report it"
