"""``loom blob``: big values stored by reference (``loom_core.blobs``).

``loom blob put FILE`` uploads a JSON value and prints its reference (pass it in a run's
input); ``loom blob get REF`` streams a stored value to stdout (or ``--out FILE``),
chunk by chunk, with ``--offset``/``--length`` to page through a large one; ``loom blob
info REF`` says whether it is stored and how big it is. REF is a reference as JSON or
just its digest ``sha256:<hex>``, as ``loom show`` prints it.

``--run RUN`` reads the blob through a run whose events refer to it (the planner's
``apiBlob``): how a tenant's operator (``LOOM_TENANT``) reads its runs' blobs, since it
has no access to the blob bucket itself. A tenant cannot upload (``put``): its large
inputs stay inline.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import typer

from loom_cli.common import UrlOpt, connect, fail
from loom_cli.render import stderr, stdout
from loom_core import blobs
from loom_infra.client import LoomClient, LoomError

RunOpt = typer.Option(
    None, "--run", help="read it through this run, whose events refer to it (a tenant must)"
)


def _ref_arg(text: str) -> dict[str, Any] | str:
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise fail(f"REF is not valid JSON: {exc}") from None
        return value if isinstance(value, dict) else text
    return text


def blob_put(
    file: Path = typer.Argument(..., help="a JSON file (- for stdin)"),
    url: str = UrlOpt,
) -> None:
    """Upload a JSON value; print its reference (stored once: the same value, the same
    reference). Inline secrets are redacted first, as in a run's input."""
    raw = sys.stdin.buffer.read() if str(file) == "-" else _read(file)
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fail(f"{file} is not JSON: {exc}") from None

    async def main() -> dict[str, Any]:
        async with await connect(url) as client:
            if client.tenant is not None:
                raise fail(
                    f"tenant {client.tenant}'s operator cannot upload blobs: pass the value "
                    "inline in the run's input (it is stored with the run)"
                )
            return await client.put_blob(value)

    try:
        ref = asyncio.run(main())
    except LoomError as exc:
        raise fail(str(exc)) from None
    sys.stdout.write(json.dumps(ref) + "\n")


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror}") from None


def blob_get(
    ref: str = typer.Argument(..., help='a reference (JSON) or its digest "sha256:<hex>"'),
    out: Path = typer.Option(None, "--out", "-O", help="write to this file, not stdout"),
    offset: int = typer.Option(0, "--offset", min=0, help="skip this many bytes"),
    length: int = typer.Option(None, "--length", min=0, help="write at most this many bytes"),
    run: str = RunOpt,
    url: str = UrlOpt,
) -> None:
    """Write a stored value's bytes (its canonical JSON), streamed chunk by chunk; a
    reference's ``path`` is ignored (the whole blob is written). The sha256 is checked
    at the end: a mismatch is an error (exit 1), whatever was written."""

    async def main(sink: BinaryIO) -> int:
        async with await connect(url) as client:
            return await write_range(client, _ref_arg(ref), sink, offset, length, run)

    try:
        if out is None:
            written = asyncio.run(main(sys.stdout.buffer))
            sys.stdout.buffer.flush()
        else:
            with out.open("wb") as sink:
                written = asyncio.run(main(sink))
    except LoomError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc.strerror}") from None
    stderr.print(f"{written} bytes", highlight=False)


def _digest(ref: dict[str, Any] | str) -> str:
    return str(ref.get(blobs.BLOB_KEY, "")) if isinstance(ref, dict) else ref


def _chunks(client: LoomClient, ref: dict[str, Any] | str, run: str | None) -> AsyncIterator[bytes]:
    """The blob's bytes: through ``run`` when given, else from the bucket (the
    platform's operator only)."""
    if run is not None:
        return client.run_blob_chunks(run, _digest(ref))
    if client.tenant is not None:
        raise fail(_NEEDS_RUN.format(tenant=client.tenant))
    return client.blob_chunks(ref)


_NEEDS_RUN = (
    "tenant {tenant}'s operator reads a blob through its run: add --run RUN_ID (the run "
    "whose output or events hold the reference; `loom run` prints the command)"
)


async def write_range(
    client: LoomClient,
    ref: dict[str, Any] | str,
    sink: BinaryIO,
    offset: int = 0,
    length: int | None = None,
    run: str | None = None,
) -> int:
    """Write bytes ``[offset, offset + length)`` of the blob to ``sink`` (read through
    ``run`` when given); the whole blob is still read so its digest is checked. Returns
    the bytes written."""
    end = None if length is None else offset + length
    position = written = 0
    async for chunk in _chunks(client, ref, run):
        lo = max(offset - position, 0)
        hi = len(chunk) if end is None else min(end - position, len(chunk))
        if hi > lo:
            sink.write(chunk[lo:hi])
            written += hi - lo
        position += len(chunk)
    return written


def blob_info(
    ref: str = typer.Argument(..., help='a reference (JSON) or its digest "sha256:<hex>"'),
    run: str = RunOpt,
    url: str = UrlOpt,
) -> None:
    """Is the blob stored, and how big is it."""

    async def main() -> blobs.BlobRef:
        async with await connect(url) as client:
            given = _ref_arg(ref)
            if run is not None:
                digest = _digest(given)
                try:
                    blobs.parse_ref({blobs.BLOB_KEY: digest, "bytes": 0}, "REF")
                except blobs.BlobRefError as exc:
                    raise LoomError(exc.error) from None
                return blobs.BlobRef(digest, await client.run_blob_size(run, digest))
            if client.tenant is not None:
                raise fail(_NEEDS_RUN.format(tenant=client.tenant))
            return await client.blob_ref(given)

    try:
        found = asyncio.run(main())
    except LoomError as exc:
        raise fail(str(exc)) from None
    stdout.print(blobs.describe(found), highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``blob put``, ``blob get`` and ``blob info`` to ``app``."""
    group = typer.Typer(help="Big values stored by reference (the blob store).")
    group.command("put")(blob_put)
    group.command("get")(blob_get)
    group.command("info")(blob_info)
    app.add_typer(group, name="blob")
