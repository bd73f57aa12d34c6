"""``loom tools`` and ``loom tools show NAME``: the tool catalog (the ``loom_tools`` KV
bucket the tool-runner keeps current): every tool with its source (built-in, module,
MCP server), description, idempotency, availability, breaker state and access rules;
``show`` adds the input and output schemas."""

from __future__ import annotations

import asyncio
import difflib
import json
import sys
from typing import Any

import typer
from nats.js.errors import NoKeysError
from rich.markup import escape
from rich.table import Table

from loom_cli.common import Output, OutputOpt, UrlOpt, connect, dump, fail
from loom_cli.render import stdout
from loom_core import codec
from loom_core.contracts import ToolSpec
from loom_infra import bus
from loom_infra.client import LoomClient

MAX_TOOLS = 10_000  # a catalog is small; this bounds a hostile one


async def read_catalog(client: LoomClient) -> list[ToolSpec]:
    if client.tenant is not None:  # a tenant's user reads no bucket: the planner answers
        return sorted(await client.tools(), key=lambda s: s.name)
    kv = await bus.ensure_tools_bucket(client.js)
    keys: list[str] = []
    for attempt in (1, 2):
        # A listing is a short-lived watcher: under load it can come back empty or fail
        # although the tool-runner keeps the built-ins there. One more try before an
        # empty catalog (which turns the unknown-tool check off) or the error is believed.
        try:
            keys = await kv.keys()
            break
        except NoKeysError:  # an empty bucket (nats-py's way of saying so)
            keys = []
        except Exception:
            if attempt == 2:
                raise  # the console answers 503 "retry"; the CLI a one-line error
    specs = []
    for key in keys[:MAX_TOOLS]:
        entry = await kv.get(key)
        if entry.value:
            specs.append(codec.decode(entry.value, ToolSpec))
    return sorted(specs, key=lambda s: s.name)


def _fetch(url: str | None) -> list[ToolSpec]:
    async def main() -> list[ToolSpec]:
        async with await connect(url) as client:
            return await read_catalog(client)

    try:
        return asyncio.run(main())
    except TimeoutError:
        raise fail(
            "the tool catalog did not answer: is the stack up (`loom up`) and does "
            "--nats / LOOM_NATS_URL point at it?"
        ) from None


def full(spec: ToolSpec) -> dict[str, Any]:
    """Every field, defaults included (a Record's JSON omits them)."""
    return codec.to_builtins({f: getattr(spec, f) for f in spec.__struct_fields__})


def _access(s: ToolSpec) -> str:
    rules = [r for r, on in (("auth", s.requires_auth), ("admin", s.admin_only)) if on]
    return ", ".join(rules) or "-"


def _state(s: ToolSpec) -> str:
    return "available" if s.available else "[red]unavailable[/]"


def _breaker(s: ToolSpec) -> str:
    return {"open": "[red]open[/]", "half_open": "[yellow]half_open[/]"}.get(s.breaker, s.breaker)


def tools_list(
    ctx: typer.Context,
    source: str = typer.Option(None, "--source", help="only this source, e.g. mcp:time"),
    category: str = typer.Option(None, "--category", help="only this category"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """Every tool: source, category, idempotency, availability, breaker, access."""
    if ctx.invoked_subcommand is not None:
        return
    specs = [
        s
        for s in _fetch(url)
        if (source is None or s.source == source) and (category is None or s.category == category)
    ]
    if output is Output.json:
        sys.stdout.write(dump([full(s) for s in specs]) + "\n")
        return
    if output is Output.jsonl:
        for s in specs:
            sys.stdout.write(json.dumps(full(s)) + "\n")
        return
    if not specs:
        stdout.print("no tools in the catalog (is a tool-runner running?)")
        return
    table = Table("tool", "source", "category", "idempotent", "state", "breaker", "access",
                  "description")  # fmt: skip
    for s in specs:
        table.add_row(  # names and texts come from MCP servers: never markup
            escape(s.name),
            escape(s.source),
            escape(s.category or "-"),
            "yes" if s.idempotent else "no",
            _state(s),
            _breaker(s),
            _access(s),
            escape(s.description[:80]),
        )
    stdout.print(table)


def tools_show(
    name: str = typer.Argument(..., help="the tool's name, e.g. echo or time.get_current_time"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """One tool in full, with its input and output JSON Schemas."""
    specs = {s.name: s for s in _fetch(url)}
    spec = specs.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(specs), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `loom tools` lists them"
        raise fail(f"no tool {name!r} in the catalog{hint}")
    if output is not Output.text:
        sys.stdout.write(dump(full(spec)) + "\n")
        return
    rows: list[tuple[str, Any]] = [
        ("name", spec.name),
        ("source", spec.source),
        ("category", spec.category or "-"),
        ("description", spec.description),
        ("idempotent", "yes" if spec.idempotent else "no (never run twice for one key)"),
        ("timeout", f"{spec.timeout_s:g} s"),
        (
            "state",
            _state(spec) + (f" ({escape(spec.unavailable_reason)})" if not spec.available else ""),
        ),
        ("breaker", _breaker(spec)),
        ("requires auth", "yes" if spec.requires_auth else "no"),
        ("admin only", "yes" if spec.admin_only else "no"),
    ]
    for key, value in rows:
        safe = value if key in ("state", "breaker") else escape(str(value))
        stdout.print(f"[bold]{key}:[/] {safe}", soft_wrap=True)
    stdout.print("[bold]input schema:[/]")
    stdout.print_json(json.dumps(spec.input_schema))
    stdout.print("[bold]output schema:[/]")
    stdout.print_json(json.dumps(spec.output_schema))


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="The tool catalog: built-in, module and MCP tools, with availability and "
        "breaker state.",
        invoke_without_command=True,
        no_args_is_help=False,
    )
    group.callback(invoke_without_command=True)(tools_list)
    group.command("show")(tools_show)
    app.add_typer(group, name="tools")
