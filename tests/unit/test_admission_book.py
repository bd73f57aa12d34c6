"""The shared admission book's pure changes (``loom_core.quotas.book_*``): whatever the
interleaving of bookings and releases (each replica's change applied by compare-and-set
is one step of such a sequence), a tenant never holds more slots than its limit (nor a
queue more than its own), nobody waits while their queue has room, the waiting keep
priority-then-submission order, nothing booked is lost, and every book written survives
its own encoding and the corruption check."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom_core import codec, quotas
from loom_core.contracts import AdmissionBook, AdmissionSlot
from loom_core.quotas import Limits, QueueFull, Quotas

TENANT = "acme"
QUOTA = Quotas(
    tenants={TENANT: Limits(max_concurrent_runs=3)},
    queues={(TENANT, "batch"): Limits(max_concurrent_runs=1)},
)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.sampled_from(["", "batch"]), st.integers(0, 3)),
        st.tuples(st.just("end"), st.integers(0, 40), st.just(0)),
    ),
    max_size=60,
)


def check(book: AdmissionBook) -> None:
    assert quotas.book_problem(book, TENANT) is None
    assert codec.decode(codec.encode(book), AdmissionBook) == book
    assert len(book.running) <= 3
    assert sum(s.queue == "batch" for s in book.running) <= 1
    keys = [(-s.priority, s.order) for s in book.waiting]
    assert keys == sorted(keys)
    # nobody waits while the tenant and the run's queue both have room
    if len(book.running) < 3:
        batch_full = sum(s.queue == "batch" for s in book.running) >= 1
        assert all(s.queue == "batch" and batch_full for s in book.waiting)


@given(ops)
@settings(max_examples=200, deadline=None)
def test_any_interleaving_keeps_the_limits_the_order_and_every_run(
    steps: list[tuple[str, object, int]],
) -> None:
    book = AdmissionBook(tenant=TENANT)
    booked: list[str] = []
    gone: set[str] = set()
    for n, (kind, arg, priority) in enumerate(steps):
        if kind == "offer":
            run_id = f"r{n}"
            book, waits = quotas.book_offer(QUOTA, book, run_id, str(arg), priority, now=n)
            assert waits == (run_id in {s.run_id for s in book.waiting})
            booked.append(run_id)
        elif booked:
            run_id = booked[int(arg) % len(booked)]  # type: ignore[call-overload]
            before = {s.run_id for s in book.waiting}
            book, admitted = quotas.book_release(QUOTA, book, [run_id])
            assert set(admitted) <= before
            gone.add(run_id)
        check(book)
        held = {s.run_id for s in (*book.running, *book.waiting)}
        assert held == set(booked) - gone  # nothing lost, nothing kept after its end


def test_booking_twice_keeps_the_first_place() -> None:
    book, waits = quotas.book_offer(QUOTA, AdmissionBook(tenant=TENANT), "a", "", 0, now=1)
    again, waits_again = quotas.book_offer(QUOTA, book, "a", "", 5, now=2)
    assert again == book and waits == waits_again is False


def test_a_full_queue_refuses_typed_and_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quotas, "MAX_WAITING", 2)
    book = AdmissionBook(tenant=TENANT)
    for n in range(5):
        book, _ = quotas.book_offer(QUOTA, book, f"r{n}", "", 0, now=n)
    with pytest.raises(QueueFull) as refused:
        quotas.book_offer(QUOTA, book, "r9", "", 0, now=9)
    assert refused.value.info.code == "queue_full" and refused.value.info.retryable
    assert refused.value.info.details["waiting"] == 2


def test_repair_follows_the_store() -> None:
    book = AdmissionBook(
        tenant=TENANT,
        running=[AdmissionSlot("ended", order=1), AdmissionSlot("live", order=2)],
        waiting=[AdmissionSlot("next", order=3)],
        next_order=3,
    )
    repaired, admitted = quotas.book_repair(
        QUOTA, book, drop=["ended"], running=[("found-running", "", 0)],
        waiting=[("found-queued", "", 0)], now=7,
    )  # fmt: skip
    assert [s.run_id for s in repaired.running] == ["live", "next", "found-running"]
    assert admitted == ["next"]
    assert [s.run_id for s in repaired.waiting] == ["found-queued"]
    assert repaired.next_order == 5


@pytest.mark.parametrize(
    ("book", "why"),
    [
        (AdmissionBook(tenant="globex"), "holds tenant"),
        (AdmissionBook(tenant=TENANT, running=[AdmissionSlot("a"), AdmissionSlot("a")]), "twice"),
        (AdmissionBook(tenant=TENANT, waiting=[AdmissionSlot("a", order=9)]), "order"),
    ],
)
def test_a_book_this_code_did_not_write_is_named(book: AdmissionBook, why: str) -> None:
    problem = quotas.book_problem(book, TENANT)
    assert problem is not None and why in problem
