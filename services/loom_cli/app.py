"""``loom``: start the stack, submit and follow runs, look at their events and traces.

Data goes to stdout (``-o json`` / ``-o jsonl`` for scripts), progress to stderr; the
exit code is non-zero when a run fails or a request is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

import msgspec
import typer
import yaml
from nats.errors import Error as NatsError
from rich.markup import escape

from loom_cli import planfile
from loom_cli.blobs import register as register_blob_commands
from loom_cli.common import (
    ExitCode,
    Following,
    Output,
    OutputOpt,
    TokenOpt,
    UrlOpt,
    connect,
    dump,
    fail,
    follow_and_report,
    run_and_report,
)
from loom_cli.console import DEFAULT_PORT as CONSOLE_PORT
from loom_cli.console import register as register_console_commands
from loom_cli.control import register as register_control_commands
from loom_cli.creds import register as register_creds_commands
from loom_cli.deadletters import register as register_dead_letter_commands
from loom_cli.debug import register as register_debug_commands
from loom_cli.examples import add_examples
from loom_cli.mcp import register as register_mcp_commands
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
from loom_cli.schedule import register as register_schedule_commands
from loom_cli.tools import register as register_tool_commands
from loom_cli.traces import register as register_trace_commands
from loom_core import codec, convert, errors
from loom_core.contracts import Plan, PlanIssue, RunRequest
from loom_core.error_codes import CODES
from loom_core.shape import shape_issues
from loom_core.statuses import RUN_STATUSES, unknown_status_message
from loom_infra.client import LoomClient, LoomError
from loom_infra.datalock import DataDirLocked
from loom_infra.natsserver import NatsServerError
from loom_infra.settings import SettingsError, debug_from_env, settings_from_env

app = typer.Typer(
    name="loom",
    help="agentloom: AI-agent runs as event-sourced actors over NATS JetStream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# ---------------------------------------------------------------------- run files


class PlanFormat(StrEnum):
    native = "native"
    plan_execute = "plan-execute"


FormatOpt = typer.Option(
    PlanFormat.native,
    "--format",
    "-f",
    help="the run file's plan language: native, or plan-execute (converted first; see "
    "`loom convert`)",
)


def load_run_request(
    path: Path,
    inputs: list[str],
    input_json: str | None,
    plan_format: PlanFormat = PlanFormat.native,
    output: Output = Output.text,
) -> RunRequest:
    """A run file is a RunRequest (``plan:`` + ``input:``) or a bare plan (``steps:``).
    Every shape mistake is reported at once (``loom_core.shape``), not the first."""
    doc = planfile.read_run_file(path)  # no recursion on what the file holds
    if not isinstance(doc, dict):
        raise fail(f"{path}: expected a mapping with `plan:` or `steps:`", ExitCode.USAGE)
    if plan_format is PlanFormat.plan_execute:
        doc = {"plan": convert_file(path, doc, output), "input": doc.get("input") or {}}
    elif "steps" in doc:
        doc = {"plan": doc}
    run_input = doc.get("input") or {}
    if not isinstance(run_input, dict):
        raise fail(f"{path}: `input` must be a mapping, got {run_input!r}", ExitCode.USAGE)
    run_input = dict(run_input)
    if input_json:
        extra = planfile.parse_json(input_json, "--input-json")
        if not isinstance(extra, dict):
            raise fail("--input-json must be a JSON object", ExitCode.USAGE)
        run_input.update(extra)
    for item in inputs:
        key, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--input expects KEY=VALUE, got {item!r}", ExitCode.USAGE)
        run_input[key] = value
    doc["input"] = run_input
    planfile.check(doc, str(path), *planfile.limits())
    issues = shape_issues(doc, RunRequest)
    if issues:
        hint = foreign_hint(doc) if plan_format is PlanFormat.native else ""
        report_issues(path, issues, hint, output)
    try:
        return msgspec.convert(doc, RunRequest)
    except msgspec.ValidationError as exc:  # what the shape walk did not foresee
        raise fail(f"{path}: {exc}", ExitCode.USAGE) from None


def report_issues(
    path: Path, issues: Sequence[PlanIssue], hint: str = "", output: Output = Output.text
) -> NoReturn:
    """Every problem of a file, one per line on stderr; exits 2. With ``-o json`` or
    ``jsonl`` the same document as for a plan the stack rejected goes to stdout, so a
    script reads the problems the same way wherever they were found."""
    if output is not Output.text:
        body = {
            "run_id": None,
            "status": "rejected",
            "output": None,
            "error": {
                "code": "invalid_shape",
                "message": f"{path}: {len(issues)} problem(s); nothing was submitted",
            },
            "issues": msgspec.to_builtins(list(issues)),
        }
        sys.stdout.write(json.dumps(body, ensure_ascii=False, indent=None
                                    if output is Output.jsonl else 2) + "\n")  # fmt: skip
    stderr.print(
        f"[red]error:[/] {escape(str(path))}: {len(issues)} problem(s); nothing was submitted",
        soft_wrap=True,
    )
    for issue in issues:
        stderr.print(f"  ✗ {issue.code} at {issue.path}: {issue.message}", markup=False,
                     soft_wrap=True)  # fmt: skip
    if hint:
        stderr.print(hint, markup=False, soft_wrap=True)
    raise typer.Exit(ExitCode.USAGE)


def foreign_hint(doc: dict[str, Any]) -> str:
    """A line pointing at ``--format plan-execute`` when the file looks written for it."""
    plan = doc.get("plan")
    if isinstance(plan, dict) and convert.looks_like_plan_execute(plan):
        return (
            "hint: this looks like a plan for the plan-execute framework: run it with "
            "`--format plan-execute`, or see the native plan with `loom convert FILE`"
        )
    return ""


def convert_file(path: Path, doc: Any, output: Output = Output.text) -> dict[str, Any]:
    """``doc`` (a plan-execute plan) as a native plan, or exit with every problem."""
    try:
        return convert.to_native(doc)
    except convert.ConversionError as exc:
        report_issues(path, exc.issues, output=output)


# ---------------------------------------------------------------------- commands


@app.command()
def up(
    port: int = typer.Option(4222, help="NATS client port (embedded server)"),
    data_dir: Path = typer.Option(None, envvar="LOOM_DATA_DIR", help="where state lives"),
    insecure: bool = typer.Option(
        False, "--insecure", help="no NATS authentication (development only; LOOM_INSECURE=1)"
    ),
    console: bool = typer.Option(True, "--console/--no-console", help="serve the web console"),
    console_port: int = typer.Option(CONSOLE_PORT, help="the web console's port on 127.0.0.1"),
) -> None:
    """Start nats-server (JetStream), the store and all five services; Ctrl-C stops.

    Each service connects with its own NATS key (generated in DATA_DIR/creds). The web
    console (`loom console`) is served on 127.0.0.1 too; its address is printed."""
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
            # Ctrl-C is ours before the banner says so: one pressed just after it stops the
            # stack cleanly (exit 0) instead of interrupting the CLI (exit 130)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
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
            if not console:
                await stop.wait()
                return
            from loom_console.server import ConsoleServer

            async with await stack.client() as client:
                try:
                    server = ConsoleServer(
                        client, port=console_port, max_json_depth=settings.max_json_depth,
                        max_payload=settings.max_payload,
                    )  # fmt: skip
                    await server.start()
                except OSError as exc:  # the stack is up: a busy console port only warns
                    stderr.print(
                        f"[yellow]warning:[/] the web console did not start: port "
                        f"{console_port}: {exc.strerror or exc}; use --console-port N "
                        "(or `loom console --port N` later)", soft_wrap=True,
                    )  # fmt: skip
                    await stop.wait()
                    return
                stderr.print(f"console: {server.url}", markup=False, soft_wrap=True)
                try:
                    await stop.wait()
                finally:
                    await server.stop()

    try:
        asyncio.run(main())
    except DataDirLocked as exc:
        raise fail(exc.error.message, ExitCode.UNAVAILABLE) from None
    except NatsServerError as exc:
        raise fail(f"cannot start: {exc}", ExitCode.UNAVAILABLE) from None


def request_from_text(text: str, inputs: list[str], input_json: str | None) -> RunRequest:
    """``loom run --request TEXT``: a natural-language request the planner's model plans."""
    run_input: dict[str, object] = {}
    if input_json:
        run_input.update(planfile.parse_json(input_json, "--input-json"))
    for item in inputs:
        key, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--input expects KEY=VALUE, got {item!r}")
        run_input[key] = value
    if not text.strip():
        raise fail("--request needs the text of what to do")
    doc = {"request": text, "input": run_input}
    planfile.check(doc, "--request", *planfile.limits())
    return msgspec.convert(doc, RunRequest)


@app.command()
def run(
    file: Path = typer.Argument(
        None, help="run file (YAML/JSON): a plan, or plan + input (or give --request)"
    ),
    request_text: str = typer.Option(
        None,
        "--request",
        "-r",
        help="natural language instead of a file: the planner's model writes the plan "
        "(needs LOOM_MODEL or LOOM_MODELS_FILE where the planner runs)",
    ),
    input: list[str] = typer.Option([], "--input", "-i", help="KEY=VALUE run input"),
    input_json: str = typer.Option(None, "--input-json", help="run input as JSON"),
    run_id: str = typer.Option(
        None, "--run-id", help="choose the run id: submitting it again never starts it twice"
    ),
    plan_format: PlanFormat = FormatOpt,
    queue: str = typer.Option(
        None, "--queue", help="the tenant's queue to wait in when at its limit (LOOM_QUOTAS_FILE)"
    ),
    priority: int = typer.Option(
        None, "--priority", help="higher starts first among runs waiting in the queue"
    ),
    output: Output = OutputOpt,
    url: str = UrlOpt,
    token: str = TokenOpt,
) -> None:
    """Submit a run, show each step live, print its output.

    Give a run file, or `--request TEXT` for the planner's model to plan. Exit 0 when the
    run completes, 1 when it fails, is cancelled or its plan is rejected, 2 when the file
    is wrong (every problem is listed), 3 when the stack does not answer. Ctrl-C stops
    following, not the run.
    """
    if (file is None) == (request_text is None):
        raise fail("give a run file or --request TEXT (one of them)", ExitCode.USAGE)
    if request_text is not None:
        request = request_from_text(request_text, input, input_json)
    else:
        request = load_run_request(file, input, input_json, plan_format, output)
    # an id chosen here, so a submission whose answer was lost can be repeated safely
    request = msgspec.structs.replace(request, run_id=run_id or new_run_id())
    if queue is not None:  # over the run file's `queue:`; the executor checks the name
        request = msgspec.structs.replace(request, queue=queue)
    if priority is not None:
        request = msgspec.structs.replace(request, priority=priority)
    following = Following(request.run_id)

    async def main() -> int:
        client = await connect(url)
        client.token = token or None  # sent as `Authorization: Bearer`, never stored
        async with client:
            code, _ = await run_and_report(client, request, output, following=following)
            return code

    fmt = f" --format {plan_format.value}" if plan_format is not PlanFormat.native else ""
    try:
        code = asyncio.run(main())
    except KeyboardInterrupt:
        raise following.interrupted(
            f"loom follow {request.run_id} (or: loom run {file}{fmt} --run-id {request.run_id})"
        ) from None
    except NatsError as exc:
        if not following.submitted:
            raise
        raise fail(
            f"lost the stack while following run {request.run_id} ({type(exc).__name__}); "
            f"the run goes on there: once the stack answers, `loom follow {request.run_id}`",
            ExitCode.UNAVAILABLE,
        ) from None
    raise typer.Exit(code)


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:20]}"


@app.command()
def follow(
    run_id: str = typer.Argument(..., metavar="RUN", help="the run's id"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """Follow a run already submitted: its steps so far and live, then its output.

    Exit codes as for `loom run`. Ctrl-C stops following, not the run.
    """
    following = Following(run_id)
    following.submitted = True

    async def main() -> int:
        async with await connect(url) as client:
            try:  # one event tells the run exists, whatever its length
                pages = client.iter_events(run_id, page=1)
                known = await anext(aiter(pages), None)
                await pages.aclose()
            except LoomError as exc:
                raise fail(str(exc)) from None
            if known is None:
                raise fail(f"no run '{run_id}': see `loom runs` for the runs there are")
            return await follow_and_report(client, run_id, output)

    try:
        code = asyncio.run(main())
    except KeyboardInterrupt:
        raise following.interrupted() from None
    raise typer.Exit(code)


@app.command("convert")
def convert_cmd(
    file: Path = typer.Argument(..., help="a plan written for the plan-execute framework"),
    output: Output = OutputOpt,
) -> None:
    """Print the native plan for a plan-execute plan (docs/convert.md has the mapping).

    Conditions become declarative predicates; nothing is evaluated. The result is checked
    like any plan file, so `loom convert plan.yaml -o json > native.json` gives a file
    `loom run` accepts.
    """
    doc = planfile.read_run_file(file)
    plan = convert_file(file, doc)
    issues = shape_issues(plan, Plan, "$")
    if issues:
        report_issues(file, issues)
    if isinstance(doc, dict) and doc.get("input"):
        plan = {"input": doc["input"], "plan": plan}
    if output is Output.text:
        sys.stdout.write(yaml.safe_dump(plan, sort_keys=False, allow_unicode=True, width=100))
    elif output is Output.jsonl:
        sys.stdout.write(json.dumps(plan, ensure_ascii=False) + "\n")
    else:
        stdout.print_json(json.dumps(plan, ensure_ascii=False))


@app.command()
def runs(
    status: str = typer.Option(None, help="only runs with this status: " + ", ".join(RUN_STATUSES)),
    suspended: bool = typer.Option(False, "--suspended", help="only runs waiting for people"),
    lineage: str = typer.Option(None, "--lineage", help="the fork tree RUN belongs to"),
    limit: int = typer.Option(50, min=1, help="runs to list (read page by page)"),
    after: str = typer.Option(
        "", "--after", help="continue a listing: the cursor a previous `loom runs` printed"
    ),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """List runs, newest first, with status and duration (and what they wait for).

    The status words are the same in every verb (docs/cli.md). When more runs follow, the
    command to list the next ones (with its --after cursor) is printed on stderr.
    """
    if status is not None and (problem := unknown_status_message(status)) is not None:
        raise fail(f"--status: {problem}", ExitCode.USAGE)

    async def main() -> None:
        async with await connect(url) as client:
            wanted = "suspended" if suspended else status
            try:
                found, cursor = await client.runs_page(
                    limit=1000 if lineage else limit, status=wanted, after=after
                )
            except LoomError as exc:
                raise fail(str(exc)) from None
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
        if cursor is not None and not lineage:
            sys.stdout.flush()
            which = " --suspended" if suspended else f" --status {status}" if status else ""
            stderr.print(
                f"more runs: loom runs{which} --limit {limit} --after {cursor}", soft_wrap=True
            )

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
        if not entries:
            raise fail(
                f"no thread '{thread_id}' (or it is empty): a run's thread id is its run "
                "id unless the run request set `thread_id`; see `loom runs`"
            )
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
    file: Path = typer.Option(
        None, help="run file to demo", show_default="the bundled examples/hello-dag.yaml"
    ),
    data_dir: Path = typer.Option(Path(".loom/demo"), help="scratch state (wiped first)"),
) -> None:
    """Start the embedded stack, run the demo plan, print its output and trace, stop."""
    from loom_services.stack import LocalStack

    file = file or EXAMPLES / "hello-dag.yaml"
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
register_tool_commands(app)
register_mcp_commands(app)
register_schedule_commands(app)
register_dead_letter_commands(app)
register_console_commands(app)
add_examples(app)


def main() -> None:
    """Run the CLI. No traceback reaches a user unless they ask for it (``--debug`` or
    ``LOOM_DEBUG=1``): an unexpected failure is one line saying what to do, and the exit
    code says which kind (``ExitCode``, docs/cli.md)."""
    debug = "--debug" in sys.argv or debug_from_env()
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    plain_warnings(debug)
    if debug:  # the lines of a read model's process that are not log records (tracebacks)
        logging.getLogger("loom.readmodels").setLevel(logging.DEBUG)
    try:
        app(standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        raise SystemExit(ExitCode.INTERRUPTED) from None
    except BaseException as exc:
        if debug:
            raise
        code, text = explain(exc)
        stderr.print(f"[red]error:[/] {escape(text)}", soft_wrap=True)
        raise SystemExit(code) from None


def plain_warnings(debug: bool) -> None:
    """Warnings logged by the libraries reach a CLI user through logging's last-resort
    handler (``loom up`` configures real logging, which replaces it): as ``warning:
    ...`` lines. Without --debug, the one saying NATS is unreachable is dropped: the
    error line says it, with what to do."""
    handler = logging.lastResort
    if handler is None:
        return
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    if not debug:
        handler.addFilter(lambda record: "NATS unreachable" not in record.getMessage())


def explain(exc: BaseException) -> tuple[int, str]:
    """The exit code and one line for an unexpected failure, with what to do about it."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return ExitCode.UNAVAILABLE, (
            "no answer from the stack in time: check it is up (`loom up`), and if a "
            "'permissions violation' warning is shown above, this key lacks that right "
            "(the CLI needs the operator key). Add --debug for details"
        )
    name = type(exc).__name__
    if isinstance(exc, SettingsError):  # a configuration mistake, named with its place
        return ExitCode.USAGE, f"{exc}; fix it and start again"
    if isinstance(exc, errors.LoomError):  # typed: its code says which kind of failure
        info = exc.info
        area = CODES[info.code].area if info.code in CODES else ""
        if info.retryable or area == "stack":
            return ExitCode.UNAVAILABLE, f"{info.message} ({info.code})"
        if info.code != "internal_error":
            return ExitCode.FAILED, f"{info.message} ({info.code})"
    if "nats" in type(exc).__module__:
        return ExitCode.UNAVAILABLE, (
            f"NATS failed ({name}: {exc}); check LOOM_NATS_URL and that the stack is up"
        )
    return ExitCode.BUG, (
        f"{name}: {exc}. This is a bug if it persists: rerun with --debug and report it"
    )
