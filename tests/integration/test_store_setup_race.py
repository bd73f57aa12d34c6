"""Several executors starting at once on an empty PostgreSQL database all create the
store's tables: each must succeed (PostgreSQL refuses concurrent first-time CREATE
TABLE / CREATE TYPE on one catalog row with "tuple concurrently updated")."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from loom_infra.settings import StoreSettings
from loom_infra.store import open_event_store, open_snapshot_store, open_tool_ledger

pytestmark = pytest.mark.integration

SETUPS = 3
ROUNDS = 4  # fresh databases: the race is not lost every time without the lock


def _fresh_database(postgres_url: str, tmp: Any) -> tuple[str, StoreSettings]:
    dbname = f"loom_race_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    url = urlunsplit(urlsplit(postgres_url)._replace(path=f"/{dbname}"))
    return dbname, StoreSettings(kind="postgres", data_dir=tmp, postgres_url=url)


def _drop(postgres_url: str, dbname: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


def _setup_all(settings: StoreSettings, barrier: threading.Barrier) -> str:
    """What an executor opens at start, all at the same moment as the others."""
    opened: list[Callable[[], None]] = []
    barrier.wait(timeout=30)
    try:
        for opener in (open_event_store, open_snapshot_store, open_tool_ledger):
            opened.append(opener(settings).close)
    finally:
        for close in opened:
            close()
    return "ok"


def test_concurrent_store_setups_on_a_fresh_database_all_succeed(
    postgres_url: str, tmp_path: Any
) -> None:
    for round_ in range(ROUNDS):
        dbname, settings = _fresh_database(postgres_url, tmp_path / f"r{round_}")
        try:
            barrier = threading.Barrier(SETUPS)
            with ThreadPoolExecutor(SETUPS) as pool:
                futures = [pool.submit(_setup_all, settings, barrier) for _ in range(SETUPS)]
                errors = [f.exception(timeout=120) for f in futures]
            assert errors == [None] * SETUPS, f"round {round_}: {errors}"
            # the tables are whole: a store opened afterwards writes and reads
            store = open_event_store(settings)
            try:
                assert store.load("nobody") == []
            finally:
                store.close()
        finally:
            _drop(postgres_url, dbname)
