"""The chaos suite's short form (``make chaos`` runs the full one): 10 runs x 5 steps on
SQLite, one seeded kill -9 each of the executor, the tool-runner, the planner and
nats-server, all through ``bench/chaos.py``'s driver. What must hold is the driver's
(every run terminal, LOOM_RUNS and the store gap-free and duplicate-free, no
non-idempotent effect twice); this test fails on any violation it reports.
``LOOM_CHAOS_SEED`` overrides the seed to explore other schedules."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def load_driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loom_chaos", ROOT / "bench" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


async def test_short_chaos_every_kill_is_survived(tmp_path: Path) -> None:
    chaos = load_driver()
    seed = int(os.environ.get("LOOM_CHAOS_SEED", "3"))
    cfg = chaos.Config(runs=10, steps=5, kills=1, seed=seed, base=tmp_path, end_timeout=60)
    report = await chaos.chaos(cfg)
    print(report.text())
    assert len(report.recoveries) == len(chaos.TARGETS)
    assert not report.violations, report.text()
    assert sum(report.ends.values()) == cfg.runs
    # every kill was followed by its affected runs progressing again
    assert all(r.recovery_s is not None for r in report.recoveries), report.text()
