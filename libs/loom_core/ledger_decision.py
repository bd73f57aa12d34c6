"""What the tool-runner does with one tool request, given what it knows of the ledger.

Pure (no I/O): the tool-runner (``loom_services.toolrunner``) asks :func:`next_step`
with what it knows so far (:class:`Known`), does the one thing it is told (run the tool,
claim the key, read the entry, ask the run), adds what it learnt and asks again, until
the answer is final. The rules, per idempotency key (docs/decisions.md "Tool-runner",
issue 10's fast path):

- a first delivery of an idempotent call runs at once; its claim and result are
  recorded after the answer (no read, no commit before it);
- a first delivery of a non-idempotent call claims the key (a unique insert: the claim
  is the read); it runs only if the claim is won;
- anything else reads the entry:
  - none, idempotent: ask the run (a runner killed between its answer and its ledger
    write leaves the result only there); it has the result: send nothing; else run and
    record at once (a lost record: the first result stands, sent from the entry);
  - none, not idempotent: claim, as a first delivery;
  - finished: send the stored result (an idempotent call taken from its publish by
    another runner: ask the run first, and send nothing if it has it);
  - claimed but unfinished: the claimant stopped mid-call. Idempotent: run again.
    Not idempotent: never run again; answer ``ambiguous_outcome``.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Literal

EntryState = Literal["absent", "unfinished", "finished"]


class Step(Enum):
    # not final: do it, add what was learnt to ``Known``, ask again
    CLAIM = "claim"  # try the unique insert -> Known.claimed
    READ = "read"  # read the entry -> Known.entry
    ASK_RUN = "ask_run"  # does the run hold a result for it? -> Known.run_has_result
    RUN_RECORD_NOW = "run_record_now"  # run, record claim + result in one commit
    # -> Known.ran, Known.recorded (and entry forgotten: it may have changed)
    # final
    RUN_RECORD_LATER = "run_record_later"  # run, answer, record after (batched)
    RUN_FINISH = "run_finish"  # run (the claim is ours, or idempotent), finish, answer
    SEND_OWN = "send_own"  # answer with the result this runner produced
    RESEND = "resend"  # answer with the stored result
    NOTHING = "nothing"  # the run has it: answer nothing
    AMBIGUOUS = "ambiguous"  # answer ambiguous_outcome (and finish the entry with it)
    RETRY = "retry"  # the ledger contradicts itself: try the message again later


FINAL = frozenset(
    {Step.RUN_RECORD_LATER, Step.RUN_FINISH, Step.SEND_OWN, Step.RESEND, Step.NOTHING,
     Step.AMBIGUOUS, Step.RETRY}
)  # fmt: skip
RUNS = frozenset({Step.RUN_RECORD_LATER, Step.RUN_FINISH, Step.RUN_RECORD_NOW})


@dataclasses.dataclass(frozen=True)
class Known:
    """What the tool-runner knows of one request so far."""

    first: bool  # no runner can have handled it before (see ToolRunnerService._first)
    idempotent: bool
    # an idempotent call's finished entry may have been answered by another runner
    # (direct dispatch): ask the run before sending it again
    ask_before_resend: bool = False
    claimed: bool | None = None  # the outcome of this runner's claim (None: not tried)
    entry: EntryState | None = None  # the entry as last read (None: not read)
    run_has_result: bool | None = None  # None: not asked
    ran: bool = False  # RUN_RECORD_NOW done
    recorded: bool | None = None  # its record was stored (False: someone else's first)


def next_step(known: Known) -> Step:
    """The next thing to do for a request, from what is known (see the module doc)."""
    if known.ran:  # after RUN_RECORD_NOW
        if known.recorded:
            return Step.SEND_OWN
        if known.entry is None:
            return Step.READ
        return Step.RESEND if known.entry == "finished" else Step.SEND_OWN
    if known.claimed:
        return Step.RUN_FINISH
    untouched = known.claimed is None and known.entry is None
    if known.first and untouched:
        return Step.RUN_RECORD_LATER if known.idempotent else Step.CLAIM
    if known.entry is None:
        return Step.READ
    if known.entry == "absent":
        if not known.idempotent:
            # a lost claim that then reads no entry: the ledger contradicts itself
            return Step.CLAIM if known.claimed is None else Step.RETRY
        if known.run_has_result is None:
            return Step.ASK_RUN
        return Step.NOTHING if known.run_has_result else Step.RUN_RECORD_NOW
    if known.entry == "finished":
        if known.idempotent and known.ask_before_resend:
            if known.run_has_result is None:
                return Step.ASK_RUN
            if known.run_has_result:
                return Step.NOTHING
        return Step.RESEND
    return Step.RUN_FINISH if known.idempotent else Step.AMBIGUOUS
