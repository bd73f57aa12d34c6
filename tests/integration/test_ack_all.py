"""A pull consumer that settles each batch with one cumulative ack (``ack_all``), on a
real nats-server: the acks are counted on the wire (a plain subscription on the
consumer's ack subjects sees every ack, nak and term the consumer sends), the consumer's
ack floor read from JetStream. And a durable taking over from another one
(``replaces``): it starts right after the old one's ack floor, and the old one is gone.

Synchronisation: on JetStream's consumer state or on what the handler saw, polled
within a bound (tests/integration/waiting.py); never on a fixed sleep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from tests.integration.waiting import eventually

from loom_core import codec, subjects
from loom_core.contracts import DeadLetter, ErrorInfo
from loom_infra import bus

pytestmark = pytest.mark.integration

STREAM = subjects.RUN_EVENTS_STREAM


class Wire:
    """Every ack-subject message a consumer sends (``$JS.ACK.<stream>.<durable>.>``):
    (kind, stream seq), kind one of ack, nak, term, wpi."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    async def on(self, msg: Msg) -> None:
        kind = msg.data.split(b" ", 1)[0].decode().lstrip("+-").lower() or "ack"  # b"": ack
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
        self.sent.append((kind, int(msg.subject.split(".")[5])))

    def of(self, kind: str) -> list[int]:
        return [seq for k, seq in self.sent if k == kind]


async def publish(js: Any, run: str, n: int) -> list[int]:
    """``n`` run events of run ``run``; their stream sequences."""
    seqs = []
    for i in range(n):
        ack = await js.publish(f"loom.run.{run}.e", codec.encode({"n": i}))
        seqs.append(ack.seq)
    return seqs


async def wire_of(nc: Any, durable: str) -> Wire:
    wire = Wire()
    await nc.subscribe(f"$JS.ACK.{STREAM}.{durable}.>", cb=wire.on)
    return wire


async def consuming(consumer: bus.PullConsumer, check: Callable[[], bool], what: str) -> None:
    """Run ``consumer`` until ``check`` holds (bounded), then stop it."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(consumer.run(stop))
    try:
        await eventually(check, what, bound_s=15.0)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10.0)


async def floor_and_pending(js: Any, durable: str) -> tuple[int, int]:
    info = await js.consumer_info(STREAM, durable)
    return info.ack_floor.stream_seq, info.num_ack_pending


async def _at(js: Any, durable: str, seq: int) -> bool:
    return await floor_and_pending(js, durable) == (seq, 0)


def seq_of(msg: Msg) -> int:
    return msg.metadata.sequence.stream


async def test_a_batch_is_settled_by_one_ack(nc: Any) -> None:
    js = nc.jetstream()
    seqs = await publish(js, "one", 40)
    wire = await wire_of(nc, "aa")
    batches: list[list[int]] = []

    async def handle(msgs: Sequence[Msg]) -> list[bool | BaseException]:
        batches.append([seq_of(m) for m in msgs])
        return [True] * len(msgs)

    consumer = bus.PullConsumer(
        js=js, service="test", stream=STREAM, durable="aa", filter_subjects=["loom.run.one.>"],
        handler=handle, batch=64, ack_all=True,
    )  # fmt: skip
    await consuming(consumer, lambda: len(wire.of("ack")) == len(batches) and
                    sum(map(len, batches)) == 40, "every message handled and acked")  # fmt: skip
    await eventually(lambda: _at(js, "aa", seqs[-1]), "acked to the end, nothing pending")
    info = await js.consumer_info(STREAM, "aa")
    assert info.config.ack_policy == AckPolicy.ALL
    assert len(batches) < 40  # batched (the stored messages come in one or two fetches)
    # one ack per batch, of its last message; nothing else was sent
    assert wire.of("ack") == [b[-1] for b in batches]
    assert [k for k, _ in wire.sent] == ["ack"] * len(batches)
    assert consumer._acks is not None and consumer._acks.acked == wire.of("ack")


async def test_a_poison_message_in_the_middle_is_dead_lettered_and_the_batch_advances(
    nc: Any,
) -> None:
    js = nc.jetstream()
    seqs = await publish(js, "poison", 7)
    bad = seqs[3]
    wire = await wire_of(nc, "ap")
    seen: list[int] = []

    async def handle(msgs: Sequence[Msg]) -> list[bool | BaseException]:
        seen.extend(seq_of(m) for m in msgs)
        return [
            bus.Poison(ErrorInfo(code="bad_event", message="never folds"))
            if seq_of(m) == bad else True
            for m in msgs
        ]  # fmt: skip

    consumer = bus.PullConsumer(
        js=js, service="acktest", stream=STREAM, durable="ap",
        filter_subjects=["loom.run.poison.>"], handler=handle, batch=64, ack_all=True,
    )  # fmt: skip
    await consuming(consumer, lambda: wire.of("ack") and wire.of("ack")[-1] == seqs[-1],
                    "acked up to the last message")  # fmt: skip
    await eventually(lambda: _at(js, "ap", seqs[-1]), "acked to the end, nothing pending")
    assert sorted(seen) == seqs  # each handled once: the poison one is not delivered again
    assert not wire.of("term") and not wire.of("nak")  # a term would ack what is before it
    letter = await js.get_last_msg(subjects.DLQ_STREAM, subjects.dead_letter("acktest"))
    dead = msgspec.json.decode(letter.data, type=DeadLetter)
    assert dead.error.code == "bad_event" and dead.origin_subject == "loom.run.poison.e"
    dlq = await js.stream_info(subjects.DLQ_STREAM)
    assert dlq.state.messages == 1


# back before the others' ack wait ends (nothing delivered again but it), and after it
# (the others come back meanwhile, maybe more than once, and are settled unhandled)
@pytest.mark.parametrize(("later_s", "ack_wait_s"), [(0.3, 1.0), (1.2, 0.3)])
async def test_a_message_put_back_holds_the_ack_below_it_and_nothing_after_it_is_lost(
    nc: Any, later_s: float, ack_wait_s: float
) -> None:
    js = nc.jetstream()
    seqs = await publish(js, "later", 6)
    held, bad = seqs[2], seqs[4]
    wire = await wire_of(nc, "al")
    handled: list[int] = []
    first_batch = asyncio.Event()
    acked_before: list[int] = []  # what was acked when the put-back message came back

    async def handle(msgs: Sequence[Msg]) -> list[bool | BaseException]:
        handled.extend(seq_of(m) for m in msgs)
        first_batch.set()
        out: list[bool | BaseException] = []
        for m in msgs:
            if seq_of(m) == held and m.metadata.num_delivered > 1:
                assert consumer._acks is not None
                acked_before.extend(consumer._acks.acked)
            if seq_of(m) == held and m.metadata.num_delivered == 1:
                out.append(bus.Later(later_s))  # wanted again, once
            elif seq_of(m) == bad:
                out.append(bus.Poison(ErrorInfo(code="bad_event", message="never folds")))
            else:
                out.append(True)
        return out

    consumer = bus.PullConsumer(
        js=js, service="acklater", stream=STREAM, durable="al",
        filter_subjects=["loom.run.later.>"], handler=handle, batch=64, ack_all=True,
        ack_wait_s=ack_wait_s,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.ensure_future(consumer.run(stop))
    try:
        await eventually(first_batch.is_set, "the first batch handled", bound_s=10.0)
        # published while the put-back message is out: handled, not acked past it
        more = await publish(js, "later", 3)
        await eventually(lambda: wire.of("ack") and wire.of("ack")[-1] == more[-1],
                         "acked up to the last message", bound_s=15.0)  # fmt: skip
    finally:
        stop.set()
        await asyncio.wait_for(task, 10.0)
    assert wire.of("nak") == [held]
    # while it was out, nothing was acked past it: up to just before it
    assert acked_before and max(acked_before) == held - 1
    assert handled.count(held) == 2
    # everything else handled exactly once: those after the put-back message were kept
    # as settled (not handled again if their ack wait ran out meanwhile)
    assert sorted(set(handled)) == seqs + more
    assert all(handled.count(s) == 1 for s in seqs + more if s != held)
    await eventually(lambda: _at(js, "al", more[-1]), "acked to the end, nothing pending")
    dlq = await js.stream_info(subjects.DLQ_STREAM)
    assert dlq.state.messages == 1  # the poison one after it: dead-lettered once


async def test_a_durable_takes_over_after_the_old_ones_ack_floor_and_deletes_it(
    nc: Any,
) -> None:
    js = nc.jetstream()
    seqs = await publish(js, "move", 8)
    # the old durable (explicit acks) acked the first five, and one above its floor
    await js.add_consumer(STREAM, ConsumerConfig(
        durable_name="old", ack_policy=AckPolicy.EXPLICIT, filter_subject="loom.run.move.>",
    ))  # fmt: skip
    old = await js.pull_subscribe_bind("old", STREAM)
    got = await old.fetch(7, timeout=5.0)
    while len(got) < 7:
        got += await old.fetch(7 - len(got), timeout=5.0)
    for msg in got[:5] + [got[6]]:
        await msg.ack_sync()
    assert (await js.consumer_info(STREAM, "old")).ack_floor.stream_seq == seqs[4]
    handled: list[int] = []

    async def handle(msgs: Sequence[Msg]) -> list[bool | BaseException]:
        handled.extend(seq_of(m) for m in msgs)
        return [True] * len(msgs)

    def consumer() -> bus.PullConsumer:
        return bus.PullConsumer(
            js=js, service="test", stream=STREAM, durable="new",
            filter_subjects=["loom.run.move.>"], handler=handle, batch=64, ack_all=True,
            replaces="old",
        )  # fmt: skip

    await consuming(consumer(), lambda: sorted(handled) == seqs[5:], "the rest handled")
    # nothing the old one's floor covered; the one it acked above its floor once more
    # (the handler is idempotent: tracing skips a seq it folded)
    assert sorted(handled) == seqs[5:]
    with pytest.raises(NotFoundError):
        await js.consumer_info(STREAM, "old")
    info = await js.consumer_info(STREAM, "new")
    assert info.config.deliver_policy == DeliverPolicy.BY_START_SEQUENCE
    assert info.config.opt_start_seq == seqs[5]
    await eventually(lambda: _at(js, "new", seqs[-1]), "the new one acked all")
    # a restart keeps the consumer as it is (not replaced: nothing is taken again)
    created = info.created
    later = await publish(js, "move", 2)
    await consuming(consumer(), lambda: sorted(handled) == seqs[5:] + later, "the new ones")
    again = await js.consumer_info(STREAM, "new")
    assert again.created == created and again.config.opt_start_seq == seqs[5]
    assert sorted(handled) == seqs[5:] + later


async def test_a_fresh_install_starts_at_the_beginning(nc: Any) -> None:
    js = nc.jetstream()
    seqs = await publish(js, "fresh", 3)
    handled: list[int] = []

    async def handle(msgs: Sequence[Msg]) -> list[bool | BaseException]:
        handled.extend(seq_of(m) for m in msgs)
        return [True] * len(msgs)

    consumer = bus.PullConsumer(
        js=js, service="test", stream=STREAM, durable="fresh",
        filter_subjects=["loom.run.fresh.>"], handler=handle, ack_all=True, replaces="gone",
    )  # fmt: skip
    await consuming(consumer, lambda: sorted(handled) == seqs, "every message handled")
    info = await js.consumer_info(STREAM, "fresh")
    assert info.config.deliver_policy == DeliverPolicy.ALL
