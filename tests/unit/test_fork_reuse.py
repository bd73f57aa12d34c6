"""Forks from any step instance path (issue 17, item 4), on the pure core: what a fork
reuses (``loom_core.fork_reuse``), that the executor then asks no reused question and
calls no reused tool, the typed errors, and a property over random plans: nothing
reused depends on the fork point, and everything that does not is reused."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_debugging import records_of  # type: ignore[import-not-found]
from test_executor import World, check_invariants  # type: ignore[import-not-found]

from loom_cli.render import lineage_tree
from loom_core.contracts import (
    ApprovalStep,
    ForeachStep,
    IfStep,
    LoopStep,
    ParallelStep,
    Plan,
    ReduceStep,
    ResumeRun,
    RunCompleted,
    RunSummary,
    Step,
    StepCompleted,
    StepScheduled,
    StepSuspended,
    SubRunStep,
    ToolCallRequested,
    ToolStep,
)
from loom_core.fork_reuse import ForkError, Recorded, body_of, within
from loom_core.lineage import diff_runs, fork_request
from loom_core.validation import dependencies

FLAG = {"eq": ["{{ input.flag }}", True]}
OK = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def echo(req: ToolCallRequested) -> tuple[Any, None]:
    return {"echo": req.input}, None


def tool(sid: str, deps: tuple[str, ...] = (), **input: Any) -> ToolStep:
    return ToolStep(id=sid, tool="echo", input=dict(input), depends_on=list(deps))


def drive(w: World) -> None:
    """Run to the end, answering every question ``{"ok": true}`` by suspension id."""
    for _ in range(100):
        w.run(echo)
        open_ = [e for e in w.of(StepSuspended) if e.suspension_id in w.state.suspensions
                 and w.state.suspensions[e.suspension_id].resumed is None]  # fmt: skip
        if not open_:
            return
        for e in open_:
            w.send(ResumeRun(run_id=w.run_id, suspension_id=e.suspension_id, data={"ok": True},
                             request_id=f"q-{e.suspension_id}"))  # fmt: skip
    raise AssertionError("questions never stopped")


def fork(a: World, from_step: str, **edits: Any) -> World:
    request = fork_request(records_of(a), from_step, dict(edits))
    w = World(request.plan, run_id="r2", request=request)
    drive(w)
    check_invariants(w)
    return w


def tools_called(w: World) -> list[str]:
    return [e.step_id for e in w.of(ToolCallRequested)]


def asked(w: World) -> list[str]:
    return [e.suspension_id for e in w.of(StepSuspended)]


def reused(w: World) -> list[str]:
    return [e.step_id for e in w.of(StepCompleted) if e.reused_from is not None]


# ----------------------------------------------------------------------------- shapes

REVIEWS = Plan(
    steps=[
        tool("quote", amount=100),
        ParallelStep(id="reviews", depends_on=["quote"], branches={
            "legal": [
                tool("check_l", q="{{ steps.quote.output }}"),
                ApprovalStep(id="legal_ok", label="legal", schema=OK, depends_on=["check_l"]),
                tool("file_l", ok="{{ steps.legal_ok.output.ok }}"),
            ],
            "finance": [
                tool("check_f", q="{{ steps.quote.output }}"),
                ApprovalStep(id="finance_ok", label="finance", schema=OK, depends_on=["check_f"]),
                tool("file_f", ok="{{ steps.finance_ok.output.ok }}"),
            ],
        }),
        tool("notify", r="{{ steps.reviews.output }}"),
        tool("unrelated", x=1),
    ],
    output="{{ steps.notify.output }}",
)  # fmt: skip


def test_fork_from_a_parallel_branch_approval_keeps_the_sibling_branch() -> None:
    a = World(REVIEWS)
    drive(a)
    assert asked(a) == ["reviews/legal/legal_ok#1", "reviews/finance/finance_ok#1"]

    b = fork(a, "reviews/legal/legal_ok#1", **{"reviews/legal/legal_ok": {"ok": False}})
    assert asked(b) == []  # the edit is the answer; the finance approval is not asked again
    assert tools_called(b) == ["reviews/legal/file_l", "notify"]
    assert set(reused(b)) == {
        "quote", "unrelated", "reviews/finance", "reviews/legal/check_l", "reviews/legal/legal_ok",
    }  # fmt: skip
    assert isinstance(b.events[-1], RunCompleted)
    assert b.events[-1].output["echo"]["r"]["legal"] == {"echo": {"ok": False}}
    assert b.events[-1].output["echo"]["r"]["finance"] == {"echo": {"ok": True}}

    # without an edit the approval is asked again, and only it
    c = fork(a, "reviews/legal/legal_ok")
    assert asked(c) == ["reviews/legal/legal_ok#1"]
    assert tools_called(c) == ["reviews/legal/file_l", "notify"]

    # diff: the reused branch is marked; its inner steps are carried by it, not listed
    changes = {d.step_id: d.changes for d in diff_runs(records_of(a), records_of(b))}
    assert changes["reviews/finance"]["reused"] == (False, True)
    assert changes["reviews/legal/legal_ok"]["output"] == ({"ok": True}, {"ok": False})
    assert not any(k.startswith("reviews/finance/") for k in changes)


EACH = Plan(
    steps=[
        ForeachStep(id="each", items=[10, 20, 30, 40], concurrency=2, do=[
            tool("prep", n="{{ item }}"),
            ApprovalStep(id="ok", label="reviewer", schema=OK, depends_on=["prep"]),
            tool("use", ok="{{ steps.ok.output.ok }}", n="{{ item }}"),
        ]),
        tool("total", all="{{ steps.each.output }}"),
    ],
    output="{{ steps.total.output }}",
)  # fmt: skip


def test_fork_from_a_foreach_element_reruns_only_its_downstream() -> None:
    a = World(EACH)
    drive(a)
    b = fork(a, "each/2/ok")
    assert asked(b) == ["each/2/ok#1"]
    assert tools_called(b) == ["each/2/use", "total"]
    assert set(reused(b)) == {"each/0", "each/1", "each/3", "each/2/prep"}
    assert b.events[-1] == a.events[-1]  # same answers, same result

    whole = fork(a, "each/2")  # the element from its start
    assert tools_called(whole) == ["each/2/prep", "each/2/use", "total"]
    assert asked(whole) == ["each/2/ok#1"]


def test_fork_inside_a_loop_reuses_earlier_iterations_step_by_step() -> None:
    plan = Plan(steps=[
        LoopStep(id="lp", max_iterations=4, do=[
            tool("x", i="{{ iteration }}"),
            tool("y", x="{{ steps.x.output }}"),
        ], until={"eq": ["{{ steps.x.output.echo.i }}", 2]}),
    ])  # fmt: skip
    a = World(plan)
    drive(a)
    b = fork(a, "lp/1/y")
    # iteration 0 reused by steps (its `until` reads them), iteration 1 from y, then 2
    assert set(reused(b)) == {"lp/0/x", "lp/0/y", "lp/1/x"}
    assert tools_called(b) == ["lp/1/y", "lp/2/x", "lp/2/y"]
    assert b.events[-1] == a.events[-1]


def test_fork_inside_a_reduce_reruns_the_accumulator_chain_from_there() -> None:
    plan = Plan(steps=[
        ReduceStep(id="r", items=[1, 2, 3], initial=0, do=[
            tool("add", acc="{{ acc }}", item="{{ item }}"),
        ]),
    ])  # fmt: skip
    a = World(plan)
    drive(a)
    b = fork(a, "r/1/add")
    assert reused(b) == ["r/0"]
    assert tools_called(b) == ["r/1/add", "r/2/add"]
    assert b.events[-1] == a.events[-1]


def test_edits_at_two_depths_and_a_top_level_fork_still_work_as_before() -> None:
    a = World(EACH)
    drive(a)
    # an edit of a whole element: the foreach collects it, only `total` runs again
    b = fork(a, "total", **{"each/1": "edited"})
    assert tools_called(b) == ["total"] and asked(b) == []
    assert b.events[-1].output["echo"]["all"][1] == "edited"
    top = fork_request(records_of(a), "total")
    assert set(top.fork.reused) == {"each"}  # a top-level fork reuses top-level results


# ----------------------------------------------------------------------------- errors


def error_of(a: World, from_step: str, **edits: Any) -> ForkError:
    with pytest.raises(ForkError) as caught:
        fork_request(records_of(a), from_step, dict(edits))
    return caught.value


def test_bad_paths_get_typed_errors_that_say_what_exists() -> None:
    a = World(REVIEWS)
    drive(a)
    typo = error_of(a, "reviews/legal/legal_okk")
    assert (typo.code, typo.path) == ("unknown_step", "$.from_step")
    assert "reviews/legal/legal_ok" in typo.details["close_matches"]
    branch = error_of(a, "reviews/hr/hr_ok")
    assert branch.code == "unknown_step" and "'reviews/hr' is not in its plan" in str(branch)
    bad = error_of(a, "quote", **{"reviews/legal/legal_ok": {"ok": "yes"}})
    assert (bad.code, bad.path) == ("invalid_output", '$.set_output["reviews/legal/legal_ok"].ok')
    fallback = error_of(a, "quote/fallback")
    assert fallback.code == "invalid_fork" and "name 'quote' instead" in str(fallback)

    each = World(EACH)
    drive(each)
    gone = error_of(each, "each/7/ok")
    assert gone.code == "step_never_ran" and gone.details["never_ran"] == "each/7"
    assert "each/0, each/1, each/2, each/3" in str(gone)

    cond = Plan(steps=[IfStep(id="c", condition=FLAG, then=[tool("t")], else_=[tool("e")])])
    w = World(cond, {"flag": False})
    drive(w)
    not_taken = error_of(w, "c/then/t")
    assert not_taken.code == "step_never_ran" and not_taken.details["never_ran"] == "c/then"
    assert [e.step_id for e in fork(w, "c/else/e").of(ToolCallRequested)] == ["c/else/e"]

    nested = Plan(steps=[SubRunStep(id="sub", plan=Plan(steps=[tool("x")]))])
    n = World(nested)
    sub = error_of(n, "sub/x")
    assert sub.code == "invalid_fork" and "fork that run instead" in str(sub)

    lp = Plan(steps=[LoopStep(id="lp", max_iterations=2, do=[tool("x")])])
    loop = World(lp)
    drive(loop)
    assert "edit a step inside the iteration" in str(error_of(loop, "lp/1", **{"lp/0": 1}))


# ----------------------------------------------------------------------------- property


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """Random plans nesting every composite kind (two levels), tool steps depending on
    earlier ones by ``depends_on`` and by templates."""
    counter = iter(range(10_000))

    def body(depth: int, size: int) -> list[Step]:
        steps: list[Step] = []
        for _ in range(size):
            sid = f"s{next(counter)}"
            earlier = [s.id for s in steps]
            deps = (
                draw(st.lists(st.sampled_from(earlier), unique=True, max_size=2)) if earlier else []
            )
            kinds = ["tool"] * 3 + (
                ["foreach", "parallel", "if", "loop", "reduce"] if depth < 2 else []
            )
            kind = draw(st.sampled_from(kinds))
            inner = lambda: body(depth + 1, draw(st.integers(1, 3)))  # noqa: E731
            if kind == "tool":
                reads = {d: f"{{{{ steps.{d}.output }}}}" for d in deps[:1]}
                steps.append(ToolStep(id=sid, tool="echo", input={"id": sid, **reads},
                                      depends_on=deps))  # fmt: skip
            elif kind == "foreach":
                steps.append(ForeachStep(id=sid, items=list(range(draw(st.integers(1, 3)))),
                                         concurrency=draw(st.integers(1, 2)), do=inner(),
                                         depends_on=deps))  # fmt: skip
            elif kind == "parallel":
                steps.append(ParallelStep(id=sid, branches={"p": inner(), "q": inner()},
                                          depends_on=deps))  # fmt: skip
            elif kind == "if":
                steps.append(IfStep(id=sid, condition=FLAG, then=inner(), else_=inner(),
                                    depends_on=deps))  # fmt: skip
            elif kind == "loop":
                steps.append(LoopStep(id=sid, max_iterations=draw(st.integers(1, 3)), do=inner(),
                                      depends_on=deps))  # fmt: skip
            else:
                steps.append(ReduceStep(id=sid, items=[1, 2, 3][: draw(st.integers(1, 3))],
                                        initial=0, do=inner(), depends_on=deps))  # fmt: skip
        return steps

    return Plan(steps=body(0, draw(st.integers(1, 4))))


class Instances:
    """The recorded instances of a run and the "depends on" relation of the module
    docstring of ``loom_core.fork_reuse``, written out independently as a closure."""

    def __init__(self, plan: Plan, recorded: Recorded) -> None:
        self.ran = set(recorded.ran)
        self.steps: dict[str, Step | None] = {}  # None: a child scope
        self.owner: dict[str, Step] = {}  # child scope -> composite step
        self.scope_steps: dict[str, list[Step]] = {"": plan.steps}
        for path in sorted(self.ran, key=lambda p: p.count("/")):
            head, _, last = path.rpartition("/")
            if head in self.scope_steps:
                self.steps[path] = next(s for s in self.scope_steps[head] if s.id == last)
            else:
                owner = self.steps[head]
                assert owner is not None
                self.steps[path], self.owner[path] = None, owner
                self.scope_steps[path] = body_of(owner, last) or []

    def inside(self, path: str) -> set[str]:
        return {p for p in self.ran if p.startswith(path + "/")}

    def downstream(self, seed: str) -> set[str]:
        out = {seed} | self.inside(seed)
        todo = list(out)
        while todo:
            x = todo.pop()
            found: set[str] = set()
            head, _, last = x.rpartition("/")
            if head:
                found.add(head)  # rule 2
            step = self.steps.get(x)
            if step is not None:  # rule 1, and rule 4 for what is inside
                deps = dependencies(self.scope_steps[head])
                for sid, ds in deps.items():
                    if last in ds:
                        dep = f"{head}/{sid}" if head else sid
                        found |= {dep} | self.inside(dep)
            elif isinstance(self.owner.get(x), LoopStep | ReduceStep):  # rule 3
                for sib in self.ran:
                    h, _, k = sib.rpartition("/")
                    if h == head and self.steps.get(sib) is None and int(k) > int(last):
                        found |= {sib} | self.inside(sib)
            # a dependent found through a step that is inside: the closure goes on from it
            new = {f for f in found if f in self.ran or f == ""} - out - {""}
            out |= new
            todo.extend(new)
        return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans(), data=st.data())
def test_nothing_reused_depends_on_the_fork_point_and_nothing_else_runs_again(
    plan: Plan, data: st.DataObject
) -> None:
    a = World(plan, {"flag": data.draw(st.booleans())})
    drive(a)
    check_invariants(a)
    assert isinstance(a.events[-1], RunCompleted)
    records = records_of(a)
    recorded = Recorded.of(records)
    runs = Instances(plan, recorded)
    point = data.draw(st.sampled_from(sorted(recorded.ran)))
    editable = sorted(
        p for p in recorded.completed
        if runs.steps.get(p) is not None or not isinstance(runs.owner[p], LoopStep)
    )  # fmt: skip
    edits = {e: {"edited": e} for e in data.draw(st.lists(st.sampled_from(editable), max_size=1))}
    event(f"fork point at depth {point.count('/')}" + (", one edit" if edits else ""))
    request = fork_request(records, point, edits)
    reuse = request.fork.reused
    down = runs.downstream(point)
    for e in edits:
        down |= runs.downstream(e) - {e}

    # sound: no reused instance depends on the fork point or on an edit (but the edit)
    assert not (set(reuse) - set(edits)) & down, (set(reuse) - set(edits)) & down
    assert all(reuse[e] == v for e, v in edits.items())
    # complete: every recorded result that does not depend on them is kept (itself, or
    # by an enclosing reused instance; a loop iteration by its steps)
    for path in recorded.completed.keys() - down:
        kept = any(path == r or path.startswith(r + "/") for r in reuse)
        loop_iteration = runs.steps.get(path) is None and isinstance(runs.owner[path], LoopStep)
        assert kept or loop_iteration, (path, point, sorted(reuse))

    b = World(request.plan, run_id="r2", request=request)
    drive(b)
    check_invariants(b)
    assert isinstance(b.events[-1], RunCompleted)
    if not edits:
        assert b.events[-1] == a.events[-1]  # deterministic tools: the same result
    # only what depends on the fork point or an edit is called again, and all of it
    # (but what an edit replaces)
    expected = {p for p in tools_called(a) if p in down and not any(within(p, e) for e in edits)}
    assert set(tools_called(b)) == expected
    assert set(reused(b)) == set(reuse)  # the executor reached every reused instance
    scheduled = {e.step_id for e in b.of(StepScheduled)}
    assert not any(p.startswith(r + "/") for r in reuse for p in scheduled)


def test_lineage_names_the_instance_the_edits_and_the_reuse() -> None:
    origin = RunSummary(run_id="a", status="completed")
    fork_ = RunSummary(
        run_id="b", status="completed", forked_from="a", fork_from_step="each/2/ok",
        fork_edited=["each/2/ok"], fork_reused=4,
    )  # fmt: skip
    tree = lineage_tree([origin, fork_], "b")
    assert str(tree.label) == "a  completed"
    assert str(tree.children[0].label) == (
        "b  completed  (from each/2/ok, edited each/2/ok; 4 reused) [bold]◀[/]"
    )
