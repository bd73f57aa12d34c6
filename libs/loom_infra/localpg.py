"""A local PostgreSQL for tests and benchmarks, with no Docker: the ``pgserver`` wheel
(PostgreSQL 16 inside the wheel) or, failing that, a system ``initdb``/``pg_ctl`` on a
free port in a temporary directory. As root, the server runs as an unprivileged user
(pgserver creates ``pgserver``; the system path uses ``postgres``)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import psycopg

Stop = Callable[[], None]


def wait_until_accepting(url: str, timeout: float = 30.0) -> None:
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


def start_pgserver(base: Path) -> tuple[str, Stop]:
    base.mkdir(parents=True)
    # pgserver warns at import when XDG_RUNTIME_DIR is unset (pytest turns warnings
    # into errors); the fallback directory it picks is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(base / "data", cleanup_mode="stop")
    url = server.get_uri()
    wait_until_accepting(url)
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


PORT_ATTEMPTS = 3  # ports a system PostgreSQL is started on before giving up


def _port_was_taken(server_log: Path, since: int) -> bool:
    """Did the server's last start (its log after byte ``since``) fail to bind its port?"""
    with open(server_log, "rb") as log:
        log.seek(since)
        return b"already in use" in log.read()


def start_system_postgres(base: Path) -> tuple[str, Stop]:
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
    pg_ctl = str(bindir / "pg_ctl")
    server_log = base / "server.log"
    for attempt in range(1, PORT_ATTEMPTS + 1):
        # a port free now may be taken before the server binds it (another test's server,
        # any program): the server then stops, saying so in its log, and another is tried
        port = _free_port()
        logged = server_log.stat().st_size if server_log.exists() else 0
        try:
            run(
                [pg_ctl, "-D", str(data), "-l", str(server_log), "-w", "-t", "30"]
                + ["-o", f"-p {port} -h 127.0.0.1 -k {base}", "start"]
            )
            break
        except RuntimeError:
            if attempt == PORT_ATTEMPTS or not _port_was_taken(server_log, logged):
                raise
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def stop() -> None:
        run([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"])

    try:
        wait_until_accepting(url)
    except Exception:
        stop()
        raise
    return url, stop


STARTERS: dict[str, Callable[[Path], tuple[str, Stop]]] = {
    "pgserver": start_pgserver,
    "system": start_system_postgres,
}


def start_local_postgres(base: Path, choice: str = "auto") -> tuple[str, Stop]:
    """Start PostgreSQL under ``base`` (which must not exist); returns (url, stop).
    Raises RuntimeError listing every way that was tried when none works."""
    starters = STARTERS if choice == "auto" else {choice: STARTERS[choice]}
    failures: list[str] = []
    for name, start in starters.items():
        try:
            return start(base / name)
        except Exception as exc:  # try the next way; report all at the end
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    raise RuntimeError(
        "could not start PostgreSQL; install the pgserver wheel (pip install pgserver) or "
        "PostgreSQL's server binaries. Tried: " + "; ".join(failures)
    )
