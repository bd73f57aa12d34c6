"""The pure quota core (loom_core.quotas): the file's shape, the token bucket's promise
and the admission book's order (priority first, then submission order; nothing lost)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom_core import quotas
from loom_core.quotas import Admission, Limits, QuotaError, Quotas, Ticket, TokenBucket


def test_the_file_parses_tenants_queues_and_the_any_tenant_default() -> None:
    q = quotas.parse({"tenants": {
        "*": {"max_concurrent_runs": 9},
        "acme": {"max_concurrent_runs": 2, "submissions_per_s": 0.5, "submission_burst": 3,
                 "tool_calls_per_s": 10, "queues": {"batch": {"max_concurrent_runs": 1}}},
    }})  # fmt: skip
    assert q.of("acme") == Limits(2, 0.5, 3, 10.0, None)
    assert q.of("globex").max_concurrent_runs == 9  # "*"
    assert q.of_queue("acme", "batch").max_concurrent_runs == 1
    assert q.of_queue("acme", "other") == Limits()
    assert q.limits_runs and not quotas.parse(None).limits_runs


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"tenant": {}}, "$"),
        ({"tenants": {"acme": {"max_concurrent_runs": 0}}}, "$.tenants.acme.max_concurrent_runs"),
        ({"tenants": {"acme": {"max_concurrent_runs": 1.5}}}, "$.tenants.acme.max_concurrent_runs"),
        ({"tenants": {"acme": {"submissions_per_s": "fast"}}}, "$.tenants.acme.submissions_per_s"),
        ({"tenants": {"acme": {"max_runs": 1}}}, "$.tenants.acme"),
        ({"tenants": {"acme": {"queues": {"a b": {}}}}}, "$.tenants.acme.queues"),
        (
            {"tenants": {"acme": {"queues": {"b": {"tool_calls_per_s": 1}}}}},
            "$.tenants.acme.queues.b",
        ),
        ({"tenants": ["acme"]}, "$.tenants"),
    ],
)
def test_a_bad_file_is_refused_naming_the_field(doc: object, path: str) -> None:
    with pytest.raises(QuotaError) as refused:
        quotas.parse(doc)
    assert refused.value.path == path
    assert refused.value.info.code == "invalid_quotas"


def test_queue_names() -> None:
    assert quotas.check_queue("") is None and quotas.check_queue("batch-1") is None
    bad = quotas.check_queue("no spaces")
    assert bad is not None and bad.path == "$.queue"


@given(
    rate=st.floats(0.1, 100),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=60),
)
def test_the_bucket_never_starts_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket, now, starts = TokenBucket(rate, burst), 0.0, []
    for gap in gaps:
        now += gap
        starts.append(now + bucket.take(now))  # when the caller may start
    first = starts[0]
    for i, start in enumerate(sorted(starts)):
        # the (i+1)-th start needs i+1 tokens: burst at the first, then rate per second
        assert i + 1 <= burst + (start - first) * rate + 1e-6


def test_a_refused_take_is_given_back() -> None:
    bucket = TokenBucket(rate=1.0, burst=1)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(1.0)
    bucket.give_back()
    assert bucket.take(1.0) == 0.0


def _book(tenant_max: int | None, queue_max: int | None = None) -> Admission:
    return Admission(Quotas(
        tenants={"t": Limits(max_concurrent_runs=tenant_max)},
        queues={("t", "q"): Limits(max_concurrent_runs=queue_max)},
    ))  # fmt: skip


def test_waiting_runs_start_by_priority_then_submission_order() -> None:
    book = _book(1)
    assert book.offer(Ticket("a", "t", "", 0, 1))
    for run_id, priority, order in (("b", 0, 2), ("c", 5, 3), ("d", 0, 4), ("e", 5, 5)):
        assert not book.offer(Ticket(run_id, "t", "", priority, order))
    started = []
    running = "a"
    while True:
        nxt = book.ended(running)
        if not nxt:
            break
        (ticket,) = nxt
        started.append(ticket.run_id)
        running = ticket.run_id
    assert started == ["c", "e", "b", "d"]
    assert not book.running and not book.waiting


def test_a_full_queue_does_not_hold_back_another_queue_of_the_tenant() -> None:
    book = _book(3, queue_max=1)
    assert book.offer(Ticket("q1", "t", "q", 0, 1))
    assert not book.offer(Ticket("q2", "t", "q", 9, 2))  # its queue is full
    assert book.offer(Ticket("x", "t", "", 0, 3))  # the tenant has room
    assert book.ended("x") == []  # q's slot is still taken
    assert [t.run_id for t in book.ended("q1")] == ["q2"]


def test_a_run_cancelled_while_it_waits_leaves_the_queue() -> None:
    book = _book(1)
    book.offer(Ticket("a", "t", "", 0, 1))
    book.offer(Ticket("b", "t", "", 0, 2))
    book.offer(Ticket("c", "t", "", 0, 3))
    assert book.ended("b") == []  # b ended (cancelled) while waiting: a still runs
    assert [t.run_id for t in book.ended("a")] == ["c"]


@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=40))
def test_nothing_is_dropped_and_the_limit_always_holds(ops: list[tuple[int, bool]]) -> None:
    book, limit = _book(2), 2
    for order, (priority, end_one) in enumerate(ops, start=1):
        if end_one and book.running:
            book.ended(next(iter(book.running)))
        run_id = f"r{order}"
        book.offer(Ticket(run_id, "t", "", priority, order))
        assert len(book.running) <= limit
        assert not (set(book.running) & set(book.waiting))
    while book.running:
        book.ended(next(iter(book.running)))
        assert len(book.running) <= limit
    assert not book.waiting  # every waiting run got its turn
