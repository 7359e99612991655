"""The score as a pure function of the ledger, and the Ledger application service."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.score.domain import (
    CategoryScore,
    EntryStatus,
    IncomingOutcome,
    Ledger,
    LedgerEntry,
    Mismatch,
    Recorded,
    Rescore,
    RuleRef,
    ScoredEntry,
    SubjectLedger,
    compute_score,
    outcome_violations,
)
from services.score.policy import ScorePolicy, load_policy

POLICY = load_policy(Path(__file__).parents[3] / "config" / "policy.yaml")
PERSON = POLICY.for_kind("person")
NOW = datetime(2026, 7, 1, 9, 30, tzinfo=UTC)
OCCURRED = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def active(points: int, category: str = "civic") -> ScoredEntry:
    return ScoredEntry(points, category, EntryStatus.ACTIVE)


def test_score_is_base_plus_the_points_of_active_entries_by_category() -> None:
    result = compute_score([active(10), active(-5, "traffic"), active(-3), active(2, "transport")], PERSON)
    assert result.score == 1000 + 10 - 5 - 3 + 2
    assert result.tier == "A"
    assert result.policy_version == "2026.1"
    assert result.entry_count == 4
    assert result.categories == (
        CategoryScore("civic", 7, 2),
        CategoryScore("traffic", -5, 1),
        CategoryScore("transport", 2, 1),
    )


def test_an_empty_ledger_scores_the_base() -> None:
    result = compute_score([], PERSON)
    assert (result.score, result.tier, result.entry_count, result.categories) == (1000, "A", 0, ())


@pytest.mark.parametrize(
    "status", [EntryStatus.DISPUTED, EntryStatus.REVERSED, EntryStatus.REPAIRED, EntryStatus.EXPIRED]
)
def test_entries_that_are_not_active_do_not_count(status: EntryStatus) -> None:
    result = compute_score([active(-50, "traffic"), ScoredEntry(-100, "legal", status)], PERSON)
    assert (result.score, result.entry_count) == (950, 1)
    assert result.categories == (CategoryScore("traffic", -50, 1),)


def test_the_score_is_clamped_to_the_upper_bound() -> None:
    result = compute_score([active(600), active(500)], PERSON)
    assert (result.score, result.tier) == (2000, "AAA")
    # The breakdown keeps the real points: it explains, the clamp only bounds.
    assert result.categories == (CategoryScore("civic", 1100, 2),)


def test_the_score_is_clamped_to_the_lower_bound() -> None:
    result = compute_score([active(-100, "legal")] * 11, PERSON)
    assert (result.score, result.tier) == (0, "D")


def test_the_bounds_themselves_are_reached_exactly() -> None:
    assert compute_score([active(1000)], PERSON).score == 2000
    assert compute_score([active(-1000)], PERSON).score == 0


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
    result = compute_score([active(score - 1000)], PERSON)
    assert (result.score, result.tier) == (score, tier)


def test_each_subject_kind_is_scored_under_its_own_policy() -> None:
    strict = replace(POLICY.for_kind("organization"), base=900)
    policy = ScorePolicy(version="x", kinds={"person": PERSON, "organization": strict})
    ledger = Ledger(policy=policy, store=FakeStore(), clock=lambda: NOW)
    assert ledger.rescore("organization", [active(5)]).score == 905
    assert ledger.rescore("person", [active(5)]).score == 1005


# --- the Ledger, over an in-memory store -------------------------------------------------


class FakeStore:
    """LedgerStore in memory, with the same contract as the SQL store."""

    def __init__(self) -> None:
        self.entries: dict[str, LedgerEntry] = {}
        self.scores: dict[str, tuple[int, str]] = {}
        self.record_calls = 0

    def record(self, entries: Sequence[LedgerEntry], rescore: Rescore) -> Recorded:
        self.record_calls += 1
        fresh = [e for e in entries if e.entry_id not in self.entries]
        self.entries.update((e.entry_id, e) for e in fresh)
        subjects = {e.subject_key: e.subject_kind for e in fresh}
        for key, kind in subjects.items():
            result = rescore(kind, [e for e in self.entries.values() if e.subject_key == key])
            self.scores[key] = (result.score, result.tier)
        return Recorded(applied=len(fresh), subjects_updated=len(subjects))

    def subject_pages(self, page_size: int) -> Iterator[Sequence[SubjectLedger]]:
        keys = sorted({e.subject_key for e in self.entries.values()})
        for start in range(0, len(keys), page_size):
            page = []
            for key in keys[start : start + page_size]:
                mine = [e for e in self.entries.values() if e.subject_key == key]
                stored = self.scores.get(key)
                page.append(
                    SubjectLedger(
                        subject_key=key,
                        subject_kind=mine[0].subject_kind,
                        stored_score=stored[0] if stored else None,
                        stored_tier=stored[1] if stored else None,
                        entries=tuple(ScoredEntry(e.points, e.category, e.status) for e in mine),
                    )
                )
            yield page


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


@pytest.fixture
def ledger(store: FakeStore) -> Ledger:
    return Ledger(policy=POLICY, store=store, clock=lambda: NOW)


def test_apply_records_each_outcome_as_an_active_entry(ledger: Ledger, store: FakeStore) -> None:
    result = ledger.apply(
        [outcome("o1"), outcome("o2", "b" * 64, points=10, category="civic", severity="positive")]
    )
    assert (result.applied, result.duplicate, result.subjects_updated, result.rejected) == (2, 0, 2, ())
    entry = store.entries["o1"]
    assert entry.status is EntryStatus.ACTIVE
    assert entry.recorded_at == NOW
    assert entry.visible_until == OCCURRED + timedelta(days=90)
    assert store.entries["o2"].visible_until == OCCURRED + timedelta(days=730)
    assert entry.snapshot == b"o1"
    assert store.scores == {"a" * 64: (995, "A"), "b" * 64: (1010, "A")}


def test_apply_is_idempotent_by_outcome_id(ledger: Ledger, store: FakeStore) -> None:
    batch = [outcome("o1"), outcome("o2"), outcome("o3", points=-50, severity="serious")]
    ledger.apply(batch)
    scores = dict(store.scores)
    again = ledger.apply(batch)
    assert (again.applied, again.duplicate, again.subjects_updated) == (0, 3, 0)
    assert store.scores == scores == {"a" * 64: (940, "B")}
    assert len(store.entries) == 3


def test_a_repeat_within_one_batch_is_a_duplicate(ledger: Ledger, store: FakeStore) -> None:
    result = ledger.apply([outcome("o1"), outcome("o1")])
    assert (result.applied, result.duplicate) == (1, 1)
    assert store.scores == {"a" * 64: (995, "A")}


def test_an_invalid_outcome_is_rejected_without_blocking_the_others(ledger: Ledger, store: FakeStore) -> None:
    result = ledger.apply([outcome("bad", severity=None), outcome("o1"), outcome("", category="")])
    assert (result.applied, result.duplicate, result.subjects_updated) == (1, 0, 1)
    assert [(r.outcome_id, [v.field for v in r.violations]) for r in result.rejected] == [
        ("bad", ["severity"]),
        ("", ["outcome_id", "category"]),
    ]
    assert list(store.entries) == ["o1"]


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
    assert outcome_violations(outcome("ok")) == []


def test_verify_finds_nothing_wrong_in_scores_it_computed(ledger: Ledger) -> None:
    ledger.apply([outcome(f"o{i}", subject_key=f"{i % 3:064x}") for i in range(7)])
    result = ledger.verify(max_mismatches=10, page_size=2)
    assert (result.subjects_checked, result.mismatch_count, result.mismatches) == (3, 0, ())


def test_verify_reports_corrupted_and_missing_scores(ledger: Ledger, store: FakeStore) -> None:
    ledger.apply([outcome(f"o{i}", subject_key=f"{i:064x}") for i in range(4)])
    store.scores[f"{1:064x}"] = (1200, "AAA")
    del store.scores[f"{2:064x}"]
    result = ledger.verify(max_mismatches=10, page_size=3)
    assert result.subjects_checked == 4
    assert result.mismatch_count == 2
    assert result.mismatches == (
        Mismatch(f"{1:064x}", 1200, 995, "AAA", "A"),
        Mismatch(f"{2:064x}", 0, 995, "", "A"),
    )


def test_verify_counts_every_mismatch_but_lists_at_most_the_limit(ledger: Ledger, store: FakeStore) -> None:
    ledger.apply([outcome(f"o{i}", subject_key=f"{i:064x}") for i in range(5)])
    for key in store.scores:
        store.scores[key] = (1, "D")
    result = ledger.verify(max_mismatches=2)
    assert (result.mismatch_count, len(result.mismatches)) == (5, 2)
