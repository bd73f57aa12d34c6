"""An exact in-memory index in front of Qdrant local mode, for similarity queries.

Why: local mode evaluates every filter in Python, point by point, and then walks the
sorted scores in Python too: measured here, a tenant+user filtered query took 104 ms at
10k points and 2.1 s at 100k (even unfiltered 1.75 s). Because the memory service is the
only writer of its local store (local mode allows no other), a write-through copy of
the vectors and payloads is exact: every write goes to Qdrant first and then here, and
the copy is loaded from Qdrant when a collection is opened. Queries are one matrix-vector
product and NumPy masks per condition.

Only the filter shapes the memory store builds are evaluated here: nested ``must`` /
``should`` / ``must_not`` filters of ``FieldCondition`` with ``MatchValue``, ``MatchAny``
or ``Range``. Anything else raises :class:`Unsupported` and the caller asks Qdrant.
Semantics follow Qdrant's: a list-valued field matches if any element matches; a
missing field matches nothing; ``score_threshold`` keeps scores above it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qdrant_client import models

from loom_core.errors import LoomError


class Unsupported(LoomError):
    """A filter this index does not evaluate: ask Qdrant."""

    code = "invalid_query"


class LocalIndex:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.vectors = np.zeros((1024, dim), dtype=np.float32)
        self.alive = np.zeros(1024, dtype=bool)
        self.ids: list[str] = []
        self.payloads: list[dict[str, Any]] = []
        self.row_of: dict[str, int] = {}
        # per payload key, built on first use and kept current by every write: the values
        # (object array) and their kinds (0 scalar, 1 list, 2 bool), both at capacity
        self.columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.alive[: len(self.ids)].sum())

    # ------------------------------------------------------------------ writes

    def upsert(self, point_id: str, vector: list[float], payload: dict[str, Any]) -> None:
        vec = np.asarray(vector, dtype=np.float32)
        norm = float(np.linalg.norm(vec))
        vec = vec / norm if norm > 0 else vec  # cosine, as the collection is configured
        row = self.row_of.get(point_id)
        if row is None:
            row = len(self.ids)
            if row >= len(self.alive):
                self._grow()
            self.ids.append(point_id)
            self.payloads.append({})
            self.row_of[point_id] = row
        self.vectors[row] = vec
        self.payloads[row] = dict(payload)
        self.alive[row] = True
        self._refresh(row)

    def set_payload(self, point_id: str, payload: dict[str, Any]) -> None:
        row = self.row_of.get(point_id)
        if row is not None and self.alive[row]:
            self.payloads[row] = {**self.payloads[row], **payload}
            self._refresh(row)

    def delete(self, point_id: str) -> None:
        row = self.row_of.get(point_id)
        if row is not None:
            self.alive[row] = False

    def _grow(self) -> None:
        grow = len(self.alive)
        self.vectors = np.concatenate([self.vectors, np.zeros((grow, self.dim), np.float32)])
        self.alive = np.concatenate([self.alive, np.zeros(grow, dtype=bool)])
        for key, (values, kinds) in list(self.columns.items()):
            more = np.empty(grow, dtype=object)
            self.columns[key] = (
                np.concatenate([values, more]),
                np.concatenate([kinds, np.zeros(grow, dtype=np.int8)]),
            )

    def _refresh(self, row: int) -> None:
        for key, (values, kinds) in self.columns.items():
            value = self.payloads[row].get(key)
            values[row] = value
            kinds[row] = _kind(value)

    def matching_ids(self, flt: models.Filter) -> list[str]:
        n = len(self.ids)
        mask = self._filter(flt, n) & self.alive[:n]
        return [self.ids[i] for i in np.flatnonzero(mask)]

    # ------------------------------------------------------------------ queries

    def query(
        self, vector: list[float], flt: models.Filter | None, limit: int, threshold: float | None
    ) -> list[tuple[str, float, dict[str, Any]]]:
        n = len(self.ids)
        if n == 0 or limit <= 0:
            return []
        mask = self.alive[:n].copy()
        if flt is not None:
            mask &= self._filter(flt, n)
        candidates = np.flatnonzero(mask)
        if candidates.size == 0:
            return []
        q = np.asarray(vector, dtype=np.float32)
        norm = float(np.linalg.norm(q))
        q = q / norm if norm > 0 else q
        if candidates.size * 4 > n:  # most rows: score them all in place, no gather copy
            scores = (self.vectors[:n] @ q)[candidates]
        else:
            scores = self.vectors[candidates] @ q
        if threshold is not None:
            keep = scores > threshold
            candidates, scores = candidates[keep], scores[keep]
        k = min(limit, candidates.size)
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k] if k < candidates.size else np.arange(k)
        top = top[np.lexsort((candidates[top], -scores[top]))]  # best first, then by row
        return [
            (self.ids[candidates[i]], float(scores[i]), dict(self.payloads[candidates[i]]))
            for i in top
        ]

    # ------------------------------------------------------------------ filters

    def _filter(self, flt: models.Filter, n: int) -> np.ndarray:
        if flt.min_should is not None:
            raise Unsupported("min_should")
        mask = np.ones(n, dtype=bool)
        for cond in _as_list(flt.must):
            mask &= self._condition(cond, n)
        should = _as_list(flt.should)
        if should:
            any_of = np.zeros(n, dtype=bool)
            for cond in should:
                any_of |= self._condition(cond, n)
            mask &= any_of
        for cond in _as_list(flt.must_not):
            mask &= ~self._condition(cond, n)
        return mask

    def _condition(self, cond: Any, n: int) -> np.ndarray:
        if isinstance(cond, models.Filter):
            return self._filter(cond, n)
        if not isinstance(cond, models.FieldCondition) or "." in cond.key or "[" in cond.key:
            raise Unsupported(type(cond).__name__)
        if cond.match is not None and cond.range is None:
            if isinstance(cond.match, models.MatchValue):
                wanted = [cond.match.value]
            elif isinstance(cond.match, models.MatchAny):
                wanted = list(cond.match.any)
            else:
                raise Unsupported(type(cond.match).__name__)
            return self._equals_any(cond.key, wanted, n)
        if cond.range is not None and cond.match is None and isinstance(cond.range, models.Range):
            return self._in_range(cond.key, cond.range, n)
        raise Unsupported("condition")

    def _column(self, key: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        if key not in self.columns:
            cap = len(self.alive)
            values = np.empty(cap, dtype=object)
            kinds = np.zeros(cap, dtype=np.int8)
            for row in range(n):
                value = self.payloads[row].get(key)
                values[row] = value
                kinds[row] = _kind(value)
            self.columns[key] = (values, kinds)
        values, kinds = self.columns[key]
        return values[:n], kinds[:n]

    def _equals_any(self, key: str, wanted: list[Any], n: int) -> np.ndarray:
        if any(isinstance(w, bool) or not isinstance(w, str | int) for w in wanted):
            raise Unsupported("match on a value other than a keyword or an integer")
        values, kinds = self._column(key, n)
        scalar = kinds == 0
        mask = np.zeros(n, dtype=bool)
        for w in wanted:
            mask |= scalar & (values == w)  # elementwise on the object array
        for i in np.flatnonzero(kinds == 1):
            mask[i] = any(_same(v, w) for v in values[i] for w in wanted)
        return mask

    def _in_range(self, key: str, rng: models.Range, n: int) -> np.ndarray:
        col, _ = self._column(key, n)
        nums = np.array(
            [
                float(v) if isinstance(v, int | float) and not isinstance(v, bool) else np.nan
                for v in col
            ],
            dtype=np.float64,
        )
        mask = ~np.isnan(nums)
        if rng.gte is not None:
            mask &= nums >= rng.gte
        if rng.gt is not None:
            mask &= nums > rng.gt
        if rng.lte is not None:
            mask &= nums <= rng.lte
        if rng.lt is not None:
            mask &= nums < rng.lt
        return mask


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _kind(value: Any) -> int:
    if isinstance(value, bool):
        return 2
    return 1 if isinstance(value, list) else 0


def _same(value: Any, wanted: Any) -> bool:
    return not isinstance(value, bool) and value == wanted
