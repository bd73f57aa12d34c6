"""Vectors on Qdrant (qdrant-client 1.20): embedded local mode or a server, one API.

``LOOM_QDRANT`` picks the backend: a path (local mode, the default
``<LOOM_DATA_DIR>/qdrant``) or an ``http(s)://`` URL (a Qdrant server; Kubernetes).

Why one writer: local mode allows one client per folder and loses points under concurrent
writes (8 threads x 200 upserts kept 415 of 1,600), so every write goes through one lock
in the one process that owns the store (the memory service). Reads need no lock on a
server; in local mode they share the same client, which serialises internally.

In local mode similarity queries are answered by an exact write-through copy
(``loom_infra.vectorindex``): local mode's own query filters point by point in Python
(2.1 s at 100k points). Every write below goes to Qdrant first, then to the copy.

Every collection gets payload indexes on the fields every query filters by, with
``tenant`` as Qdrant's tenant-indexed field (``is_tenant``: the server co-locates a
tenant's points). Local mode ignores payload indexes (it filters in Python).
"""

from __future__ import annotations

import threading
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdrant_client import QdrantClient, models

from loom_infra.vectorindex import LocalIndex, Unsupported

# fields filtered on by every query; "tenant" is the tenant-indexed one
INDEXED_KEYWORDS = ("user_id", "scope", "thread_id", "category", "collection", "source", "doc_hash")
INDEXED_INTEGERS = ("seq",)
ID_NAMESPACE = uuid.UUID("7b1f2a4e-6f0b-4c1a-9a55-6c6f6f6d6d65")


def point_id(*parts: str) -> str:
    """A stable point id from a natural key: re-writing the same key replaces the point."""
    return str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(parts)))


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any]


def match(**fields: Any) -> list[models.Condition]:
    """Equality conditions; a list or tuple value matches any of its items."""
    out: list[models.Condition] = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            out.append(models.FieldCondition(key=key, match=models.MatchAny(any=list(value))))
        else:
            out.append(models.FieldCondition(key=key, match=models.MatchValue(value=value)))
    return out


class VectorStore:
    def __init__(self, location: str | Path) -> None:
        text = str(location)
        self.local = not text.startswith(("http://", "https://"))
        if self.local:
            Path(text).mkdir(parents=True, exist_ok=True)
            self.client = QdrantClient(path=text)
        else:
            self.client = QdrantClient(url=text, timeout=30)
        self.location = text
        # re-entrant: a caller may hold it across a read and the write that depends on it
        self.write_lock = threading.RLock()
        self.known: set[str] = set()
        self.indexes: dict[str, LocalIndex] = {}

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ collections

    def ensure(self, collection: str, dim: int) -> None:
        if collection in self.known:
            return
        with self.write_lock:
            if not self.client.collection_exists(collection):
                self.client.create_collection(
                    collection,
                    vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                )
                self._index(collection)
            if self.local:
                self.indexes[collection] = self._load(collection, dim)
            self.known.add(collection)

    def _load(self, collection: str, dim: int) -> LocalIndex:
        index = LocalIndex(dim)
        offset = None
        while True:
            records, offset = self.client.scroll(
                collection, limit=1024, offset=offset, with_payload=True, with_vectors=True
            )
            for r in records:
                index.upsert(str(r.id), list(r.vector), r.payload or {})  # type: ignore[arg-type]  # qdrant types vectors loosely; ours are one dense list
            if offset is None:
                return index

    def _index(self, collection: str) -> None:
        with warnings.catch_warnings():
            # local mode warns that payload indexes have no effect there: same code path
            warnings.simplefilter("ignore", UserWarning)
            self.client.create_payload_index(
                collection,
                "tenant",
                field_schema=models.KeywordIndexParams(
                    type=models.KeywordIndexType.KEYWORD, is_tenant=True
                ),
            )
            for name in INDEXED_KEYWORDS:
                self.client.create_payload_index(
                    collection, name, field_schema=models.PayloadSchemaType.KEYWORD
                )
            for name in INDEXED_INTEGERS:
                self.client.create_payload_index(
                    collection,
                    name,
                    field_schema=models.IntegerIndexParams(
                        type=models.IntegerIndexType.INTEGER, lookup=True, range=True
                    ),
                )

    # ------------------------------------------------------------------ writes

    def upsert(
        self, collection: str, points: Sequence[tuple[str, list[float], dict[str, Any]]]
    ) -> None:
        if not points:
            return
        structs = [models.PointStruct(id=i, vector=v, payload=p) for i, v, p in points]
        with self.write_lock:
            self.client.upsert(collection, points=structs, wait=True)
            index = self.indexes.get(collection)
            if index is not None:
                for i, v, p in points:
                    index.upsert(i, v, p)

    def set_payload(self, collection: str, ids: list[str], payload: dict[str, Any]) -> None:
        with self.write_lock:
            points: list[models.ExtendedPointId] = list(ids)
            self.client.set_payload(collection, payload=payload, points=points, wait=True)
            index = self.indexes.get(collection)
            if index is not None:
                for i in ids:
                    index.set_payload(i, payload)

    def delete_ids(self, collection: str, ids: Iterable[str]) -> None:
        ids = list(ids)
        points: list[models.ExtendedPointId] = list(ids)
        if points:
            with self.write_lock:
                self.client.delete(
                    collection, points_selector=models.PointIdsList(points=points), wait=True
                )
                index = self.indexes.get(collection)
                if index is not None:
                    for i in ids:
                        index.delete(i)

    def delete_where(self, collection: str, must: list[models.Condition]) -> int:
        return self.delete_filter(collection, models.Filter(must=must))

    def delete_filter(self, collection: str, flt: models.Filter) -> int:
        """Delete what ``flt`` matches; the number deleted. The ids are found first and
        deleted by id, so Qdrant and the local copy lose exactly the same points."""
        with self.write_lock:
            ids: list[str] = []
            offset = None
            while True:
                records, offset = self.client.scroll(
                    collection, scroll_filter=flt, limit=1024, offset=offset, with_payload=False
                )
                ids.extend(str(r.id) for r in records)
                if offset is None:
                    break
            self.delete_ids(collection, ids)
            return len(ids)

    # ------------------------------------------------------------------ reads

    def query(
        self,
        collection: str,
        vector: list[float],
        must: list[models.Condition],
        limit: int,
        threshold: float | None = None,
        should: list[models.Condition] | None = None,
    ) -> list[Hit]:
        flt = models.Filter(must=must, should=should or None)
        index = self.indexes.get(collection)
        if index is not None:
            try:
                with self.write_lock:
                    found = index.query(vector, flt, limit, threshold)
                return [Hit(i, score, payload) for i, score, payload in found]
            except Unsupported:
                pass  # Qdrant answers what the copy does not evaluate
        reply = self.client.query_points(
            collection,
            query=vector,
            query_filter=flt,
            limit=limit,
            score_threshold=threshold,
            with_payload=True,
        )
        return [Hit(str(p.id), float(p.score), p.payload or {}) for p in reply.points]

    def get(self, collection: str, ids: list[str]) -> list[Hit]:
        found = self.client.retrieve(collection, ids=ids, with_payload=True)
        return [Hit(str(p.id), 1.0, p.payload or {}) for p in found]

    def scroll(
        self,
        collection: str,
        must: list[models.Condition],
        limit: int,
        offset: str | None = None,
        order_by: str | None = None,
        should: list[models.Condition] | None = None,
    ) -> tuple[list[Hit], str | None]:
        """A page and the next page's cursor (None: the last page). With ``order_by``
        (an integer field) use a range condition to page instead of the cursor."""
        records, nxt = self.client.scroll(
            collection,
            scroll_filter=models.Filter(must=must, should=should or None),
            limit=limit,
            offset=None if order_by else offset,
            order_by=order_by,
            with_payload=True,
        )
        hits = [Hit(str(r.id), 1.0, r.payload or {}) for r in records]
        return hits, (None if order_by or nxt is None else str(nxt))

    def count(self, collection: str, must: list[models.Condition], should=None) -> int:
        flt = models.Filter(must=must, should=should or None)
        return self.client.count(collection, count_filter=flt, exact=True).count

    def seq_range(self, key: str, low: int | None = None, high: int | None = None):
        return models.FieldCondition(key=key, range=models.Range(gte=low, lte=high))
