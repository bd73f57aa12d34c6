"""Memory benchmark (issue 12): retrieval quality, search latency, embed throughput.

1. recall@5 on a small labelled set written for this bench: 60 facts a user told us, 240
   distractor memories of the same user (300 in all), and 60 questions, each phrased
   differently from its fact (few shared words), with the fact as its known answer.
   Run for the default embedder (all-MiniLM-L6-v2, NumPy) and the hash embedder (a
   lexical floor). Searches go through ``MemoryStore.search`` (Qdrant local mode, tenant
   and user filter), as a tool call would.
2. Search latency at 10k and 100k memories (random unit vectors, 384 dimensions, 20
   users in 2 tenants; a query filters on tenant+user like every memory search), in
   Qdrant local mode (which filters in Python: the figure a laptop stack sees).
3. Embed throughput of the default embedder: texts per second in batches of 64 and the
   latency of one query; and this process's CPU per text embedded here vs in the memory
   service's child process (``loom_services.embedworker``, issue 10).

Wall and process CPU time are printed side by side (the machine is shared).

    python bench/memory_bench.py                    # everything
    python bench/memory_bench.py --sizes 10000      # skip the 100k load
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from loom_core.contracts import Principal
from loom_infra.embedders import HashEmbedder, MiniLMEmbedder
from loom_infra.vectors import VectorStore, match, point_id
from loom_infra.workingmemory import WorkingMemoryStore
from loom_services.memorystore import MemoryStore

# (fact the user told us, a question whose answer is that fact)
LABELLED: list[tuple[str, str]] = [
    ("My daughter Emma was born on the 3rd of May", "When is my kid's birthday?"),
    ("I am allergic to peanuts", "Which foods must I avoid?"),
    ("I drive a blue Volvo XC60", "What car do I own?"),
    ("My favourite tea is jasmine green tea", "Which hot drink do I like best?"),
    ("I work as a nurse at St Mary's hospital", "What is my job?"),
    ("My dog is a golden retriever called Max", "What kind of pet do I have?"),
    ("I live in an apartment in Lisbon", "Which city is my home in?"),
    ("I prefer window seats on flights", "Where do I like to sit on a plane?"),
    ("My wife's name is Sofia", "Who am I married to?"),
    ("I run a marathon every autumn", "What endurance sport do I do?"),
    ("I am learning Japanese on weekends", "Which language am I studying?"),
    ("My blood type is O negative", "What is my blood group?"),
    ("I take my coffee black without sugar", "How do I drink my coffee?"),
    ("I am vegetarian since 2015", "Do I eat meat?"),
    ("My bank is Nordea", "Which financial institution holds my account?"),
    ("I play the cello in an amateur orchestra", "What musical instrument do I play?"),
    ("My son plays football on Saturday mornings", "What does my boy do at the weekend?"),
    ("I am afraid of heights", "Do I have any phobias?"),
    ("My laptop is a ThinkPad X1 Carbon", "What computer do I use?"),
    ("I support Benfica", "Which football club am I a fan of?"),
    ("I wake up at 6 am every day", "What time do I get up?"),
    ("My mother lives in Porto", "Where does my mum live?"),
    ("I have a meeting with the dentist on Friday", "When is my dental appointment?"),
    ("I wear contact lenses", "Do I need anything for my eyesight?"),
    ("My favourite author is Haruki Murakami", "Which writer do I read most?"),
    ("I am saving money for a house deposit", "What am I putting money aside for?"),
    ("My car insurance renews in March", "When is my vehicle policy due?"),
    ("I am lactose intolerant", "Can I have milk?"),
    ("I speak Portuguese, English and French", "How many languages do I know?"),
    ("My password manager is Bitwarden", "Which app keeps my logins?"),
    ("I go to the gym on Mondays and Thursdays", "Which days do I work out?"),
    ("My sister is a lawyer in London", "What does my sibling do for a living?"),
    ("I prefer email over phone calls", "How should people contact me?"),
    ("My shoe size is 43", "What size are my feet?"),
    ("I grow tomatoes on my balcony", "What do I plant at home?"),
    ("I am colour blind", "Do I have trouble seeing red and green?"),
    ("My team standup is at 9:30", "When is the daily team sync?"),
    ("I use Linux on my desktop", "Which operating system do I run?"),
    ("My wedding anniversary is in September", "When did I get married?"),
    ("I hate coriander", "Which herb do I dislike?"),
    ("My grandfather was a fisherman", "What was my grandpa's trade?"),
    ("I volunteer at the food bank monthly", "Do I do any charity work?"),
    ("I have two cats named Salt and Pepper", "What are my kittens called?"),
    ("My favourite film is Spirited Away", "Which movie do I love most?"),
    ("I commute by bicycle", "How do I get to work?"),
    ("I am diabetic and monitor my glucose", "Do I have a chronic illness?"),
    ("My flat has solar panels", "How is my home powered?"),
    ("I studied physics at university", "What was my degree in?"),
    ("I am planning a trip to Iceland in July", "Where am I going on holiday this summer?"),
    ("My manager is called Daniel", "Who is my boss?"),
    ("I sleep badly when it is hot", "What affects my rest at night?"),
    ("I like hiking in the mountains", "What outdoor activity do I enjoy?"),
    ("My phone is an iPhone 15", "What mobile do I have?"),
    ("I am a night owl and work best late", "When am I most productive?"),
    ("My favourite colour is teal", "Which colour do I like?"),
    ("I donate blood twice a year", "How often do I give blood?"),
    ("I keep a journal every evening", "Do I write a diary?"),
    ("My rent is due on the first of the month", "When do I pay my landlord?"),
    ("I have a PhD in chemistry", "What is my highest qualification?"),
    ("I meditate for ten minutes each morning", "Do I have a mindfulness practice?"),
]

SUBJECTS = ["The project", "Our office", "The client", "A colleague", "The newsletter",
            "The supplier", "The quarterly report", "The printer", "The conference",
            "The build server", "The intern", "The marketing team"]  # fmt: skip
EVENTS = ["was moved to the third floor", "needs a new budget approval", "asked for a demo",
          "sent the invoice late", "is delayed by two weeks", "won an industry award",
          "requires a security review", "changed its opening hours", "was reorganised",
          "ran out of paper", "got positive feedback", "will be audited next year",
          "switched to a new vendor", "published a summary", "was cancelled",
          "hired two engineers", "uses a shared calendar", "is on hold",
          "doubled its traffic", "needs translation into German"]  # fmt: skip


def distractors(n: int, rng: random.Random) -> list[str]:
    pairs = [f"{s} {e}" for s in SUBJECTS for e in EVENTS]
    rng.shuffle(pairs)
    return pairs[:n]


def recall_at_5(embedder, folder: Path) -> tuple[float, float, float]:
    """recall@5, MRR, and the wall seconds the 60 searches took."""
    vectors = VectorStore(folder / embedder.name)
    working = WorkingMemoryStore(folder / f"{embedder.name}.db")
    store = MemoryStore(vectors, embedder, working)
    user = Principal(user_id="u1", via="client", tenant="t1")
    other = Principal(user_id="u2", via="client", tenant="t1")
    ids = [store.store(user, fact)["id"] for fact, _ in LABELLED]
    for text in distractors(240, random.Random(7)):
        store.store(user, text)
    for fact, _ in LABELLED[:20]:  # another user's identical facts must never be found
        store.store(other, fact + " (other user)")
    hits = 0
    rr = 0.0
    start = time.perf_counter()
    for (_, question), answer in zip(LABELLED, ids, strict=True):
        found = [m["id"] for m in store.search(user, question, scope="user", limit=5)]
        if answer in found:
            hits += 1
            rr += 1 / (found.index(answer) + 1)
    took = time.perf_counter() - start
    vectors.close()
    working.close()
    return hits / len(LABELLED), rr / len(LABELLED), took


def search_latency(size: int, folder: Path, queries: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    vectors = VectorStore(folder / f"load{size}")
    name = "bench_memories"
    vectors.ensure(name, 384)
    batch = 2000
    start, cpu = time.perf_counter(), time.process_time()
    for offset in range(0, size, batch):
        block = rng.standard_normal((batch, 384)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        points = []
        for i, vec in enumerate(block):
            n = offset + i
            payload = {"tenant": f"t{n % 2}", "scope": "user", "user_id": f"u{n % 20}",
                       "text": f"memory {n}"}  # fmt: skip
            points.append((point_id("bench", str(n)), vec.tolist(), payload))
        vectors.upsert(name, points)
    load_s, load_cpu = time.perf_counter() - start, time.process_time() - cpu
    walls, cpus = [], []
    for q in range(queries):
        vec = rng.standard_normal(384).astype(np.float32)
        vec /= np.linalg.norm(vec)
        must = match(tenant=f"t{q % 2}", scope="user", user_id=f"u{(q * 2 + q % 2) % 20}")
        w, c = time.perf_counter(), time.process_time()
        vectors.query(name, vec.tolist(), must, 5)
        walls.append((time.perf_counter() - w) * 1000)
        cpus.append((time.process_time() - c) * 1000)
    w, c = time.perf_counter(), time.process_time()
    vectors.query(name, vec.tolist(), [], 5)
    unfiltered = ((time.perf_counter() - w) * 1000, (time.process_time() - c) * 1000)
    vectors.close()
    return {
        "load_s": load_s,
        "load_cpu_s": load_cpu,
        "p50_ms": statistics.median(walls),
        "p50_cpu_ms": statistics.median(cpus),
        "max_ms": max(walls),
        "unfiltered_ms": unfiltered[0],
        "unfiltered_cpu_ms": unfiltered[1],
    }


def embed_throughput(model: MiniLMEmbedder) -> dict[str, float]:
    texts = [
        f"{fact} and {d}"
        for (fact, _), d in zip(LABELLED * 5, distractors(240, random.Random(3)) * 2, strict=False)
    ][:256]  # noqa: E501
    model.embed(texts[:8])  # warm
    w, c = time.perf_counter(), time.process_time()
    for start in range(0, len(texts), 64):
        model.embed(texts[start : start + 64])
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    singles = []
    for q in LABELLED[:20]:
        s = time.perf_counter()
        model.embed([q[1]])
        singles.append((time.perf_counter() - s) * 1000)
    return {
        "texts_per_s": len(texts) / wall,
        "cpu_ms_per_text": cpu / len(texts) * 1000,
        "query_p50_ms": statistics.median(singles),
    }


def child_cost(model: MiniLMEmbedder, texts: int = 40) -> dict[str, float]:
    """CPU this process spends per text (run start/end messages: one text per call),
    embedding in this process vs in the memory service's child (embedworker): what a run's
    messages take from the process that runs the steps."""
    from loom_infra.settings import EmbedderSettings
    from loom_services.embedworker import ProcessEmbedder

    child = ProcessEmbedder(EmbedderSettings())
    try:
        out: dict[str, float] = {}
        for name, embedder in (("here", model), ("child", child)):
            w, c = time.perf_counter(), time.process_time()
            for i in range(texts):
                embedder.embed([f"run {i}: summarise the invoices of week {i % 52}"])
            out[f"{name}_cpu_ms"] = (time.process_time() - c) / texts * 1000
            out[f"{name}_wall_ms"] = (time.perf_counter() - w) / texts * 1000
        return out
    finally:
        child.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        w, c = time.perf_counter(), time.process_time()
        model = MiniLMEmbedder()
        print(f"model load: {time.perf_counter() - w:.2f} s wall, "
              f"{time.process_time() - c:.2f} s CPU")  # fmt: skip
        for embedder in (model, HashEmbedder(384)):
            r5, mrr, took = recall_at_5(embedder, folder)
            print(f"recall@5 {embedder.name}: {r5:.3f} (MRR {mrr:.3f}; 300 memories, "
                  f"60 queries, {took / 60 * 1000:.1f} ms per search incl. embedding)")  # fmt: skip
        k = child_cost(model)
        print(f"one text per call: {k['here_cpu_ms']:.2f} ms CPU of this process embedding "
              f"here ({k['here_wall_ms']:.2f} ms wall), {k['child_cpu_ms']:.3f} ms in the "
              f"child ({k['child_wall_ms']:.2f} ms wall)")  # fmt: skip
        t = embed_throughput(model)
        print(f"embed: {t['texts_per_s']:.0f} texts/s in batches of 64 "
              f"({t['cpu_ms_per_text']:.1f} ms CPU per text); one query "
              f"{t['query_p50_ms']:.1f} ms p50")  # fmt: skip
        for size in (int(s) for s in args.sizes.split(",") if s):
            r = search_latency(size, folder, args.queries if size <= 10_000 else 5)
            print(f"search at {size}: tenant+user filtered p50 {r['p50_ms']:.0f} ms "
                  f"({r['p50_cpu_ms']:.0f} ms CPU), max {r['max_ms']:.0f} ms; unfiltered "
                  f"{r['unfiltered_ms']:.0f} ms ({r['unfiltered_cpu_ms']:.0f} ms CPU); "
                  f"load {r['load_s']:.0f} s ({r['load_cpu_s']:.0f} s CPU)")  # fmt: skip


if __name__ == "__main__":
    main()
