"""Crash test: the five services as separate OS processes on SQLite, a real nats-server,
and the executor and the tool-runner SIGKILLed again and again while runs of every step
kind are in flight.

Design note
- Kills are placed by progress, not by the clock: before each kill the test waits
  (bounded) until the LOOM_RUNS stream grew by a random number of events, and a
  tool-runner kill waits for an effect to be in flight (an open ``start`` line), so the
  kill lands mid-call. The sequence of targets and growths comes from a seeded
  ``random.Random`` (``LOOM_CRASH_SEED`` overrides the seed to explore other schedules).
- Runs arrive in waves: every plan once, then a few more before each kill. A message the
  killed process had fetched and not acked is redelivered only after its consumer's
  ack_wait (30 s today), so the runs it belonged to stall that long; the fresh runs keep
  every kill on work in progress, and that redelivery is most of the test's duration.
- A killed process is restarted at once with the same environment; the test goes on
  when the new process (its pid in the Pong) answers its health subject.
- What must hold afterwards (see ``check_*``): every run completed with the expected
  output; every run's stream is gap-free and states each fact once; the stream LOOM_RUNS
  holds each event id once; and the effects log (written by ``crash_tools``) shows each
  idempotency key ran once, or again only because the process that ran it was killed
  before its result was recorded.
- Why "or again": the tool-runner records an idempotent tool's result after the tool
  returned, so a kill between the tool's last effect and that commit makes the next
  runner run it again. No runner can close that window for a tool whose effect is not
  in the ledger's transaction; what it must never do is run a key again after its result
  was recorded. The test tells the two apart: the recorded result
  (``tool_call_completed.started_at``) must come from the last execution, and every
  earlier execution must belong to a process the test killed.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import DeliverPolicy

from loom_core import subjects
from loom_core.contracts import (
    BranchTaken,
    EventRecord,
    FinalStep,
    ForeachStarted,
    ForeachStep,
    IfStep,
    LoopIterationStarted,
    LoopStep,
    ParallelStep,
    Plan,
    PlanAccepted,
    ReduceStep,
    RetryPolicy,
    RunCompleted,
    RunRequest,
    RunRequested,
    SleepStep,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    TimerFired,
    TimerStarted,
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

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
SEED = int(os.environ.get("LOOM_CRASH_SEED", "7"))
KILLS = 8  # half executor, half tool-runner, in a seeded order
WAVE = 3  # runs submitted before each kill (every plan once before the first)
STOPPED = ("run_completed", "run_failed", "plan_rejected", "run_cancelled", "run_needs_review")


# ----------------------------------------------------------------------------- plans


def effect(sid: str, label: str, deps: tuple[str, ...] = (), ms: int = 40) -> ToolStep:
    return ToolStep(id=sid, tool="effect", input={"label": label, "ms": ms}, depends_on=list(deps))


def workload() -> dict[str, tuple[Plan, dict[str, Any], Any]]:
    """name -> (plan, input, expected output): every step kind at least once, with the
    built-in ``math`` (reduce) and ``flaky`` (retries) tools."""
    n_chain, n_items, n_reduce = 12, 24, 10
    chain = [effect("c0", "0")] + [
        effect(f"c{i}", f"{{{{ steps.c{i - 1}.output.label }}}}.{i}") for i in range(1, n_chain)
    ]
    foreach = ForeachStep(
        id="fe",
        items="{{ input.items }}",
        concurrency=4,
        do=[effect("e", "item-{{ item }}", ms=60)],
        output="{{ steps.e.output.label }}",
    )
    parallel = ParallelStep(
        id="par",
        branches={
            "left": [effect("l1", "L1"), effect("l2", "{{ steps.l1.output.label }}-L2")],
            "right": [effect("r1", "R1", ms=80)],
        },
    )
    branch = IfStep(
        id="cond",
        condition={"eq": ["{{ steps.probe.output.label }}", "big"]},
        then=[effect("yes", "then")],
        else_=[effect("no", "else")],
    )
    loop = LoopStep(
        id="lp",
        do=[effect("tick", "tick-{{ iteration }}")],
        max_iterations=10,
        until={"eq": ["{{ steps.tick.output.label }}", "tick-4"]},
    )
    reduce = ReduceStep(
        id="sum",
        items="{{ input.numbers }}",
        initial=0,
        do=[
            ToolStep(
                id="add", tool="math", input={"op": "add", "a": "{{ acc }}", "b": "{{ item }}"}
            ),
            effect("mark", "sum-{{ steps.add.output.result }}", ("add",)),
        ],
        output="{{ steps.add.output.result }}",
    )
    flaky = ToolStep(
        id="flaky",
        tool="flaky",
        input={"fail_times": 2, "value": "ok"},
        retry=RetryPolicy(max_attempts=4, initial_delay_s=0.3, multiplier=1.0),
    )
    after_flaky = effect("after", "{{ steps.flaky.output.value }}-{{ steps.flaky.output.attempt }}")
    numbers = list(range(1, n_reduce + 1))
    return {
        "chain": (Plan(steps=[*chain, FinalStep(id="out", output="{{ steps.c11.output.label }}")]),
                  {}, ".".join(str(i) for i in range(n_chain))),
        "foreach": (Plan(steps=[foreach], output="{{ steps.fe.output }}"),
                    {"items": list(range(n_items))}, [f"item-{i}" for i in range(n_items)]),
        "parallel": (Plan(steps=[parallel], output="{{ steps.par.output }}"), {},
                     {"left": {"label": "L1-L2"}, "right": {"label": "R1"}}),
        "if": (Plan(steps=[effect("probe", "big"), branch], output="{{ steps.cond.output }}"),
               {}, {"label": "then"}),
        "loop": (Plan(steps=[loop], output="{{ steps.lp.output }}"), {}, {"label": "tick-4"}),
        "reduce": (Plan(steps=[reduce], output="{{ steps.sum.output }}"),
                   {"numbers": numbers}, sum(numbers)),
        "sleep": (Plan(steps=[SleepStep(id="nap", seconds=1.5), effect("woke", "woke", ("nap",))],
                       output="{{ steps.woke.output }}"), {}, {"label": "woke"}),
        "retry": (Plan(steps=[flaky, after_flaky], output="{{ steps.after.output }}"), {},
                  {"label": "ok-3"}),
    }  # fmt: skip


# ----------------------------------------------------------------------------- processes


@dataclass
class Deployment:
    url: str
    env: dict[str, str]
    effects: Path
    services: dict[str, ServiceProcess]

    def logs(self) -> str:
        return "\n".join(s.tail() for s in self.services.values())


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    creds = ensure_credentials(tmp_path / "creds")
    server = EmbeddedNats(
        data_dir=tmp_path / "nats", port=-1, authorization=creds.authorization()
    ).start()
    asyncio.run(provision(server.url, creds.seed_file(ADMIN)))
    effects = tmp_path / "effects.log"
    effects.touch()
    pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        "LOOM_NATS_URL": server.url,
        "LOOM_STORE": "sqlite",
        "LOOM_DATA_DIR": str(tmp_path / "data"),
        "LOOM_LOG_LEVEL": "WARNING",
        "LOOM_TOOL_MODULES": "crash_tools",
        "LOOM_TEST_EFFECTS": str(effects),
        "PYTHONPATH": pythonpath,
        "LOOM_NKEY_SEED_FILE": str(creds.seed_file("operator")),  # the test's own client
    }
    services = {  # each process holds its own key only, as a Kubernetes pod does
        name: ServiceProcess(
            name, {**env, "LOOM_NKEY_SEED_FILE": str(creds.seed_file(name))}, tmp_path
        )
        for name in subjects.SERVICES
    }
    try:
        for service in services.values():
            service.start()
        yield Deployment(server.url, env, effects, services)
    finally:
        for service in services.values():
            service.stop()
        server.stop()


# ----------------------------------------------------------------------------- watching


class Watch:
    """Follows LOOM_RUNS live (an ordered consumer): how many events, which runs ended."""

    def __init__(self) -> None:
        self.count = 0
        self.ended: dict[str, str] = {}
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        self.count += 1
        _, _, run_id, kind = msg.subject.split(".", 3)
        if kind in STOPPED:
            self.ended[run_id] = kind
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait for ``condition`` (re-checked on each new event) at most ``timeout`` s."""
        return await wait_until(self._changed, condition, timeout)


def effect_in_flight(path: Path) -> bool:
    """True when some call wrote its ``start`` line and not yet its ``end``."""
    open_calls: set[tuple[str, str]] = set()
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:  # a line being appended right now is skipped
            kind, key, pid, _ = parts
            (open_calls.add if kind == "start" else open_calls.discard)((key, pid))
    return bool(open_calls)


async def until_effect_in_flight(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not effect_in_flight(path):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)  # poll a file the tool-runner appends to; bounded
    return True


# ----------------------------------------------------------------------------- checks


@dataclass
class Execution:
    """One run of one idempotency key, as the effects log tells it."""

    key: str
    pid: int
    start: float
    end: float | None = None


def read_effects(path: Path) -> dict[str, list[Execution]]:
    runs: dict[str, list[Execution]] = defaultdict(list)
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        kind, key, pid_text, at_text = line.split()
        pid, at = int(pid_text), float(at_text)
        if kind == "start":
            runs[key].append(Execution(key, pid, at))
            continue
        mine = [x for x in runs[key] if x.pid == pid and x.end is None]
        assert mine, f"effects log line {n}: 'end' of {key} by pid {pid} without a start"
        mine[-1].end = at
    return runs


def fact(event: Any) -> tuple[Any, ...] | None:
    """What one event states, as a key: a fact must be stated once per run."""
    match event:
        case StepScheduled(step_id=sid) | ForeachStarted(step_id=sid) | BranchTaken(step_id=sid):
            return (type(event).__name__, sid)
        case StepStarted(step_id=sid, attempt=n) | StepRetryScheduled(step_id=sid, attempt=n):
            return (type(event).__name__, sid, n)
        case LoopIterationStarted(step_id=sid, iteration=n):
            return ("iteration", sid, n)
        case ToolCallRequested(idempotency_key=key):
            return ("requested", key)
        case ToolCallCompleted(idempotency_key=key) | ToolCallFailed(idempotency_key=key):
            return ("outcome", key)  # one outcome per key, whichever it is
        case TimerStarted(timer_id=tid) | TimerFired(timer_id=tid):
            return (type(event).__name__, tid)
        case (
            StepCompleted(step_id=sid)
            | StepFailed(step_id=sid)
            | StepSkipped(step_id=sid)
            | StepCancelled(step_id=sid)
        ):
            return ("step_end", sid)  # one terminal event per step instance
        case RunRequested() | PlanAccepted() | RunCompleted():
            return (type(event).__name__,)
    return None


def check_run(run_id: str, records: list[EventRecord], expected: Any) -> None:
    assert [r.seq for r in records] == list(range(1, len(records) + 1)), f"{run_id}: gap"
    last = records[-1].event
    assert isinstance(last, RunCompleted), (run_id, [r.kind for r in records[-5:]], last)
    assert last.output == expected, (run_id, last.output)
    facts = Counter(f for r in records if (f := fact(r.event)) is not None)
    twice = {f: n for f, n in facts.items() if n > 1}
    assert not twice, f"{run_id}: facts stated more than once: {twice}"
    scheduled = {f[1] for f in facts if f[0] == "StepScheduled"}
    ended = {f[1] for f in facts if f[0] == "step_end"}
    assert scheduled <= ended, f"{run_id}: steps that never ended: {scheduled - ended}"
    requested = {f[1] for f in facts if f[0] == "requested"}
    answered = {f[1] for f in facts if f[0] == "outcome"}
    assert requested == answered, f"{run_id}: calls without outcome: {requested ^ answered}"


def check_effects(
    runs: dict[str, list[EventRecord]], effects: dict[str, list[Execution]], killed: set[int]
) -> list[str]:
    """The effects log against the recorded outcomes; returns the keys that legitimately
    ran twice (killed between the effect and its ledger record)."""
    outcome: dict[str, ToolCallCompleted | ToolCallFailed] = {}
    tool_of: dict[str, str] = {}
    for records in runs.values():
        for r in records:
            if isinstance(r.event, ToolCallRequested):
                tool_of[r.event.idempotency_key] = r.event.tool
            elif isinstance(r.event, ToolCallCompleted | ToolCallFailed):
                outcome[r.event.idempotency_key] = r.event
    phantom = set(effects) - set(tool_of)
    assert not phantom, f"effects of keys no run requested: {sorted(phantom)[:5]}"
    rerun: list[str] = []
    for key, tool in tool_of.items():
        if tool != "effect":  # the only tool that writes the effects log
            continue
        execs = effects.get(key, [])
        recorded = outcome[key]
        assert execs and execs[-1].end is not None, (
            f"{key}: outcome recorded ({type(recorded).__name__}) but the effect never "
            f"completed: {execs}"
        )
        pids = Counter(x.pid for x in execs)
        assert max(pids.values()) == 1, f"{key}: one process ran it twice: {execs}"
        earlier = execs[:-1]
        unkilled = [x for x in earlier if x.pid not in killed]
        assert not unkilled, f"{key}: ran again although its runner was not killed: {execs}"
        if earlier:
            # the recorded result must be the last execution's: a run after the result
            # was recorded is an effect done twice
            assert recorded.started_at is not None, (key, recorded)
            assert recorded.started_at.timestamp() > earlier[-1].start, (
                f"{key}: ran again after its result (started {recorded.started_at}) was "
                f"recorded: {execs}"
            )
            if any(x.end is not None for x in earlier):
                rerun.append(key)
    return rerun


async def read_stream_ids(client: LoomClient) -> Counter[str]:
    """Every Nats-Msg-Id held by LOOM_RUNS, read with an ordered consumer."""
    info = await client.js.stream_info(subjects.RUN_EVENTS_STREAM)
    total = info.state.messages
    ids: Counter[str] = Counter()
    sub = await client.js.subscribe(
        subjects.RUN_EVENTS_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        for _ in range(total):
            msg = await sub.next_msg(timeout=10)
            # the id is "{event id}/{content digest}": count by event id
            ids[(msg.headers or {}).get(subjects.MSG_ID, "").rsplit("/", 1)[0]] += 1
    finally:
        await sub.unsubscribe()
    return ids


# ----------------------------------------------------------------------------- the test


async def test_runs_survive_repeated_kills_of_executor_and_toolrunner(
    deployment: Deployment,
) -> None:
    rng = random.Random(SEED)
    plans = workload()
    expected: dict[str, Any] = {}
    seed = deployment.env["LOOM_NKEY_SEED_FILE"]
    async with await LoomClient.connect(deployment.url, seed=seed) as client:
        await client.wait_ready(timeout=30)
        watch = Watch()
        live = await client.js.subscribe(
            subjects.RUN_EVENTS_ALL,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            cb=watch.on_msg,
        )

        async def submit(names: list[str], wave: int) -> None:
            requests = []
            for name in names:
                plan, run_input, output = plans[name]
                run_id = f"crash-{wave}-{name}"
                expected[run_id] = output
                requests.append(RunRequest(plan=plan, input=run_input, run_id=run_id))
            await asyncio.gather(*(client.submit(r) for r in requests))

        def all_ended() -> bool:
            return len(watch.ended) == len(expected)

        await submit(list(plans), 0)
        t0 = time.monotonic()
        targets = ["executor", "toolrunner"] * (KILLS // 2)
        rng.shuffle(targets)
        kills: list[str] = []
        for wave, target in enumerate(targets, start=1):
            # Fresh runs before each kill: runs whose messages the killed process had
            # fetched wait for JetStream's redelivery (ack_wait), and the kill should
            # land on work in progress, not on a stalled system.
            await submit(rng.sample(list(plans), WAVE), wave)
            goal = watch.count + rng.randint(20, 100)
            await watch.until(lambda g=goal: watch.count >= g, timeout=3)
            if target == "toolrunner":
                await until_effect_in_flight(deployment.effects, timeout=1)
            service = deployment.services[target]
            pid = service.kill()
            kills.append(f"{target} pid {pid} at {time.monotonic() - t0:.1f}s/{watch.count} events")
            service.start()
            await service.wait_healthy(client, timeout=20.0)

        ended = await watch.until(all_ended, timeout=60)
        await live.unsubscribe()
        missing = sorted(set(expected) - set(watch.ended))
        assert ended, f"runs not ended: {missing}; kills {kills}\n{deployment.logs()}"

        runs = {run_id: await client.events(run_id) for run_id in expected}
        for run_id, records in runs.items():
            check_run(run_id, records, expected[run_id])

        killed = {pid for s in deployment.services.values() for pid in s.killed}
        rerun = check_effects(runs, read_effects(deployment.effects), killed)
        print(
            f"seed {SEED}; all ended {time.monotonic() - t0:.1f}s after submission; kills: "
            f"{kills}; ran again (killed before the record): {rerun}"
        )

        stream_ids = await read_stream_ids(client)
        dup = {i: n for i, n in stream_ids.items() if n > 1}
        assert not dup, f"LOOM_RUNS holds event ids more than once: {dup}"
        stored = {r.event_id for records in runs.values() for r in records}
        assert set(stream_ids) == stored, (
            f"LOOM_RUNS vs store: missing {sorted(stored - set(stream_ids))[:5]}, "
            f"extra {sorted(set(stream_ids) - stored)[:5]}"
        )
