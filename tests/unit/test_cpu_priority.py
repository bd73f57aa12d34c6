"""The read model's CPU policy (loom_infra.cpu_priority): when the embedded stack may
start tracing under SCHED_IDLE, and when the tracing service leaves and re-enters it.
The switch itself is recorded here; tests/integration/test_sched_idle_switch.py makes it."""

from __future__ import annotations

import logging
import resource

import pytest
from nats.aio.msg import Msg

from loom_infra import bus
from loom_infra.cpu_priority import IdleWhileCaughtUp, may_leave_idle

SYS_NICE = 1 << 23


@pytest.mark.parametrize(
    ("nice", "caps", "limit", "allowed"),
    [
        (10, SYS_NICE, 0, True),  # CAP_SYS_NICE: always
        (10, SYS_NICE | 0xFF, 0, True),
        (10, 0xFF, 0, False),  # the common default: RLIMIT_NICE 0, no capability
        (10, 0, 10, True),  # 20 - 10 <= 10
        (10, 0, 9, False),
        (19, 0, 1, True),
        (0, 0, 19, False),  # nice 0 needs 20
        (0, 0, resource.RLIM_INFINITY, True),
    ],
)
def test_may_leave_idle_only_with_the_privilege_to(
    nice: int, caps: int, limit: int, allowed: bool
) -> None:
    assert may_leave_idle(nice, lambda: caps, lambda: limit) is allowed


def test_it_goes_normal_while_behind_and_idle_once_caught_up() -> None:
    switched: list[bool] = []
    priority = IdleWhileCaughtUp(256, managed=True, switch=switched.append)
    assert priority.idle
    for pending in (0, 10, 255):  # caught up: already idle, nothing to do
        priority.saw(pending)
    assert switched == []
    priority.saw(256)  # a batch's worth waiting: behind
    priority.saw(4000)
    assert switched == [False] and not priority.idle
    priority.saw(0)
    assert switched == [False, True] and priority.idle
    assert priority.switches == 2


def test_old_events_mean_behind_even_when_few_wait() -> None:
    """A machine kept busy by other programs: few events, but they waited; the idle
    process got a slice at last and must not go back to waiting for idle cores."""
    switched: list[bool] = []
    priority = IdleWhileCaughtUp(256, managed=True, switch=switched.append, late_s=1.0)
    priority.saw(3, age_s=0.2)
    assert switched == []
    priority.saw(3, age_s=1.0)
    assert switched == [False]
    priority.saw(0, age_s=0.05)
    assert switched == [False, True]


def test_a_process_not_started_idle_is_left_alone() -> None:
    switched: list[bool] = []
    priority = IdleWhileCaughtUp(256, managed=False, switch=switched.append)
    for pending in (10_000, 0, 10_000):
        priority.saw(pending)
    assert switched == [] and not priority.idle


def test_a_refused_switch_stops_managing_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[bool] = []

    def refuse(idle: bool) -> None:
        calls.append(idle)
        raise PermissionError(1, "Operation not permitted")

    priority = IdleWhileCaughtUp(256, managed=True, switch=refuse)
    with caplog.at_level(logging.WARNING, "loom.cpu_priority"):
        priority.saw(1000)
        priority.saw(0)
        priority.saw(1000)
    assert calls == [False]  # tried once, then left as the kernel keeps it
    assert not priority.managed
    assert "keeps its CPU policy" in caplog.text


@pytest.mark.parametrize(
    ("reply", "pending"),
    [
        ("$JS.ACK.RUNS.tracing-fold.1.812.790.1733400000000000000.37", 37),  # v1
        ("$JS.ACK._.ACCHASH.RUNS.tracing-fold.1.812.790.1733400000000000000.0.xyz", 0),  # v2
        ("$JS.ACK._.ACCHASH.RUNS.tracing-fold.1.812.790.1733400000000000000.912.xyz", 912),
        ("_INBOX.abc", 0),  # not a JetStream delivery
        ("$JS.ACK.RUNS.tracing-fold.1.812.790.1733400000000000000.x", 0),  # damaged
        ("", 0),
    ],
)
def test_the_pending_count_is_read_from_the_reply_subject(reply: str, pending: int) -> None:
    assert bus.num_pending(Msg(_client=None, subject="loom.run.x", reply=reply)) == pending  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reply", "stored"),
    [
        ("$JS.ACK.RUNS.tracing-fold.1.812.790.1733400000000000000.37", 1733400000000000000),
        ("$JS.ACK._.ACCHASH.RUNS.tracing-fold.1.812.790.1733400000000000001.0.xyz",
         1733400000000000001),
        ("_INBOX.abc", 0),
        ("$JS.ACK.RUNS.tracing-fold.1.812.790.soon.37", 0),
    ],
)  # fmt: skip
def test_the_store_time_is_read_from_the_reply_subject(reply: str, stored: int) -> None:
    assert bus.stored_at_ns(Msg(_client=None, subject="loom.run.x", reply=reply)) == stored  # type: ignore[arg-type]
