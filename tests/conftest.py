"""Shared fixtures: a real PostgreSQL for the whole session and per-test store settings.

PostgreSQL comes from, in order:
1. ``LOOM_TEST_POSTGRES=postgresql://...``: an existing server (e.g. a CI service); each
   test still gets its own fresh database on it.
2. the ``pgserver`` wheel (PostgreSQL 16 from the wheel, unix socket only). As root it
   runs the server as a system user ``pgserver`` that it creates.
3. a system ``initdb``/``pg_ctl`` (on PATH or under /usr/lib/postgresql/*/bin), on a free
   TCP port in a temporary directory; as root it runs them as the ``postgres`` user.
``LOOM_TEST_POSTGRES=pgserver`` or ``=system`` forces one of 2 or 3. If no PostgreSQL can
be had, the fixture fails (it never skips): the store must be tested on PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from loom_infra.localpg import STARTERS, wait_until_accepting
from loom_infra.settings import StoreSettings

# The suite's stacks run their read models (tracing, memory) in their own process: a
# child each costs ~0.9 s more per LocalStack start (Python start-up and imports, on a
# 2-core machine), for some hundred stacks. Split mode, what `loom up` runs, has its own
# tests (tests/integration/test_read_model_processes.py), which ask for it explicitly.
# LOOM_READ_MODELS=process in the environment runs the whole suite split.
os.environ.setdefault("LOOM_READ_MODELS", "inline")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a running PostgreSQL superuser connection (database ``postgres``)."""
    choice = os.environ.get("LOOM_TEST_POSTGRES", "auto").strip()
    if choice.startswith(("postgresql://", "postgres://")):
        wait_until_accepting(choice)
        yield choice
        return
    starters = dict(STARTERS)
    if choice != "auto":
        if choice not in starters:
            pytest.fail(f"LOOM_TEST_POSTGRES must be auto, pgserver, system or a URL: {choice!r}")
        starters = {choice: starters[choice]}
    base = Path(tempfile.mkdtemp(prefix="loom-pg-"))
    failures: list[str] = []
    for name, start in starters.items():
        try:
            url, stop = start(base / name)
        except Exception as exc:  # try the next way; report all at the end
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        try:
            yield url
        finally:
            stop()
            shutil.rmtree(base, ignore_errors=True)
        return
    shutil.rmtree(base, ignore_errors=True)
    pytest.fail(
        "could not start PostgreSQL for the tests; install the pgserver wheel "
        "(pip install pgserver) or PostgreSQL's server binaries, or point "
        "LOOM_TEST_POSTGRES at a server. Tried: " + "; ".join(failures)
    )


def _with_dbname(url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{dbname}"))


@pytest.fixture
def pg_store_settings(tmp_path: Path, postgres_url: str) -> Iterator[StoreSettings]:
    """Postgres store settings on a fresh database of its own (dropped afterwards)."""
    dbname = f"loom_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    yield StoreSettings(
        kind="postgres", data_dir=tmp_path / "data", postgres_url=_with_dbname(postgres_url, dbname)
    )
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        # FORCE: a test that failed half-way may have left pooled connections open.
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


@pytest.fixture
def sqlite_store_settings(tmp_path: Path) -> StoreSettings:
    """SQLite store settings in this test's own directory."""
    return StoreSettings(kind="sqlite", data_dir=tmp_path / "data", postgres_url=None)
