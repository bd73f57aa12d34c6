"""The system PostgreSQL starter (``localpg.start_system_postgres``, the fallback when the
pgserver wheel cannot start one): a port found free can be taken before the server binds
it; the start then tries another instead of failing. Starts a real server: from the
machine's PostgreSQL binaries, or, where it has none, from those the pgserver wheel (a
dependency) ships."""

from __future__ import annotations

import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from loom_infra import localpg

pytestmark = pytest.mark.integration


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory as the test suite's own PostgreSQL gets (``tests/conftest.py``): the
    postgres user must reach it when the tests run as root, which pytest's tmp_path (in a
    private directory) does not allow."""
    made = Path(tempfile.mkdtemp(prefix="loom-pg-"))
    yield made
    shutil.rmtree(made, ignore_errors=True)


def test_a_port_taken_before_the_server_binds_it_is_replaced_by_another(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        offered: list[int] = []
        free = localpg._free_port

        def first_a_taken_port() -> int:
            offered.append(taken if not offered else free())
            return offered[-1]

        monkeypatch.setattr(localpg, "_free_port", first_a_taken_port)
        try:
            localpg._system_pg_bindir()
        except RuntimeError:  # no system binaries: the wheel's
            with warnings.catch_warnings():  # it warns at import (see localpg)
                warnings.simplefilter("ignore")
                import pgserver
            bindir = Path(pgserver.__file__).parent / "pginstall" / "bin"
            monkeypatch.setattr(localpg, "_system_pg_bindir", lambda: bindir)
        url, stop = localpg.start_system_postgres(base / "pg")
        try:
            assert len(offered) == 2 and urlsplit(url).port == offered[1] != taken
            with psycopg.connect(url, connect_timeout=10) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            stop()
        log = (base / "pg" / "server.log").read_text(errors="replace")
        assert "already in use" in log  # the first start did meet the taken port
