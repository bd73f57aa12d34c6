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
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from loom_infra.settings import StoreSettings

Stop = Callable[[], None]


def _wait_until_accepting(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _start_pgserver(base: Path) -> tuple[str, Stop]:
    base.mkdir(parents=True)
    # pgserver warns at import when XDG_RUNTIME_DIR is unset (pytest turns warnings
    # into errors); the fallback directory it picks is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(base / "data", cleanup_mode="stop")
    url = server.get_uri()
    _wait_until_accepting(url)
    return url, server.cleanup


def _system_pg_bindir() -> Path:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path))

    candidates = sorted(
        (str(p) for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")),
        key=version,
        reverse=True,
    )
    if not candidates:
        raise RuntimeError("no initdb on PATH or under /usr/lib/postgresql/*/bin")
    return Path(candidates[0]).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_system_postgres(base: Path) -> tuple[str, Stop]:
    bindir = _system_pg_bindir()
    base.mkdir(parents=True)
    data = base / "data"
    run_as: str | None = None
    if os.geteuid() == 0:
        # initdb and postgres refuse to run as root: run them as the postgres user, who
        # must be able to reach its directory through our private temp directory.
        run_as = "postgres"
        entry = pwd.getpwnam(run_as)
        base.parent.chmod(0o711)
        os.chown(base, entry.pw_uid, entry.pw_gid)
        base.chmod(0o700)
    log = base.parent / f"{base.name}-commands.log"

    def run(args: list[str]) -> None:
        # Output goes to a file: a pipe inherited by the forked server would keep
        # pg_ctl's caller waiting for EOF.
        with open(log, "ab") as out:
            result = subprocess.run(
                args, stdout=out, stderr=out, user=run_as, timeout=60, cwd=base, check=False
            )
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{Path(args[0]).name} exited with {result.returncode}: {tail}")

    run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    port = _free_port()
    options = f"-p {port} -h 127.0.0.1 -k {base}"
    pg_ctl = str(bindir / "pg_ctl")
    run(
        [pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "30"]
        + ["-o", options, "start"]
    )
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def stop() -> None:
        run([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"])

    try:
        _wait_until_accepting(url)
    except Exception:
        stop()
        raise
    return url, stop


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a running PostgreSQL superuser connection (database ``postgres``)."""
    choice = os.environ.get("LOOM_TEST_POSTGRES", "auto").strip()
    if choice.startswith(("postgresql://", "postgres://")):
        _wait_until_accepting(choice)
        yield choice
        return
    starters: dict[str, Callable[[Path], tuple[str, Stop]]] = {
        "pgserver": _start_pgserver,
        "system": _start_system_postgres,
    }
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
