"""Where a step's cost goes: CPU per process, and counts of the operations on a step's
path (NATS publishes by kind, JetStream acks, event decodes, store transactions,
fsyncs), all divided by the steps measured. Used by ``bench/steps.py`` (``--breakdown``)
so that each change's saving is a number, not a guess, on a shared and noisy machine:
CPU seconds per step do not depend on what the other cores are doing nearly as much as
wall time does, and with many runs one core is the ceiling (1000 / CPU-ms-per-step is
the throughput one process can reach).

Counting wraps library functions in this process (the bench runs the whole stack in
one process); it adds a little CPU itself, so the CPU figures are taken in a pass
without counting. fsyncs are counted with ``strace -c`` attached to the nats-server
(and PostgreSQL) processes when strace is installed; SQLite runs in this process, so
its commits are counted as store transactions instead (one fsync each with WAL and
``synchronous=FULL``).
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` so far, 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def helper_processes() -> dict[str, list[int]]:
    """This process's descendants by name: nats-server, postgres (pgserver's server and
    its backends), runner (a tool-runner in its own process), tracing and memory (the
    read models in their own processes, LOOM_READ_MODELS=process), embedder (the memory
    service's MiniLM child, apart: its CPU is not the runner's nor memory's)."""
    tree = _children()
    found: dict[str, list[int]] = {}
    todo = list(tree.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        name = _comm(pid)
        key = "nats" if "nats" in name else "postgres" if "postgres" in name else name
        if key.startswith("python"):  # --runner-process, the read models, the embedder
            key = _python_role(_cmdline(pid))
        found.setdefault(key, []).append(pid)
    return found


def _python_role(cmdline: str) -> str:
    if "embedworker" in cmdline:
        return "embedder"
    for name in ("tracing", "memory"):
        if f"loom_services.{name}" in cmdline:
            return name
    return "runner"


HELPERS = ("nats", "postgres", "runner", "tracing", "memory", "embedder")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _waited(pid: int) -> float:
    """Seconds ``pid``'s threads have spent runnable but waiting for a core (the second
    field of each thread's ``schedstat``), 0 if it is gone."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def _machine_busy() -> float:
    """CPU seconds every core has spent busy so far (``/proc/stat``: all but idle and
    iowait), whichever process ran: PostgreSQL's server is not this process's child."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS


class CpuMeter:
    """CPU seconds of this process and of its helpers between ``start`` and ``stop``;
    also, in ``waits`` after ``stop``, how long each waited for a core and how busy the
    whole machine was (``format_waits``): on 2 cores a sequential run keeps most of both
    busy, and a step's slow tail is its processes queueing for a core."""

    def start(self) -> None:
        self.helpers = helper_processes()
        self.t0 = time.process_time()
        self.w0 = time.perf_counter()
        self.h0 = {k: sum(_proc_cpu(p) for p in pids) for k, pids in self.helpers.items()}
        self.q0 = {k: sum(_waited(p) for p in pids) for k, pids in self.helpers.items()}
        self.q0["python"] = _waited(os.getpid())
        self.b0 = _machine_busy()
        self.waits: dict[str, float] = {}

    def stop(self) -> dict[str, float]:
        cpu = {"python": time.process_time() - self.t0, "wall": time.perf_counter() - self.w0}
        self.waits = {"python": _waited(os.getpid()) - self.q0["python"]}
        # helpers started since (a PostgreSQL backend) count from zero
        now = helper_processes()
        for key, pids in now.items():
            if key in HELPERS:
                cpu[key] = sum(_proc_cpu(p) for p in pids) - self.h0.get(key, 0.0)
                self.waits[key] = sum(_waited(p) for p in pids) - self.q0.get(key, 0.0)
        self.waits["machine busy"] = _machine_busy() - self.b0
        self.waits["wall"] = cpu["wall"]
        return cpu


def format_waits(waits: dict[str, float], steps: int) -> str:
    """ "waited for a core, ms/step: python 0.25 nats 0.72 ...; machine busy 1.64 of 2
    cores" (empty when nothing was measured)."""
    if "wall" not in waits:
        return ""
    parts = [f"{k} {v * 1000 / steps:.3f}" for k, v in waits.items() if v and k not in
             ("wall", "machine busy")]  # fmt: skip
    busy = waits["machine busy"] / (waits["wall"] or 1e-9)
    return (
        "waited for a core, ms/step: " + "  ".join(parts)
        + f"; machine busy {busy:.2f} of {os.cpu_count()} cores"
    )  # fmt: skip


def format_cpu(cpu: dict[str, float], steps: int) -> str:
    parts = [f"wall {cpu['wall'] * 1000 / steps:.3f}"]
    parts += [f"{k} {v * 1000 / steps:.3f}" for k, v in cpu.items() if k != "wall"]
    return "ms/step: " + "  ".join(parts)


# ---------------------------------------------------------------------- counting


class Counts:
    def __init__(self) -> None:
        self.counter: Counter[str] = Counter()
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, label: str | Callable[..., str]) -> None:
        original = getattr(owner, name)

        if callable(label):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.counter[label(*args, **kwargs)] += 1
                return original(*args, **kwargs)
        else:

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.counter[label] += 1
                return original(*args, **kwargs)

        setattr(owner, name, counted)
        self._undo.append(lambda: setattr(owner, name, original))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _publish_kind(_nc: Any, subject: str, payload: bytes = b"", reply: str = "", **_: Any) -> str:
    if subject.startswith("$JS.ACK"):
        token = bytes(payload[:4])
        kind = {b"": "ack", b"+ACK": "ack", b"+WPI": "in_progress", b"-NAK": "nak", b"+TER": "term"}
        return "nats ack: " + kind.get(token, "other")
    if subject.startswith("$JS.API.CONSUMER.MSG.NEXT"):
        return "nats fetch"
    if subject.startswith("$JS.API"):
        return "nats api"
    js = "jetstream" if reply.startswith("_INBOX") or reply.startswith("$") else "core"
    family = ".".join(subject.split(".")[:2])
    if subject.startswith("loom.run."):
        family += "." + subject.rsplit(".", 1)[-1]  # the event kind
    return f"nats publish ({js}) {family}"


def _pipe_kinds(counter: Counter[str]) -> Callable[..., str]:
    """The label of a pipe's batch; each of its messages counted as a publish too."""

    def label(_pipe: Any, messages: Any) -> str:
        for subject, *_ in messages:
            counter[_publish_kind(None, subject, reply="_INBOX")] += 1
        return "nats publish batches (relay)"

    return label


@contextlib.contextmanager
def counting() -> Iterator[Counts]:
    """Count publishes (by kind and subject family), acks, decodes, store calls."""
    from nats.aio.client import Client

    from loom_core import codec
    from loom_infra import store
    from loom_infra.publish_pipe import PublishPipe

    counts = Counts()
    counts.wrap(Client, "publish", _publish_kind)
    # the relay writes its batches past Client.publish (loom_infra.publish_pipe)
    counts.wrap(PublishPipe, "send", _pipe_kinds(counts.counter))
    for name in ("decode_event", "decode_inbox", "decode"):
        counts.wrap(codec, name, f"codec.{name}")
    counts.wrap(codec, "encode", "codec.encode")
    for cls, names in (
        (store.EventStore, ("append", "load", "read_notifications", "set_position")),
        (store.ToolCallLedger, ("get", "claim", "finish", "record")),
        (store.SnapshotStore, ("save", "latest")),
    ):
        for name in names:
            counts.wrap(cls, name, f"store {cls.__name__}.{name}")
    try:
        yield counts
    finally:
        counts.undo()


def format_counts(counter: Counter[str], steps: int) -> str:
    lines = [f"  {count / steps:8.2f}  {label}" for label, count in sorted(counter.items())]
    return "per step:\n" + "\n".join(lines)


# ---------------------------------------------------------------------- fsyncs


class FsyncCounter:
    """``strace -c -f -e fsync,fdatasync`` on the helper processes (nats-server,
    PostgreSQL); empty when strace is not installed or may not attach."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[str]]] = []

    def start(self) -> None:
        if shutil.which("strace") is None:
            return
        for key, pids in helper_processes().items():
            if key not in ("nats", "postgres"):
                continue
            args = ["strace", "-c", "-f", "-e", "trace=fsync,fdatasync,sync_file_range"]
            for pid in pids:
                args += ["-p", str(pid)]
            proc = subprocess.Popen(
                args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
            )
            self.procs.append((key, proc))
        time.sleep(0.3)  # strace attaches asynchronously; a measurement needs it attached

    def stop(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for key, proc in self.procs:
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                continue
            for line in err.splitlines():
                m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
                if m and m.group(2) != "total":
                    found[f"fsync {key} {m.group(2)}"] = int(m.group(1))
        return found


# ---------------------------------------------------------------------- profile


@contextlib.contextmanager
def profiling(top: int = 45) -> Iterator[io.StringIO]:
    """cProfile of this process (every service's code; not nats-server or PostgreSQL)."""
    out = io.StringIO()
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield out
    finally:
        profiler.disable()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats(os.environ.get("LOOM_PROFILE_SORT", "tottime")).print_stats(top)
