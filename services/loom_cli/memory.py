"""``loom memory`` and ``loom knowledge``: the memory service from the command line.

Each command is one ``MemoryRequest`` on the operator's route. ``--user``/``--tenant``/
``--role`` name the principal to act as (to see what a user sees); without ``--user`` the
operator acts as itself (role ``admin``, tenant ``default``). Results print as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import typer

from loom_cli.common import UrlOpt, connect, fail
from loom_core import subjects
from loom_core.contracts import MemoryReply, MemoryRequest, Principal

UserOpt = typer.Option(None, "--user", help="act as this user (default: the operator)")
TenantOpt = typer.Option("default", "--tenant", help="the user's tenant")
RoleOpt = typer.Option([], "--role", help="a role of the user (repeatable)")
ScopeOpt = typer.Option("user", "--scope", help="user, global or all")
ThreadOpt = typer.Option(None, "--thread", help="a thread's document instead of the user's")

CONTENT_TYPES = {".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html",
                 ".json": "json"}  # fmt: skip


def _principal(user: str | None, tenant: str, roles: list[str]) -> Principal | None:
    if user is None:
        return (
            None
            if tenant == "default" and not roles
            else Principal(
                user_id="operator", via="operator", tenant=tenant, roles=roles or ["admin"]
            )
        )
    return Principal(user_id=user, via="operator", tenant=tenant, roles=list(roles))


def call(op: str, args: dict[str, Any], url: str | None, principal: Principal | None,
         timeout: float = 30.0) -> Any:  # fmt: skip
    async def main() -> MemoryReply:
        async with await connect(url) as client:
            request = MemoryRequest(op=op, args=args, principal=principal)  # type: ignore[arg-type]  # op is one of this CLI's verbs; the service refuses others
            return await client.ask(subjects.API_MEMORY_OPERATOR, request, MemoryReply, timeout)

    try:
        reply = asyncio.run(main())
    except TimeoutError:
        raise fail("the memory service did not answer: is the stack up? (loom up)") from None
    if reply.error is not None:
        where = f" at {reply.error.path}" if reply.error.path else ""
        raise fail(f"{reply.error.code}{where}: {reply.error.message}")
    return reply.result


def _print(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- memory


def memory_search(
    query: str = typer.Argument(...),
    scope: str = typer.Option("all", "--scope", help="user, global or all"),
    limit: int = typer.Option(5, "--limit"),
    threshold: float | None = typer.Option(None, "--threshold"),
    category: str | None = typer.Option(None, "--category"),
    user: str | None = UserOpt, tenant: str = TenantOpt, role: list[str] = RoleOpt,
    url: str = UrlOpt,
) -> None:  # fmt: skip
    """Memories like QUERY, best first, with scores."""
    args = {"query": query, "scope": scope, "limit": limit, "threshold": threshold,
            "category": category}  # fmt: skip
    _print(call("search", _given(args), url, _principal(user, tenant, role)))


def memory_list(
    scope: str = ScopeOpt,
    category: str | None = typer.Option(None, "--category"),
    limit: int = typer.Option(50, "--limit"),
    cursor: str | None = typer.Option(None, "--cursor", help="next_cursor of the last page"),
    user: str | None = UserOpt, tenant: str = TenantOpt, role: list[str] = RoleOpt,
    url: str = UrlOpt,
) -> None:  # fmt: skip
    """A page of memories (pass --cursor to get the next)."""
    args = {"scope": scope, "category": category, "limit": limit, "cursor": cursor}
    _print(call("list", _given(args), url, _principal(user, tenant, role)))


def memory_show(
    memory_id: str = typer.Argument(...),
    user: str | None = UserOpt, tenant: str = TenantOpt, role: list[str] = RoleOpt,
    url: str = UrlOpt,
) -> None:  # fmt: skip
    """One memory."""
    _print(call("get", {"memory_id": memory_id}, url, _principal(user, tenant, role)))


def memory_add(
    text: str = typer.Argument(...),
    scope: str = typer.Option("user", "--scope", help="user or global"),
    category: str | None = typer.Option(None, "--category"),
    readers: list[str] = typer.Option([], "--reader-role", help="global: who may read"),
    user: str | None = UserOpt, tenant: str = TenantOpt, role: list[str] = RoleOpt,
    url: str = UrlOpt,
) -> None:  # fmt: skip
    """Store a memory."""
    args = {"text": text, "scope": scope, "category": category, "roles": readers or None}
    _print(call("store", _given(args), url, _principal(user, tenant, role)))


def memory_delete(
    memory_id: str = typer.Argument(...),
    user: str | None = UserOpt, tenant: str = TenantOpt, role: list[str] = RoleOpt,
    url: str = UrlOpt,
) -> None:  # fmt: skip
    """Forget one memory."""
    _print(call("delete", {"memory_id": memory_id}, url, _principal(user, tenant, role)))


def memory_stats(
    user: str | None = UserOpt, tenant: str = TenantOpt, role: list[str] = RoleOpt,
    url: str = UrlOpt,
) -> None:  # fmt: skip
    """How many memories, by scope and category."""
    _print(call("stats", {}, url, _principal(user, tenant, role)))


def memory_inspect(
    target: str = typer.Argument(..., help="the user to inspect"),
    tenant: str = TenantOpt, limit: int = typer.Option(50, "--limit"), url: str = UrlOpt,
) -> None:  # fmt: skip
    """Another user's memories and stats (as the operator, role admin)."""
    principal = Principal(user_id="operator", via="operator", tenant=tenant, roles=["admin"])
    _print(call("inspect", {"user_id": target, "limit": limit}, url, principal))


def memory_export(
    out: Path | None = typer.Option(None, "--out", help="write here instead of stdout"),
    scope: str = ScopeOpt,
    user: str | None = UserOpt, tenant: str = TenantOpt, role: list[str] = RoleOpt,
    url: str = UrlOpt,
) -> None:  # fmt: skip
    """Memories as JSON (import them with `loom memory import`)."""
    result = call("export", {"scope": scope}, url, _principal(user, tenant, role), timeout=120)
    if out is None:
        _print(result)
    else:
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False))


def memory_import(
    file: Path = typer.Argument(..., help="a file written by `loom memory export`"),
    user: str | None = UserOpt, tenant: str = TenantOpt, role: list[str] = RoleOpt,
    url: str = UrlOpt,
) -> None:  # fmt: skip
    """Store exported memories (as the acting user, whatever the file says)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise fail(f"cannot read {file}: {exc}") from None
    memories = data.get("memories") if isinstance(data, dict) else data
    if not isinstance(memories, list):
        raise fail(f"{file} holds no list of memories: give a `loom memory export` file")
    args = {"memories": memories}
    _print(call("import", args, url, _principal(user, tenant, role), timeout=300))


def working_get(
    thread: str | None = ThreadOpt,
    version: int | None = typer.Option(None, "--version", help="an earlier version"),
    user: str | None = UserOpt, tenant: str = TenantOpt, role: list[str] = RoleOpt,
    url: str = UrlOpt,
) -> None:  # fmt: skip
    """The working memory document and its version."""
    args = {"thread_id": thread, "version": version}
    _print(call("working_get", _given(args), url, _principal(user, tenant, role)))


def working_set(
    doc: str = typer.Argument(..., help="JSON, or plain text with --text"),
    expected: int = typer.Option(..., "--expected-version", help="the version you read"),
    text: bool = typer.Option(False, "--text", help="DOC is free text, not JSON"),
    thread: str | None = ThreadOpt,
    user: str | None = UserOpt, tenant: str = TenantOpt, role: list[str] = RoleOpt,
    url: str = UrlOpt,
) -> None:  # fmt: skip
    """Replace the document if it is still at --expected-version."""
    if text:
        value: Any = doc
    else:
        try:
            value = json.loads(doc)
        except ValueError as exc:
            raise fail(f"DOC is not JSON ({exc}): pass --text for free text") from None
    args = {"doc": value, "expected_version": expected, "thread_id": thread}
    _print(call("working_set", _given(args), url, _principal(user, tenant, role)))


# --------------------------------------------------------------------------- knowledge


def knowledge_add(
    collection: str = typer.Argument(...),
    file: Path = typer.Argument(..., help="text, markdown, HTML or JSON"),
    source: str | None = typer.Option(None, "--source", help="default: the file's name"),
    content_type: str | None = typer.Option(None, "--type", help="text|markdown|html|json"),
    tenant: str = TenantOpt, url: str = UrlOpt,
) -> None:  # fmt: skip
    """Ingest a document (again: unchanged content is not embedded twice)."""
    try:
        content = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read {file}: {exc}") from None
    kind = content_type or CONTENT_TYPES.get(file.suffix.lower(), "text")
    args = {"collection": collection, "source": source or file.name, "content": content,
            "content_type": kind}  # fmt: skip
    _print(call("knowledge_add", args, url, _principal(None, tenant, []), timeout=600))


def knowledge_search(
    collection: str = typer.Argument(...),
    query: str = typer.Argument(...),
    limit: int = typer.Option(5, "--limit"),
    tenant: str = TenantOpt, url: str = UrlOpt,
) -> None:  # fmt: skip
    """Chunks like QUERY, with scores and sources."""
    args = {"collection": collection, "query": query, "limit": limit}
    _print(call("knowledge_search", args, url, _principal(None, tenant, [])))


def knowledge_list(
    collection: str | None = typer.Argument(None),
    tenant: str = TenantOpt, url: str = UrlOpt,
) -> None:  # fmt: skip
    """Collections, or one collection's sources (with chunk counts)."""
    args = {"collection": collection}
    _print(call("knowledge_list", _given(args), url, _principal(None, tenant, [])))


def knowledge_delete(
    collection: str = typer.Argument(...),
    source: str | None = typer.Option(None, "--source", help="only this document"),
    tenant: str = TenantOpt, url: str = UrlOpt,
) -> None:  # fmt: skip
    """Remove a document, or the whole collection."""
    args = {"collection": collection, "source": source}
    _print(call("knowledge_delete", _given(args), url, _principal(None, tenant, [])))


def _given(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if v is not None}


def register(app: typer.Typer) -> None:
    memory = typer.Typer(help="Memories, threads' working memory (the memory service).")
    memory.command("search")(memory_search)
    memory.command("list")(memory_list)
    memory.command("show")(memory_show)
    memory.command("add")(memory_add)
    memory.command("delete")(memory_delete)
    memory.command("stats")(memory_stats)
    memory.command("inspect")(memory_inspect)
    memory.command("export")(memory_export)
    memory.command("import")(memory_import)
    working = typer.Typer(help="The working memory document (compare-and-set).")
    working.command("get")(working_get)
    working.command("set")(working_set)
    memory.add_typer(working, name="working")
    app.add_typer(memory, name="memory")
    knowledge = typer.Typer(help="Knowledge collections: documents for retrieval (RAG).")
    knowledge.command("add")(knowledge_add)
    knowledge.command("search")(knowledge_search)
    knowledge.command("list")(knowledge_list)
    knowledge.command("delete")(knowledge_delete)
    app.add_typer(knowledge, name="knowledge")
