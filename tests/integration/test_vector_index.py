"""The local-mode copy (loom_infra.vectorindex) answers exactly what Qdrant local mode
answers, for random points and the filter shapes the memory store builds, after
upserts, payload updates, deletes and a reopen."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qdrant_client import models

from loom_infra.vectors import VectorStore, match, point_id

DIM = 16
TENANTS = ["t1", "t2"]
USERS = ["u1", "u2", "u3", ""]
ROLES = ["*", "staff", "sales", "admin"]


def payload(rng: random.Random, n: int) -> dict:
    scope = rng.choice(["user", "global"])
    out = {
        "tenant": rng.choice(TENANTS),
        "scope": scope,
        "user_id": rng.choice(USERS) if scope == "user" else "",
        "category": rng.choice(["", "a", "b"]),
        "roles": rng.sample(ROLES, rng.randint(1, 2)) if scope == "global" else [],
        "seq": n,
    }
    if rng.random() < 0.1:
        del out["category"]  # a missing field matches nothing
    return out


def random_filter(rng: random.Random) -> models.Filter:
    user = models.Filter(must=match(tenant=rng.choice(TENANTS), scope="user",
                                    user_id=rng.choice(USERS)))  # fmt: skip
    glob = models.Filter(must=match(tenant=rng.choice(TENANTS), scope="global",
                                    roles=rng.sample(ROLES, rng.randint(1, 3))))  # fmt: skip
    shape = rng.randrange(5)
    if shape == 0:
        return models.Filter(must=[user])
    if shape == 1:
        return models.Filter(should=[user, glob])
    if shape == 2:
        return models.Filter(must=[glob, *match(category=rng.choice(["a", "b"]))])
    if shape == 3:
        lo = rng.randrange(40)
        return models.Filter(
            must=[*match(tenant=rng.choice(TENANTS)),
                  models.FieldCondition(key="seq", range=models.Range(gte=lo, lte=lo + 10))],
            must_not=match(category="a"),
        )  # fmt: skip
    return models.Filter(must=match(tenant=rng.choice(TENANTS), category=["a", "b"]))


def qdrant_answer(store: VectorStore, name: str, vec, flt, limit, threshold):
    reply = store.client.query_points(name, query=vec, query_filter=flt, limit=limit,
                                      score_threshold=threshold, with_payload=True)  # fmt: skip
    return [(str(p.id), p.score) for p in reply.points]


def index_answer(store: VectorStore, name: str, vec, flt, limit, threshold):
    found = store.indexes[name].query(vec, flt, limit, threshold)
    return [(i, score) for i, score, _ in found]


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 10_000))
def test_the_copy_answers_like_qdrant(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    folder = tmp_path / uuid.uuid4().hex  # hypothesis replays a seed: a fresh folder each time
    store = VectorStore(folder)
    name = "c"
    store.ensure(name, DIM)
    ids = [point_id(str(seed), str(i)) for i in range(60)]
    store.upsert(name, [(i, nrng.standard_normal(DIM).tolist(), payload(rng, n))
                        for n, i in enumerate(ids)])  # fmt: skip
    store.set_payload(name, ids[:5], {"category": "b"})
    store.delete_ids(name, ids[5:10])
    store.delete_where(name, match(tenant="t2", category="a"))
    store.upsert(name, [(ids[0], nrng.standard_normal(DIM).tolist(), payload(rng, 0))])

    def compare(s: VectorStore) -> None:
        for _ in range(12):
            vec = nrng.standard_normal(DIM).tolist()
            flt = random_filter(rng)
            limit = rng.choice([1, 5, 100])
            threshold = rng.choice([None, 0.0, 0.3])
            ours = index_answer(s, name, vec, flt, limit, threshold)
            theirs = qdrant_answer(s, name, vec, flt, limit, threshold)
            assert [i for i, _ in ours] == [i for i, _ in theirs], flt
            # float32 here, float64 there: the same scores to ~1e-6
            assert np.allclose([x for _, x in ours], [x for _, x in theirs], atol=1e-4)

    try:
        compare(store)
    finally:
        store.close()
    reopened = VectorStore(folder)  # the copy is rebuilt from what Qdrant stored
    try:
        reopened.ensure(name, DIM)
        compare(reopened)
    finally:
        reopened.close()
