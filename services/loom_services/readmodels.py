"""The embedded stack's read models (tracing, memory) as child processes.

``LOOM_READ_MODELS=process`` (the default): ``LocalStack`` starts each read model as
``python -m loom_services.<name>`` (the entry a Kubernetes pod runs), with its own
identity's nkey seed and the stack's settings (``settings.service_process_env``), and
keeps it alive while the stack runs. Why: tracing's fold held the loop that runs the
steps 2-4 ms every 50 ms (p99 per step 4.5-5.6 ms with it, 2.7-3.0 without; issue 10),
and memory does per-event work of its own; both are read models, fed by the run
streams, so nothing on a step's path waits for them.

- A child never outlives the stack: ``close`` terminates it and waits (bounded, then
  SIGKILL); if the stack's process dies (kill -9), the kernel kills the child
  (``PR_SET_PDEATHSIG``, Linux). Chosen over a pipe the child watches because it needs
  nothing from the child (``python -m loom_services.<name>`` stays the pod's entry) and
  works even while the child's loop is blocked; a read model is an idempotent, acking
  consumer, so a SIGKILL loses nothing. The signal follows the *thread* that forked
  the child: every child is started from the stack's event-loop thread.
- Each child runs in its own process group, so a terminal's Ctrl-C reaches only the
  stack's process, which then stops the children itself (no child exits first, to be
  restarted during the stop). It stays in the stack's session: with the kernel's
  autogroups (one scheduling group per session) its nice and its ``SCHED_IDLE`` weigh
  against the stack's own processes only when they share the group.
- A child that dies while the stack runs is logged (ERROR, with its last line of
  output) and restarted after a bounded backoff (0.2 s doubling to 10 s; back to 0.2 s
  once a child lived 30 s). Until it is back, the stack's ``/readyz`` names it.
  A child that never became ready is not restarted: the stack's start fails with the
  child's last output (``ReadModelFailed``).
- Its output goes to this process's log: each of its log records under the same logger
  name and level it had in the child, prefixed with the child's name and pid; any other
  line (a traceback) at DEBUG, so a CLI user sees no traceback unless they ask for one
  (``loom --debug ...`` or ``LOOM_LOG_LEVEL=DEBUG``).
- Each child runs at a lower CPU priority than the stack (``LOOM_READ_MODELS_NICE``,
  default 10): their folds come in bursts (tracing: ~28 steps' events every 50 ms), and
  at the stack's priority a burst took a core from the executor, the tool-runner or
  nats-server; most of a sequential run's slow steps were those (issue 10's p99). The
  tracing child also starts under ``SCHED_IDLE`` where it may leave it again, and stays
  there while it keeps up (``loom_infra.cpu_priority``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping

from loom_core.errors import LoomError
from loom_infra import bus
from loom_infra.client import LoomClient

log = logging.getLogger("loom.readmodels")

READ_MODELS = ("tracing", "memory")  # the services LOOM_READ_MODELS=process moves out
STOP_S = 10.0  # a child's clean stop (its consumers settle, its stores close), then SIGKILL
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 10.0
STABLE_S = 30.0  # a child that lived this long starts the backoff over
READY_S = 60.0  # a child's start: Python, its imports (Qdrant, NumPy), NATS, its consumer
OUTPUT_LINES = 20  # kept for the report of a child that exits
_LINE_LIMIT = 1024 * 1024
# runtime.configure_logging's format: "%(asctime)s %(levelname)s %(name)s: %(message)s"
_RECORD = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.-]+): (.*)$"
)
_PR_SET_PDEATHSIG = 1


class ReadModelFailed(LoomError, RuntimeError):
    """A read-model child process did not start (it exited, or never answered)."""

    code = "read_model_failed"


def _die_with(parent: int, nice: int = 0, idle: bool = False) -> Callable[[], None]:
    """In the child, between fork and exec: SIGKILL when the parent dies; if it already
    died (between the fork and this call, so no signal will come), exit now. ``prctl``
    is looked up here, in the parent: the child of a threaded process should load no
    library between fork and exec (another thread may have held the loader's lock).
    ``nice``: the child's priority this many steps below the parent's
    (``LOOM_READ_MODELS_NICE``; relative, so a stack started under ``nice`` keeps its
    read models below itself; the kernel caps it at 19). ``idle``: ``SCHED_IDLE``, set
    before the exec so every thread the child starts inherits it."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    kill = int(signal.SIGKILL)

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, kill)
        if os.getppid() != parent:
            os._exit(1)
        if nice:
            os.nice(nice)
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    return preexec


class ReadModelProcess:
    """One read model as a child process of the stack, restarted if it dies."""

    def __init__(
        self, name: str, env: Mapping[str, str], nice: int = 0, idle: bool = False
    ) -> None:
        self.name = name
        self.env = dict(env)
        self.nice = nice  # below the stack's priority (LOOM_READ_MODELS_NICE)
        self.idle = idle  # started under SCHED_IDLE (loom_infra.cpu_priority)
        self.proc: asyncio.subprocess.Process | None = None
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES)
        self.restarts = 0
        self.closing = False
        self.was_ready = False  # restarted only once it has served: a start that fails, fails
        self._started_at = 0.0
        self._backoff = BACKOFF_FIRST_S
        self._supervisor: asyncio.Task[None] | None = None
        self._forwarder: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # ends a backoff wait at close

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        """Start the child (not waiting for it to be ready: ``wait_ready``)."""
        await self._spawn()
        self._supervisor = asyncio.ensure_future(self._supervise())
        self._supervisor.set_name(f"{self.name}-process")

    async def _spawn(self) -> None:
        self.output.clear()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"loom_services.{self.name}",
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            process_group=0,  # Ctrl-C is for the stack; in its session: see the module doc
            preexec_fn=_die_with(os.getpid(), self.nice, self.idle),  # noqa: PLW1509 - prctl, getppid, nice, policy only
            limit=_LINE_LIMIT,
        )
        self._started_at = time.monotonic()
        self._forwarder = asyncio.ensure_future(self._forward(self.proc))
        self._forwarder.set_name(f"{self.name}-output")
        log.debug("%s process started (pid %d)", self.name, self.proc.pid)

    async def _forward(self, proc: asyncio.subprocess.Process) -> None:
        """Every line the child writes, to this process's log, until its end of output
        (read to the end: a child blocks on a full pipe)."""
        assert proc.stdout is not None
        prefix = f"[{self.name} pid {proc.pid}]"
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line over the limit: dropped, the rest goes on
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            record = _RECORD.match(line)
            if record is None:
                self.output.append(line)
                log.debug("%s %s", prefix, line)
                continue
            level, logger, message = record.groups()
            self.output.append(message)
            logging.getLogger(logger).log(
                logging.getLevelNamesMapping()[level], "%s %s", prefix, message
            )

    async def _supervise(self) -> None:
        while True:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._forwarder is not None:  # its last lines first: they say why
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(self._forwarder), 2.0)
            if self.closing or not self.was_ready:  # at start: wait_ready says why
                return
            lived = time.monotonic() - self._started_at
            if lived >= STABLE_S:
                self._backoff = BACKOFF_FIRST_S
            delay = self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            log.error(
                "the %s read model's process (pid %d) exited (%s) after %.1f s; restarting "
                "it in %.1f s. Its last output: %s",
                self.name,
                self.proc.pid,
                _exit_text(code),
                lived,
                delay,
                self.output[-1] if self.output else "(none)",
            )
            # not 3.11's ``wait_for``, which can swallow the stop's cancel (bus.py)
            await bus.wait_or_timeout(self._wake, delay)
            if self.closing:
                return
            try:
                await self._spawn()
            except OSError as exc:  # no process could be made: try again later
                log.error("cannot restart the %s process: %s", self.name, exc)
                continue
            self.restarts += 1
            log.warning("the %s read model restarted (pid %d)", self.name, self.proc.pid)

    async def wait_ready(self, client: LoomClient, timeout: float = READY_S) -> None:
        """Until this child (its pid in the Pong) answers its health subject; a
        ``ReadModelFailed`` naming it, with its last output, if it exits or stays silent
        ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.proc
            assert proc is not None
            try:
                pong = await client.ping(self.name, timeout=0.5)
            except Exception:  # no responder yet: the process is still starting
                pong = None
            if pong is not None and pong.instance.endswith(f":{proc.pid}"):
                self.was_ready = True
                return
            if proc.returncode is not None and not self.closing:
                raise ReadModelFailed(
                    f"the {self.name} read model's process exited ({_exit_text(proc.returncode)})"
                    f" before it was ready; its last output: {self.last_output()}. "
                    "Fix what it says, or set LOOM_READ_MODELS=inline to run it in this process"
                )
            if time.monotonic() > deadline:
                raise ReadModelFailed(
                    f"the {self.name} read model's process (pid {proc.pid}) did not answer "
                    f"in {timeout:.0f} s; its last output: {self.last_output()}"
                )
            await asyncio.sleep(0.05)  # retry interval of a bounded readiness probe

    def last_output(self) -> str:
        return " | ".join(list(self.output)[-3:]) or "(none)"

    async def problem(self) -> str | None:
        """For the stack's ``/readyz``: None while the child runs."""
        if self.running:
            return None
        return f"the {self.name} process is down (restarting)"

    async def close(self) -> None:
        """Stop the child: SIGTERM, ``STOP_S`` to end cleanly, then SIGKILL."""
        self.closing = True
        self._wake.set()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_S)
            except TimeoutError:
                log.warning("the %s process did not stop in %.0f s: killed", self.name, STOP_S)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in (self._supervisor, self._forwarder):
            if task is not None and not task.done():
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(task, 2.0)


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"
