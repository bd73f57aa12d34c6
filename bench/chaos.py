"""Fault injection: kill -9 the executor, the tool-runner, the planner and nats-server at
seeded random points while runs are in flight, restart each, and check what must survive.

    python bench/chaos.py                      # the full form: 50 runs x 10 steps, 4 kills each
    python bench/chaos.py --runs 10 --steps 5 --kills 1 --seed 3   # the CI form
    python bench/chaos.py --store postgres     # on PostgreSQL (pgserver wheel or system)

The stack is nats-server plus the five services as separate OS processes, each with its
own NATS key, as tests/e2e/test_processes.py runs them. Every run is a chain of counting
tools (``tests/e2e/chaos_tools.py``): ``tally`` (idempotent) and ``charge`` (not
idempotent), each appending start/end lines per idempotency key to an effects log.

Kills are placed by progress, not by the clock: runs arrive in waves, one before each
kill, and the driver waits (bounded) for a seeded number of new events on LOOM_RUNS (a
tool-runner kill also waits for a call in flight) before it kills. The killed process is
restarted at once on the same environment (nats-server on the same port, data dir and
users); the driver goes on when the new process answers its health subject.

Recovery after a kill is the time from the restarted process answering (or nats-server
ready and every service answering again) until every *affected* run stored a new event
or ended. Affected runs: for the planner, in-flight runs with no plan yet; for the
tool-runner, runs with a tool call awaiting its outcome; for the executor and
nats-server, every in-flight run. It is dominated by JetStream's redelivery of what the
killed process had fetched and not acked (``ack_wait``: 5 s, 6 s for tool calls).

Checked at the end (each failure is a violation; the exit status is 1 if any):
- every run is terminal: ``run_completed`` with the expected output, or
  ``run_needs_review`` caused by an ``ambiguous_outcome`` of a ``charge`` whose claiming
  tool-runner was killed (docs/decisions.md, "Tool-runner");
- every run's history in the store is seq 1..n and states each fact once;
- LOOM_RUNS holds, per run, seq 1..n with no gap and no duplicate, and the same event
  ids as the store;
- no ``charge`` key started twice; a ``tally`` key ran again only in place of a killed
  runner's execution and never after its result was recorded; no effect for a key no run
  requested.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js.api import ConsumerConfig, DeliverPolicy

from loom_core import codec, subjects
from loom_core.contracts import (
    EventRecord,
    FinalStep,
    Plan,
    RunCompleted,
    RunNeedsReview,
    RunRequest,
    StepCompleted,
    StepScheduled,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolStep,
)
from loom_infra.client import LoomClient
from loom_infra.credentials import ADMIN, ensure_credentials
from loom_infra.natsserver import EmbeddedNats
from loom_infra.processes import ServiceProcess, wait_until
from loom_services.runtime import provision

ROOT = Path(__file__).resolve().parents[1]
TOOLS_DIR = ROOT / "tests" / "e2e"  # chaos_tools.py
TARGETS = ("executor", "toolrunner", "planner", "nats")
ENDED = ("run_completed", "run_failed", "plan_rejected", "run_cancelled", "run_needs_review")
EXPECTED_ENDS = ("run_completed", "run_needs_review")


# ----------------------------------------------------------------------------- plans


def chain(steps: int, rng: random.Random) -> tuple[Plan, str]:
    """``steps`` counting-tool steps in a chain, every third one a ``charge``; each label
    extends the previous one, so the output proves every step ran in order."""
    tools = []
    for i in range(steps):
        label = str(i) if i == 0 else f"{{{{ steps.s{i - 1}.output.label }}}}.{i}"
        name = "charge" if i % 3 == 2 else "tally"
        deps = [f"s{i - 1}"] if i else []
        ms = rng.randint(10, 60)
        tools.append(
            ToolStep(id=f"s{i}", tool=name, input={"label": label, "ms": ms}, depends_on=deps)
        )
    final = FinalStep(id="out", output=f"{{{{ steps.s{steps - 1}.output.label }}}}")
    return Plan(steps=[*tools, final]), ".".join(str(i) for i in range(steps))


# ----------------------------------------------------------------------------- processes


# ----------------------------------------------------------------------------- watching


@dataclass
class Recovery:
    """One kill: which runs it affected and when each showed progress again."""

    target: str
    at_events: int
    killed_at: float
    affected: set[str]
    ready_at: float = 0.0
    waiting: set[str] = field(default_factory=set)
    done_at: float | None = None
    last_run: str = ""  # the affected run that progressed last: where to look first

    @property
    def down_s(self) -> float:
        return self.ready_at - self.killed_at

    @property
    def recovery_s(self) -> float | None:
        return None if self.done_at is None else max(0.0, self.done_at - self.ready_at)


class Watch:
    """Follows LOOM_RUNS live: event count, per-run state, and the open recoveries. Keyed by
    stream sequence so a re-subscription after a nats-server restart counts nothing twice."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.count = 0
        self.ended: dict[str, str] = {}
        self.planned: set[str] = set()
        self.open_calls: Counter[str] = Counter()
        self.open: list[Recovery] = []
        self._changed = asyncio.Event()
        self.sub: Any = None

    async def subscribe(self, client: LoomClient) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):  # the old one died with the server
                await self.sub.unsubscribe()
        self.sub = await client.js.subscribe(
            subjects.RUN_EVENTS_ALL,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.last_seq + 1
            ),
            cb=self.on_msg,
        )

    async def on_msg(self, msg: Any) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= self.last_seq:
            return
        self.last_seq = seq
        if msg.subject == subjects.RUN_GAP:
            return  # a filler (the relay, after nats-server lost the stream's tail)
        self.count += 1
        _, _, run_id, kind = msg.subject.split(".", 3)
        if kind in ENDED:
            self.ended[run_id] = kind
        elif kind == "plan_accepted":
            self.planned.add(run_id)
        elif kind == "tool_call_requested":
            self.open_calls[run_id] += 1
        elif kind in ("tool_call_completed", "tool_call_failed"):
            self.open_calls[run_id] -= 1
        now = time.monotonic()
        for rec in self.open:
            if rec.ready_at and run_id in rec.waiting:
                rec.waiting.discard(run_id)
                rec.last_run = run_id
            if rec.ready_at and not rec.waiting and rec.done_at is None:
                rec.done_at = now
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait for ``condition`` (re-checked on each new event) at most ``timeout`` s."""
        return await wait_until(self._changed, condition, timeout)

    def affected_by(self, target: str, submitted: set[str]) -> set[str]:
        live = submitted - set(self.ended)
        if target == "planner":
            hit = live - self.planned
        elif target == "toolrunner":
            hit = {r for r in live if self.open_calls[r] > 0}
        else:
            hit = live
        return hit or live  # nothing was waiting on it: any in-flight run progressing

    def restarted(self, rec: Recovery) -> None:
        rec.ready_at = time.monotonic()
        rec.waiting = rec.affected - set(self.ended)
        if not rec.waiting:
            rec.done_at = rec.ready_at


async def until_effect_in_flight(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        starts: set[tuple[str, str]] = set()
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5:  # a line being appended right now is skipped
                kind, _, key, pid, _ = parts
                (starts.add if kind == "start" else starts.discard)((key, pid))
        if starts:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)  # poll a file the tool-runner appends to; bounded


# ----------------------------------------------------------------------------- checks


@dataclass
class Execution:
    tool: str
    key: str
    pid: int
    start: float
    end: float | None = None


def read_effects(path: Path) -> dict[str, list[Execution]]:
    runs: dict[str, list[Execution]] = defaultdict(list)
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 5:
            continue  # cannot happen with single O_APPEND writes; never crash the report
        kind, tool, key, pid_text, at_text = parts
        pid, at = int(pid_text), float(at_text)
        if kind == "start":
            runs[key].append(Execution(tool, key, pid, at))
            continue
        mine = [x for x in runs[key] if x.pid == pid and x.end is None]
        if mine:
            mine[-1].end = at
    return runs


def check_history(run_id: str, records: list[EventRecord], expected: str) -> list[str]:
    bad: list[str] = []
    seqs = [r.seq for r in records]
    if seqs != list(range(1, len(records) + 1)):
        bad.append(f"{run_id}: store seqs are not 1..{len(records)}: {seqs[:20]}")
    if not records:
        return bad + [f"{run_id}: no events in the store"]
    last = records[-1].event
    if isinstance(last, RunCompleted):
        if last.output != expected:
            bad.append(f"{run_id}: output {last.output!r}, expected {expected!r}")
    elif not isinstance(last, RunNeedsReview):
        bad.append(f"{run_id}: not terminal or wrong end: {records[-1].kind}")
    facts: Counter[tuple[str, str]] = Counter()
    for r in records:
        match r.event:
            case StepScheduled(step_id=sid) | StepCompleted(step_id=sid):
                facts[(r.kind, sid)] += 1
            case ToolCallRequested(idempotency_key=key):
                facts[("requested", key)] += 1
            case ToolCallCompleted(idempotency_key=key) | ToolCallFailed(idempotency_key=key):
                facts[("outcome", key)] += 1
    twice = {f: n for f, n in facts.items() if n > 1}
    if twice:
        bad.append(f"{run_id}: facts stated more than once: {twice}")
    return bad


def check_effects(
    runs: dict[str, list[EventRecord]],
    effects: dict[str, list[Execution]],
    killed_runners: set[int],
) -> tuple[list[str], dict[str, int]]:
    """The effects log against the recorded outcomes (see the module doc)."""
    bad: list[str] = []
    tool_of: dict[str, str] = {}
    outcome: dict[str, ToolCallCompleted | ToolCallFailed] = {}
    for records in runs.values():
        for r in records:
            if isinstance(r.event, ToolCallRequested):
                tool_of[r.event.idempotency_key] = r.event.tool
            elif isinstance(r.event, ToolCallCompleted | ToolCallFailed):
                outcome[r.event.idempotency_key] = r.event
    phantom = set(effects) - set(tool_of)
    if phantom:
        bad.append(f"effects of keys no run requested: {sorted(phantom)[:5]}")
    stats = Counter[str]()
    for key, tool in tool_of.items():
        execs = effects.get(key, [])
        stats["executions"] += len(execs)
        stats[f"{tool}_executions"] += len(execs)
        recorded = outcome.get(key)
        if recorded is None:
            continue  # the run needs review before this call's outcome: nothing to hold
        if isinstance(recorded, ToolCallFailed):
            if recorded.error.code != "ambiguous_outcome" or tool != "charge":
                bad.append(f"{key}: failed {recorded.error.code}: {recorded.error.message}")
                continue
            stats["ambiguous"] += 1
            owner = str((recorded.error.details or {}).get("owner", ""))
            pid = int(owner.split(":")[1]) if owner.count(":") >= 2 else -1
            if pid not in killed_runners:
                bad.append(f"{key}: ambiguous, but its claimant {owner!r} was never killed")
            if len(execs) > 1:
                bad.append(f"{key}: non-idempotent effect ran {len(execs)} times: {execs}")
            continue
        if not execs or execs[-1].end is None:
            bad.append(f"{key}: result recorded but the effect never completed: {execs}")
            continue
        if tool == "charge":
            if len(execs) > 1:
                bad.append(f"{key}: non-idempotent effect ran {len(execs)} times: {execs}")
            continue
        earlier = execs[:-1]
        if any(x.pid not in killed_runners for x in earlier):
            bad.append(f"{key}: ran again although its runner was not killed: {execs}")
        if earlier:
            stats["tally_reruns"] += 1
            started = recorded.started_at.timestamp() if recorded.started_at else 0.0
            if started <= earlier[-1].start:
                bad.append(f"{key}: ran again after its result was recorded: {execs}")
    return bad, dict(stats)


async def check_stream(
    client: LoomClient, runs: dict[str, list[EventRecord]]
) -> tuple[list[str], int]:
    """LOOM_RUNS, read whole: per run seq 1..n, no gap, no duplicate, same ids as the store."""
    info = await client.js.stream_info(subjects.RUN_EVENTS_STREAM)
    total = info.state.messages
    per_run: dict[str, list[EventRecord]] = defaultdict(list)
    sub = await client.js.subscribe(
        subjects.RUN_EVENTS_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        for _ in range(total):
            msg = await sub.next_msg(timeout=10)
            if msg.subject == subjects.RUN_GAP:
                continue  # a filler: takes up a sequence number only
            record = codec.decode_event(msg.data)
            per_run[record.run_id].append(record)
    finally:
        await sub.unsubscribe()
    bad: list[str] = []
    for run_id, stored in runs.items():
        seen = per_run.get(run_id, [])
        seqs = [r.seq for r in seen]
        if sorted(seqs) != list(range(1, len(stored) + 1)):
            dup = [s for s, n in Counter(seqs).items() if n > 1]
            missing = sorted(set(range(1, len(stored) + 1)) - set(seqs))
            bad.append(f"{run_id}: LOOM_RUNS duplicates {dup[:10]}, missing {missing[:10]}")
        elif {r.event_id for r in seen} != {r.event_id for r in stored}:
            bad.append(f"{run_id}: LOOM_RUNS event ids differ from the store's")
    return bad, total


# ----------------------------------------------------------------------------- driver


@dataclass
class Config:
    runs: int = 50
    steps: int = 10
    kills: int = 4  # of each target
    seed: int = 1
    store: str = "sqlite"
    base: Path | None = None
    end_timeout: float = 180.0


@dataclass
class Report:
    config: Config
    recoveries: list[Recovery]
    ends: Counter[str]
    effects: dict[str, int]
    events: int
    elapsed: float
    violations: list[str]

    def text(self) -> str:
        c = self.config
        lines = [
            f"chaos: {c.runs} runs x {c.steps} steps on {c.store}, seed {c.seed}, "
            f"{len(self.recoveries)} kills, {self.elapsed:.1f}s",
            f"runs: {dict(self.ends)}; LOOM_RUNS events: {self.events}",
            "effects: " + ", ".join(f"{k} {v}" for k, v in sorted(self.effects.items())),
        ]
        for target in TARGETS:
            recs = [r for r in self.recoveries if r.target == target]
            if recs:
                lines.append(f"  {target:<10} {_summary(recs)}")
        lines.append(f"  {'all':<10} {_summary(self.recoveries)}")
        lines.append("kills (target @events: down s, recovery s, affected runs):")
        lines.extend(
            f"  {r.target:<10} @{r.at_events:<5} down {r.down_s:5.2f}  recovery "
            + (f"{r.recovery_s:5.2f}" if r.recovery_s is not None else "  n/a")
            + f"  affected {len(r.affected)}"
            + (f" (last: {r.last_run})" if r.last_run else "")
            for r in self.recoveries
        )
        verdict = "OK" if not self.violations else f"{len(self.violations)} VIOLATIONS"
        lines.append(f"result: {verdict}")
        lines.extend(f"  ! {v}" for v in self.violations[:50])
        return "\n".join(lines)


def _summary(recs: list[Recovery]) -> str:
    rec = [r.recovery_s for r in recs if r.recovery_s is not None]
    down = [r.down_s for r in recs]
    unrecovered = len(recs) - len(rec)
    text = f"kills {len(recs)}  down p50 {statistics.median(down):.2f}s max {max(down):.2f}s"
    if rec:
        text += f"  recovery p50 {statistics.median(rec):.2f}s max {max(rec):.2f}s"
    if unrecovered:
        text += f"  never recovered {unrecovered}"
    return text


async def chaos(cfg: Config) -> Report:
    base = cfg.base or Path(tempfile.mkdtemp(prefix="loom-chaos-"))
    stop_pg: Callable[[], None] | None = None
    env = {**os.environ, "LOOM_STORE": cfg.store, "LOOM_DATA_DIR": str(base / "data")}
    if cfg.store == "postgres":
        from loom_infra.localpg import start_local_postgres

        url, stop_pg = start_local_postgres(base / "pg")
        env["LOOM_POSTGRES_URL"] = url
    creds = ensure_credentials(base / "creds")
    server = EmbeddedNats(data_dir=base / "nats", port=-1, authorization=creds.authorization())
    server.start()
    effects = base / "effects.log"
    effects.touch()
    pythonpath = os.pathsep.join(p for p in (str(TOOLS_DIR), os.environ.get("PYTHONPATH")) if p)
    env |= {
        "LOOM_NATS_URL": server.url,
        "LOOM_LOG_LEVEL": "WARNING",
        "LOOM_TOOL_MODULES": "chaos_tools",
        "LOOM_CHAOS_EFFECTS": str(effects),
        "PYTHONPATH": pythonpath,
    }
    services = {  # each process holds its own key only, as a Kubernetes pod does
        name: ServiceProcess(name, {**env, "LOOM_NKEY_SEED_FILE": str(creds.seed_file(name))}, base)
        for name in subjects.SERVICES
    }
    try:
        await provision(server.url, creds.seed_file(ADMIN))
        for service in services.values():
            service.start()
        return await _drive(cfg, server, services, effects, creds.seed_file("operator"))
    finally:
        for service in services.values():
            service.stop()
        server.stop()
        if stop_pg is not None:
            stop_pg()


async def _drive(
    cfg: Config,
    server: EmbeddedNats,
    services: dict[str, ServiceProcess],
    effects: Path,
    seed: Path,
) -> Report:
    rng = random.Random(cfg.seed)
    schedule = [t for t in TARGETS for _ in range(cfg.kills)]
    rng.shuffle(schedule)
    # one wave before each kill and the rest after the last, so each kill meets fresh work
    waves = [list(range(cfg.runs))[i :: len(schedule) + 1] for i in range(len(schedule) + 1)]
    expected: dict[str, str] = {}
    violations: list[str] = []
    recoveries: list[Recovery] = []
    async with await LoomClient.connect(server.url, persistent=True, seed=seed) as client:
        await client.wait_ready(timeout=60)
        watch = Watch()
        await watch.subscribe(client)
        t0 = time.monotonic()

        async def submit(indexes: list[int]) -> None:
            requests = []
            for i in indexes:
                plan, output = chain(cfg.steps, rng)
                run_id = f"chaos-{cfg.seed}-{i}"
                expected[run_id] = output
                requests.append(RunRequest(plan=plan, run_id=run_id))
            await asyncio.gather(*(client.submit(r) for r in requests))

        for wave, target in zip(waves, schedule, strict=False):
            await submit(wave)
            # the planner is busy right after a submission; the others a little later
            grow = rng.randint(0, 3) if target == "planner" else rng.randint(5, 10 * cfg.steps)
            goal = watch.count + grow
            await watch.until(lambda g=goal: watch.count >= g, timeout=5)
            if target == "toolrunner":
                await until_effect_in_flight(effects, timeout=2)
            rec = Recovery(target, watch.count, 0.0, watch.affected_by(target, set(expected)))
            if target == "nats":
                rec.killed_at = time.monotonic()
                server.kill()
                await asyncio.to_thread(server.start)
                await _until_connected(client)
                await watch.subscribe(client)
                await client.wait_ready(timeout=60)
            else:
                service = services[target]
                rec.killed_at = time.monotonic()
                service.kill()
                service.start()
                await service.wait_healthy(client, timeout=30.0)
            watch.open.append(rec)
            watch.restarted(rec)
            recoveries.append(rec)
            # the next kill waits for this one's recovery, so each is measured alone
            await watch.until(lambda r=rec: r.done_at is not None, timeout=30)
        await submit(waves[-1])

        all_ended = await watch.until(lambda: set(expected) <= set(watch.ended), cfg.end_timeout)
        elapsed = time.monotonic() - t0
        if not all_ended:
            stuck = sorted(set(expected) - set(watch.ended))
            violations.append(
                f"{len(stuck)} runs not terminal after {cfg.end_timeout}s: {stuck[:10]}"
            )
            violations.extend(s.tail() for s in services.values())
        runs = {run_id: await client.events(run_id, timeout=30) for run_id in expected}
        ends = Counter(records[-1].kind if records else "none" for records in runs.values())
        for run_id, records in runs.items():
            violations.extend(check_history(run_id, records, expected[run_id]))
            if records and records[-1].kind not in EXPECTED_ENDS:
                violations.append(f"{run_id}: ended {records[-1].kind}")
        killed = set(services["toolrunner"].killed)
        bad, stats = check_effects(runs, read_effects(effects), killed)
        violations.extend(bad)
        bad, total = await check_stream(client, runs)
        violations.extend(bad)
        await watch.sub.unsubscribe()
    return Report(cfg, recoveries, ends, stats, total, elapsed, violations)


async def _until_connected(client: LoomClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not client.nc.is_connected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"client not reconnected to nats-server in {timeout}s")
        await asyncio.sleep(0.02)  # poll the client's reconnect loop; bounded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kills", type=int, default=4, help="kills of each target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    args = parser.parse_args()
    cfg = Config(args.runs, args.steps, args.kills, args.seed, args.store)
    cfg.base = Path(tempfile.mkdtemp(prefix="loom-chaos-"))
    report = asyncio.run(chaos(cfg))
    print(report.text())
    if report.violations or args.keep:
        print(f"logs, effects log and data kept in {cfg.base}")
    else:
        shutil.rmtree(cfg.base, ignore_errors=True)
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
