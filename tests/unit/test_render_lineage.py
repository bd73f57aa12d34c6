"""`loom runs --lineage R -o json` printed the text tree (issue 17, item 5): the runs of
a fork tree as data, root first."""

from __future__ import annotations

from loom_cli.render import lineage_members
from loom_core.contracts import RunSummary


def run(run_id: str, forked_from: str | None = None) -> RunSummary:
    return RunSummary(run_id=run_id, status="completed", forked_from=forked_from)


def test_the_tree_of_any_member_is_listed_root_first_depth_first() -> None:
    runs = [run("b2", "b"), run("a"), run("b", "a"), run("c", "a"), run("other"), run("b1", "b")]
    for member in ("a", "b", "b2", "c"):
        assert [r.run_id for r in lineage_members(runs, member)] == ["a", "b", "b1", "b2", "c"]
    assert [r.run_id for r in lineage_members(runs, "other")] == ["other"]
    assert lineage_members(runs, "missing") == []
