"""The recorded runs in tests/golden: one JSON event per line, decoded (and upcast) as
the store gives events back."""

from __future__ import annotations

from pathlib import Path

from loom_core import codec
from loom_core.contracts import EventRecord

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
FILES = sorted(GOLDEN.glob("*.jsonl"))


def read(path: Path) -> list[EventRecord]:
    return [codec.decode_event(line.encode()) for line in path.read_text().splitlines() if line]
