"""What the memory service knows, and who may see it: memories, thread messages,
working memory and knowledge, every call checked against a :class:`Principal`.

Synchronous (the service calls it off the event loop); every write goes through the one
:class:`VectorStore` writer lock. The principal always comes from the caller's verified
identity (the run's stored ``RunRequested.principal`` or the operator), never from the
arguments: no argument names a user or a tenant except an admin's ``inspect``.

Access rules (docs/decisions.md, "Who acts: the principal, never the arguments"):
- a user memory is visible to its owner (same tenant, same user id) only;
- a global memory to every principal of its tenant holding one of its ``roles``
  (``["*"]``: everyone in the tenant); writing one needs ``admin`` or ``memory_admin``;
- thread messages and working memory belong to the user that wrote them;
- knowledge collections are per tenant: everyone in it reads, ``admin`` /
  ``knowledge_admin`` write;
- ``inspect`` (another user's memories) is for ``admin`` only.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from qdrant_client import models

from loom_core.contracts import Principal
from loom_core.errors import LoomError
from loom_core.schemas import problems
from loom_infra.embedders import Embedder
from loom_infra.vectors import Hit, VectorStore, match, point_id
from loom_infra.workingmemory import Conflict, WorkingMemoryStore

ADMIN_ROLES = frozenset({"admin"})
MEMORY_ADMIN_ROLES = frozenset({"admin", "memory_admin"})
KNOWLEDGE_ADMIN_ROLES = frozenset({"admin", "knowledge_admin"})
EVERYONE = "*"
# vectors of short texts kept for reuse (MemoryStore._embed): 384 Python floats are
# ~12 KB, so 512 of them ~6 MB
CACHED_TEXT_CHARS = 256
CACHED_VECTORS = 512


@dataclass(frozen=True)
class MemoryLimits:
    max_text_chars: int = 16_000  # one memory or message
    max_document_bytes: int = 2_000_000  # one knowledge document
    max_json_depth: int = 32
    max_json_bytes: int = 256_000  # a working-memory document, a memory's metadata
    max_page: int = 200
    max_top_k: int = 50
    max_window: int = 10
    max_import: int = 5_000
    chunk_chars: int = 800
    chunk_overlap: int = 150


class MemoryFailure(LoomError):
    """A typed, expected failure: becomes ``ErrorInfo(code, message, path)``."""

    def __init__(self, code: str, message: str, path: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path
        self.details = details


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _depth(value: Any, limit: int, path: str = "$") -> None:
    # iterative: a hostile 100k-deep document must not blow the Python stack
    stack = [(value, 1, path)]
    while stack:
        item, depth, where = stack.pop()
        if depth > limit:
            raise MemoryFailure(
                "too_deep", f"JSON nested deeper than {limit} levels at {where}: flatten it", where
            )
        if isinstance(item, dict):
            stack.extend((v, depth + 1, f"{where}.{k}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(item))


class MemoryStore:
    def __init__(
        self,
        vectors: VectorStore,
        embedder: Embedder,
        working: WorkingMemoryStore,
        limits: MemoryLimits | None = None,
    ) -> None:
        self.vectors = vectors
        self.embedder = embedder
        self.working = working
        self.limits = limits or MemoryLimits()
        self._vectors: OrderedDict[str, tuple[float, ...]] = OrderedDict()  # see _embed
        self._vectors_lock = threading.Lock()
        suffix = re.sub(r"[^a-z0-9]+", "_", embedder.name.lower()).strip("_")
        self.memories = f"loom_memories_{suffix}"
        self.messages = f"loom_messages_{suffix}"
        self.knowledge = f"loom_knowledge_{suffix}"
        for name in (self.memories, self.messages, self.knowledge):
            vectors.ensure(name, embedder.dim)

    # ------------------------------------------------------------------ checks

    def _text(self, text: str, path: str = "$.text") -> str:
        if not isinstance(text, str) or not text.strip():
            raise MemoryFailure("invalid_input", "give a non-empty text", path)
        if len(text) > self.limits.max_text_chars:
            raise MemoryFailure(
                "too_large",
                f"text of {len(text)} characters exceeds {self.limits.max_text_chars}: "
                "split it or store it as knowledge",
                path,
                limit=self.limits.max_text_chars,
            )
        return text

    def _json(self, value: Any, path: str) -> Any:
        _depth(value, self.limits.max_json_depth, path)
        size = len(json.dumps(value))
        if size > self.limits.max_json_bytes:
            raise MemoryFailure(
                "too_large",
                f"{path} is {size} bytes of JSON, over {self.limits.max_json_bytes}",
                path,
                limit=self.limits.max_json_bytes,
            )
        return value

    def _page(self, limit: int) -> int:
        if limit < 1:
            raise MemoryFailure("invalid_input", "limit must be at least 1", "$.limit")
        return min(limit, self.limits.max_page)

    def _embed(self, text: str) -> list[float]:
        """The text's vector; short texts' vectors are kept (a pure function of the text,
        so the same numbers): every run's start and end message is embedded, and runs
        often repeat one (a scheduled run's input, an empty request, a ``null`` output),
        which cost ~6 ms of CPU each time (issue 10)."""
        if len(text) > CACHED_TEXT_CHARS:
            return self.embedder.embed([text])[0]
        with self._vectors_lock:
            kept = self._vectors.get(text)
            if kept is not None:
                self._vectors.move_to_end(text)
                return list(kept)
        vector = self.embedder.embed([text])[0]
        with self._vectors_lock:
            self._vectors[text] = tuple(vector)
            while len(self._vectors) > CACHED_VECTORS:
                self._vectors.popitem(last=False)
        return vector

    @staticmethod
    def _has(principal: Principal, roles: frozenset[str]) -> bool:
        return bool(roles.intersection(principal.roles))

    def _require(self, principal: Principal, roles: frozenset[str], what: str) -> None:
        if not self._has(principal, roles):
            raise MemoryFailure(
                "forbidden",
                f"{what} needs one of the roles {sorted(roles)}; ask an administrator",
            )

    # ------------------------------------------------------------------ memories

    def _user_filter(self, p: Principal, user_id: str | None = None) -> models.Filter:
        return models.Filter(
            must=match(tenant=p.tenant, scope="user", user_id=user_id or p.user_id)
        )

    def _global_filter(self, p: Principal) -> models.Filter:
        if self._has(p, MEMORY_ADMIN_ROLES):
            return models.Filter(must=match(tenant=p.tenant, scope="global"))
        return models.Filter(
            must=match(tenant=p.tenant, scope="global", roles=[EVERYONE, *p.roles])
        )

    def _scope_filter(self, p: Principal, scope: str) -> tuple[list, list]:
        """``(must, should)`` of what ``p`` may read in ``scope``."""
        if scope == "user":
            return [self._user_filter(p)], []
        if scope == "global":
            return [self._global_filter(p)], []
        if scope == "all":
            return [], [self._user_filter(p), self._global_filter(p)]
        raise MemoryFailure("invalid_input", "scope is user, global or all", "$.scope")

    def store(
        self,
        p: Principal,
        text: str,
        scope: str = "user",
        category: str | None = None,
        metadata: dict[str, Any] | None = None,
        roles: list[str] | None = None,
        memory_id: str | None = None,
    ) -> dict[str, Any]:
        self._text(text)
        self._json(metadata or {}, "$.metadata")
        if scope == "global":
            self._require(p, MEMORY_ADMIN_ROLES, "storing a global memory")
        elif scope != "user":
            raise MemoryFailure("invalid_input", "scope is user or global", "$.scope")
        elif roles:
            raise MemoryFailure("invalid_input", "roles apply to global memories only", "$.roles")
        owner = p.user_id if scope == "user" else ""
        # the id is derived from who stores what: the same memory stored twice (a
        # retried tool call) is one memory
        mid = point_id(
            p.tenant, scope, owner, memory_id or hashlib.sha256(text.encode()).hexdigest()
        )
        now = _now()
        payload = {
            "tenant": p.tenant,
            "scope": scope,
            "user_id": owner,
            "text": text,
            "category": category or "",
            "metadata": metadata or {},
            "roles": (roles or [EVERYONE]) if scope == "global" else [],
            "created_at": now,
            "updated_at": now,
            "created_by": p.user_id,
        }
        self.vectors.upsert(self.memories, [(mid, self._embed(text), payload)])
        return _memory(mid, payload)

    def search(
        self,
        p: Principal,
        query: str,
        scope: str = "all",
        limit: int = 5,
        threshold: float | None = None,
        category: str | None = None,
    ) -> list[dict[str, Any]]:
        self._text(query, "$.query")
        must, should = self._scope_filter(p, scope)
        if category:
            must = [*must, *match(category=category)]
        hits = self.vectors.query(
            self.memories,
            self._embed(query),
            must,
            min(max(limit, 1), self.limits.max_top_k),
            threshold,
            should=should,
        )
        return [_memory(h.id, h.payload, h.score) for h in hits]

    def _owned(self, p: Principal, memory_id: str, write: bool) -> Hit:
        """The memory if ``p`` may read (or write) it; ``not_found`` otherwise, never
        ``forbidden``: another user's memory does not exist for this one."""
        try:
            found = self.vectors.get(self.memories, [memory_id])
        except Exception:  # a malformed id is as unknown as a missing one
            found = []
        hit = found[0] if found else None
        if hit is not None:
            pl = hit.payload
            same_tenant = pl.get("tenant") == p.tenant
            if pl.get("scope") == "user":
                ok = same_tenant and pl.get("user_id") == p.user_id
            else:
                readable = self._has(p, MEMORY_ADMIN_ROLES) or bool(
                    {EVERYONE, *p.roles}.intersection(pl.get("roles", []))
                )
                ok = same_tenant and (self._has(p, MEMORY_ADMIN_ROLES) if write else readable)
                if write and same_tenant and readable and not ok:
                    raise MemoryFailure(
                        "forbidden", "changing a global memory needs the role admin or memory_admin"
                    )
            if ok:
                return hit
        raise MemoryFailure("not_found", f"no memory {memory_id!r} of yours", "$.memory_id")

    def get(self, p: Principal, memory_id: str) -> dict[str, Any]:
        hit = self._owned(p, memory_id, write=False)
        return _memory(hit.id, hit.payload)

    def update(
        self,
        p: Principal,
        memory_id: str,
        text: str | None = None,
        category: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        hit = self._owned(p, memory_id, write=True)
        payload = dict(hit.payload)
        if metadata is not None:
            payload["metadata"] = self._json(metadata, "$.metadata")
        if category is not None:
            payload["category"] = category
        payload["updated_at"] = _now()
        if text is not None:
            payload["text"] = self._text(text)
            self.vectors.upsert(self.memories, [(hit.id, self._embed(text), payload)])
        else:
            self.vectors.set_payload(self.memories, [hit.id], payload)
        return _memory(hit.id, payload)

    def delete(self, p: Principal, memory_id: str) -> dict[str, Any]:
        hit = self._owned(p, memory_id, write=True)
        self.vectors.delete_ids(self.memories, [hit.id])
        return {"deleted": 1, "id": hit.id}

    def list_memories(
        self,
        p: Principal,
        scope: str = "user",
        category: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        user_id: str | None = None,
    ) -> dict[str, Any]:
        must: list[models.Condition]
        should: list[models.Condition]
        if user_id is not None and user_id != p.user_id:
            self._require(p, ADMIN_ROLES, "inspecting another user's memories")
            must, should = [self._user_filter(p, user_id)], []
        else:
            must, should = self._scope_filter(p, scope)
        if category:
            must = [*must, *match(category=category)]
        hits, nxt = self.vectors.scroll(
            self.memories, must, self._page(limit), offset=cursor, should=should
        )
        return {"memories": [_memory(h.id, h.payload) for h in hits], "next_cursor": nxt}

    def stats(self, p: Principal, user_id: str | None = None) -> dict[str, Any]:
        if user_id is not None and user_id != p.user_id:
            self._require(p, ADMIN_ROLES, "inspecting another user's memories")
        who = user_id or p.user_id
        out: dict[str, Any] = {
            "user": self.vectors.count(self.memories, [self._user_filter(p, who)]),
            "global": self.vectors.count(self.memories, [self._global_filter(p)]),
            "categories": {},
        }
        cursor = None
        categories: dict[str, int] = {}
        while True:  # bounded by the user's own memories, a page at a time
            hits, cursor = self.vectors.scroll(
                self.memories, [self._user_filter(p, who)], 256, offset=cursor
            )
            for h in hits:
                c = h.payload.get("category") or ""
                categories[c] = categories.get(c, 0) + 1
            if cursor is None:
                break
        out["categories"] = categories
        out["threads"] = self.vectors.count(self.messages, match(tenant=p.tenant, user_id=who))
        return out

    def bulk_delete(
        self, p: Principal, scope: str = "user", category: str | None = None
    ) -> dict[str, Any]:
        if scope == "global":
            self._require(p, MEMORY_ADMIN_ROLES, "deleting global memories")
            must = match(tenant=p.tenant, scope="global", category=category or None)
        elif scope == "user":
            must = match(
                tenant=p.tenant, scope="user", user_id=p.user_id, category=category or None
            )
        else:
            raise MemoryFailure(
                "invalid_input", "bulk delete takes scope user or global", "$.scope"
            )
        return {"deleted": self.vectors.delete_where(self.memories, must)}

    def export(self, p: Principal, scope: str = "user") -> dict[str, Any]:
        items: list[dict[str, Any]] = []
        cursor = None
        must, should = self._scope_filter(p, scope)
        while True:
            hits, cursor = self.vectors.scroll(
                self.memories, must, 256, offset=cursor, should=should
            )
            items.extend(_exported(h.payload) for h in hits)
            if cursor is None or len(items) >= self.limits.max_import:
                break
        return {"version": 1, "memories": items[: self.limits.max_import]}

    def import_(self, p: Principal, memories: list[dict[str, Any]]) -> dict[str, Any]:
        if not isinstance(memories, list):
            raise MemoryFailure("invalid_input", "memories must be a list", "$.memories")
        if len(memories) > self.limits.max_import:
            raise MemoryFailure(
                "too_large",
                f"{len(memories)} memories in one import, over {self.limits.max_import}: split it",
                "$.memories",
            )
        stored = 0
        for i, item in enumerate(memories):
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise MemoryFailure("invalid_input", "each memory needs a text", f"$.memories[{i}]")
            # owner and tenant are the importer's, whatever the file says
            self.store(
                p,
                item["text"],
                scope=item.get("scope", "user"),
                category=item.get("category") or None,
                metadata=item.get("metadata") or {},
                roles=item.get("roles") if item.get("scope") == "global" else None,
            )
            stored += 1
        return {"imported": stored}

    # ------------------------------------------------------------------ threads

    def append_message(
        self,
        tenant: str,
        user_id: str,
        thread_id: str,
        role: str,
        text: str,
        source_id: str,
        run_id: str = "",
        seq: int | None = None,
    ) -> int:
        """Idempotent by ``source_id``; returns the message's position in its thread:
        ``seq`` (the durable thread's position, which every replica agrees on) or, when
        not given, the next one of this single writer."""
        text = text[: self.limits.max_text_chars]
        pid = point_id("message", tenant, source_id)
        existing = self.vectors.get(self.messages, [pid])
        if existing:
            return int(existing[0].payload["seq"])
        vector = self._embed(text or "(empty)")
        with self.vectors.write_lock:  # seq assignment and write: one step
            if seq is None:
                seq = self._next_seq(tenant, thread_id)
            payload = {
                "tenant": tenant,
                "user_id": user_id,
                "thread_id": thread_id,
                "seq": seq,
                "role": role,
                "text": text,
                "run_id": run_id,
                "at": _now(),
            }
            self.vectors.upsert(self.messages, [(pid, vector, payload)])
        return seq

    def _next_seq(self, tenant: str, thread_id: str) -> int:
        last = self._last(match(tenant=tenant, thread_id=thread_id), None, 1)
        return int(last[0].payload["seq"]) + 1 if last else 0

    def _last(self, must: list, before: int | None, limit: int) -> list[Hit]:
        """The thread's last ``limit`` messages matching ``must`` (before seq
        ``before``), newest first. A thread id may be shared by several users' runs, so
        one user's messages need not have consecutive positions."""
        if before is not None:
            must = [*must, self.vectors.seq_range("seq", None, before - 1)]
        records, _ = self.vectors.client.scroll(
            self.messages,
            scroll_filter=models.Filter(must=must),
            limit=limit,
            order_by=models.OrderBy(key="seq", direction=models.Direction.DESC),
            with_payload=True,
        )
        return [Hit(str(r.id), 1.0, r.payload or {}) for r in records]

    def _thread_must(self, p: Principal, thread_id: str | None) -> list:
        return match(tenant=p.tenant, user_id=p.user_id, thread_id=thread_id)

    def history(
        self, p: Principal, thread_id: str, last: int = 20, before: int | None = None
    ) -> dict[str, Any]:
        """The user's last ``last`` messages of the thread (before position ``before``),
        oldest first."""
        must = self._thread_must(p, thread_id)
        hits = self._last(must, before, self._page(last))
        return {
            "thread_id": thread_id,
            "total": self.vectors.count(self.messages, must),
            "messages": [_message(h) for h in reversed(hits)],
        }

    def recall(
        self,
        p: Principal,
        query: str,
        thread_id: str | None = None,
        top_k: int = 3,
        window: int = 1,
        threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        """Top-k messages like ``query`` in one thread (or all of the user's), each with
        ``window`` messages either side."""
        self._text(query, "$.query")
        top_k = min(max(top_k, 1), self.limits.max_top_k)
        window = min(max(window, 0), self.limits.max_window)
        must = self._thread_must(p, thread_id)
        hits = self.vectors.query(self.messages, self._embed(query), must, top_k, threshold)
        out = []
        for h in hits:
            seq = int(h.payload["seq"])
            around, _ = self.vectors.scroll(
                self.messages,
                [
                    *self._thread_must(p, h.payload["thread_id"]),
                    self.vectors.seq_range("seq", seq - window, seq + window),
                ],
                2 * window + 1,
                order_by="seq",
            )
            out.append({**_message(h), "score": h.score, "window": [_message(a) for a in around]})
        return out

    # ------------------------------------------------------------------ working memory

    def _wm_key(self, p: Principal, thread_id: str | None) -> str:
        if thread_id:
            return f"{p.tenant}\x1fthread\x1f{p.user_id}\x1f{thread_id}"
        return f"{p.tenant}\x1fuser\x1f{p.user_id}"

    def working_get(
        self, p: Principal, thread_id: str | None = None, version: int | None = None
    ) -> dict[str, Any]:
        found = self.working.at(self._wm_key(p, thread_id), version)
        if found is None:
            if version is not None:
                raise MemoryFailure(
                    "not_found", f"no working memory version {version}", "$.version"
                )
            return {"version": 0, "doc": None, "schema": None}
        return {"version": found.version, "doc": found.doc, "schema": found.schema, "at": found.at}

    def working_set(
        self,
        p: Principal,
        doc: Any,
        expected_version: int,
        thread_id: str | None = None,
        schema: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        self._json(doc, "$.doc")
        if schema is not None:
            self._json(schema, "$.schema")
        key = self._wm_key(p, thread_id)
        if isinstance(doc, str) and len(doc) > self.limits.max_text_chars * 4:
            raise MemoryFailure("too_large", "working memory text is too long", "$.doc")
        effective = schema
        if effective is None and expected_version > 0:
            prev = self.working.at(key, expected_version)
            effective = prev.schema if prev else None
        if effective is not None and not isinstance(doc, str):
            bad = problems(effective, doc, "$.doc")
            if bad:
                where, why = bad[0]
                raise MemoryFailure("schema_mismatch", f"{where}: {why}", where)
        try:
            v = self.working.update(key, expected_version, doc, p.user_id, schema)
        except Conflict as c:
            raise MemoryFailure(
                "conflict", str(c), "$.expected_version", current_version=c.current
            ) from None
        return {"version": v.version, "doc": v.doc, "schema": v.schema, "at": v.at}

    def working_history(
        self, p: Principal, thread_id: str | None = None, after: int = 0, limit: int = 50
    ) -> dict[str, Any]:
        rows = self.working.history(self._wm_key(p, thread_id), after, self._page(limit))
        return {
            "versions": [{"version": r.version, "doc": r.doc, "at": r.at, "by": r.by} for r in rows]
        }

    # ------------------------------------------------------------------ knowledge

    def knowledge_add(
        self,
        p: Principal,
        collection: str,
        source: str,
        content: str,
        content_type: str = "text",
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        self._require(p, KNOWLEDGE_ADMIN_ROLES, "adding knowledge")
        _collection_name(collection)
        if not source or len(source) > 1000:
            raise MemoryFailure(
                "invalid_input", "source names the document (1-1000 chars)", "$.source"
            )
        size = len(content.encode())
        if size > self.limits.max_document_bytes:
            raise MemoryFailure(
                "too_large",
                f"document of {size} bytes exceeds {self.limits.max_document_bytes}: split it",
                "$.content",
                limit=self.limits.max_document_bytes,
            )
        self._json(metadata or {}, "$.metadata")
        digest = hashlib.sha256(content.encode()).hexdigest()
        same = match(tenant=p.tenant, collection=collection, source=source)
        if self.vectors.count(self.knowledge, [*same, *match(doc_hash=digest)]):
            n = self.vectors.count(self.knowledge, same)
            return {
                "collection": collection,
                "source": source,
                "chunks": n,
                "doc_hash": digest,
                "unchanged": True,
            }
        text = to_text(content, content_type, self.limits.max_json_depth)
        chunks = chunk(text, self.limits.chunk_chars, self.limits.chunk_overlap)
        vectors: list[list[float]] = []
        for start in range(0, len(chunks), 64):
            vectors.extend(self.embedder.embed(chunks[start : start + 64]))
        now = _now()
        points = [
            (
                point_id("chunk", p.tenant, collection, source, digest, str(i)),
                vec,
                {
                    "tenant": p.tenant,
                    "collection": collection,
                    "source": source,
                    "doc_hash": digest,
                    "chunk_index": i,
                    "chunks": len(chunks),
                    "text": piece,
                    "content_type": content_type,
                    "metadata": metadata or {},
                    "added_at": now,
                    "added_by": p.user_id,
                },
            )
            for i, (piece, vec) in enumerate(zip(chunks, vectors, strict=True))
        ]
        # the old version of this source goes once the new one is stored
        self.vectors.upsert(self.knowledge, points)
        self._drop_other_versions(same, digest)
        return {
            "collection": collection,
            "source": source,
            "chunks": len(points),
            "doc_hash": digest,
            "unchanged": False,
        }

    def _drop_other_versions(self, same: list, digest: str) -> None:
        self.vectors.delete_filter(
            self.knowledge,
            models.Filter(
                must=same,
                must_not=[
                    models.FieldCondition(key="doc_hash", match=models.MatchValue(value=digest))
                ],
            ),
        )

    def _known_collection(self, p: Principal, collection: str) -> None:
        _collection_name(collection)
        if not self.vectors.count(self.knowledge, match(tenant=p.tenant, collection=collection)):
            raise MemoryFailure(
                "unknown_collection",
                f"no knowledge collection {collection!r}: add a document to it first "
                "(loom knowledge add) or list them (loom knowledge list)",
                "$.collection",
            )

    def knowledge_search(
        self,
        p: Principal,
        collection: str,
        query: str,
        limit: int = 5,
        threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        self._text(query, "$.query")
        self._known_collection(p, collection)
        hits = self.vectors.query(
            self.knowledge,
            self._embed(query),
            match(tenant=p.tenant, collection=collection),
            min(max(limit, 1), self.limits.max_top_k),
            threshold,
        )
        return [
            {
                "text": h.payload["text"],
                "score": h.score,
                "source": h.payload["source"],
                "chunk_index": h.payload["chunk_index"],
                "metadata": h.payload.get("metadata", {}),
            }
            for h in hits
        ]

    def knowledge_list(self, p: Principal, collection: str | None = None) -> dict[str, Any]:
        """Collections (with chunk counts), or one collection's sources."""
        if collection is not None:
            self._known_collection(p, collection)
        must = match(tenant=p.tenant, collection=collection)
        groups: dict[str, int] = {}
        cursor = None
        key = "source" if collection else "collection"
        while True:
            hits, cursor = self.vectors.scroll(self.knowledge, must, 512, offset=cursor)
            for h in hits:
                groups[h.payload[key]] = groups.get(h.payload[key], 0) + 1
            if cursor is None:
                break
        if collection:
            return {"collection": collection, "sources": groups}
        return {"collections": groups}

    def knowledge_delete(
        self, p: Principal, collection: str, source: str | None = None
    ) -> dict[str, Any]:
        self._require(p, KNOWLEDGE_ADMIN_ROLES, "deleting knowledge")
        self._known_collection(p, collection)
        n = self.vectors.delete_where(
            self.knowledge, match(tenant=p.tenant, collection=collection, source=source)
        )
        return {"deleted_chunks": n}


# --------------------------------------------------------------------------- helpers

_COLLECTION = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _collection_name(name: str) -> None:
    if not isinstance(name, str) or not _COLLECTION.match(name):
        raise MemoryFailure(
            "invalid_input",
            "a collection name is 1-64 lowercase letters, digits, '_' or '-'",
            "$.collection",
        )


def _memory(mid: str, payload: dict[str, Any], score: float | None = None) -> dict[str, Any]:
    out = {
        "id": mid,
        "text": payload.get("text", ""),
        "scope": payload.get("scope", "user"),
        "category": payload.get("category", ""),
        "metadata": payload.get("metadata", {}),
        "created_at": payload.get("created_at", ""),
        "updated_at": payload.get("updated_at", ""),
    }
    if payload.get("scope") == "global":
        out["roles"] = payload.get("roles", [])
    if score is not None:
        out["score"] = score
    return out


def _exported(payload: dict[str, Any]) -> dict[str, Any]:
    out = {k: payload.get(k) for k in ("text", "scope", "category", "metadata", "created_at")}
    if payload.get("scope") == "global":
        out["roles"] = payload.get("roles", [])
    return out


def _message(h: Hit) -> dict[str, Any]:
    pl = h.payload
    return {
        "thread_id": pl["thread_id"],
        "seq": pl["seq"],
        "role": pl["role"],
        "text": pl["text"],
        "at": pl.get("at", ""),
        "run_id": pl.get("run_id", ""),
    }


class _HTMLText(html.parser.HTMLParser):
    SKIP = frozenset({"script", "style", "head", "noscript"})
    BLOCK = frozenset({"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag) -> None:
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1

    def handle_data(self, data) -> None:
        if not self.skipping:
            self.parts.append(data)


def to_text(content: str, content_type: str, max_depth: int = 32) -> str:
    """Plain text of a document: HTML without tags/scripts, JSON as ``path: value`` lines,
    markdown and text as they are (headings and paragraphs guide the chunker)."""
    if content_type in ("text", "markdown"):
        return content
    if content_type == "html":
        parser = _HTMLText()
        parser.feed(content)
        parser.close()
        return re.sub(r"\n{3,}", "\n\n", "".join(parser.parts)).strip()
    if content_type == "json":
        try:
            value = json.loads(content)
        except (ValueError, RecursionError) as exc:
            raise MemoryFailure(
                "invalid_input", f"content is not JSON: {exc}", "$.content"
            ) from None
        _depth(value, max_depth, "$.content")
        lines: list[str] = []
        stack: list[tuple[str, Any]] = [("$", value)]
        while stack:
            path, item = stack.pop()
            if isinstance(item, dict):
                stack.extend((f"{path}.{k}", v) for k, v in reversed(list(item.items())))
            elif isinstance(item, list):
                stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
            else:
                lines.append(f"{path}: {item}")
        return "\n".join(lines)
    raise MemoryFailure(
        "invalid_input", "content_type is text, markdown, html or json", "$.content_type"
    )


def chunk(text: str, size: int, overlap: int) -> list[str]:
    """Pieces of about ``size`` characters, each starting ``overlap`` characters before the
    previous one ended, cut at a paragraph, line, sentence or word boundary when one is
    near (never mid-word unless a word is longer than a chunk)."""
    text = text.strip()
    if not text:
        return []
    out: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            window = text[start:end]
            for sep in ("\n\n", "\n", ". ", " "):
                cut = window.rfind(sep)
                if cut > size // 2:
                    end = start + cut + len(sep)
                    break
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        if end >= len(text):
            break
        nxt = max(end - overlap, start + 1)
        # start the overlap at a word boundary
        space = text.find(" ", nxt, end)
        start = space + 1 if space != -1 else nxt
    return out
