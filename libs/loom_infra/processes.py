"""A loom service as its own OS process (``python -m loom_services.<name>``): start,
kill -9, restart with the same environment, read its log. What the crash test and the
chaos driver (``bench/chaos.py``) use to kill services the way a machine would."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loom_infra.client import LoomClient


def die_with_parent() -> None:
    """In the child: SIGKILL it if the process that started it dies, so nothing outlives
    a crashed test or driver."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class ServiceProcess:
    """One service as its own OS process; restartable with the same environment."""

    name: str
    env: dict[str, str]
    logs: Path
    proc: subprocess.Popen[bytes] | None = None
    killed: list[int] = field(default_factory=list)
    label: str = ""  # one of several replicas of a service (its log file's name)

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.label or self.name}.log"

    def start(self) -> int:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"loom_services.{self.name}"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only calls prctl
            )
        return self.proc.pid

    def kill(self) -> int:
        """SIGKILL, as a crash would; returns the pid it killed."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        pid = self.proc.pid
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.killed.append(pid)
        return pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        title = f"--- {self.label or self.name} log (last {lines} lines)\n"
        return title + "\n".join(text.splitlines()[-lines:])

    async def wait_healthy(self, client: LoomClient, timeout: float = 30.0) -> None:
        """Until *this* process (its pid in the Pong) answers its health subject; raises
        RuntimeError with the log's tail if it exits or stays silent ``timeout`` s."""
        assert self.proc is not None
        suffix = f":{self.proc.pid}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                pong = await client.ping(self.name, timeout=0.5)
            except Exception:  # no responder yet: the process is still starting
                pong = None
            if pong is not None and pong.instance.endswith(suffix):
                return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} (pid {self.proc.pid}) not healthy in {timeout}s\n" + self.tail()
                )
            await asyncio.sleep(0.05)  # retry interval of a bounded readiness probe


async def wait_until(
    changed: asyncio.Event, condition: Callable[[], bool], timeout: float, recheck_s: float = 0.5
) -> bool:
    """Wait for ``condition``, re-checked each time ``changed`` is set (and at least every
    ``recheck_s``: a condition may also change without an event), at most ``timeout`` s.
    The watchers of the crash test and the chaos driver share it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        left = deadline - loop.time()
        if left <= 0:
            return False
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), min(left, recheck_s))
    return True


def replicated_services(
    env: dict[str, str],
    seed_file: Callable[[str], Path],
    logs: Path,
    replicas: tuple[str, ...] | list[str],
    others: tuple[str, ...] = ("planner", "toolrunner"),
) -> tuple[dict[str, ServiceProcess], list[ServiceProcess]]:
    """A partitioned deployment as processes (not started): one executor per replica
    name (``LOOM_REPLICA_ID``) and one of each of ``others``, each with its own identity's
    seed (``seed_file(name)``); the others log at WARNING."""
    executors = {
        replica: ServiceProcess(
            "executor",
            {**env, "LOOM_REPLICA_ID": replica, "LOOM_NKEY_SEED_FILE": str(seed_file("executor"))},
            logs,
            label=replica,
        )
        for replica in replicas
    }
    rest = [
        ServiceProcess(
            name,
            {**env, "LOOM_NKEY_SEED_FILE": str(seed_file(name)), "LOOM_LOG_LEVEL": "WARNING"},
            logs,
        )
        for name in others
    ]
    return executors, rest


async def wait_healthy_at(
    url: str, seed: str, service: ServiceProcess, timeout: float = 60
) -> None:
    """Connect as ``seed``'s identity and wait (bounded) until ``service`` reports healthy."""
    async with await LoomClient.connect(url, seed=seed) as client:
        await service.wait_healthy(client, timeout=timeout)
