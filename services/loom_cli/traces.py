"""``loom traces`` / ``usage`` / ``slowest`` / ``rebuild-traces``: questions about many
runs' traces, answered by the tracing service (``loom.api.traces*``).

``register(app)`` adds the four commands to the ``loom`` app. As in ``loom_cli.app``,
data goes to stdout (``-o json`` / ``-o jsonl`` for scripts) and errors to stderr; a
refused or failed request exits 1.

Times (``--since``, ``--until``): a duration back from now (``90s``, ``15m``, ``1h``,
``2d``, ``1w``, or combined like ``1h30m``), ``now``, or an ISO 8601 time
(``2026-11-02T09:00:00+01:00``; a date is its midnight; a time without a zone is UTC).
``since`` is inclusive, ``until`` exclusive; both filter on the start of a run or span.

Import cycle: ``loom_cli.app`` imports this module to call ``register(app)``, so this
module never imports ``loom_cli.app`` at import time: it takes ``app._client`` at call
time and re-declares the few option helpers it needs (as ``loom_cli.control`` does).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

import msgspec
import typer
from nats.errors import Error as NatsError
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from loom_cli.common import ExitCode, Output, OutputOpt, UrlOpt, connect, fail
from loom_cli.render import runs_table, stderr, stdout
from loom_core import subjects
from loom_core.contracts import (
    ErrorInfo,
    RebuildTracesQuery,
    RebuildTracesReply,
    SlowestStepsQuery,
    SlowestStepsReply,
    SpanRecord,
    TracesQuery,
    TracesReply,
    UsageQuery,
    UsageReply,
    UsageRow,
)
from loom_infra.client import LoomClient

__all__ = [
    "parse_when",
    "rebuild_traces",
    "register",
    "slowest",
    "slowest_table",
    "traces",
    "usage",
    "usage_table",
]

R = TypeVar("R")

QUERY_TIMEOUT_S = 30.0
REBUILD_TIMEOUT_S = 300.0  # one page of runs refolded and stored


class UsageBy(StrEnum):
    tool = "tool"
    model = "model"
    run = "run"
    minute = "minute"
    hour = "hour"
    day = "day"


SinceOpt = typer.Option(None, "--since", help="from this time (1h, 2d, ISO 8601), inclusive")
UntilOpt = typer.Option(None, "--until", help="before this time (1h, ISO 8601), exclusive")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|m|s)")
_UNITS = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_when(text: str, now: datetime) -> datetime:
    """A CLI time: ``now``, a duration back from ``now`` (``15m``, ``1h30m``, ``2d``,
    optionally followed by ``ago``) or an ISO 8601 date/time (no zone: UTC). Raises
    ``typer.BadParameter`` saying what is accepted."""
    value = text.strip().lower()
    if value == "now":
        return now
    compact = value.removesuffix("ago").replace(" ", "")
    if compact and _DURATION.sub("", compact) == "":
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(compact))
        return now - timedelta(seconds=seconds)
    try:
        if len(value) == 10:  # a date: its midnight, UTC
            d = date.fromisoformat(value)
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a time: use a duration back from now (90s, 15m, 1h, 2d, 1w, "
            "1h30m), 'now', or an ISO 8601 time such as 2026-11-02T09:00:00+01:00"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _window(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    now = datetime.now(UTC)
    start = parse_when(since, now) if since else None
    end = parse_when(until, now) if until else None
    if start is not None and end is not None and end <= start:
        raise typer.BadParameter(
            f"--until ({end.isoformat()}) must be after --since ({start.isoformat()})"
        )
    return start, end


# ---------------------------------------------------------------------- plumbing


def _unreachable(exc: Exception) -> typer.Exit:
    return fail(
        f"no answer from the tracing service ({exc.__class__.__name__}): is the stack up? "
        "Start it with `loom up` or set LOOM_NATS_URL",
        ExitCode.UNAVAILABLE,
    )


async def _connect(url: str | None) -> LoomClient:
    return await connect(url)


def _ask(url: str | None, subject: str, query: object, reply_type: type[R], timeout: float) -> R:
    async def main() -> R:
        async with await _connect(url) as client:
            try:
                return await client.ask(subject, query, reply_type, timeout)
            except NatsError as exc:
                raise _unreachable(exc) from None

    reply = asyncio.run(main())
    error: ErrorInfo | None = getattr(reply, "error", None)
    if error is not None:
        raise fail(f"{error.code}: {error.message}")
    return reply


def _emit(items: list[Any], output: Output, render: Any) -> None:
    if output is Output.text:
        stdout.print(render(items))
    elif output is Output.jsonl:
        for item in items:
            sys.stdout.write(msgspec.json.encode(item).decode() + "\n")
    else:
        stdout.print_json(json.dumps(msgspec.to_builtins(items), ensure_ascii=False))


def _ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.1f} ms"


def _duration(span: SpanRecord) -> float:
    return (span.end - span.start).total_seconds() * 1000 if span.end else 0.0


def slowest_table(spans: list[SpanRecord]) -> Table:
    table = Table(box=None, pad_edge=False)
    for name in ("duration", "run", "step", "kind", "tool", "status", "started"):
        table.add_column(name, justify="right" if name == "duration" else "left", no_wrap=True)
    colours = {"completed": "green", "failed": "red", "cancelled": "yellow"}
    for s in spans:
        a = s.attributes
        status = str(a.get("loom.step.status", ""))
        table.add_row(
            _ms(_duration(s)),
            Text(s.run_id),
            Text(str(a.get("loom.step.id", s.name))),
            Text(str(a.get("loom.step.kind", ""))),
            Text(str(a.get("loom.step.tool", ""))),
            f"[{colours.get(status, 'white')}]{escape(status)}[/]",
            s.start.strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table


def usage_table(rows: list[UsageRow], by: str = "key") -> Table:
    table = Table(box=None, pad_edge=False)
    table.add_column(by, no_wrap=True)
    for name in ("calls", "errors", "runs", "total", "avg", "max", "tokens in", "tokens out"):
        table.add_column(name, justify="right")
    table.add_column("cost $", justify="right")
    for r in rows:
        table.add_row(
            Text(r.key),
            str(r.calls),
            f"[red]{r.errors}[/]" if r.errors else "0",
            str(r.runs),
            _ms(r.total_ms),
            _ms(r.avg_ms),
            _ms(r.max_ms),
            str(r.input_tokens),
            str(r.output_tokens),
            f"{r.cost_usd:.4f}",
        )
    return table


# ---------------------------------------------------------------------- commands


def traces(
    since: str = SinceOpt,
    until: str = UntilOpt,
    status: str = typer.Option(None, "--status", help="runs with this status (failed, ...)"),
    tool: str = typer.Option(None, "--tool", help="runs that called this tool"),
    model: str = typer.Option(None, "--model", help="runs that called this model"),
    error: str = typer.Option(None, "--error", help="runs with a span of this error code"),
    limit: int = typer.Option(50, "--limit", min=1, help="at most this many runs"),
    after: str = typer.Option(
        "", "--after", help="continue a listing: the cursor a previous `loom traces` printed"
    ),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """Runs' traces, newest first, filtered by status, time, tool, model or error code.

    One page per call: when more runs follow, the cursor to pass as --after (with the
    same filters) is printed on stderr."""
    start, end = _window(since, until)
    query = TracesQuery(
        since=start,
        until=end,
        status=status,
        tool=tool,
        model=model,
        error=error,
        limit=limit,
        after=after,
    )
    reply = _ask(url, subjects.API_TRACES, query, TracesReply, QUERY_TIMEOUT_S)
    _emit(reply.runs, output, runs_table)
    if reply.next_after is not None:
        sys.stdout.flush()
        stderr.print(f"more runs: add --after {reply.next_after}", soft_wrap=True)


def usage(
    since: str = SinceOpt,
    until: str = UntilOpt,
    by: UsageBy = typer.Option(UsageBy.tool, "--by", help="tool, model, run, minute, hour, day"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """Tool and model calls aggregated by tool, model, run or time bucket (UTC): calls,
    errors, durations, tokens and cost."""
    start, end = _window(since, until)
    query = UsageQuery(by=by.value, since=start, until=end)
    reply = _ask(url, subjects.API_TRACES_USAGE, query, UsageReply, QUERY_TIMEOUT_S)
    _emit(reply.rows, output, lambda rows: usage_table(rows, by.value))


def slowest(
    since: str = SinceOpt,
    until: str = UntilOpt,
    limit: int = typer.Option(10, "--limit", min=1, help="how many steps"),
    tool: str = typer.Option(None, "--tool", help="only steps calling this tool"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """The slowest steps (ended step spans, longest first)."""
    start, end = _window(since, until)
    query = SlowestStepsQuery(since=start, until=end, tool=tool, limit=limit)
    reply = _ask(url, subjects.API_TRACES_SLOWEST, query, SlowestStepsReply, QUERY_TIMEOUT_S)
    _emit(reply.spans, output, slowest_table)


def rebuild_traces(
    since: str = SinceOpt,
    until: str = UntilOpt,
    run: list[str] = typer.Option([], "--run", help="only this run (repeatable)"),
    page: int = typer.Option(100, "--page", min=1, help="runs per request"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """Recompute runs' spans from their events and export them again (all runs, or
    those started in the window, or --run ones). Reports how many spans changed: 0 means
    the rebuilt traces equal the stored ones."""
    start, end = _window(since, until)
    totals = RebuildTracesReply()
    after: str | None = None
    while True:
        query = RebuildTracesQuery(
            run_ids=run, since=start, until=end, after_run_id=after, limit=page
        )
        reply = _ask(url, subjects.API_TRACES_REBUILD, query, RebuildTracesReply, REBUILD_TIMEOUT_S)
        totals = RebuildTracesReply(
            runs=totals.runs + reply.runs,
            spans=totals.spans + reply.spans,
            changed=totals.changed + reply.changed,
        )
        if output is Output.text:
            stderr.print(f"rebuilt {totals.runs} runs so far…")
        if reply.last_run_id is None:
            break
        after = reply.last_run_id
    if output is Output.text:
        stdout.print(
            f"rebuilt {totals.runs} runs, {totals.spans} spans; {totals.changed} changed "
            "(queued for export again)"
        )
        return
    # every field, zeros included (``changed: 0`` is the answer scripts look for)
    result = {"runs": totals.runs, "spans": totals.spans, "changed": totals.changed}
    if output is Output.jsonl:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        stdout.print_json(json.dumps(result))


def register(app: typer.Typer) -> None:
    """Add ``traces``, ``usage``, ``slowest`` and ``rebuild-traces`` to ``app``."""
    app.command("traces")(traces)
    app.command("usage")(usage)
    app.command("slowest")(slowest)
    app.command("rebuild-traces")(rebuild_traces)
