"""The store contract on PostgreSQL, plus URL handling and what is particular to it."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from store_contract import T0, StoreContract, run_events

from loom_infra.settings import (
    SettingsError,
    StoreSettings,
    settings_from_env,
    store_settings_from_env,
)
from loom_infra.store import StoreError, open_event_store, open_stores

pytestmark = pytest.mark.integration


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def store_settings(self, pg_store_settings: StoreSettings) -> StoreSettings:
        return pg_store_settings


def _with_query(url: str, query: str) -> str:
    parts = urlsplit(url)
    joined = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit(parts._replace(query=joined))


def test_tables_share_one_database_under_loom_names(pg_store_settings: StoreSettings) -> None:
    with open_stores(pg_store_settings) as stores:
        stores.events.append(run_events("run-a", count=1))
        stores.toolcalls.claim("k", "me", T0)
        stores.threads.list("t")
    assert pg_store_settings.postgres_url is not None
    with psycopg.connect(pg_store_settings.postgres_url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    assert {name for (name,) in rows} == {
        "loom_events",
        "loom_events_tracking",
        "loom_toolcalls",
        "loom_threads",
    }


def test_url_query_parameters_reach_the_connection(pg_store_settings: StoreSettings) -> None:
    assert pg_store_settings.postgres_url is not None
    url = _with_query(pg_store_settings.postgres_url, "application_name=loom_contract_test")
    with open_event_store(
        StoreSettings(kind="postgres", data_dir=Path("."), postgres_url=url)
    ) as s:
        s.append(run_events("run-a", count=1))
        with psycopg.connect(pg_store_settings.postgres_url) as conn:
            (count,) = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                ("loom_contract_test",),
            ).fetchone() or (0,)
    assert count >= 1


def test_unreachable_database_fails_fast_without_leaking_the_password(
    postgres_url: str,
) -> None:
    parts = urlsplit(postgres_url)
    host = parts.netloc.rpartition("@")[2]
    url = urlunsplit(parts._replace(netloc=f"postgres:s3cret-pw@{host}", path="/no_such_db"))
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        open_event_store(StoreSettings(kind="postgres", data_dir=Path("."), postgres_url=url))
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "no_such_db" in message and "LOOM_POSTGRES_URL" in message
    assert "s3cret-pw" not in message and "s3cret-pw" not in repr(caught.value)
    assert caught.value.backend == "postgres"


def test_malformed_url_is_a_store_error() -> None:
    url = "postgresql://u:hunter2@h/db?no_such_option=1"
    with pytest.raises(StoreError) as caught:
        open_event_store(StoreSettings(kind="postgres", data_dir=Path("."), postgres_url=url))
    assert "hunter2" not in str(caught.value)


def test_postgres_url_forms_and_redaction() -> None:
    env = {
        "LOOM_STORE": "postgres",
        "LOOM_POSTGRES_URL": "postgresql://loom:p%40ss-w0rd@db.internal:5433/loom?sslmode=require",
        "LOOM_NATS_URL": "nats://svc:natspw@nats:4222",
    }
    settings = settings_from_env(env)
    assert settings.store.kind == "postgres"
    assert settings.store.postgres_url == env["LOOM_POSTGRES_URL"]
    for text in (repr(settings), str(settings), repr(settings.store), str(settings.store)):
        assert "p%40ss-w0rd" not in text and "natspw" not in text
        assert "loom:***@db.internal:5433" in text or "svc:***@nats" in text
    socket_form = store_settings_from_env(
        {"LOOM_STORE": "postgres", "LOOM_POSTGRES_URL": "postgresql://postgres:@/db?host=/run/pg"}
    )
    assert socket_form.postgres_url == "postgresql://postgres:@/db?host=/run/pg"


def test_postgres_without_url_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="LOOM_POSTGRES_URL") as caught:
        store_settings_from_env({"LOOM_STORE": "postgres"})
    assert caught.value.variable == "LOOM_POSTGRES_URL"
    with pytest.raises(SettingsError, match="LOOM_POSTGRES_URL"):
        store_settings_from_env({"LOOM_STORE": "postgres", "LOOM_POSTGRES_URL": "db.internal"})
    with pytest.raises(SettingsError, match="LOOM_STORE"):
        store_settings_from_env({"LOOM_STORE": "mysql"})
    with pytest.raises(SettingsError, match="LOOM_MAX_PAYLOAD"):
        settings_from_env({"LOOM_MAX_PAYLOAD": "lots"})
