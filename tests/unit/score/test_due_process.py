"""Due process as pure domain: pauses on both timelines, a dispute's lapse at its deadline,
decisions, repair periods, working days, consent in force, and the instants replay and
the sweep look at."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from domain.consent import Consent, consent_in_force, may_serve
from domain.entries import (
    APPROVED,
    DISPUTE,
    OPEN,
    OVERTURNED,
    UPHELD,
    DisputeRecord,
    EntryFacts,
    EntryStatus,
    LedgerEntry,
    RepairRecord,
    ReversalRecord,
    RuleRef,
    ScoredEntry,
    View,
    counts_at,
    pauses_of,
    status_of,
)
from domain.history import Event, replay
from domain.policy import ActivatedPolicy, Caps, PolicyBook, load_policy
from domain.scoring import compute_score
from kit.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from kit.principal import Principal, Role
from kit.pseudonym import KeyLink, Pseudonymiser
from services.score.due_process import Audited, DueProcess
from services.score.due_process_checks import CONSENT_MAX_FUTURE_SKEW, add_working_days
from services.score.ledger import Ledger
from services.score.ledger_store import Rescored, SubjectLedger
from tests.support.score_store import FakeStore

POLICY = load_policy(Path(__file__).parents[3] / "config" / "policy.yaml")
PERSON = POLICY.for_kind("person")
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # a Monday
DAY = timedelta(days=1)
US = timedelta(microseconds=1)


def entry(
    points: int = -10,
    severity: str = "general",
    *,
    entry_id: str = "e1",
    occurred_at: datetime = T0,
    recorded_at: datetime = T0,
    category: str = "traffic",
    disputes: tuple[DisputeRecord, ...] = (),
    repairs: tuple[RepairRecord, ...] = (),
    reversals: tuple[ReversalRecord, ...] = (),
) -> ScoredEntry:
    return ScoredEntry(
        entry_id,
        points,
        category,
        severity,
        status_of(disputes, repairs, bool(reversals)),
        occurred_at,
        recorded_at,
        False,
        pauses_of(disputes, repairs, reversals),
    )


def dispute(
    filed_at: datetime = T0 + DAY,
    *,
    status: str = OPEN,
    resolved_at: datetime | None = None,
    dispute_id: int = 7,
    entry_id: str = "e1",
) -> DisputeRecord:
    return DisputeRecord(
        dispute_id,
        entry_id,
        "alice",
        "not me",
        "subject:alice",
        "subject",
        filed_at,
        filed_at + 20 * DAY,
        status,
        resolved_at=resolved_at,
    )


def reversal(at: datetime, outcome_id: str = "e1") -> ReversalRecord:
    return ReversalRecord(outcome_id, "alice", "library", "ev-1", "wrong", at, "library", at)


def score(entries: list[ScoredEntry], at: datetime, view: View = View.AS_KNOWN) -> int:
    return compute_score(entries, PERSON, at, view=view).score


# --- counting on both timelines --------------------------------------------------------


def test_an_open_dispute_stops_the_entry_exactly_at_its_deadline() -> None:
    d = dispute()
    e = entry(disputes=(d,))
    assert e.status is EntryStatus.DISPUTED
    assert counts_at(e, PERSON, d.deadline - US)
    assert not counts_at(e, PERSON, d.deadline)
    assert not counts_at(e, PERSON, d.deadline + US)
    assert score([e], d.deadline - US) == 990
    assert score([e], d.deadline) == 1000


def test_a_dispute_decided_before_its_deadline_never_pauses_the_entry() -> None:
    d = dispute(status=UPHELD, resolved_at=T0 + 5 * DAY)
    e = entry(disputes=(d,))
    assert pauses_of((d,), (), ()) == ()
    assert all(counts_at(e, PERSON, T0 + n * DAY) for n in range(0, 60))


def test_an_uphold_after_the_deadline_makes_the_entry_count_again_from_the_decision() -> None:
    decided = T0 + 30 * DAY
    d = dispute(status=UPHELD, resolved_at=decided)
    e = entry(disputes=(d,))
    assert e.status is EntryStatus.ACTIVE
    assert not counts_at(e, PERSON, decided - US)
    assert counts_at(e, PERSON, decided)
    # Both timelines agree: a lapse is not a correction.
    assert not counts_at(e, PERSON, decided - US, View.AS_CORRECTED)
    assert counts_at(e, PERSON, decided, View.AS_CORRECTED)


def test_an_overturned_entry_counted_before_the_decision_as_known_and_never_as_corrected() -> None:
    decided = T0 + 5 * DAY
    e = entry(disputes=(dispute(status=OVERTURNED, resolved_at=decided),))
    assert e.status is EntryStatus.REVERSED
    assert e.void
    assert counts_at(e, PERSON, decided - US)
    assert not counts_at(e, PERSON, decided)
    assert not counts_at(e, PERSON, decided - US, View.AS_CORRECTED)


def test_a_retraction_ends_the_entry_from_its_instant_as_known_and_voids_it_as_corrected() -> None:
    r = T0 + 10 * DAY
    e = entry(reversals=(reversal(r),))
    assert e.status is EntryStatus.REVERSED
    assert score([e], r - US) == 990
    assert score([e], r) == 1000
    assert score([e], r - US, View.AS_CORRECTED) == 1000


def test_as_corrected_counts_from_the_event_time_as_known_from_the_recording() -> None:
    late = entry(occurred_at=T0, recorded_at=T0 + 5 * DAY)
    assert score([late], T0 + DAY) == 1000
    assert score([late], T0 + DAY, View.AS_CORRECTED) == 990
    assert score([late], T0 + 5 * DAY) == 990


def test_an_approved_repair_ends_the_entry_from_the_decision_on_both_timelines() -> None:
    decided = T0 + 100 * DAY
    approved = RepairRecord(
        3, "e1", "alice", "paid", "", T0 + 95 * DAY, T0 + 98 * DAY, APPROVED, "ok", "r", decided
    )
    e = entry(repairs=(approved,))
    assert e.status is EntryStatus.REPAIRED
    for view in View:
        assert counts_at(e, PERSON, decided - US, view)
        assert not counts_at(e, PERSON, decided, view)


def test_the_status_shown_prefers_reversed_then_repaired_then_disputed() -> None:
    approved = RepairRecord(3, "e1", "alice", "paid", "", T0, T0, APPROVED, decided_at=T0)
    assert status_of((dispute(),), (approved,), True) is EntryStatus.REVERSED
    assert status_of((dispute(),), (approved,), False) is EntryStatus.REPAIRED
    assert status_of((dispute(),), (), False) is EntryStatus.DISPUTED
    assert status_of((), (), False) is EntryStatus.ACTIVE


# --- caps ------------------------------------------------------------------------------


def test_a_reversed_positive_frees_its_cap_from_the_reversal_on_and_never_consumed_it_as_corrected() -> None:
    capped = replace(PERSON, caps=Caps(window_days=365, positive_per_category=50))
    r = T0 + 10 * DAY
    big = entry(50, "positive", entry_id="big", category="civic", reversals=(reversal(r, "big"),))
    small = entry(
        20, "positive", entry_id="small", category="civic", occurred_at=T0 + DAY, recorded_at=T0 + DAY
    )
    # Before the reversal, as known: the wrong entry filled the cap, as Egret served then.
    assert compute_score([big, small], capped, r - US).score == 1050
    assert compute_score([big, small], capped, r - US).categories[0].capped == 20
    # From the reversal on the later positive gets its allowance.
    assert compute_score([big, small], capped, r).score == 1020
    # As corrected, the reversed entry never took any allowance.
    assert compute_score([big, small], capped, r - US, view=View.AS_CORRECTED).score == 1020


# --- next change and replay ------------------------------------------------------------


def test_next_change_at_is_an_open_disputes_deadline_when_that_comes_first() -> None:
    d = dispute()
    e = entry(disputes=(d,))
    assert compute_score([e], PERSON, T0 + 2 * DAY).next_change_at == d.deadline
    # Past the deadline, the entry's expiry is not due (it does not count); nothing is.
    assert compute_score([e], PERSON, d.deadline).next_change_at is None


def test_replay_writes_the_lapse_at_the_deadline_even_when_the_score_does_not_change() -> None:
    d = dispute()
    zero = entry(0, "minor", disputes=(d,))
    before = compute_score([zero], PERSON, T0 + DAY).state
    changes, result = replay([zero], PERSON, before=before, since=T0 + DAY, until=d.deadline + 3 * DAY)
    assert [(c.changed_at, c.cause, c.ended_entry_ids, c.note) for c in changes] == [
        (d.deadline, DISPUTE, ("e1",), "dispute 7 undecided at its deadline")
    ]
    assert result.as_of == d.deadline + 3 * DAY


def test_replay_looks_at_pause_boundaries_like_expiry_instants() -> None:
    d = dispute()
    e = entry(disputes=(d,))
    before = compute_score([e], PERSON, T0 + DAY).state
    changes, _ = replay([e], PERSON, before=before, since=T0 + DAY, until=d.deadline + DAY)
    assert [(c.changed_at, c.before and c.before.score, c.after.score) for c in changes] == [
        (d.deadline, 990, 1000)
    ]
    # A later sweep from the deadline on writes nothing again.
    again, _ = replay(
        [e], PERSON, before=changes[-1].after.state, since=d.deadline, until=d.deadline + 2 * DAY
    )
    assert again == []


def test_a_due_process_event_is_written_even_when_nothing_changes() -> None:
    e = entry()
    state = compute_score([e], PERSON, T0 + DAY).state
    event = Event(DISPUTE, note="dispute 7 filed", always=True)
    changes, _ = replay([e], PERSON, before=state, since=T0 + DAY, until=T0 + 2 * DAY, event=event)
    assert [(c.cause, c.note, c.before, c.after.state) for c in changes] == [
        (DISPUTE, "dispute 7 filed", state, state)
    ]


# --- working days and consent ----------------------------------------------------------


@pytest.mark.parametrize(
    ("applied", "due"),
    [
        (datetime(2026, 3, 2, 10, tzinfo=UTC), datetime(2026, 3, 5, 10, tzinfo=UTC)),  # Mon -> Thu
        (datetime(2026, 3, 5, 10, tzinfo=UTC), datetime(2026, 3, 10, 10, tzinfo=UTC)),  # Thu -> Tue
        (datetime(2026, 3, 6, 10, tzinfo=UTC), datetime(2026, 3, 11, 10, tzinfo=UTC)),  # Fri -> Wed
        (datetime(2026, 3, 7, 10, tzinfo=UTC), datetime(2026, 3, 11, 10, tzinfo=UTC)),  # Sat -> Wed
    ],
)
def test_the_repair_decision_is_due_three_working_days_later_skipping_weekends(
    applied: datetime, due: datetime
) -> None:
    assert add_working_days(applied, 3) == due


def test_the_consent_in_force_is_the_latest_effective_record_ties_by_recording_order() -> None:
    def c(granted: bool, effective: datetime, n: int) -> Consent:
        return Consent("alice", granted, effective, T0 + n * DAY, "subject:alice", n)

    records = [
        c(True, T0, 1),
        c(False, T0 + 10 * DAY, 2),
        c(True, T0 + 10 * DAY, 3),
        c(False, T0 + 20 * DAY, 4),
    ]
    assert consent_in_force(records, T0 - US) is None
    assert consent_in_force(records, T0) == records[0]
    assert consent_in_force(records, T0 + 10 * DAY - US) == records[0]
    assert consent_in_force(records, T0 + 10 * DAY) == records[2]
    assert consent_in_force(records, T0 + 30 * DAY) == records[3]
    assert may_serve(False, None)
    assert not may_serve(True, None)
    assert not may_serve(True, records[3])
    assert may_serve(True, records[2])


# --- acts through DueProcess with an in-memory transaction ------------------------------


class FakeTx:
    def __init__(self, facts: dict[str, EntryFacts]) -> None:
        self.facts = facts
        self.repairs: list[RepairRecord] = []
        self.disputes: list[DisputeRecord] = []
        self.audited: list[Audited] = []
        self.rescored: list[str] = []
        self.known: set[str] = set()

    def entry(self, entry_id: str) -> EntryFacts | None:
        return self.facts.get(entry_id)

    def dispute(self, dispute_id: int) -> DisputeRecord | None:
        return next((d for d in self.disputes if d.dispute_id == dispute_id), None)

    def repair(self, application_id: int) -> RepairRecord | None:
        return next((r for r in self.repairs if r.application_id == application_id), None)

    def add_dispute(self, dispute: DisputeRecord) -> DisputeRecord:
        stored = replace(dispute, dispute_id=len(self.disputes) + 1)
        self.disputes.append(stored)
        return stored

    def save_dispute(self, dispute: DisputeRecord) -> None: ...

    def add_repair(self, repair: RepairRecord) -> RepairRecord:
        stored = replace(repair, application_id=len(self.repairs) + 1)
        self.repairs.append(stored)
        return stored

    def save_repair(self, repair: RepairRecord) -> None: ...

    def add_consent(self, consent: Consent) -> Consent:
        return consent

    def stored_subject(self, subject_keys: Sequence[str]) -> str | None:
        return next((k for k in subject_keys if k in self.known), None)

    def set_status(self, entry_id: str, status: EntryStatus) -> None: ...

    def lock(self, subject_keys: Sequence[str]) -> list[SubjectLedger]:
        return [SubjectLedger(k, "person", None, None, "", ()) for k in subject_keys]

    def save(self, results: Mapping[str, Rescored], recorded_at: datetime | None) -> None:
        self.rescored += list(results)

    def audit(self, act: Audited, at: datetime) -> None:
        self.audited.append(act)


class FakeDueStore:
    def __init__(self, tx: FakeTx) -> None:
        self.tx = tx

    @contextmanager
    def transaction(self) -> Iterator[FakeTx]:
        yield self.tx

    def overdue_repairs(self, now: datetime, limit: int) -> list[RepairRecord]:
        return [r for r in self.tx.repairs if r.overdue(now)][:limit]


def ledger_entry(severity: str, points: int = -10, occurred_at: datetime = T0) -> LedgerEntry:
    return LedgerEntry(
        "e1",
        "alice",
        "person",
        RuleRef("r"),
        points,
        "traffic",
        severity,
        EntryStatus.ACTIVE,
        occurred_at,
        occurred_at,
        occurred_at + PERSON.visibility(severity),
        "because",
        False,
        b"",
    )


ALICE = Principal("alice", Role.SUBJECT, subject_key="alice")


def due_process(
    facts: EntryFacts, now: datetime, pseudonymiser: Pseudonymiser | None = None
) -> tuple[DueProcess, FakeTx]:
    tx = FakeTx({"e1": facts})
    book = PolicyBook((ActivatedPolicy(POLICY, T0 - 1000 * DAY, "test", ""),))
    ledger = Ledger(policies=book, store=(store := FakeStore()), policy_store=store, clock=lambda: now)
    return DueProcess(
        ledger=ledger, store=FakeDueStore(tx), clock=lambda: now, pseudonymiser=pseudonymiser
    ), tx


@pytest.mark.parametrize(("severity", "days"), [("minor", 0), ("general", 90), ("serious", 365)])
def test_repair_is_accepted_from_the_severitys_minimum_period_not_an_instant_before(
    severity: str, days: int
) -> None:
    possible = T0 + days * DAY
    facts = EntryFacts(ledger_entry(severity))
    if days:
        early, _ = due_process(facts, possible - US)
        with pytest.raises(FailedPrecondition, match=possible.date().isoformat()):
            early.apply_for_repair(ALICE, "e1", "paid in full", "")
    on_time, tx = due_process(facts, possible)
    application = on_time.apply_for_repair(ALICE, "e1", "paid in full", "https://city.example/receipt")
    assert application.decision_due == add_working_days(possible, 3)
    assert [a.action for a in tx.audited] == ["repair.apply"]


def test_repair_is_refused_for_positive_entries_other_subjects_and_a_second_pending_application() -> None:
    now = T0 + 100 * DAY
    positive, _ = due_process(EntryFacts(ledger_entry("positive", 5)), now)
    with pytest.raises(FailedPrecondition, match="not negative"):
        positive.apply_for_repair(ALICE, "e1", "x", "")
    act, tx = due_process(EntryFacts(ledger_entry("general")), now)
    with pytest.raises(NotFound):
        act.apply_for_repair(Principal("bob", Role.SUBJECT, subject_key="bob"), "e1", "x", "")
    pending = act.apply_for_repair(ALICE, "e1", "x", "")
    tx.facts["e1"] = replace(tx.facts["e1"], repairs=(pending,))
    with pytest.raises(FailedPrecondition, match="pending"):
        act.apply_for_repair(ALICE, "e1", "x", "")


def test_disputes_are_filed_by_the_subject_or_the_department_of_the_evidence_only() -> None:
    facts = EntryFacts(ledger_entry("general"), sources=frozenset({"library"}))
    act, tx = due_process(facts, T0 + DAY)
    for stranger in (
        Principal("bob", Role.SUBJECT, subject_key="bob"),
        Principal("courts", Role.DEPARTMENT),
    ):
        with pytest.raises(NotFound):
            act.file_dispute(stranger, "e1", "wrong")
    filed = act.file_dispute(Principal("library", Role.DEPARTMENT), "e1", "our mistake")
    assert (filed.filed_by_role, filed.deadline) == ("department", T0 + 21 * DAY)
    tx.facts["e1"] = replace(facts, disputes=(filed,))
    with pytest.raises(FailedPrecondition, match="open dispute"):
        act.file_dispute(ALICE, "e1", "not me")


def test_statements_and_reasons_are_required_and_bounded() -> None:
    act, _ = due_process(EntryFacts(ledger_entry("general")), T0 + DAY)
    with pytest.raises(InvalidArgument) as empty:
        act.file_dispute(ALICE, "e1", "  ")
    assert [v.field for v in empty.value.violations] == ["statement"]
    with pytest.raises(InvalidArgument) as long:
        act.file_dispute(ALICE, "e1", "x" * 4001)
    assert [v.reason for v in long.value.violations] == ["TOO_LONG"]
    with pytest.raises(InvalidArgument) as both:
        act.resolve_dispute(None, "1", None, "")
    assert [v.field for v in both.value.violations] == ["decision", "reason"]


def test_a_subject_sets_only_its_own_consent_and_never_beyond_clock_skew_in_the_future() -> None:
    act, _ = due_process(EntryFacts(ledger_entry("general")), T0)
    assert act.set_consent(ALICE, "", True, None).subject_key == "alice"
    with pytest.raises(PermissionDenied):
        act.set_consent(ALICE, "bob", True, None)
    with pytest.raises(InvalidArgument):
        act.set_consent(ALICE, "", True, T0 + CONSENT_MAX_FUTURE_SKEW + US)
    bob = "b0" * 32
    paper = act.set_consent(Principal("r-1", Role.REVIEWER), bob, False, T0 - DAY)
    assert (paper.subject_key, paper.granted, paper.recorded_by) == (bob, False, "r-1")
    with pytest.raises(InvalidArgument):
        act.set_consent(Principal("r-1", Role.REVIEWER), "", True, None)
    # A key no subject has (stored as bytes, kit.columns.Hex) is refused, not bound.
    with pytest.raises(InvalidArgument):
        act.set_consent(Principal("r-1", Role.REVIEWER), "bob", True, None)


def test_staff_naming_a_subject_by_a_key_of_the_previous_generation_reach_its_current_key() -> None:
    chain = Pseudonymiser(b"", "k1", (KeyLink("k2", b"second-generation-secret-0123456789"),))
    act, tx = due_process(EntryFacts(ledger_entry("general")), T0, chain)
    old, unknown = "a1" * 32, "b2" * 32
    current = chain.rekey(old, "k1")
    tx.known = {current}
    reviewer = Principal("r-1", Role.REVIEWER)
    # A key a read returned before the rotation, the current key itself, and a key of a
    # subject the store knows nothing of (taken as given).
    assert act.set_consent(reviewer, old, True, None).subject_key == current
    assert act.set_consent(reviewer, current, True, None).subject_key == current
    assert act.set_consent(reviewer, unknown, True, None).subject_key == unknown
    # Before any rotation there is no previous generation to look for.
    act, tx = due_process(EntryFacts(ledger_entry("general")), T0, Pseudonymiser(b"", "k1"))
    tx.known = {current}
    assert act.set_consent(reviewer, old, True, None).subject_key == old
