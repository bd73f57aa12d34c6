"""``loom schedule ...``: schedules that submit runs (cron, every, at).

``register(app)`` adds the group. The schedule's runs act for whoever creates it (the
``--token`` / ``LOOM_TOKEN`` user, else anonymous where the stack allows it), as ``loom
run`` would; with ``LOOM_TENANT`` everything is that tenant's (its operator's twin
subject). Like ``loom_cli.control``, this module never imports ``loom_cli.app`` at
import time (``app`` imports it to register the group).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import typer
from nats.errors import Error as NatsError
from rich.table import Table

from loom_cli.common import ExitCode, Output, OutputOpt, TokenOpt, UrlOpt, connect, dump, fail
from loom_cli.render import stdout
from loom_core import codec, routes, subjects
from loom_core.contracts import (
    ErrorInfo,
    Schedule,
    ScheduleControl,
    ScheduleCreate,
    ScheduleMessage,
    ScheduleReply,
    ScheduleSpec,
    SchedulesQuery,
)
from loom_infra.client import LoomClient

__all__ = ["ask", "register"]

NameArg = typer.Argument(..., metavar="NAME", help="the schedule's name (letters, digits, - _)")


async def ask(
    client: LoomClient, message: ScheduleMessage, token: str | None = None, timeout: float = 10.0
) -> ScheduleReply:
    """Send one schedule request as the operator (of the client's tenant: its twin
    subject), the token's user acting."""
    token = token or client.token
    headers = {subjects.AUTHORIZATION: f"Bearer {token}"} if token else None
    msg = await client.nc.request(
        client.scoped(routes.SCHEDULE.subject(via="operator")), codec.encode(message),
        timeout=timeout, headers=headers,
    )  # fmt: skip
    return codec.decode(msg.data, ScheduleReply)


def _request(message: ScheduleMessage, url: str | None, token: str | None = None) -> ScheduleReply:
    async def main() -> ScheduleReply:
        async with await connect(url) as client:
            try:
                return await ask(client, message, token)
            except (NatsError, TimeoutError) as exc:
                raise fail(
                    f"no answer from agentloom ({type(exc).__name__}): is the stack up? "
                    "Start it with `loom up` or set LOOM_NATS_URL",
                    ExitCode.UNAVAILABLE,
                ) from None

    reply = asyncio.run(main())
    if reply.error is not None:
        raise _refused(reply.error)
    return reply


def _refused(error: ErrorInfo) -> typer.Exit:
    where = f" at {error.path}" if error.path else ""
    issues = error.details.get("issues") if error.details else None
    lines = [f"{error.code}{where}: {error.message}"]
    if isinstance(issues, list):
        lines += [f"  ✗ {i.get('code')} at {i.get('path')}: {i.get('message')}"
                  for i in issues[:20] if isinstance(i, dict)]  # fmt: skip
    code = ExitCode.UNAVAILABLE if error.retryable else ExitCode.FAILED
    return fail("\n".join(lines), code)


def _when(schedule: Schedule) -> str:
    spec = schedule.when
    if spec.cron is not None:
        return f"cron '{spec.cron}'" + (f" ({spec.tz})" if spec.tz != "UTC" else "")
    if spec.every is not None:
        return f"every {spec.every}"
    return f"at {spec.at.isoformat() if spec.at else '?'}"


def _time(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value else "—"


def _tenant(schedule: Schedule) -> str:
    """Whose runs a schedule submits: a tenant's (its own users made it) or the
    platform's (a token's tenant claim is shown, but its runs are the platform's)."""
    who = schedule.principal
    if who is not None and who.tenant_verified:
        return schedule.tenant
    return "platform" + (f" (claims {schedule.tenant})" if schedule.tenant != "default" else "")


def _show(schedules: list[Schedule], output: Output, tenants: bool = False) -> None:
    if output is Output.json:
        stdout.print_json(dump(schedules))
        return
    if output is Output.jsonl:
        for s in schedules:
            stdout.print(codec.encode(s).decode(), markup=False, soft_wrap=True)
        return
    table = Table(*(["tenant"] if tenants else []), "name", "when", "next", "state", "fired",
                  "last run", box=None)  # fmt: skip
    for s in schedules:
        state = "paused" if s.paused else ("done" if s.next_at is None else "active")
        table.add_row(*([_tenant(s)] if tenants else []), s.name, _when(s), _time(s.next_at),
                      state, str(s.fired), s.last_run_id or "—")  # fmt: skip
    stdout.print(table)


def _one(reply: ScheduleReply, output: Output) -> None:
    schedule = reply.schedule
    assert schedule is not None
    if output is Output.json:
        stdout.print_json(dump(reply))
        return
    if output is Output.jsonl:
        stdout.print(codec.encode(reply).decode(), markup=False, soft_wrap=True)
        return
    _show([schedule], output)
    who = schedule.principal
    if who is not None:
        stdout.print(f"  acts for {who.user_id} (tenant {who.tenant}); catch-up "
                     f"{schedule.when.catch_up}; runs are labelled schedule={schedule.name}",
                     markup=False)  # fmt: skip
    if schedule.error is not None:
        stdout.print(f"  paused by the firer: {schedule.error.message} ({schedule.error.code}); "
                     "delete and create it again", markup=False)  # fmt: skip
    if reply.run_id:
        stdout.print(f"  run {reply.run_id}" + (" (existing)" if reply.existing else ""),
                     markup=False)  # fmt: skip


def create(
    name: str = NameArg,
    file: Path = typer.Argument(..., metavar="PLAN.yaml", help="a plan or run file"),
    cron: str = typer.Option(None, "--cron", help="five cron fields, e.g. '*/5 * * * *'"),
    every: str = typer.Option(None, "--every", help="an interval: 30s, 10m, 1h30m"),
    at: str = typer.Option(None, "--at", help="one instant, e.g. 2026-12-05T09:00Z"),
    tz: str = typer.Option("UTC", "--tz", help="the time zone cron fields are read in"),
    catch_up: str = typer.Option(
        "latest", "--catch-up", help="missed firings: none, latest (once) or all (bounded)"
    ),
    inputs: list[str] = typer.Option([], "--input", "-i", help="KEY=VALUE (repeatable)"),
    input_json: str = typer.Option(None, "--input-json", help="a JSON object of inputs"),
    paused: bool = typer.Option(False, "--paused", help="create it paused"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
    token: str = TokenOpt,
) -> None:
    """Create a schedule that submits the run file at each fire time (one of --cron,
    --every or --at). Its runs act for you (the token's user) and carry the label
    schedule=NAME."""
    from loom_cli.app import load_run_request  # app imports this module

    request = load_run_request(file, inputs, input_json)
    given = [flag for flag, v in (("--cron", cron), ("--every", every), ("--at", at)) if v]
    if len(given) != 1:
        raise fail("give exactly one of --cron, --every or --at", ExitCode.USAGE)
    try:
        moment = datetime.fromisoformat(at.replace("Z", "+00:00")) if at else None
    except ValueError:
        raise fail(f"--at {at!r} is not an ISO time such as 2026-12-05T09:00Z",
                   ExitCode.USAGE) from None  # fmt: skip
    try:
        spec = msgspec.convert(
            {"cron": cron, "every": every, "at": moment, "tz": tz, "catch_up": catch_up},
            ScheduleSpec,
        )
    except msgspec.ValidationError as exc:
        raise fail(f"{exc} (--catch-up is none, latest or all)", ExitCode.USAGE) from None
    message = ScheduleCreate(name=name, when=spec, run=request, paused=paused)
    _one(_request(message, url, token), output)


def list_(
    limit: int = typer.Option(100, "--limit", help="at most this many"),
    every_tenant: bool = typer.Option(
        False, "--every-tenant", help="every tenant's, with the tenant (the platform's operator)"
    ),
    output: Output = OutputOpt,
    url: str = UrlOpt,
    token: str = TokenOpt,
) -> None:
    """Your tenant's schedules by name, with their next fire time. The platform's
    operator lists every tenant's with --every-tenant (and describes one with
    `loom schedule describe NAME --tenant T`)."""
    found: list[Schedule] = []
    after = ""
    while len(found) < limit:
        query = SchedulesQuery(limit=limit - len(found), after=after, every_tenant=every_tenant)
        reply = _request(query, url, token)
        found += reply.schedules
        if reply.next_after is None:
            break
        after = reply.next_after
    _show(found, output, tenants=every_tenant)


def _control(action: str):
    def command(
        name: str = NameArg, output: Output = OutputOpt, url: str = UrlOpt, token: str = TokenOpt
    ) -> None:
        message = ScheduleControl(name=name, action=action)  # type: ignore[arg-type]  # action is one of the verbs registered below
        _one(_request(message, url, token), output)

    def describe(
        name: str = NameArg,
        tenant: str = typer.Option(
            "", "--tenant", help="a tenant's schedule (the platform's operator only)"
        ),
        output: Output = OutputOpt,
        url: str = UrlOpt,
        token: str = TokenOpt,
    ) -> None:
        message = ScheduleControl(name=name, action="describe", tenant=tenant)
        _one(_request(message, url, token), output)

    if action == "describe":
        command = describe  # type: ignore[assignment]  # describe takes one more option (--tenant); typer reads its signature

    command.__doc__ = {
        "describe": "One schedule: when it fires, its next time, what it fired, who it acts for.",
        "pause": "Stop firing (missed times are not caught up on resume).",
        "resume": "Fire again, from the next time after now.",
        "delete": "Remove the schedule (its runs stay).",
        "trigger": "Fire now, once, apart from the schedule's times.",
    }[action]
    return command


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        name="schedule",
        help="Schedules that submit runs: cron, every or at (one-shot).",
        no_args_is_help=True,
        rich_markup_mode="markdown",
    )
    group.command("create")(create)
    group.command("list")(list_)
    for action in ("describe", "pause", "resume", "delete", "trigger"):
        group.command(action)(_control(action))
    app.add_typer(group, name="schedule")
