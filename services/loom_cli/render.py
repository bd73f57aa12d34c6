"""Terminal rendering for the CLI: live run progress, event tables, span trees.
Progress goes to stderr, data to stdout (so ``loom run x.yaml > out.json`` works)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from loom_core import blobs
from loom_core.contracts import (
    BranchTaken,
    EventRecord,
    EventWaitStarted,
    ForeachStarted,
    ModelCallCompleted,
    ModelCallFailed,
    ModelOutputRefused,
    ModelUsage,
    PlanAccepted,
    PlanRejected,
    PlanRevised,
    ReplanRefused,
    ReplanRequested,
    RunAdmitted,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunNeedsReview,
    RunPaused,
    RunQueued,
    RunRequested,
    RunSummary,
    RunUnpaused,
    SpanRecord,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepResumed,
    StepRetryScheduled,
    StepSkipped,
    StepSuspended,
    TimerStarted,
    ToolCallRequested,
)
from loom_infra.settings import columns_from_env

BAR_WIDTH = 30


def _usage(usage: ModelUsage) -> str:
    tokens = f"{usage.input_tokens}+{usage.output_tokens} tokens"
    return f"{tokens}, ${usage.cost_usd:.6f}" if usage.cost_usd else tokens


def _ms(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "…"
    return f"{(end - start).total_seconds() * 1000:.1f} ms"


def progress_line(record: EventRecord, started: dict[str, datetime]) -> str | None:
    """One human line for an event worth showing live, else None."""
    e = record.event
    match e:
        case RunRequested():
            return f"[bold]run[/] {record.run_id} requested"
        case PlanAccepted(plan=plan, planning=planning) if planning is not None:
            return (f"plan accepted: {len(plan.steps)} steps, planned by "
                    f"{escape(planning.model)} ({len(planning.repairs)} repairs, "
                    f"{_usage(planning.usage)})")  # fmt: skip
        case PlanAccepted(plan=plan):
            return f"plan accepted: {len(plan.steps)} steps"
        case ModelCallCompleted(step_id=sid, turn=n, message=message):
            what = (f"{len(message.tool_calls)} tool call(s)" if message.tool_calls
                    else "answered")  # fmt: skip
            return f"  [magenta]◆[/] {sid} turn {n}: {escape(e.model)} {what} ({_usage(e.usage)})"
        case ModelCallFailed(step_id=sid, turn=n, error=err):
            return f"  [red]◆[/] {sid} turn {n}: {err.code}: {escape(err.message)}"
        case ModelOutputRefused(step_id=sid, error=err):
            return f"  [yellow]![/] {sid}: model output refused: {err.code}"
        case StepSuspended(step_id=sid, label="budget", payload=payload):
            exceeded = payload.get("exceeded", "?") if isinstance(payload, dict) else "?"
            return (f"  [yellow]⏸[/] {sid}: budget used up ({exceeded}); raise it with "
                    f"loom resume {record.run_id} --label budget --data '{{\"{exceeded}\": …}}' "
                    "or cancel")  # fmt: skip
        case ReplanRequested(step_id=sid, error=err, attempt=n):
            return f"  [yellow]↻[/] {sid} failed ({err.code}): re-planning the rest ({n})"
        case PlanRevised(plan=plan, kept=kept):
            return f"plan revised: {len(plan.steps) - len(kept)} new steps, {len(kept)} kept"
        case ReplanRefused(issues=issues):
            codes = ", ".join(sorted({i.code for i in issues})) or "no plan"
            return f"[red]re-planning refused[/] ({codes})"
        case PlanRejected(issues=issues):
            lines = [f"[red]plan rejected[/] ({len(issues)} issues):"]
            lines += [f"  [red]✗[/] {i.code} at {i.path}: {i.message}" for i in issues]
            return "\n".join(lines)
        case ToolCallRequested(step_id=sid, tool=tool, attempt=attempt):
            started[sid] = record.at
            extra = f" (attempt {attempt})" if attempt > 1 else ""
            return f"  [cyan]▶[/] {sid} → {tool}{extra}"
        case StepCompleted(step_id=sid):
            return f"  [green]✓[/] {sid}  {_ms(started.get(sid), record.at)}"
        case StepFailed(step_id=sid, error=err):
            return f"  [red]✗[/] {sid}: {err.code}: {err.message}"
        case StepSkipped(step_id=sid, reason=reason):
            return f"  [yellow]-[/] {sid} skipped ({reason})"
        case StepCancelled(step_id=sid, reason=reason):
            return f"  [yellow]⊘[/] {sid} cancelled ({reason})"
        case StepRetryScheduled(step_id=sid, attempt=n, delay_s=delay, error=err):
            return f"  [yellow]↻[/] {sid}: {err.code}; attempt {n} in {delay:g}s"
        case TimerStarted(purpose="sleep", step_id=sid, fire_at=when):
            return f"  [cyan]⏸[/] {sid} sleeps until {when.isoformat(timespec='seconds')}"
        case ForeachStarted(step_id=sid, count=n):
            return f"  [cyan]▶[/] {sid}: {n} items"
        case BranchTaken(step_id=sid, branch=branch):
            return f"  [cyan]▶[/] {sid}: {branch}"
        case StepSuspended(step_id=sid, label=label):
            return (
                f"  [yellow]⏸[/] {sid} waits for a person ({label}): answer with "
                f"`loom resume {record.run_id} --label {label} --data JSON`; a wait can last "
                "days, Ctrl-C leaves the run waiting"
            )
        case StepResumed(step_id=sid, by=by):
            return f"  [green]▶[/] {sid} resumed by {by}"
        case EventWaitStarted(step_id=sid, matches=matches):
            names = ", ".join(f"{m.name}/{m.key}" for m in matches)
            return (
                f"  [yellow]⏸[/] {sid} waits for {names} (`loom signal NAME KEY`); "
                "Ctrl-C leaves the run waiting"
            )
        case RunPaused(by=by):
            return f"[yellow]run paused[/] by {by}"
        case RunUnpaused(by=by):
            return f"[green]run unpaused[/] by {by}"
        case RunQueued(queue=queue, priority=priority):
            where = f"queue {queue!r}" if queue else "its tenant's queue"
            return f"[yellow]run queued[/] in {where} (priority {priority}): at its run limit"
        case RunAdmitted():
            return "[green]run admitted[/]: a slot freed"
        case RunNeedsReview(step_id=sid, error=err):
            return f"[red]run needs review[/]: step {sid}: {err.message}"
        case RunCompleted():
            return "[green]run completed[/]"
        case RunFailed(error=err):
            return f"[red]run failed[/]: {err.code}: {err.message}"
        case RunCancelled(by=by, reason=reason):
            return f"[yellow]run cancelled[/] by {by}" + (f": {reason}" if reason else "")
    return None


def events_table(records: Sequence[EventRecord]) -> Table:
    table = Table("seq", "at", "event", "detail", box=None, pad_edge=False)
    for r in records:
        detail = msgspec.json.encode(r.event).decode()
        if '"$blob"' in detail:  # a reference reads as <blob sha256:… 10.5 MB …>
            readable = blobs.readable(msgspec.to_builtins(r.event))
            detail = msgspec.json.encode(readable).decode()
        if len(detail) > 100:
            detail = detail[:97] + "..."
        table.add_row(str(r.seq), r.at.strftime("%H:%M:%S.%f")[:-3], r.kind, detail)
    return table


def principal_line(records: Sequence[EventRecord]) -> Text | None:
    """Who the run acts for, from its first event (None for runs stored before
    principals). Plain Text: a user id is never read as markup."""
    first = records[0].event if records else None
    p = first.principal if isinstance(first, RunRequested) else None
    if p is None:
        return None
    who = "anonymous" if p.anonymous else p.user_id
    roles = f", roles {', '.join(p.roles)}" if p.roles else ""
    return Text(f"acts for {who} (tenant {p.tenant}{roles}) via {p.via}")


def runs_table(runs: Sequence[RunSummary]) -> Table:
    table = Table(box=None)
    table.add_column("run", no_wrap=True)
    for name in ("status", "name", "steps", "started", "duration", "waiting for"):
        table.add_column(name)
    labelled = any(run.labels for run in runs)  # a column only when some run has labels
    if labelled:
        table.add_column("labels")
    colours = {"completed": "green", "failed": "red", "rejected": "red", "running": "cyan"}
    for run in runs:
        c = colours.get(run.status, "white")
        row = [
            run.run_id,
            f"[{c}]{run.status}[/]",
            run.name,
            f"{run.steps_done}/{run.steps_total}",
            run.started_at.strftime("%Y-%m-%d %H:%M:%S") if run.started_at else "",
            f"{run.duration_ms:.1f} ms" if run.duration_ms is not None else "",
            _waiting_for(run),
        ]
        if labelled:
            row.append(escape(" ".join(f"{k}={v}" for k, v in sorted(run.labels.items()))))
        table.add_row(*row)
    return table


def _waiting_for(run: RunSummary) -> str:
    """The people a run waits on: its own (``label (suspension id)``) and its sub-runs'
    (``label (sub-run: suspension id)``); summaries stored before ``waits`` use
    ``waiting``."""
    people = [w for w in run.waits if w.kind == "person"]
    if not people:
        return ", ".join(f"{label} ({sid})" for sid, label in run.waiting.items())
    return ", ".join(f"{w.label} ({w.run_id + ': ' if w.run_id else ''}{w.ref})" for w in people)


def _fork_tree(
    runs: Sequence[RunSummary], run_id: str
) -> tuple[RunSummary, dict[str, list[RunSummary]]] | None:
    """The root of ``run_id``'s fork tree and each run's forks (sorted by run id);
    None when ``run_id`` is not among ``runs``."""
    by_id = {r.run_id: r for r in runs}
    if run_id not in by_id:
        return None
    root = by_id[run_id]
    while root.forked_from in by_id:
        root = by_id[root.forked_from]
    children: dict[str, list[RunSummary]] = {}
    for r in sorted(runs, key=lambda r: r.run_id):
        if r.forked_from:
            children.setdefault(r.forked_from, []).append(r)
    return root, children


def lineage_members(runs: Sequence[RunSummary], run_id: str) -> list[RunSummary]:
    """The runs of ``run_id``'s fork tree, root first, then each fork below its origin
    (depth first, by run id); [] when ``run_id`` is not among ``runs``."""
    tree = _fork_tree(runs, run_id)
    if tree is None:
        return []
    root, children = tree
    out: list[RunSummary] = []
    todo = [root]
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(reversed(children.get(node.run_id, [])))
    return out


def lineage_tree(runs: Sequence[RunSummary], run_id: str) -> Tree | str:
    """The fork tree ``run_id`` belongs to: its root origin and every fork below."""
    found = _fork_tree(runs, run_id)
    if found is None:
        return f"no run '{run_id}' among the {len(runs)} most recent runs"
    root, children = found

    def label(r: RunSummary) -> str:
        mark = " [bold]◀[/]" if r.run_id == run_id else ""
        return f"{r.run_id}  {r.status}{fork_note(r)}{mark}"

    tree = Tree(label(root))
    todo = [(tree, root)]  # no recursion: a fork tree can be deep
    while todo:
        node, r = todo.pop()
        for child in children.get(r.run_id, []):
            todo.append((node.add(label(child)), child))
    return tree


def fork_note(r: RunSummary) -> str:
    """How a fork was made: the instance it re-ran from, its edits, what it reused."""
    if not r.fork_from_step:
        return ""
    edited = f", edited {', '.join(r.fork_edited)}" if r.fork_edited else ""
    return f"  (from {r.fork_from_step}{edited}; {r.fork_reused} reused)"


def span_tree(spans: Sequence[SpanRecord]) -> Tree:
    """A tree of spans with durations and a time bar relative to the whole trace."""
    by_id = {s.span_id: s for s in spans}
    children: dict[str | None, list[SpanRecord]] = {}
    for s in spans:
        parent = s.parent_span_id if s.parent_span_id in by_id else None
        children.setdefault(parent, []).append(s)
    t0 = min(s.start for s in spans)
    t1 = max((s.end or s.start) for s in spans)
    total = max((t1 - t0).total_seconds(), 1e-9)

    def label(s: SpanRecord) -> str:
        a = (s.start - t0).total_seconds() / total
        b = ((s.end or t1) - t0).total_seconds() / total
        lo = min(int(a * BAR_WIDTH), BAR_WIDTH - 1)
        hi = max(lo + 1, int(round(b * BAR_WIDTH)))
        bar = " " * lo + "█" * (hi - lo) + " " * (BAR_WIDTH - hi)
        colour = {"ok": "green", "error": "red"}.get(s.status, "white")
        return f"[{colour}]{s.name}[/]  {_ms(s.start, s.end)}  [dim]|{bar}|[/]"

    roots = children.get(None, [])
    tree = Tree(label(roots[0]) if len(roots) == 1 else "trace")

    def add(node: Tree, span: SpanRecord) -> None:
        for child in sorted(children.get(span.span_id, []), key=lambda c: c.start):
            add(node.add(label(child)), child)

    if len(roots) == 1:
        add(tree, roots[0])
    else:
        for r in roots:
            add(tree.add(label(r)), r)
    return tree


# Not on a terminal (piped, redirected), rich would cut tables and wrap text at 80
# columns; nobody reads that width there, so lines are kept whole (COLUMNS still wins).
PIPE_WIDTH = 4096


class _Console(Console):
    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or columns_from_env() or self._width is not None:
            return size
        return ConsoleDimensions(PIPE_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


stderr = _Console(stderr=True, highlight=False)
stdout = _Console(highlight=False)
