"""Backtests in the pure domain, with hand-computed expectations."""

from __future__ import annotations

from datetime import timedelta

import pytest

from domain.catalogue import CatalogueError, parse_catalogue
from domain.ruleset.model import EngineEvent, RuleSet
from services.rules.backtest import Backtest, BacktestScope, LedgerLine, StoredEvent, _held, _score_alike
from services.rules.backtest_report import SCORE_CHANGE_BUCKETS, BacktestReport, bucket_of
from services.rules.engine import RuleEngine
from services.rules.handlers.backtests import cohort_attributes
from tests.support.backtest_events import ACME, ALICE, AS_OF, BOB, DAY, T0, event, policy, rule_set


def replay(
    baseline: RuleSet, candidate: RuleSet, batches: list[list[EngineEvent]], cohorts: tuple[str, ...] = ()
) -> BacktestReport:
    backtest = Backtest(
        baseline=baseline,
        candidate=candidate,
        policy=policy(),
        cohort_attributes=cohorts,
        make_engine=RuleEngine,
    )
    try:
        for number, batch in enumerate(batches):
            backtest.feed(StoredEvent(T0 + number * timedelta(seconds=1), e) for e in batch)
        return backtest.report(as_of=AS_OF)
    finally:
        backtest.close()


def test_a_stricter_rule_moves_tiers_and_points_as_computed_by_hand() -> None:
    batches = [
        [
            event("1", ALICE, "traffic.red_light", 1, {"district": "Huli"}),
            event("2", BOB, "civic.blood_donation", 2, {"district": "Siming"}),
        ],
        [
            event("3", ALICE, "traffic.red_light", 3),
            event("4", ACME, "civic.blood_donation", 4, kind="organization"),
        ],
    ]
    report = replay(rule_set(1), rule_set(2, red="-15"), batches, cohorts=("district",))

    assert (report.events_replayed, report.batches_replayed) == (4, 2)
    # Alice: 1000 - 10 = 990 (B) under the baseline, 1000 - 30 = 970 (C) under the candidate.
    scores = {s.subject_key: (s.baseline.score, s.candidate.score, s.change) for s in report.subjects}
    assert scores == {ALICE: (990, 970, -20), BOB: (1010, 1010, 0), ACME: (1010, 1010, 0)}
    assert report.subjects[0].subject_key == ALICE  # the largest change first
    assert [(m.from_tier, m.to_tier, m.subjects) for m in report.overall.migrations] == [
        ("A", "A", 2),
        ("B", "C", 1),
    ]
    buckets = {b.label: b.subjects for b in report.overall.score_changes}
    assert (buckets["-49..-20"], buckets["0"], sum(buckets.values())) == (1, 2, 3)
    red = report.overall.rules[0]
    assert (red.rule_id, red.baseline_firings, red.candidate_firings) == ("traffic.red_light", 2, 2)
    assert (red.baseline_points, red.candidate_points, red.points_moved) == (-10, -30, -20)
    assert report.overall.subjects_changed == 1

    cohorts = {(c.dimension, c.value): c.breakdown for c in report.cohorts}
    assert list(cohorts) == [
        ("subject_kind", "organization"),
        ("subject_kind", "person"),
        ("district", ""),
        ("district", "Huli"),
        ("district", "Siming"),
    ]
    assert cohorts[("district", "Huli")].subjects_changed == 1
    assert cohorts[("district", "Siming")].subjects_changed == 0
    assert cohorts[("subject_kind", "organization")].subjects == 1


def test_the_cohort_is_the_value_on_the_latest_event_in_event_time_not_arrival() -> None:
    batches = [
        [event("1", ALICE, "traffic.red_light", 9, {"district": "Jimei"})],
        [event("2", ALICE, "traffic.red_light", 2, {"district": "Huli"})],  # arrives late
    ]
    report = replay(rule_set(1), rule_set(2), batches, cohorts=("district",))
    districts = [c.value for c in report.cohorts if c.dimension == "district"]
    assert districts == ["Jimei"]


def test_windows_use_the_sides_own_history_and_consumed_events_across_batches() -> None:
    # Three evasions in separate batches: the window (2 within 30 days) fires once on
    # the first two, and the third finds its partners consumed.
    batches = [[event(str(n), ALICE, "transport.metro.fare_evasion", n * 5)] for n in range(3)]
    report = replay(rule_set(1), rule_set(2), batches)
    window = next(r for r in report.overall.rules if r.rule_id == "transport.fare_evasion_repeated")
    assert (window.baseline_firings, window.candidate_firings) == (1, 1)
    assert report.subjects[0].baseline.score == 980


def test_events_the_candidate_cannot_evaluate_are_counted_and_count_for_nothing() -> None:
    batches = [[event("1", ALICE, "civic.blood_donation", 1, {"ml": 0})]]
    report = replay(rule_set(1), rule_set(2, blood='"10 * 400 / ml"'), batches)
    assert (report.baseline_failed_events, report.candidate_failed_events) == (0, 1)
    assert (report.subjects[0].baseline.score, report.subjects[0].candidate.score) == (1010, 1000)


def test_stored_events_must_come_in_evaluation_order() -> None:
    backtest = Backtest(baseline=rule_set(1), candidate=rule_set(2), policy=policy(), make_engine=RuleEngine)
    try:
        backtest.feed([StoredEvent(T0 + DAY, event("1", ALICE, "traffic.red_light", 1))])
        with pytest.raises(ValueError, match="evaluated_at order"):
            backtest.feed([StoredEvent(T0, event("2", ALICE, "traffic.red_light", 1))])
    finally:
        backtest.close()


def test_the_sample_is_deterministic_and_about_the_asked_share() -> None:
    scope = BacktestScope(sample_fraction=0.1)
    keys = [f"{n:064x}" for n in range(20_000)]
    chosen = [k for k in keys if scope.includes_subject(k)]
    assert chosen == [k for k in keys if BacktestScope(sample_fraction=0.1).includes_subject(k)]
    assert 0.09 < len(chosen) / len(keys) < 0.11
    assert all(BacktestScope().includes_subject(k) for k in keys[:100])


def test_the_range_includes_its_start_and_excludes_its_end() -> None:
    scope = BacktestScope(occurred_from=T0, occurred_to=T0 + DAY)
    assert scope.includes_time(T0)
    assert not scope.includes_time(T0 + DAY)
    assert not scope.includes_time(T0 - timedelta(microseconds=1))
    with pytest.raises(ValueError):
        BacktestScope(occurred_from=T0, occurred_to=T0)
    with pytest.raises(ValueError):
        BacktestScope(sample_fraction=0.0)


@pytest.mark.parametrize(("change", "label"), [(-100, "<= -100"), (-10, "-19..-10"), (0, "0"), (9, "+1..+9")])
def test_score_changes_fall_in_fixed_buckets(change: int, label: str) -> None:
    assert SCORE_CHANGE_BUCKETS[bucket_of(change)][0] == label


def test_catalogue_attributes_marked_as_cohorts_split_reports() -> None:
    document = {
        "departments": [{"id": "library"}],
        "event_types": [
            {
                "name": "library.book_returned",
                "subject_kinds": ["person"],
                "departments": ["library"],
                "attributes": {
                    "on_time": {"type": "bool"},
                    "district": {"type": "string", "required": False, "cohort": True},
                    "branch": {"type": "string", "cohort": False},
                },
            }
        ],
    }
    assert cohort_attributes(parse_catalogue(document)) == ("district",)


def test_only_discrete_attributes_can_be_cohorts() -> None:
    document = {
        "departments": [{"id": "library"}],
        "event_types": [
            {
                "name": "library.fine_paid",
                "subject_kinds": ["person"],
                "departments": ["library"],
                "attributes": {
                    "amount": {"type": "double", "cohort": True},
                    "branch": {"type": "string", "cohort": "yes"},
                },
            }
        ],
    }
    with pytest.raises(CatalogueError) as error:
        parse_catalogue(document)
    assert error.value.problems == [
        "event_types[0] (library.fine_paid).attributes.amount.cohort: "
        "only string, int and bool attributes can be cohorts",
        "event_types[0] (library.fine_paid).attributes.branch.cohort: must be true or false",
    ]


def test_two_ledgers_score_alike_only_with_the_same_lines_in_the_same_order() -> None:
    """The report scores a subject once when both sides' ledgers score alike: the same lines
    but for their ids (which name each side's rule set version), read in the same order."""
    at = T0 + DAY

    def line(entry_id: str, category: str, points: int = 5) -> LedgerLine:
        return LedgerLine(entry_id, "r", points, category, "minor", at, at, black_list=False)

    baseline = _held([line("v1-a", "civic"), line("v1-b", "library")])
    assert _score_alike(baseline, _held([line("v2-a", "civic"), line("v2-b", "library")]))
    # Ties in event time are read in id order: the same lines read the other way round
    # could take a category cap's allowance in another order, so they are scored apart.
    assert not _score_alike(baseline, _held([line("v2-b", "civic"), line("v2-a", "library")]))
    assert not _score_alike(baseline, _held([line("v2-a", "civic"), line("v2-b", "library", 6)]))
    assert not _score_alike(baseline, _held([line("v2-a", "civic")]))
    # A repeated id counts once, as score inserts it once.
    assert _score_alike(_held([line("v1-a", "civic"), line("v1-a", "civic")]), _held([line("v2-a", "civic")]))
