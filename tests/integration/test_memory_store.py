"""The memory store on a real Qdrant (local mode) and a real SQLite working-memory log:
memories with access control (a test per operation), threads, working memory, knowledge,
hostile input. Embeddings are the deterministic hash embedder here (speed); the real
default model has its own test below."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loom_core.contracts import Principal
from loom_infra.embedders import HashEmbedder, MiniLMEmbedder
from loom_infra.vectors import VectorStore
from loom_infra.workingmemory import WorkingMemoryStore
from loom_services.memorystore import MemoryFailure, MemoryStore, chunk

ALICE = Principal(user_id="alice", via="client", roles=["staff"], tenant="acme")
BOB = Principal(user_id="bob", via="client", roles=["sales"], tenant="acme")
ADMIN = Principal(user_id="root", via="operator", roles=["admin"], tenant="acme")
EVE = Principal(user_id="alice", via="client", roles=["staff"], tenant="other")  # same id


@pytest.fixture
def store(tmp_path: Path):
    vectors = VectorStore(tmp_path / "qdrant")
    working = WorkingMemoryStore(tmp_path / "working.db")
    s = MemoryStore(vectors, HashEmbedder(64), working)
    yield s
    working.close()
    vectors.close()


def texts(items) -> set[str]:
    return {m["text"] for m in items}


def test_user_memories_are_private_per_operation(store: MemoryStore) -> None:
    a = store.store(ALICE, "alice likes green tea", category="prefs")
    store.store(BOB, "bob likes black coffee", category="prefs")
    store.store(EVE, "eve in another tenant likes green tea")
    # search
    assert texts(store.search(ALICE, "green tea", limit=10)) == {"alice likes green tea"}
    assert "alice likes green tea" not in texts(store.search(BOB, "green tea", limit=10))
    assert texts(store.search(EVE, "green tea", limit=10)) == {
        "eve in another tenant likes green tea"
    }
    # get / update / delete of another user's memory: it does not exist for them
    for op in (
        lambda p: store.get(p, a["id"]),
        lambda p: store.update(p, a["id"], text="hijacked"),
        lambda p: store.delete(p, a["id"]),
    ):
        for other in (BOB, EVE):
            with pytest.raises(MemoryFailure) as err:
                op(other)
            assert err.value.code == "not_found"
    assert store.get(ALICE, a["id"])["text"] == "alice likes green tea"
    # list / stats / export
    assert texts(store.list_memories(BOB)["memories"]) == {"bob likes black coffee"}
    assert store.stats(BOB)["user"] == 1
    assert texts(store.export(BOB)["memories"]) == {"bob likes black coffee"}
    # bulk delete removes only one's own
    assert store.bulk_delete(BOB)["deleted"] == 1
    assert store.get(ALICE, a["id"])
    # import lands in the importer's scope whatever the file says
    store.import_(BOB, [{"text": "imported", "user_id": "alice", "tenant": "acme"}])
    assert "imported" not in texts(store.list_memories(ALICE)["memories"])
    assert texts(store.list_memories(BOB)["memories"]) == {"imported"}
    # inspect: admin only
    with pytest.raises(MemoryFailure) as err:
        store.list_memories(BOB, user_id="alice")
    assert err.value.code == "forbidden"
    with pytest.raises(MemoryFailure):
        store.stats(BOB, user_id="alice")
    listed = store.list_memories(ADMIN, user_id="alice")["memories"]
    assert texts(listed) == {"alice likes green tea"}


def test_global_memories_follow_roles(store: MemoryStore) -> None:
    with pytest.raises(MemoryFailure) as err:
        store.store(ALICE, "a rule", scope="global")
    assert err.value.code == "forbidden"
    staff = store.store(ADMIN, "staff handbook: tea at four", scope="global", roles=["staff"])
    store.store(ADMIN, "company motto: tea for all", scope="global")  # everyone
    assert texts(store.search(ALICE, "tea", scope="global", limit=10)) == {
        "staff handbook: tea at four",
        "company motto: tea for all",
    }
    assert texts(store.search(BOB, "tea", scope="global", limit=10)) == {
        "company motto: tea for all"
    }
    assert texts(store.search(EVE, "tea", scope="all", limit=10)) == set()
    listed = store.list_memories(BOB, scope="global")["memories"]
    assert texts(listed) == {"company motto: tea for all"}
    assert store.stats(BOB)["global"] == 1 and store.stats(ALICE)["global"] == 2
    with pytest.raises(MemoryFailure) as err:
        store.get(BOB, staff["id"])
    assert err.value.code == "not_found"
    with pytest.raises(MemoryFailure) as err:  # readable, not writable
        store.update(ALICE, staff["id"], text="changed")
    assert err.value.code == "forbidden"
    with pytest.raises(MemoryFailure):
        store.delete(ALICE, staff["id"])
    with pytest.raises(MemoryFailure):
        store.bulk_delete(ALICE, scope="global")
    assert store.bulk_delete(ADMIN, scope="global")["deleted"] == 2


def test_search_threshold_category_scope_and_paging(store: MemoryStore) -> None:
    for i in range(30):
        store.store(ALICE, f"note {i} about tea", category="tea" if i % 2 else "misc")
    assert len(store.search(ALICE, "tea", limit=5)) == 5
    assert {m["category"] for m in store.search(ALICE, "tea", limit=20, category="tea")} == {"tea"}
    assert store.search(ALICE, "tea", threshold=0.999) == []
    seen, cursor = [], None
    while True:
        page = store.list_memories(ALICE, limit=7, cursor=cursor)
        seen += page["memories"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 30 == len({m["id"] for m in seen})
    assert store.stats(ALICE)["categories"] == {"tea": 15, "misc": 15}
    # storing the same memory again (a retried tool call) keeps one
    store.store(ALICE, "note 1 about tea", category="tea")
    assert store.stats(ALICE)["user"] == 30
    updated = store.update(ALICE, seen[0]["id"], text="now about coffee", category="coffee")
    assert store.get(ALICE, updated["id"])["text"] == "now about coffee"


def test_export_import_round_trip(store: MemoryStore) -> None:
    store.store(ALICE, "one", category="a", metadata={"k": 1})
    store.store(ALICE, "two")
    dumped = json.loads(json.dumps(store.export(ALICE)))
    store.bulk_delete(ALICE)
    assert store.import_(ALICE, dumped["memories"])["imported"] == 2
    assert texts(store.list_memories(ALICE)["memories"]) == {"one", "two"}


def test_threads_history_and_recall_with_windows(store: MemoryStore) -> None:
    lines = [
        "hello there",
        "my dog is called Rex",
        "nice name",
        "what is the weather",
        "sunny today",
        "thanks",
    ]
    for i, line in enumerate(lines):
        seq = store.append_message("acme", "alice", "t1", "user", line, source_id=f"e{i}")
        assert seq == i
    assert store.append_message("acme", "alice", "t1", "user", "dup", source_id="e1") == 1
    store.append_message("acme", "alice", "t2", "user", "my cat is called Tom", source_id="x1")
    store.append_message("acme", "bob", "t9", "user", "my dog is called Bo", source_id="b1")
    hist = store.history(ALICE, "t1", last=3)
    assert hist["total"] == 6 and [m["text"] for m in hist["messages"]] == lines[3:]
    assert [m["seq"] for m in store.history(ALICE, "t1", last=2, before=3)["messages"]] == [1, 2]
    hits = store.recall(ALICE, "dog called Rex", thread_id="t1", top_k=1, window=1)
    assert hits[0]["text"] == "my dog is called Rex"
    assert [m["text"] for m in hits[0]["window"]] == lines[0:3]
    across = store.recall(ALICE, "called", top_k=5, window=0)
    assert {h["thread_id"] for h in across} == {"t1", "t2"}  # never bob's thread
    assert store.history(BOB, "t1")["messages"] == []


def test_working_memory_cas_history_and_schema(store: MemoryStore) -> None:
    assert store.working_get(ALICE)["version"] == 0
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    v1 = store.working_set(ALICE, {"name": "Alice"}, expected_version=0, schema=schema)
    assert v1["version"] == 1
    with pytest.raises(MemoryFailure) as err:
        store.working_set(ALICE, {"name": "Al"}, expected_version=0)
    assert err.value.code == "conflict" and err.value.details["current_version"] == 1
    with pytest.raises(MemoryFailure) as err:
        store.working_set(ALICE, {"name": 5}, expected_version=1)  # schema carries over
    assert err.value.code == "schema_mismatch"
    with pytest.raises(MemoryFailure) as err:
        store.working_set(ALICE, {"name": "x"}, expected_version=7)  # ahead: refused too
    assert err.value.code == "conflict"
    store.working_set(ALICE, {"name": "Alice B."}, expected_version=1)
    assert store.working_get(ALICE)["doc"] == {"name": "Alice B."}
    assert store.working_get(ALICE, version=1)["doc"] == {"name": "Alice"}  # time travel
    assert [v["version"] for v in store.working_history(ALICE)["versions"]] == [1, 2]
    assert store.working_get(BOB)["version"] == 0  # per user
    store.working_set(ALICE, "free text notes", expected_version=0, thread_id="t1")
    assert store.working_get(ALICE, thread_id="t1")["doc"] == "free text notes"
    assert store.working_get(BOB, thread_id="t1")["version"] == 0


def test_knowledge_ingest_search_idempotent(store: MemoryStore) -> None:
    doc = "\n\n".join(f"Paragraph {i}. " + "tea ceremony details " * 20 for i in range(10))
    first = store.knowledge_add(ADMIN, "handbook", "tea.md", doc, "markdown")
    assert first["chunks"] > 3 and not first["unchanged"]
    again = store.knowledge_add(ADMIN, "handbook", "tea.md", doc, "markdown")
    assert again["unchanged"] and again["chunks"] == first["chunks"]
    html = (
        "<html><head><script>evil()</script></head>"
        "<body><h1>Coffee</h1><p>Beans roast.</p></body></html>"
    )
    store.knowledge_add(ADMIN, "handbook", "coffee.html", html, "html")
    office = json.dumps({"office": {"city": "Oslo"}})
    store.knowledge_add(ADMIN, "handbook", "cfg.json", office, "json")
    hits = store.knowledge_search(ALICE, "handbook", "office city Oslo", limit=1)
    assert hits[0]["source"] == "cfg.json" and "Oslo" in hits[0]["text"] and hits[0]["score"] > 0
    coffee = store.knowledge_search(ALICE, "handbook", "coffee beans roast", limit=1)[0]
    assert "evil" not in coffee["text"] and coffee["source"] == "coffee.html"
    # a changed document replaces its old chunks
    store.knowledge_add(ADMIN, "handbook", "tea.md", "short tea text", "text")
    assert store.knowledge_list(ALICE, "handbook")["sources"]["tea.md"] == 1
    assert store.knowledge_list(ALICE)["collections"] == {"handbook": 3}
    # other tenants do not see it; readers cannot write
    with pytest.raises(MemoryFailure) as err:
        store.knowledge_search(EVE, "handbook", "tea")
    assert err.value.code == "unknown_collection"
    with pytest.raises(MemoryFailure) as err:
        store.knowledge_add(ALICE, "handbook", "x", "y")
    assert err.value.code == "forbidden"
    assert store.knowledge_delete(ADMIN, "handbook", "tea.md")["deleted_chunks"] == 1
    with pytest.raises(MemoryFailure) as err:
        store.knowledge_search(ALICE, "nope", "tea")
    assert err.value.code == "unknown_collection"


def test_hostile_input_gets_typed_errors(store: MemoryStore) -> None:
    deep: object = "x"
    for _ in range(10_000):
        deep = [deep]
    cases = [
        (lambda: store.store(ALICE, "x" * 100_000), "too_large"),
        (lambda: store.store(ALICE, "   "), "invalid_input"),
        (lambda: store.store(ALICE, "ok", metadata={"d": deep}), "too_deep"),
        (lambda: store.working_set(ALICE, deep, expected_version=0), "too_deep"),
        (lambda: store.working_set(ALICE, {"x": "y" * 300_000}, expected_version=0), "too_large"),
        (lambda: store.knowledge_add(ADMIN, "c", "s", "x" * 3_000_000), "too_large"),
        (lambda: store.knowledge_add(ADMIN, "c", "s", "[" * 5000, "json"), "invalid_input"),
        (lambda: store.knowledge_add(ADMIN, "Bad Name!", "s", "x"), "invalid_input"),
        (lambda: store.knowledge_add(ADMIN, "c", "s", "x", "pdf"), "invalid_input"),
        (lambda: store.get(ALICE, "not-a-uuid"), "not_found"),
        (lambda: store.search(ALICE, "q", scope="everyone"), "invalid_input"),
        (lambda: store.list_memories(ALICE, limit=0), "invalid_input"),
    ]
    for call, code in cases:
        with pytest.raises(MemoryFailure) as err:
            call()
        assert err.value.code == code, (code, err.value.message)
    store.store(ALICE, "still healthy")
    assert store.stats(ALICE)["user"] == 1


def test_chunks_overlap_and_cover_the_text() -> None:
    text = " ".join(f"word{i}" for i in range(2000))
    pieces = chunk(text, 800, 150)
    assert all(len(p) <= 800 for p in pieces)
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert a[-60:].split()[-1] in b  # consecutive chunks overlap
    assert {w for p in pieces for w in p.split()} == set(text.split())


def test_default_model_recalls_by_meaning(tmp_path: Path) -> None:
    """The real default embedder (all-MiniLM-L6-v2 from the model wheel, NumPy)."""
    model = MiniLMEmbedder()
    a, b, c = model.embed(["The new movie is awesome", "The new movie is so great", "I sell cars"])
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    assert abs(dot - 0.8939) < 0.002  # sentence-transformers' published figure for this pair
    assert dot > sum(x * y for x, y in zip(a, c, strict=True))
    vectors = VectorStore(tmp_path / "q")
    working = WorkingMemoryStore(tmp_path / "w.db")
    store = MemoryStore(vectors, model, working)
    try:
        store.store(ALICE, "My daughter's birthday is on the 3rd of May")
        store.store(ALICE, "I am allergic to peanuts")
        store.store(ALICE, "My car is a blue Volvo")
        top = store.search(ALICE, "what food should I avoid?", limit=1)[0]
        assert top["text"] == "I am allergic to peanuts"
        top = store.search(ALICE, "which vehicle do I drive", limit=1)[0]
        assert top["text"] == "My car is a blue Volvo"
    finally:
        working.close()
        vectors.close()


def test_a_thread_shared_by_two_users_keeps_durable_positions(store: MemoryStore) -> None:
    for seq in range(6):
        who = "alice" if seq % 2 == 0 else "bob"
        store.append_message("acme", who, "shared", "user", f"{who} line {seq}", f"s{seq}", seq=seq)
    assert [m["seq"] for m in store.history(ALICE, "shared", last=2)["messages"]] == [2, 4]
    assert [m["seq"] for m in store.history(ALICE, "shared", before=4)["messages"]] == [0, 2]
    assert [m["seq"] for m in store.history(BOB, "shared")["messages"]] == [1, 3, 5]
    (hit,) = store.recall(ALICE, "alice line 2", thread_id="shared", top_k=1, window=2)
    assert hit["seq"] == 2 and [m["seq"] for m in hit["window"]] == [0, 2, 4]
    # without a durable position the one writer continues after the last one
    assert store.append_message("acme", "alice", "shared", "user", "next", "s6") == 6


def test_thread_store_positions(store_settings) -> None:
    from datetime import UTC, datetime

    from loom_core.contracts import ThreadEntry
    from loom_infra.store import open_thread_store

    threads = open_thread_store(store_settings)
    try:
        for i in range(3):
            entry = ThreadEntry(role="user", content=f"m{i}", run_id="r", at=datetime.now(UTC),
                                source_event_id=f"e{i}")  # fmt: skip
            threads.append("t", entry)
        threads.append("t", entry)  # a redelivery adds nothing
        assert [threads.position("t", f"e{i}") for i in range(3)] == [0, 1, 2]
        assert threads.position("t", "nope") is None
    finally:
        threads.close()
