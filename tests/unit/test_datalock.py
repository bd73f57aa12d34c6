"""One stack per data dir (issue 9: a second ``loom up`` on the same ``--data-dir``
started and shared the SQLite files and the JetStream store). ``DataDirLock`` refuses
the second holder with a typed error naming the dir and the pid; the lock dies with its
process, ``kill -9`` included. Real processes, no sleeps: they say when they hold it on
stdout, and the test waits for their exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom_infra.datalock import LOCK_FILE, DataDirLock, DataDirLocked

# A process that takes the lock, says so, and waits: "exit" (normally, without
# releasing), "release" (then exits), or nothing (until killed).
HOLDER = textwrap.dedent(
    """
    import sys
    from loom_infra.datalock import DataDirLock, DataDirLocked
    try:
        lock = DataDirLock(sys.argv[1]).acquire()
    except DataDirLocked as exc:
        print("refused", exc.error.code, exc.error.details["pid"], flush=True)
        sys.exit(3)
    print("holding", flush=True)
    if sys.stdin.readline().strip() == "release":
        lock.release()
        print("released", flush=True)
        sys.stdin.readline()
    """
)


def holder(data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def start_holding(data_dir: Path, procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    proc = holder(data_dir)
    procs.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "holding", proc.stderr.read() if proc.stderr else ""
    return proc


def tell(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def refused(data_dir: Path) -> DataDirLocked:
    with pytest.raises(DataDirLocked) as caught:
        DataDirLock(data_dir).acquire()
    return caught.value


# ------------------------------------------------------------------- one process


def test_the_lock_is_exclusive_and_says_who_holds_it(tmp_path: Path) -> None:
    data = tmp_path / "data"  # created on the way
    with DataDirLock(data) as lock:
        assert lock.held
        note = json.loads((data / LOCK_FILE).read_text())
        assert note["pid"] == os.getpid() and note["host"] == socket.gethostname()
        # a second descriptor is another holder, even in this process
        error = refused(data).error
        assert error.code == "data_dir_locked"
        assert error.details == {"data_dir": str(data), "pid": os.getpid(), "host": note["host"]}
        assert str(data) in error.message and f"pid {os.getpid()}" in error.message
        assert "--data-dir" in error.message and "LOOM_DATA_DIR" in error.message
        assert error.path == str(data / LOCK_FILE)
    assert not lock.held
    assert (data / LOCK_FILE).exists()  # kept: deleting it would race a new holder
    with DataDirLock(data):  # free again
        pass


def test_release_is_idempotent_and_acquire_reentrant(tmp_path: Path) -> None:
    lock = DataDirLock(tmp_path)
    assert lock.acquire() is lock.acquire()
    lock.release()
    lock.release()
    assert not lock.held


def test_an_unreadable_note_still_gives_a_typed_refusal(tmp_path: Path) -> None:
    with DataDirLock(tmp_path):
        (tmp_path / LOCK_FILE).write_text("not json")  # e.g. a holder mid-write
        error = refused(tmp_path).error
    assert error.code == "data_dir_locked" and "another process" in error.message
    assert error.details["pid"] is None


def test_a_data_dir_that_is_a_file_is_a_typed_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    error = refused(not_a_dir).error
    assert error.code == "data_dir_unusable" and str(not_a_dir) in error.message


# ------------------------------------------------------------------- processes


def test_a_second_process_is_refused_with_the_holders_pid(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    first = start_holding(tmp_path, procs)
    error = refused(tmp_path).error  # this process
    assert error.details["pid"] == first.pid and f"pid {first.pid}" in error.message
    second = holder(tmp_path)  # and another one
    procs.append(second)
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 3 and out.split() == ["refused", "data_dir_locked", str(first.pid)]


def test_the_lock_dies_with_a_killed_holder(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    first = start_holding(tmp_path, procs)
    refused(tmp_path)
    first.send_signal(signal.SIGKILL)  # a crash: no release, no cleanup
    assert first.wait(timeout=30) == -signal.SIGKILL
    with DataDirLock(tmp_path):  # the kernel dropped it with the process
        pass


def test_the_lock_dies_with_a_holder_that_exits_without_releasing(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    first = start_holding(tmp_path, procs)
    tell(first, "exit")
    assert first.wait(timeout=30) == 0
    second = start_holding(tmp_path, procs)  # another process takes it
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == second.pid


def test_a_released_lock_is_free_while_its_process_lives_on(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    first = start_holding(tmp_path, procs)
    tell(first, "release")
    assert first.stdout is not None and first.stdout.readline().strip() == "released"
    with DataDirLock(tmp_path):
        assert first.poll() is None  # still running, no longer holding
