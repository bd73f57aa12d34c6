"""The memory service's MiniLM embedder in a child process of its own.

Why a process (issue 10): the NumPy forward pass costs ~5-7 ms of CPU per text, most of it
in small array operations that hold the GIL. Run in the memory writer thread of the
embedded stack (``loom up``: executor, planner, memory and tracing in one process), each
run's start and end messages stalled the event loop that runs the steps: the first ~15
steps of every run cost 2.4 ms instead of 1.5. In a child process the parent's writer
thread only waits on a pipe (GIL released), and the child runs at a lower CPU priority
(``EMBED_NICE``), so embedding uses what the step path leaves idle. The vectors are the
same numbers (the same model code; floats travel as msgpack doubles, exact).

Protocol (stdin/stdout of ``python -m loom_services.embedworker``): each frame is a 4-byte
big-endian length and a msgpack body. Request: the embedder settings once (``spec``,
``model_dir``, ``threads``), then lists of texts; reply: ``{"v": vectors}`` or
``{"e": message}``. The child exits at end of input: it never outlives its parent.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import msgspec

from loom_infra.embedders import MODEL_NAME, EmbedderError, MiniLMEmbedder, model_dir
from loom_infra.settings import EmbedderSettings

EMBED_NICE = 10  # the child's CPU priority below the services' (a positive nice)
# one call's bound: a knowledge document is embedded in batches of chunks; a child that
# answers nothing this long is stuck, and is replaced
CALL_TIMEOUT_S = 300.0
_HEADER = struct.Struct(">I")
_MAX_FRAME = 256 * 1024 * 1024


class ProcessEmbedder:
    """An ``Embedder`` (``name``, ``dim``, ``embed``) whose model runs in a child process.
    Thread-safe: calls are serialised (the model is one, as in the parent). A child that
    died is replaced once per call."""

    name = MODEL_NAME
    dim = MiniLMEmbedder.dim

    def __init__(self, settings: EmbedderSettings) -> None:
        folder = model_dir(settings.model_dir)  # EmbedderError when not installed
        if (
            not (folder / "model.safetensors").is_file()
            or not (folder / "tokenizer.json").is_file()
        ):
            # the same check and words as MiniLMEmbedder, before a child is started
            raise EmbedderError(
                f"{folder} lacks model.safetensors or tokenizer.json: reinstall the model "
                "(`python -m loom_infra.embedders install-model`) or fix LOOM_EMBED_MODEL_DIR"
            )
        self._settings = {"model_dir": str(folder), "threads": settings.threads}
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            self.embed(["warm up"])  # loads the model now: a broken model fails here
        except BaseException:
            self.close()  # no child is left behind by a constructor that failed
            raise

    def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        with self._lock:
            try:
                return self._call(texts)
            except (EOFError, ConnectionError):
                self._stop()  # the child died (killed, out of memory): a new one, once
            try:
                return self._call(texts)
            except (EOFError, ConnectionError) as exc:
                self._stop()
                raise EmbedderError(
                    f"the embedder process stopped twice in a row ({exc!r}); its error is in "
                    "this service's log (stderr). Check memory limits and the model files"
                ) from exc

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _call(self, texts: list[str]) -> list[list[float]]:
        proc = self._proc or self._start()
        assert proc.stdin is not None and proc.stdout is not None
        _write(proc.stdin, texts)
        reply = _read(proc.stdout, CALL_TIMEOUT_S)
        if reply is None:
            self._stop(kill=True)
            raise EmbedderError(f"the embedder process answered nothing in {CALL_TIMEOUT_S:.0f} s")
        if "e" in reply:
            raise EmbedderError(str(reply["e"]))
        vectors: list[list[float]] = reply["v"]
        return vectors

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loom_services.embedworker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # raw pipes: a select() on them sees every byte not yet read
        )
        assert proc.stdin is not None
        _write(proc.stdin, self._settings)
        self._proc = proc
        return proc

    def _stop(self, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:  # stuck: what it would answer is no longer awaited
            proc.kill()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


_shared: dict[EmbedderSettings, ProcessEmbedder] = {}
_shared_lock = threading.Lock()


def shared(settings: EmbedderSettings) -> ProcessEmbedder:
    """One child per settings for this whole process (as ``embedders.from_settings``
    loads a model once): every memory service started here uses it, and it ends with
    this process (its input closes). A failure to start is not kept: the next call tries
    again."""
    with _shared_lock:
        embedder = _shared.get(settings)
        if embedder is None:
            embedder = _shared[settings] = ProcessEmbedder(settings)
        return embedder


def _write(pipe: IO[bytes], value: Any) -> None:
    body = msgspec.msgpack.encode(value)
    data = memoryview(_HEADER.pack(len(body)) + body)
    while data:  # a raw pipe may take part of it
        written = pipe.write(data)
        data = data[written or 0 :]
    pipe.flush()


def _read_exactly(pipe: IO[bytes], n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = pipe.read(n - len(data))
        if not chunk:
            raise EOFError("the embedder process closed its output")
        data += chunk
    return data


def _read(pipe: IO[bytes], timeout: float | None) -> Any:
    """The next frame's value; None when nothing came within ``timeout`` seconds."""
    if timeout is not None:
        ready, _, _ = select.select([pipe], [], [], timeout)
        if not ready:
            return None
    (size,) = _HEADER.unpack(_read_exactly(pipe, _HEADER.size))
    if size > _MAX_FRAME:
        raise EOFError(f"an embedder frame of {size} bytes: the pipe is out of step")
    return msgspec.msgpack.decode(_read_exactly(pipe, size))


def main() -> None:
    """The child: load the model, then embed each list of texts until end of input."""
    # Ctrl-C on `loom up` reaches the whole process group: the parent stops, closes the
    # pipe, and this process ends at end of input (without a traceback)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # not allowed here: embed at the same priority
        os.nice(EMBED_NICE)
    stdin = sys.stdin.buffer
    # the frames get the pipe to themselves: anything a library prints goes to stderr
    stdout = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        settings = _read(stdin, None)
    except EOFError:
        return
    model: MiniLMEmbedder | None = None
    failure = ""
    try:
        model = MiniLMEmbedder(Path(settings["model_dir"]), threads=int(settings["threads"]))
    except Exception as exc:  # said on every call: the parent decides what to do
        failure = f"the embedder could not load: {type(exc).__name__}: {exc}"
    while True:
        try:
            texts = _read(stdin, None)
        except EOFError:
            return
        try:
            if model is None:
                raise EmbedderError(failure)
            reply: dict[str, Any] = {"v": model.embed([str(t) for t in texts])}
        except Exception as exc:
            reply = {
                "e": str(exc) if isinstance(exc, EmbedderError) else f"{type(exc).__name__}: {exc}"
            }
        try:
            _write(stdout, reply)
        except BrokenPipeError:
            return


if __name__ == "__main__":
    main()
