"""The pure partition core: the hash the server's mapping uses, the stored inbox
subjects, and the assignment plans each replica makes alone (they must converge to an
even split with every partition held by exactly one replica)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from loom_core import partitions, routes

RUN_IDS = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-",
    min_size=1,
    max_size=64,
)


def test_the_hash_is_fnv1a_as_nats_server_computes_it() -> None:
    # reference values of FNV-1a 32 (the IETF draft's test vectors)
    assert partitions.fnv1a32(b"") == 0x811C9DC5
    assert partitions.fnv1a32(b"a") == 0xE40C292C
    assert partitions.fnv1a32(b"foobar") == 0xBF9CF968
    # the server's own stamping is checked against a live nats-server in
    # tests/integration/test_partitions_live.py


@given(RUN_IDS, st.integers(min_value=1, max_value=partitions.MAX_COUNT))
def test_a_run_has_one_partition_in_range(run_id: str, count: int) -> None:
    p = partitions.partition_of(run_id, count)
    assert 0 <= p < count
    assert partitions.partition_of(run_id, count) == p


def test_counts_out_of_range_are_refused() -> None:
    assert partitions.check_count(0) is not None
    assert partitions.check_count(partitions.MAX_COUNT + 1) is not None
    assert partitions.check_count(1) is None


@given(RUN_IDS, st.sampled_from(["plan", "tool", "timer", "event", "subrun", "model"]))
def test_a_stored_inbox_subject_gives_back_what_was_published(run_id: str, source: str) -> None:
    p = partitions.partition_of(run_id, 8)
    stored = partitions.stored_inbox(f"loom.inbox.{p}.{run_id}.{source}")
    assert stored == partitions.StoredInbox(p, f"loom.inbox.{run_id}.{source}", run_id)


def test_subjects_that_are_not_stored_inbox_subjects() -> None:
    for subject in ("loom.inbox.r.tool", "loom.inbox.x.r.tool", "loom.run.3.r.x", "a.b.c.d.e"):
        assert partitions.stored_inbox(subject) is None, subject


def test_the_transform_names_its_count() -> None:
    src, dest = partitions.inbox_transform(16)
    assert src == "loom.inbox.*.*"
    assert partitions.count_of_transform(dest) == 16
    assert partitions.count_of_transform(None) is None
    assert partitions.count_of_transform("loom.inbox.{{wildcard(1)}}") is None


def test_stored_filters_match_the_declared_inbox_routes() -> None:
    declared = routes.declared_durables(4)
    for p in range(4):
        _owner, filters = declared[("LOOM_INBOX", f"executor-p{p}")]
        assert filters == {f"loom.inbox.{p}.*.{s}" for s in ("plan", "tool", "timer", "event",
                                                              "subrun", "model")}  # fmt: skip


# ------------------------------------------------------------------ assignment


def converge(count: int, members: list[str], owners: dict[int, str | None], rounds: int = 20
             ) -> dict[int, str | None]:  # fmt: skip
    """Every member plans and applies its moves in turn, the table acting as the CAS
    (a partition is taken only while free), until nobody moves."""
    for _ in range(rounds):
        moved = False
        for me in members:
            moves = partitions.plan_moves(count, me, members, owners)
            for p in moves.release:
                assert owners[p] == me
                owners[p] = None
                moved = True
            for p in moves.acquire:
                if owners.get(p) is None:
                    owners[p] = me
                    moved = True
        if not moved:
            return owners
    raise AssertionError(f"no convergence: {owners}")


@settings(max_examples=200)
@given(
    st.integers(min_value=1, max_value=64),
    st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=6, unique=True),
    st.data(),
)
def test_plans_converge_to_an_even_split_with_one_owner_each(
    count: int, members: list[str], data: st.DataObject
) -> None:
    start = {p: data.draw(st.sampled_from([None, *members])) for p in range(count)}
    owners = converge(count, members, dict(start))
    held = [owners[p] for p in range(count)]
    assert None not in held  # every partition has an owner
    shares = sorted(held.count(m) for m in members)
    assert shares[-1] - shares[0] <= 1  # even
    for m in members:
        assert held.count(m) == partitions.share(count, members, m)


def test_a_dead_replicas_partitions_are_not_free_until_its_leases_expire() -> None:
    owners: dict[int, str | None] = {0: "dead", 1: "dead", 2: "a", 3: "a"}
    assert partitions.plan_moves(4, "a", ["a"], owners).acquire == ()
    owners = {0: None, 1: None, 2: "a", 3: "a"}  # expired
    assert set(partitions.plan_moves(4, "a", ["a"], owners).acquire) == {0, 1}


def test_a_joining_replica_gets_its_share_from_the_others() -> None:
    owners: dict[int, str | None] = {p: "a" for p in range(8)}
    assert len(partitions.plan_moves(8, "a", ["a", "b"], owners).release) == 4
    final = converge(8, ["a", "b", "c"], owners)
    assert sorted(list(final.values()).count(m) for m in "abc") == [2, 3, 3]


def test_a_local_run_id_is_the_first_candidate_in_an_owned_partition() -> None:
    ids = [f"run-{i}" for i in range(50)]
    owned = frozenset({partitions.partition_of("run-7", 8)})
    found = partitions.local_run_id(ids, owned, 8)
    assert found is not None and partitions.partition_of(found, 8) in owned
    assert partitions.local_run_id(ids, frozenset(), 8) is None
