"""Memory operations: each one's arguments as a strict msgspec Struct (the same Structs
are the memory tools' inputs, so a tool's schema and the service's check never differ)
and the one function that runs an operation for a principal.

No argument names the acting user or tenant: that is the caller's principal (see
``MemoryRequest``). ``inspect`` names the user to look at, and needs the admin role.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from loom_core.contracts import JSON, Principal
from loom_services.memorystore import MemoryFailure, MemoryStore


class Args(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class StoreArgs(Args):
    text: str
    scope: Literal["user", "global"] = "user"
    category: str | None = None
    metadata: dict[str, JSON] = {}
    roles: list[str] | None = None  # global memories: who may read (default everyone)


class SearchArgs(Args):
    query: str
    scope: Literal["user", "global", "all"] = "all"
    limit: int = 5
    threshold: float | None = None
    category: str | None = None


class IdArgs(Args):
    memory_id: str


class UpdateArgs(Args):
    memory_id: str
    text: str | None = None
    category: str | None = None
    metadata: dict[str, JSON] | None = None


class ListArgs(Args):
    scope: Literal["user", "global", "all"] = "user"
    category: str | None = None
    limit: int = 50
    cursor: str | None = None


class StatsArgs(Args):
    pass


class BulkDeleteArgs(Args):
    scope: Literal["user", "global"] = "user"
    category: str | None = None


class ExportArgs(Args):
    scope: Literal["user", "global", "all"] = "user"


class ImportArgs(Args):
    memories: list[dict[str, JSON]]


class InspectArgs(Args):
    user_id: str
    limit: int = 50
    cursor: str | None = None


class HistoryArgs(Args):
    thread_id: str
    last: int = 20
    before: int | None = None


class RecallArgs(Args):
    query: str
    thread_id: str | None = None  # None: all of the user's threads
    top_k: int = 3
    window: int = 1
    threshold: float | None = None


class WorkingGetArgs(Args):
    thread_id: str | None = None  # None: the user's own document
    version: int | None = None  # None: the current one


class WorkingSetArgs(Args):
    doc: JSON
    expected_version: int
    thread_id: str | None = None
    json_schema: dict[str, JSON] | None = None


class WorkingHistoryArgs(Args):
    thread_id: str | None = None
    after: int = 0
    limit: int = 50


class KnowledgeAddArgs(Args):
    collection: str
    source: str
    content: str
    content_type: Literal["text", "markdown", "html", "json"] = "text"
    metadata: dict[str, JSON] = {}


class KnowledgeSearchArgs(Args):
    collection: str
    query: str
    limit: int = 5
    threshold: float | None = None


class KnowledgeListArgs(Args):
    collection: str | None = None


class KnowledgeDeleteArgs(Args):
    collection: str
    source: str | None = None


def _inspect(s: MemoryStore, p: Principal, a: InspectArgs) -> JSON:
    return {
        "stats": s.stats(p, user_id=a.user_id),
        **s.list_memories(p, limit=a.limit, cursor=a.cursor, user_id=a.user_id),
    }


OPS: dict[str, tuple[type[Args], Any]] = {
    "store": (
        StoreArgs,
        lambda s, p, a: s.store(p, a.text, a.scope, a.category, a.metadata, a.roles),
    ),
    "search": (
        SearchArgs,
        lambda s, p, a: s.search(p, a.query, a.scope, a.limit, a.threshold, a.category),
    ),
    "get": (IdArgs, lambda s, p, a: s.get(p, a.memory_id)),
    "update": (
        UpdateArgs,
        lambda s, p, a: s.update(p, a.memory_id, a.text, a.category, a.metadata),
    ),
    "delete": (IdArgs, lambda s, p, a: s.delete(p, a.memory_id)),
    "list": (ListArgs, lambda s, p, a: s.list_memories(p, a.scope, a.category, a.limit, a.cursor)),
    "stats": (StatsArgs, lambda s, p, a: s.stats(p)),
    "bulk_delete": (BulkDeleteArgs, lambda s, p, a: s.bulk_delete(p, a.scope, a.category)),
    "export": (ExportArgs, lambda s, p, a: s.export(p, a.scope)),
    "import": (ImportArgs, lambda s, p, a: s.import_(p, a.memories)),
    "inspect": (InspectArgs, _inspect),
    "history": (HistoryArgs, lambda s, p, a: s.history(p, a.thread_id, a.last, a.before)),
    "recall": (
        RecallArgs,
        lambda s, p, a: s.recall(p, a.query, a.thread_id, a.top_k, a.window, a.threshold),
    ),
    "working_get": (WorkingGetArgs, lambda s, p, a: s.working_get(p, a.thread_id, a.version)),
    "working_set": (
        WorkingSetArgs,
        lambda s, p, a: s.working_set(p, a.doc, a.expected_version, a.thread_id, a.json_schema),
    ),
    "working_history": (
        WorkingHistoryArgs,
        lambda s, p, a: s.working_history(p, a.thread_id, a.after, a.limit),
    ),
    "knowledge_add": (
        KnowledgeAddArgs,
        lambda s, p, a: s.knowledge_add(
            p, a.collection, a.source, a.content, a.content_type, a.metadata
        ),
    ),
    "knowledge_search": (
        KnowledgeSearchArgs,
        lambda s, p, a: s.knowledge_search(p, a.collection, a.query, a.limit, a.threshold),
    ),
    "knowledge_list": (KnowledgeListArgs, lambda s, p, a: s.knowledge_list(p, a.collection)),
    "knowledge_delete": (
        KnowledgeDeleteArgs,
        lambda s, p, a: s.knowledge_delete(p, a.collection, a.source),
    ),
}


def run_op(store: MemoryStore, principal: Principal, op: str, args: dict[str, Any]) -> JSON:
    """Run ``op`` as ``principal``; a bad argument or a refused access is a
    :class:`MemoryFailure` (``invalid_input`` names the argument's path)."""
    if op not in OPS:
        raise MemoryFailure("invalid_input", f"unknown memory operation {op!r}", "$.op")
    arg_type, fn = OPS[op]
    try:
        parsed = msgspec.convert(args, arg_type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        path = text.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in text else "$"
        raise MemoryFailure(
            "invalid_input", f"{op}: {text}", path.replace("$", "$.args", 1)
        ) from None
    return fn(store, principal, parsed)
