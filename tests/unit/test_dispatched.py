"""The tool-runner's memory of the dispatches it took, by their bytes, until their stream
copy comes (``toolrunner.Dispatched``, issue 10, runnercpu): bounded in count and bytes,
oldest out first, too large ones not kept; a copy's bytes find their dispatch once."""

from __future__ import annotations

from loom_services.toolrunner import Dispatched


def test_a_copy_finds_its_dispatch_once_by_its_bytes() -> None:
    kept = Dispatched()
    kept.add(b"dispatch-1", "k1", "m1")
    assert kept.pop(b"dispatch-2") is None
    assert kept.pop(b"dispatch-1") == ("k1", "m1")
    assert kept.pop(b"dispatch-1") is None  # once: a redelivery takes the full path
    assert len(kept) == 0 and kept.size == 0


def test_the_oldest_go_first_past_the_count_or_the_bytes_and_large_ones_are_not_kept() -> None:
    kept = Dispatched(max_count=3, max_total=25, max_one=10)
    for i in range(4):
        kept.add(b"d%d" % i, f"k{i}", f"m{i}")  # 3 bytes each
    assert len(kept) == 3 and kept.pop(b"d0") is None  # the oldest went
    kept.add(b"x" * 11, "big", "m")  # over max_one: not kept
    assert kept.pop(b"x" * 11) is None
    kept.add(b"y" * 10, "ky", "my")  # 9 + 10 = 19 bytes, 4 entries: d1 goes
    kept.add(b"z" * 10, "kz", "mz")  # d2 goes (count), then 3 + 20 = 23 bytes
    assert [kept.pop(d) is not None for d in (b"d1", b"d2", b"d3")] == [False, False, True]
    assert kept.size == 20
    kept.add(b"w" * 10, "kw", "mw")  # 30 bytes > 25: the oldest (y) goes
    assert kept.pop(b"y" * 10) is None and kept.size == 20
    kept.add(b"z" * 10, "again", "m")  # the same bytes again: the first stays
    assert kept.pop(b"z" * 10) == ("kz", "mz")
