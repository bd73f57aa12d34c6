"""The memory service embeds with MiniLM in a child process (loom_services.embedworker),
off the GIL of the process that runs the steps, and keeps short texts' vectors: the same
numbers as the model in this process, a child that dies is replaced, a missing model is a
typed error saying what to do, and recall through the real stack still finds a run's
message by meaning."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from waiting import eventually  # type: ignore[import-not-found]

from loom_core import subjects
from loom_core.contracts import (
    MemoryReply,
    MemoryRequest,
    Plan,
    Principal,
    RunRequest,
    ToolStep,
)
from loom_infra import bus
from loom_infra.auth import ANONYMOUS_USER
from loom_infra.client import LoomClient
from loom_infra.embedders import EmbedderError, HashEmbedder, MiniLMEmbedder
from loom_infra.settings import EmbedderSettings, Settings, StoreSettings
from loom_infra.vectors import VectorStore
from loom_infra.workingmemory import WorkingMemoryStore
from loom_services import embedworker
from loom_services.embedworker import ProcessEmbedder
from loom_services.memory import MemoryService
from loom_services.memorystore import CACHED_TEXT_CHARS, CACHED_VECTORS, MemoryStore
from loom_services.stack import LocalStack

pytestmark = pytest.mark.integration

TEXTS = ["null", '{"input": {}}', "My daughter Emma was born on the 3rd of May", ""]


@pytest.fixture(scope="module")
def child() -> Any:
    embedder = ProcessEmbedder(EmbedderSettings())
    yield embedder
    embedder.close()


def test_the_child_gives_the_vectors_of_the_model_in_this_process(child: ProcessEmbedder) -> None:
    assert child.embed(TEXTS) == MiniLMEmbedder().embed(TEXTS)
    assert child._proc is not None and child._proc.pid != os.getpid()
    assert (child.name, child.dim) == (MiniLMEmbedder.name, MiniLMEmbedder.dim)
    assert child.embed([]) == []


def test_a_child_that_died_is_replaced_on_the_next_call(child: ProcessEmbedder) -> None:
    before = child.embed(["a sentence"])
    assert child._proc is not None
    child._proc.kill()
    child._proc.wait()
    assert child.embed(["a sentence"]) == before


def test_closing_ends_the_child() -> None:
    embedder = ProcessEmbedder(EmbedderSettings())
    proc = embedder._proc
    assert proc is not None and proc.poll() is None
    embedder.close()
    assert proc.poll() is not None and embedder._proc is None


def test_a_missing_model_is_a_typed_error_before_any_child_starts(tmp_path: Path) -> None:
    with pytest.raises(EmbedderError, match="LOOM_EMBED_MODEL_DIR"):
        ProcessEmbedder(EmbedderSettings(model_dir=tmp_path / "no-model"))


class CountingEmbedder(HashEmbedder):
    def __init__(self) -> None:
        super().__init__(64)
        self.texts: list[str] = []

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.texts += texts
        return super().embed(texts)


def test_short_texts_are_embedded_once_and_give_the_same_vector(tmp_path: Path) -> None:
    counting = CountingEmbedder()
    store = MemoryStore(
        VectorStore(str(tmp_path / "q")), counting, WorkingMemoryStore(tmp_path / "wm.db")
    )
    try:
        first = store._embed("null")
        assert store._embed("null") == first == HashEmbedder(64).embed(["null"])[0]
        assert counting.texts == ["null"]
        long_text = "x" * (CACHED_TEXT_CHARS + 1)
        store._embed(long_text)
        store._embed(long_text)
        assert counting.texts.count(long_text) == 2  # long texts are not kept
        for i in range(CACHED_VECTORS + 5):
            store._embed(f"text {i}")
        assert len(store._vectors) == CACHED_VECTORS  # bounded, oldest dropped
        # a message appended twice (two runs with the same input) is embedded once
        for run in ("r1", "r2"):
            store.append_message("default", "u", run, "user", "hello there", f"{run}/1", run, 0)
        assert counting.texts.count("hello there") == 1
    finally:
        store.working.close()
        store.vectors.close()


@pytest.fixture
async def client(
    sqlite_store_settings: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[LocalStack, LoomClient]]:
    monkeypatch.delenv("LOOM_EMBEDDER", raising=False)  # the default: MiniLM
    settings = Settings(nats_url="nats://127.0.0.1:4222", store=sqlite_store_settings)
    async with (
        LocalStack(settings, nats_port=-1, read_models="inline") as stack,
        await stack.client() as c,
    ):
        yield stack, c


async def test_the_stack_recalls_a_runs_message_embedded_in_the_child(
    client: tuple[LocalStack, LoomClient],
) -> None:
    stack, c = client
    user = Principal(user_id=ANONYMOUS_USER, via="operator", anonymous=True)
    plan = Plan(steps=[ToolStep(id="e", tool="echo", input={"message": "{{ input.q }}"})])
    for text in ("my dog is called Rex", "the invoice is due on Friday"):
        accepted = await c.submit(RunRequest(plan=plan, input={"q": text}, thread_id="chat"))
        await c.wait(accepted.run_id, timeout=60)

    async def recalled() -> Any:
        reply = await bus.request(
            c.nc, subjects.API_MEMORY_OPERATOR,
            MemoryRequest(op="recall", principal=user,
                          args={"query": "what is my puppy's name", "thread_id": "chat",
                                "top_k": 1, "window": 0}),
            MemoryReply, 30.0,
        )  # fmt: skip
        assert reply.error is None, reply.error
        return reply.result if reply.result and "Rex" in reply.result[0]["text"] else None

    await eventually(recalled, "the run's message recalled by meaning")
    memory = next(s for s in stack.stack.services if isinstance(s, MemoryService))
    assert memory._store is not None
    assert memory._store.embedder is embedworker.shared(memory.settings.embedder)


def test_a_child_that_answers_nothing_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from loom_services import embedworker

    embedder = ProcessEmbedder(EmbedderSettings())
    try:
        stuck = embedder._proc
        assert stuck is not None
        stuck.send_signal(signal.SIGSTOP)  # alive, answering nothing
        monkeypatch.setattr(embedworker, "CALL_TIMEOUT_S", 0.3)
        with pytest.raises(EmbedderError, match="answered nothing"):
            embedder.embed(["hello"])
        assert stuck.poll() is not None  # killed, not left behind
        monkeypatch.undo()  # a new child loads its model: the usual bound
        assert len(embedder.embed(["hello"])[0]) == embedder.dim
    finally:
        embedder.close()


def test_one_child_serves_every_memory_service_of_a_process() -> None:
    from loom_services import embedworker

    settings = EmbedderSettings()
    first = embedworker.shared(settings)
    assert embedworker.shared(EmbedderSettings()) is first  # equal settings, one child
    assert first._proc is not None and first._proc.poll() is None


def test_a_model_that_cannot_load_is_a_typed_error_and_leaves_no_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"not weights")
    (broken / "tokenizer.json").write_text("{}")
    started: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = popen(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(subprocess, "Popen", recording)
    with pytest.raises(EmbedderError, match="could not load"):
        ProcessEmbedder(EmbedderSettings(model_dir=broken))
    assert started and all(p.poll() is not None for p in started)
