"""The embedded nats-server's Go processors: half the cores by default, and an
operator's GOMAXPROCS wins (docs/decisions.md, "The embedded nats-server runs on half
the cores"). Read back from the running server's own ``/varz``."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from loom_infra import natsserver
from loom_infra.natsserver import EmbeddedNats, default_gomaxprocs


def _varz(server: EmbeddedNats) -> dict[str, object]:
    url = f"http://{server.host}:{server.monitor_port}/varz"
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - our own server
        return json.loads(reply.read())


def _gomaxprocs(tmp_path: Path, chosen: int | None = None) -> int:
    with EmbeddedNats(tmp_path / "nats", port=-1, monitor=True, gomaxprocs=chosen) as server:
        value = _varz(server)["gomaxprocs"]
    assert isinstance(value, int)
    return value


def test_the_server_runs_on_half_the_cores_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    assert _gomaxprocs(tmp_path) == default_gomaxprocs()


def test_a_chosen_count_reaches_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    assert _gomaxprocs(tmp_path, 3) == 3


def test_an_operators_gomaxprocs_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOMAXPROCS", "5")
    assert _gomaxprocs(tmp_path, 3) == 5


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (3, 1), (8, 4), (64, 32)])
def test_half_the_cores_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch, cores: int, expected: int
) -> None:
    monkeypatch.setattr(natsserver.os, "sched_getaffinity", lambda _pid: set(range(cores)))
    assert default_gomaxprocs() == expected
