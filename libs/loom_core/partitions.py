"""Runs partitioned for many executor replicas: which partition a run is in, how the
inbox stream stamps it into subjects, and which partitions each replica should hold.

Pure: no I/O, clock or randomness (the leases themselves live in
``loom_infra.ownership``; the executor glue in ``loom_services.partitioned``).

A run's partition is FNV-1a (32 bit) of its id modulo the partition count: the very
function nats-server's ``{{partition(n,i)}}`` subject mapping uses, so the LOOM_INBOX
stream stamps the partition into every inbox subject it stores
(``loom.inbox.{run_id}.{source}`` is kept as ``loom.inbox.{partition}.{run_id}.{source}``)
and an executor consumes only its own partitions, while publishers keep writing the
subject they always wrote. The count is fixed for the life of a system: a run's
partition must never change while it runs (``count_of_transform`` reads it back from
the stream to refuse a different one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from loom_core import subjects

DEFAULT_COUNT = 8
MAX_COUNT = 1024

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a32(data: bytes) -> int:
    value = _FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return value


@lru_cache(maxsize=65536)
def partition_of(run_id: str, count: int) -> int:
    """The partition of ``run_id`` among ``count`` (the same number nats-server's
    ``partition(count, …)`` mapping gives the token). Cached: asked on every step."""
    return fnv1a32(run_id.encode()) % count


def check_count(count: int) -> str | None:
    """Why ``count`` cannot be a partition count (None: it can)."""
    if not 1 <= count <= MAX_COUNT:
        return f"must be between 1 and {MAX_COUNT}, got {count}"
    return None


# ------------------------------------------------------------------ inbox subjects

INBOX_SOURCE = f"{subjects.PREFIX}.inbox.*.*"


def inbox_transform(count: int) -> tuple[str, str]:
    """``(source, destination)`` of the LOOM_INBOX stream's subject transform."""
    partition, run, source = f"{{{{partition({count},1)}}}}", "{{wildcard(1)}}", "{{wildcard(2)}}"
    dest = f"{subjects.PREFIX}.inbox.{partition}.{run}.{source}"
    return INBOX_SOURCE, dest


_COUNT_IN_DEST = re.compile(r"\{\{\s*partition\(\s*(\d+)\s*,\s*1\s*\)\s*\}\}")


def count_of_transform(dest: str | None) -> int | None:
    """The partition count a stream's transform destination was made with (None: the
    stream is not partitioned)."""
    found = _COUNT_IN_DEST.search(dest or "")
    return int(found.group(1)) if found else None


def stored_filter(published: str, partition: int) -> str:
    """An inbox filter as published (``loom.inbox.*.tool``) as the stream stores it for
    one partition (``loom.inbox.3.*.tool``)."""
    head = f"{subjects.PREFIX}.inbox."
    assert published.startswith(head), published
    return f"{head}{partition}.{published[len(head) :]}"


@dataclass(frozen=True)
class StoredInbox:
    partition: int
    subject: str  # as it was published: loom.inbox.{run_id}.{source}
    run_id: str


def stored_inbox(subject: str) -> StoredInbox | None:
    """The partition and published subject of an inbox subject as the stream stores it
    (``loom.inbox.{partition}.{run_id}.{source}``); None if it is not of that form."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[0] != subjects.PREFIX or parts[1] != "inbox":
        return None
    if not parts[2].isdigit():
        return None
    published = ".".join((parts[0], parts[1], parts[3], parts[4]))
    return StoredInbox(partition=int(parts[2]), subject=published, run_id=parts[3])


# ------------------------------------------------------------------ assignment


def share(count: int, members: Sequence[str], member: str) -> int:
    """How many partitions ``member`` should hold: an even split of ``count`` over the
    live ``members`` (sorted), the first ones taking one more when it does not divide."""
    ordered = sorted(set(members))
    if member not in ordered:
        return 0
    base, extra = divmod(count, len(ordered))
    return base + (1 if ordered.index(member) < extra else 0)


@dataclass(frozen=True)
class Moves:
    acquire: tuple[int, ...] = ()
    release: tuple[int, ...] = ()


def plan_moves(
    count: int, me: str, members: Iterable[str], owners: Mapping[int, str | None]
) -> Moves:
    """What ``me`` should do now, given the live ``members`` and each partition's
    current owner (None or absent: free). Each replica plans alone from the same table;
    the leases' compare-and-set decides any race, so a plan only has to converge:

    - over its share, release the excess (the highest partitions, so a replica that
      joins finds the same ones free on every node);
    - under its share, take free partitions, starting at an offset that differs per
      member so that two replicas rarely race for the same one.
    An owner that is not a live member is still an owner until its lease expires: its
    partitions are not free yet (two writers would be the worse failure)."""
    live = sorted(set(members) | {me})
    target = share(count, live, me)
    mine = sorted(p for p in range(count) if owners.get(p) == me)
    if len(mine) > target:
        return Moves(release=tuple(mine[target:][::-1]))
    want = target - len(mine)
    if want == 0:
        return Moves()
    start = (live.index(me) * count) // len(live)
    free = [p for p in _ring(count, start) if owners.get(p) is None]
    return Moves(acquire=tuple(free[:want]))


def _ring(count: int, start: int) -> Iterator[int]:
    for i in range(count):
        yield (start + i) % count


def local_run_id(candidates: Iterable[str], owned: frozenset[int], count: int) -> str | None:
    """The first candidate id in a partition ``owned`` here (None if none is): a run a
    replica creates with a fresh id is created in one of its own partitions, so it is
    never forwarded. The caller supplies the (random) candidates."""
    for candidate in candidates:
        if partition_of(candidate, count) in owned:
            return candidate
    return None
