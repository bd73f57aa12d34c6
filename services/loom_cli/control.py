"""``loom describe`` (a run's statistics) and ``loom cancel`` / ``pause`` / ``unpause``.

``register(app)`` adds the four commands to the ``loom`` app. As in ``loom_cli.app``,
data goes to stdout and errors to stderr; a refused or failed request exits 1.
Statistics are computed here from the run's events (``loom_core.stats``), so ``describe``
works for any run whose events the store has, live or finished.

Import cycle: ``loom_cli.app`` imports this module to call ``register(app)``, so this
module never imports ``loom_cli.app`` at import time (importing either module first then
works): it takes ``app._client`` at call time, and re-declares the three-line helpers it
needs at definition time (``Output``, the ``-o``/``--nats`` options, ``fail``, ``dump``)
with the same behaviour.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
import sys
from datetime import UTC, datetime

import msgspec
import typer
from nats.errors import Error as NatsError
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from loom_cli.common import ExitCode, Output, OutputOpt, UrlOpt, connect, dump, fail
from loom_cli.render import principal_line, stdout
from loom_core.contracts import EventRecord, RunControlReply
from loom_core.stats import RunStats, StepCounts, family_stats
from loom_infra.client import LoomClient, LoomError

__all__ = ["cancel", "describe", "operator", "pause", "register", "render_describe", "unpause"]


RunArg = typer.Argument(..., metavar="RUN", help="the run's id")
ReasonOpt = typer.Option("", "--reason", "-r", help="why (recorded in the run's events)")

_COLOURS = {
    "completed": "green",
    "succeeded": "green",
    "failed": "red",
    "rejected": "red",
    "cancelled": "red",
    "running": "cyan",
    "suspended": "yellow",
    "planning": "cyan",
    "paused": "yellow",
    "needs_review": "magenta",
    "pending": "white",
    "skipped": "yellow",
    "not_started": "dim",
}


def operator() -> str:
    """``user@host`` of whoever runs the CLI: recorded as ``by`` in the run's events."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name (e.g. a container's uid with no passwd entry)
        user = "unknown"
    return f"{user}@{socket.gethostname() or 'unknown-host'}"


async def _connect(url: str | None) -> LoomClient:
    return await connect(url)


def _unreachable(exc: Exception) -> typer.Exit:
    return fail(
        f"no answer from agentloom ({exc.__class__.__name__}): is the stack up? "
        "Start it with `loom up` or set LOOM_NATS_URL",
        ExitCode.UNAVAILABLE,
    )


# ---------------------------------------------------------------------- describe


def describe(run_id: str = RunArg, output: Output = OutputOpt, url: str = UrlOpt) -> None:
    """A run's statistics: status, time running/waiting/queued, counts, what it waits on.

    Computed from the run's events; a live run's open waits are measured to now. A run
    waiting on sub-runs is shown with what they wait on (their events are read too), so
    its status and waits agree with ``loom runs`` and progress."""
    # "now" ends the open waits of a live run; a finished run ignores it.
    now = datetime.now(UTC)
    records: list[EventRecord] = []

    async def main() -> RunStats | None:
        async with await _connect(url) as client:

            async def events_of(rid: str) -> list[EventRecord]:
                if rid == run_id:
                    records.extend(await client.events(rid))
                    return records
                try:
                    return await client.events(rid)
                except LoomError:  # a child this executor does not know: work in progress
                    return []

            try:
                return await family_stats(run_id, events_of, as_of=now)
            except LoomError as exc:
                raise fail(str(exc)) from None
            except NatsError as exc:
                raise _unreachable(exc) from None

    stats = asyncio.run(main())
    if stats is None:
        raise fail(f"no run '{run_id}'")
    if output is Output.text:
        stdout.print(render_describe(stats))
        if (who := principal_line(records)) is not None:
            stdout.print(Text("  ") + who)
    elif output is Output.jsonl:
        sys.stdout.write(json.dumps(msgspec.to_builtins(stats), ensure_ascii=False) + "\n")
    else:
        stdout.print_json(dump(stats))


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "…"
    if ms < 1000:
        return f"{ms:.1f} ms"
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _at(at: datetime | None) -> str:
    return at.isoformat(sep=" ", timespec="milliseconds") if at else ""


def _status(status: str) -> str:
    return f"[{_COLOURS.get(status, 'white')}]{status}[/]"


def _children(counts: StepCounts | None) -> str:
    if counts is None:
        return ""
    parts = [
        f"{n} {name}"
        for name, n in (
            ("ok", counts.succeeded),
            ("failed", counts.failed),
            ("skipped", counts.skipped),
            ("cancelled", counts.cancelled),
            ("running", counts.running),
            ("pending", counts.pending),
        )
        if n
    ]
    return ", ".join(parts)


def render_describe(stats: RunStats) -> RenderableType:
    """The human view of ``RunStats``: a few lines, a counts table, pending work, steps."""
    head = f"[bold]run[/] {escape(stats.run_id)}"
    if stats.name:
        head += f" ({escape(stats.name)})"
    head += f"  {_status(stats.status)}"
    lines: list[RenderableType] = [Text.from_markup(head)]
    if stats.detail:
        lines.append(Text(f"  {stats.detail}"))
    if stats.ended_at is not None:
        when = (
            f"  started {_at(stats.started_at)}, ended {_at(stats.ended_at)}, "
            f"took {fmt_ms(stats.duration_ms)}"
        )
    else:
        when = f"  started {_at(stats.started_at)}, last event {_at(stats.last_event_at)}"
    lines.append(Text(when + f" ({stats.events} events)"))
    lines.append(
        Text(
            f"  time: running {fmt_ms(stats.running_ms)} · waiting {fmt_ms(stats.waiting_ms)} "
            f"(timers {fmt_ms(stats.timer_wait_ms)}, paused {fmt_ms(stats.paused_ms)}) · "
            f"queued {fmt_ms(stats.queued_ms)}"
        )
    )

    counts = Table(box=None, pad_edge=False, title=None)
    columns = ("steps", "succeeded", "failed", "skipped", "cancelled", "running", "pending")
    for name in (*columns, "attempts", "retries", "failed calls"):
        counts.add_column(name, justify="right")
    counts.add_row(
        f"{stats.total}" + (f" ({stats.planned} planned)" if stats.planned else ""),
        str(stats.succeeded),
        str(stats.failed),
        str(stats.skipped),
        str(stats.cancelled),
        str(stats.running),
        str(stats.pending),
        str(stats.attempts),
        str(stats.retries),
        str(stats.tool_calls_failed),
    )
    lines += [Text(""), counts]

    if stats.pending_work:
        lines += [Text(""), Text.from_markup("[bold]waiting on[/]")]
        lines += [Text(f"  • {item.text}") for item in stats.pending_work]

    if stats.per_step:
        steps = Table(box=None, pad_edge=False)
        for name in ("step", "kind", "status", "attempts", "duration", "inside", "detail"):
            steps.add_column(name, no_wrap=name == "step")
        for s in stats.per_step:
            steps.add_row(  # Text, not markup: ids and errors are user data
                Text(s.id),
                Text(f"{s.kind} {s.tool}".strip()),
                _status(s.status),
                str(s.attempts),
                fmt_ms(s.duration_ms) if s.duration_ms is not None else "",
                _children(s.children),
                Text(s.detail or ""),
            )
        lines += [Text(""), steps]
    return Group(*lines)


# ---------------------------------------------------------------------- control


def _control(run_id: str, action: str, reason: str, output: Output, url: str | None) -> None:
    by = operator()

    async def main() -> RunControlReply:
        async with await _connect(url) as client:
            try:
                return await client.control(run_id, action, by=by, reason=reason)
            except LoomError as exc:
                raise fail(f"cannot {action} run '{run_id}': {exc}") from None
            except NatsError as exc:
                raise _unreachable(exc) from None

    reply = asyncio.run(main())
    if not reply.ok:
        why = f": {reply.status}" if reply.status else ""
        raise fail(f"cannot {action} run '{run_id}'{why}")
    if output is Output.text:
        stdout.print(f"{reply.run_id}: {reply.status or action + ' ok'}", markup=False)
    elif output is Output.jsonl:
        sys.stdout.write(msgspec.json.encode(reply).decode() + "\n")
    else:
        stdout.print_json(dump(reply))


def cancel(
    run_id: str = RunArg, reason: str = ReasonOpt, output: Output = OutputOpt, url: str = UrlOpt
) -> None:
    """Cancel a run: in-flight tool calls are told to stop, no step starts again."""
    _control(run_id, "cancel", reason, output, url)


def pause(
    run_id: str = RunArg, reason: str = ReasonOpt, output: Output = OutputOpt, url: str = UrlOpt
) -> None:
    """Pause a run: no new step starts; steps in flight finish. `loom unpause` resumes."""
    _control(run_id, "pause", reason, output, url)


def unpause(run_id: str = RunArg, output: Output = OutputOpt, url: str = UrlOpt) -> None:
    """Resume a paused run: steps held back start, waiting retries go on."""
    _control(run_id, "unpause", "", output, url)


def register(app: typer.Typer) -> None:
    """Add ``describe``, ``cancel``, ``pause`` and ``unpause`` to ``app``."""
    for command in (describe, cancel, pause, unpause):
        app.command()(command)
