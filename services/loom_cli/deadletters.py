"""``loom dead-letters``: messages a service could not process (poison, with the reason),
or with ``--rejects`` the requests refused as the client's mistake.

Read through the planner's ``apiDeadLetters`` route, a page at a time by stream sequence:
the platform's operator sees every letter; a tenant's operator (``LOOM_TENANT``) only
those its users sent or that are about its runs. Payload secrets were redacted when the
letter was written.
"""

from __future__ import annotations

import asyncio
import json
import sys

import typer
from rich.markup import escape
from rich.table import Table

from loom_cli.common import ExitCode, Output, OutputOpt, UrlOpt, connect, fail
from loom_cli.render import stdout
from loom_core import codec
from loom_core.contracts import StoredDeadLetter
from loom_infra.client import LoomError


async def read_letters(
    url: str | None, rejects: bool, after: int, limit: int
) -> tuple[list[StoredDeadLetter], int | None]:
    """Up to ``limit`` letters after sequence ``after``, and the sequence to go on from
    (None: nothing more stored now)."""
    found: list[StoredDeadLetter] = []
    cursor: int | None = after
    async with await connect(url) as client:
        while cursor is not None and len(found) < limit:
            page = await client.dead_letters(cursor, min(limit - len(found), 500), rejects)
            found += page.letters
            if page.next_after_seq is not None and page.next_after_seq <= cursor:
                break  # a cursor that does not move: never loop
            cursor = page.next_after_seq
    return found, cursor


def dead_letters(
    rejects: bool = typer.Option(
        False, "--rejects", help="the rejected requests (a client's mistakes) instead"
    ),
    after: int = typer.Option(0, "--after", min=0, help="only those after this sequence"),
    limit: int = typer.Option(50, "--limit", min=1, max=10_000, help="at most this many"),
    output: Output = OutputOpt,
    url: str = UrlOpt,
) -> None:
    """Dead letters you may see, oldest first: the service, the reason and the subject
    each came on (`-o json` adds the redacted payload). With LOOM_TENANT, your tenant's
    only. Go on with `--after` the last sequence shown."""
    try:
        letters, cursor = asyncio.run(read_letters(url, rejects, after, limit))
    except LoomError as exc:
        code = ExitCode.UNAVAILABLE if exc.error.retryable else ExitCode.FAILED
        raise fail(str(exc), code) from None
    except TimeoutError:
        raise fail(
            "no answer from the planner, which serves dead letters: is the stack up "
            "(`loom up`)?", ExitCode.UNAVAILABLE,
        ) from None  # fmt: skip
    if output is Output.json:
        sys.stdout.write(
            json.dumps({"letters": codec.to_builtins(letters), "next_after": cursor}) + "\n"
        )
        return
    if output is Output.jsonl:
        for item in letters:
            sys.stdout.write(json.dumps(codec.to_builtins(item)) + "\n")
        return
    if not letters:
        stdout.print("no " + ("rejected requests" if rejects else "dead letters"))
        return
    table = Table("seq", "at", "service", "code", "subject", "message", box=None)
    for item in letters:
        letter = item.letter
        table.add_row(  # texts come from clients and models: never markup
            str(item.seq), letter.at.strftime("%Y-%m-%d %H:%M:%SZ"), escape(letter.service),
            escape(letter.error.code), escape(letter.origin_subject),
            escape(letter.error.message[:120]),
        )  # fmt: skip
    stdout.print(table)
    if cursor is not None:
        stdout.print(f"more: loom dead-letters --after {cursor}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("dead-letters")(dead_letters)
