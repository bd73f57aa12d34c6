"""The tool-runner's ledger decision (loom_core.ledger_decision), pure: driven against a
simulated ledger and run, whatever the runner believes ("first delivery") and whatever
the ledger holds, a non-idempotent call never runs unless this runner won its claim, a
stored result is sent rather than made again, and nothing is sent when the run has it."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hypothesis import given
from hypothesis import strategies as st

from loom_core.ledger_decision import FINAL, RUNS, Known, Step, next_step

World = Literal["absent", "unfinished", "finished"]


@dataclasses.dataclass
class Ledger:
    """One key's entry and the run's knowledge; writes as the real ledger does them."""

    entry: World
    run_has_result: bool

    def claim(self) -> bool:
        if self.entry != "absent":
            return False
        self.entry = "unfinished"
        return True

    def record(self) -> bool:  # claim + result in one commit (a unique insert)
        if self.entry != "absent":
            return False
        self.entry = "finished"
        return True


def drive(known: Known, ledger: Ledger) -> list[Step]:
    """Ask, do, tell, until final; the steps taken."""
    steps: list[Step] = []
    for _ in range(8):
        step = next_step(known)
        steps.append(step)
        if step in FINAL:
            return steps
        if step is Step.CLAIM:
            known = dataclasses.replace(known, claimed=ledger.claim(), entry=None)
        elif step is Step.READ:
            known = dataclasses.replace(known, entry=ledger.entry)
        elif step is Step.ASK_RUN:
            known = dataclasses.replace(known, run_has_result=ledger.run_has_result)
        elif step is Step.RUN_RECORD_NOW:
            known = dataclasses.replace(known, ran=True, recorded=ledger.record(), entry=None)
    raise AssertionError(f"no final step after {steps}")


knowns = st.builds(Known, first=st.booleans(), idempotent=st.booleans(),
                   ask_before_resend=st.booleans())  # fmt: skip
worlds = st.builds(
    Ledger, entry=st.sampled_from(["absent", "unfinished", "finished"]),
    run_has_result=st.booleans(),
)  # fmt: skip


@given(knowns, worlds)
def test_every_request_ends_in_one_final_step(known: Known, ledger: Ledger) -> None:
    steps = drive(known, ledger)
    assert steps[-1] in FINAL and steps[-1] is not Step.RETRY  # a consistent ledger
    assert sum(s in RUNS for s in steps) <= 1  # the tool runs at most once per delivery


@given(knowns, worlds)
def test_a_non_idempotent_call_runs_only_on_a_claim_it_won(known: Known, ledger: Ledger) -> None:
    known = dataclasses.replace(known, idempotent=False)
    before = ledger.entry
    steps = drive(known, ledger)
    ran = any(s in RUNS for s in steps)
    assert ran == (before == "absent")  # an entry of anyone's: never run again
    if ran:
        assert Step.CLAIM in steps[: steps.index(next(s for s in steps if s in RUNS))]
    if before == "unfinished":
        assert steps[-1] is Step.AMBIGUOUS  # its claimant stopped mid-call
    if before == "finished":
        assert steps[-1] is Step.RESEND


@given(knowns, worlds)
def test_a_stored_result_is_sent_not_made_again(known: Known, ledger: Ledger) -> None:
    known = dataclasses.replace(known, first=False)  # the fast path is the only exception
    before = ledger.entry
    steps = drive(known, ledger)
    if before == "finished":
        assert not any(s in RUNS for s in steps)
        assert steps[-1] in (Step.RESEND, Step.NOTHING)


@given(knowns, worlds)
def test_nothing_is_sent_only_when_the_run_has_it(known: Known, ledger: Ledger) -> None:
    steps = drive(known, ledger)
    if steps[-1] is Step.NOTHING:
        assert ledger.run_has_result and Step.ASK_RUN in steps
    if steps[-1] is Step.RESEND:
        assert ledger.entry == "finished"


@given(worlds)
def test_an_idempotent_redelivery_the_run_answered_runs_nothing(ledger: Ledger) -> None:
    ledger.run_has_result = True
    before = ledger.entry
    steps = drive(Known(first=False, idempotent=True, ask_before_resend=True), ledger)
    if before != "unfinished":  # a claimant that stopped mid-call: run in its place
        assert steps[-1] is Step.NOTHING and not any(s in RUNS for s in steps)


def test_a_first_delivery_of_an_idempotent_call_runs_with_no_ledger_io() -> None:
    assert next_step(Known(first=True, idempotent=True)) is Step.RUN_RECORD_LATER
    # and a non-idempotent one's claim is its read
    assert next_step(Known(first=True, idempotent=False)) is Step.CLAIM


def test_a_lost_claim_that_then_finds_no_entry_is_retried() -> None:
    known = Known(first=True, idempotent=False, claimed=False, entry="absent")
    assert next_step(known) is Step.RETRY


def test_a_lost_record_sends_the_first_result_when_there_is_one() -> None:
    ran = Known(first=False, idempotent=True, ran=True, recorded=False)
    assert next_step(ran) is Step.READ
    assert next_step(dataclasses.replace(ran, entry="finished")) is Step.RESEND
    assert next_step(dataclasses.replace(ran, entry="unfinished")) is Step.SEND_OWN
