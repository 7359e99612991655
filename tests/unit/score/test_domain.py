"""The score as a pure function of the ledger, and the Ledger application service."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from domain.entries import CORRECTION, DISPUTE, REPAIR, EntryStatus, Pause, RuleRef, ScoredEntry
from domain.intake import IncomingOutcome, IncomingReversal, outcome_violations, reversal_violations
from domain.policy import ActivatedPolicy, Caps, PolicyBook, ScorePolicy, SubjectPolicy, load_policy
from domain.scoring import CategoryScore, ScoreResult, ScoreState, compute_score
from services.score.ledger import Ledger, Mismatch
from tests.support.score_store import FakeStore

POLICY = load_policy(Path(__file__).parents[3] / "config" / "policy.yaml")
PERSON = POLICY.for_kind("person")
# The arithmetic tests below are about sums, tiers and bounds, so the cap is lifted.
UNCAPPED = replace(PERSON, caps=Caps(positive_per_category=None))
NOW = datetime(2026, 7, 1, 9, 30, tzinfo=UTC)
OCCURRED = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


_serial = iter(range(1_000_000))


def active(points: int, category: str = "civic", status: EntryStatus = EntryStatus.ACTIVE) -> ScoredEntry:
    """A recent entry that counts at NOW, unless its status says otherwise."""
    severity = "positive" if points > 0 else "general"
    return ScoredEntry(f"e{next(_serial)}", points, category, severity, status, OCCURRED, OCCURRED)


def score_of(entries: Sequence[ScoredEntry], policy: SubjectPolicy | None = None) -> ScoreResult:
    return compute_score(entries, policy or UNCAPPED, NOW)


def test_score_is_base_plus_the_points_of_active_entries_by_category() -> None:
    result = score_of([active(10), active(-5, "traffic"), active(-3), active(2, "transport")])
    assert result.score == 1000 + 10 - 5 - 3 + 2
    assert result.tier == "A"
    assert result.policy_version == "2026.2"
    assert result.entry_count == 4
    assert result.categories == (
        CategoryScore("civic", 7, 2),
        CategoryScore("traffic", -5, 1),
        CategoryScore("transport", 2, 1),
    )


def test_an_empty_ledger_scores_the_base() -> None:
    result = score_of([])
    assert (result.score, result.tier, result.entry_count, result.categories) == (1000, "A", 0, ())


@pytest.mark.parametrize(
    "pause",
    [
        Pause(OCCURRED, None, False, DISPUTE, "1"),
        Pause(OCCURRED, None, True, CORRECTION, "library/ev-1"),
        Pause(OCCURRED, None, False, REPAIR, "2"),
    ],
)
def test_entries_in_a_pause_do_not_count(pause: Pause) -> None:
    paused = replace(active(-100, "legal", EntryStatus.DISPUTED), pauses=(pause,))
    result = score_of([active(-50, "traffic"), paused])
    assert (result.score, result.entry_count) == (950, 1)
    assert result.categories == (CategoryScore("traffic", -50, 1),)


@dataclass(frozen=True)
class Line:
    """A scorable without pauses (like the rules backtest's lines): its status decides."""

    entry_id: str
    points: int
    category: str
    severity: str
    status: EntryStatus
    occurred_at: datetime
    recorded_at: datetime
    black_list: bool = False


@pytest.mark.parametrize(
    "status", [EntryStatus.DISPUTED, EntryStatus.REVERSED, EntryStatus.REPAIRED, EntryStatus.EXPIRED]
)
def test_scorables_without_pauses_count_only_when_active(status: EntryStatus) -> None:
    line = Line("x", -100, "legal", "general", status, OCCURRED, OCCURRED)
    result = compute_score([active(-50, "traffic"), line], UNCAPPED, NOW)
    assert (result.score, result.entry_count) == (950, 1)


def test_the_score_is_clamped_to_the_upper_bound() -> None:
    result = score_of([active(600), active(500)])
    assert (result.score, result.tier) == (2000, "AAA")
    # The breakdown keeps the real points: it explains, the clamp only bounds.
    assert result.categories == (CategoryScore("civic", 1100, 2),)


def test_the_score_is_clamped_to_the_lower_bound() -> None:
    result = score_of([active(-100, "legal")] * 11)
    assert (result.score, result.tier) == (0, "D")


def test_the_bounds_themselves_are_reached_exactly() -> None:
    assert score_of([active(1000)]).score == 2000
    assert score_of([active(-1000)]).score == 0


@pytest.mark.parametrize(
    ("score", "tier"),
    [
        (1050, "AAA"),
        (1049, "AA"),
        (1030, "AA"),
        (1029, "A"),
        (960, "A"),
        (959, "B"),
        (850, "B"),
        (849, "C"),
        (600, "C"),
        (599, "D"),
        (0, "D"),
    ],
)
def test_tier_boundaries(score: int, tier: str) -> None:
    result = score_of([active(score - 1000)])
    assert (result.score, result.tier) == (score, tier)


def test_each_subject_kind_is_scored_under_its_own_policy() -> None:
    # The shipped policy caps organizations' positive points per category at +30, persons' at +50.
    civic = [active(20), active(20), active(20)]
    assert compute_score(civic, POLICY.for_kind("person"), NOW).score == 1050
    assert compute_score(civic, POLICY.for_kind("organization"), NOW).score == 1030


# --- the Ledger, over an in-memory store -------------------------------------------------


def outcome(
    outcome_id: str,
    subject_key: str = "a" * 64,
    points: int = -5,
    category: str = "traffic",
    severity: str | None = "minor",
) -> IncomingOutcome:
    return IncomingOutcome(
        outcome_id=outcome_id,
        subject_key=subject_key,
        subject_kind="person",
        rule=RuleRef(rule_id="traffic.red_light", rule_set="sample", rule_set_version=1),
        points=points,
        category=category,
        severity=severity,
        occurred_at=OCCURRED,
        reason="ran a red light",
        black_list=False,
        snapshot=outcome_id.encode(),
    )


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


def book(policy: ScorePolicy = POLICY) -> PolicyBook:
    return PolicyBook((ActivatedPolicy(policy, NOW - timedelta(days=3650), "test", ""),))


@pytest.fixture
def ledger(store: FakeStore) -> Ledger:
    return Ledger(policies=book(), store=store, policy_store=store, clock=lambda: NOW)


def test_apply_records_each_outcome_as_an_active_entry(ledger: Ledger, store: FakeStore) -> None:
    result = ledger.apply(
        [outcome("01"), outcome("02", "b" * 64, points=10, category="civic", severity="positive")]
    )
    assert (result.applied, result.duplicate, result.subjects_updated, result.rejected) == (2, 0, 2, ())
    entry = store.entries["01"]
    assert entry.status is EntryStatus.ACTIVE
    assert entry.recorded_at == NOW
    assert entry.visible_until == OCCURRED + timedelta(days=90)
    assert store.entries["02"].visible_until == OCCURRED + timedelta(days=730)
    assert entry.snapshot == b"01"
    assert store.scores == {"a" * 64: (995, "A"), "b" * 64: (1010, "A")}


def test_apply_is_idempotent_by_outcome_id(ledger: Ledger, store: FakeStore) -> None:
    batch = [outcome("01"), outcome("02"), outcome("03", points=-50, severity="serious")]
    ledger.apply(batch)
    scores = dict(store.scores)
    again = ledger.apply(batch)
    assert (again.applied, again.duplicate, again.subjects_updated) == (0, 3, 0)
    assert store.scores == scores == {"a" * 64: (940, "B")}
    assert len(store.entries) == 3


def test_a_repeat_within_one_batch_is_a_duplicate(ledger: Ledger, store: FakeStore) -> None:
    result = ledger.apply([outcome("01"), outcome("01")])
    assert (result.applied, result.duplicate) == (1, 1)
    assert store.scores == {"a" * 64: (995, "A")}


def test_an_invalid_outcome_is_rejected_without_blocking_the_others(ledger: Ledger, store: FakeStore) -> None:
    result = ledger.apply([outcome("bad0", severity=None), outcome("01"), outcome("", category="")])
    assert (result.applied, result.duplicate, result.subjects_updated) == (1, 0, 1)
    assert [(r.outcome_id, [v.field for v in r.violations]) for r in result.rejected] == [
        ("bad0", ["severity"]),
        ("", ["outcome_id", "category"]),
    ]
    assert list(store.entries) == ["01"]


def test_a_batch_of_only_rejects_never_reaches_the_store(ledger: Ledger, store: FakeStore) -> None:
    result = ledger.apply([outcome("bad", subject_key="")])
    assert (result.applied, len(result.rejected)) == (0, 1)
    assert store.record_calls == 0


def test_outcome_violations_name_every_missing_or_oversized_field() -> None:
    empty = IncomingOutcome(
        outcome_id="",
        subject_key="",
        subject_kind=None,
        rule=RuleRef(rule_id="r" * 129),
        points=0,
        category="",
        severity=None,
        occurred_at=None,
        reason="",
        black_list=False,
        snapshot=b"",
    )
    assert [(v.field, v.reason) for v in outcome_violations(empty)] == [
        ("outcome_id", "REQUIRED"),
        ("subject_key", "REQUIRED"),
        ("category", "REQUIRED"),
        ("rule.rule_id", "TOO_LONG"),
        ("subject_kind", "REQUIRED"),
        ("severity", "REQUIRED"),
        ("occurred_at", "REQUIRED"),
    ]
    assert [v.reason for v in outcome_violations(outcome("x" * 129, subject_key="k" * 65))] == [
        "TOO_LONG",
        "TOO_LONG",
    ]
    assert outcome_violations(outcome("0c")) == []


@pytest.mark.parametrize("bad", ["alice", "AB" * 32, "abc", "o1"])
def test_a_key_or_id_that_is_not_lowercase_hex_is_invalid(bad: str) -> None:
    """Refused before the store, which keeps them as bytes and could not bind it (kit.columns.Hex)."""
    assert [v.field for v in outcome_violations(outcome(bad))] == ["outcome_id"]
    assert [v.field for v in outcome_violations(outcome("0c", subject_key=bad))] == ["subject_key"]
    reversal = IncomingReversal(bad, bad, "library", "ev-1", "wrong", NOW, "library")
    assert [(v.field, v.reason) for v in reversal_violations(reversal)] == [
        ("outcome_id", "NOT_HEX"),
        ("retraction.subject_key", "NOT_HEX"),
    ]
    assert reversal_violations(IncomingReversal("0c", "a" * 64, "library", "ev-1", "", NOW, "library")) == []


def test_verify_finds_nothing_wrong_in_scores_it_computed(ledger: Ledger) -> None:
    ledger.apply([outcome(f"{i:02x}", subject_key=f"{i % 3:064x}") for i in range(7)])
    result = ledger.verify(max_mismatches=10, page_size=2)
    assert (result.subjects_checked, result.mismatch_count, result.mismatches) == (3, 0, ())


def test_verify_reports_corrupted_and_missing_scores(ledger: Ledger, store: FakeStore) -> None:
    ledger.apply([outcome(f"{i:02x}", subject_key=f"{i:064x}") for i in range(4)])
    store.rows[f"{1:064x}"].state = ScoreState(1200, "AAA", True, False)
    del store.rows[f"{2:064x}"]
    result = ledger.verify(max_mismatches=10, page_size=3)
    assert result.subjects_checked == 4
    assert result.mismatch_count == 2
    assert result.mismatches == (
        Mismatch(f"{1:064x}", 1200, 995, "AAA", "A", ("red",), ()),
        Mismatch(f"{2:064x}", 0, 995, "", "A"),
    )


def test_verify_counts_every_mismatch_but_lists_at_most_the_limit(ledger: Ledger, store: FakeStore) -> None:
    ledger.apply([outcome(f"{i:02x}", subject_key=f"{i:064x}") for i in range(5)])
    for row in store.rows.values():
        row.state = ScoreState(1, "D", False, True)
    result = ledger.verify(max_mismatches=2)
    assert (result.mismatch_count, len(result.mismatches)) == (5, 2)
