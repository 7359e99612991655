"""A backtest's report: each subject's score under the baseline and the candidate rule
set, tallied into breakdowns (tier migrations, score changes, the rules moving the most
points) over every subject and per cohort.

Partial reports from disjoint groups of subjects add up to the report of them all;
services/rules/backtest.py replays the history and fills them in.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from domain.ruleset.model import RuleSet

# Score change buckets, (label, lowest change, highest change), inclusive; None is open.
# Fixed, so that reports of different backtests can be compared side by side.
SCORE_CHANGE_BUCKETS: Final[tuple[tuple[str, int | None, int | None], ...]] = (
    ("<= -100", None, -100),
    ("-99..-50", -99, -50),
    ("-49..-20", -49, -20),
    ("-19..-10", -19, -10),
    ("-9..-1", -9, -1),
    ("0", 0, 0),
    ("+1..+9", 1, 9),
    ("+10..+19", 10, 19),
    ("+20..+49", 20, 49),
    ("+50..+99", 50, 99),
    (">= +100", 100, None),
)


@dataclass(frozen=True)
class TierMove:
    from_tier: str
    to_tier: str
    subjects: int


@dataclass(frozen=True)
class ScoreChangeBucket:
    label: str
    min_change: int | None
    max_change: int | None
    subjects: int


@dataclass(frozen=True)
class RuleImpact:
    """Firings and points of one rule id under each side; ``points_moved`` is candidate - baseline."""

    rule_id: str
    baseline_firings: int
    candidate_firings: int
    baseline_points: int
    candidate_points: int

    @property
    def points_moved(self) -> int:
        return self.candidate_points - self.baseline_points


@dataclass(frozen=True)
class Breakdown:
    """The comparison over one group of subjects (everyone, or one cohort)."""

    subjects: int
    subjects_changed: int
    migrations: tuple[TierMove, ...]
    score_changes: tuple[ScoreChangeBucket, ...]
    rules: tuple[RuleImpact, ...]  # most points moved first


@dataclass(frozen=True)
class CohortBreakdown:
    dimension: str  # "subject_kind" or a catalogue attribute marked as a cohort
    value: str  # "" for subjects without a value
    breakdown: Breakdown


@dataclass(frozen=True, slots=True)
class SideScore:
    """A subject's score and tier under one side (the rest of ScoreResult is not kept:
    a report covers hundreds of thousands of subjects)."""

    score: int
    tier: str


@dataclass(frozen=True, slots=True)
class SubjectComparison:
    subject_key: str
    subject_kind: str
    baseline: SideScore
    candidate: SideScore

    @property
    def change(self) -> int:
        return self.candidate.score - self.baseline.score

    @property
    def changed(self) -> bool:
        return self.change != 0 or self.baseline.tier != self.candidate.tier


@dataclass(frozen=True)
class BacktestReport:
    baseline: RuleSet
    candidate: RuleSet
    policy_version: str
    as_of: datetime
    events_replayed: int
    batches_replayed: int
    # Replayed events the rule set fails on (live evaluation would park them).
    baseline_failed_events: int
    candidate_failed_events: int
    overall: Breakdown
    cohorts: tuple[CohortBreakdown, ...]
    # Most changed first (most_changed_first); every subject, or the first subject_limit.
    subjects: tuple[SubjectComparison, ...]


@dataclass(frozen=True)
class PartialReport:
    """A report's raw material from one group of subjects, before it is combined.

    Subjects are independent, so replaying disjoint groups of subjects (shards, in
    separate processes) and combining their partial reports (``combine``) gives the
    report of replaying them together: every figure is a sum over subjects, except the
    batches, which are counted once per ``evaluated_at`` however many groups saw one.
    """

    events: int
    batches: frozenset[datetime]  # the evaluated_at of every batch replayed
    baseline_failed_events: int
    candidate_failed_events: int
    overall: Tally
    cohorts: Mapping[tuple[str, str], Tally]
    # The group's subjects, or only its first subject_limit by most_changed_first: the
    # first N of all subjects are among the first N of each group.
    subjects: tuple[SubjectComparison, ...]


def most_changed_first(comparison: SubjectComparison) -> tuple[int, bool, str]:
    """The order subjects are listed in: the largest score change first, then those whose
    tier changed, then by subject key (a total order, so any group's first N are well defined)."""
    return (
        -abs(comparison.change),
        comparison.baseline.tier == comparison.candidate.tier,
        comparison.subject_key,
    )


def first_listed(comparisons: list[SubjectComparison], limit: int | None) -> tuple[SubjectComparison, ...]:
    if limit is None:
        return tuple(sorted(comparisons, key=most_changed_first))
    return tuple(heapq.nsmallest(limit, comparisons, key=most_changed_first))


def bucket_of(change: int) -> int:
    for index, (_label, low, high) in enumerate(SCORE_CHANGE_BUCKETS):
        if (low is None or change >= low) and (high is None or change <= high):
            return index
    raise AssertionError(f"no bucket holds {change}")  # the buckets cover every integer


class Tally:
    """The comparison over a group of subjects, accumulated one subject at a time."""

    def __init__(self) -> None:
        self.subjects = 0
        self.changed = 0
        self.moves: dict[tuple[str, str], int] = {}
        self.buckets = [0] * len(SCORE_CHANGE_BUCKETS)
        # rule id -> [baseline firings, candidate firings, baseline points, candidate points]
        self.rules: dict[str, list[int]] = {}

    def add(
        self,
        comparison: SubjectComparison,
        baseline: Mapping[str, list[int]],
        candidate: Mapping[str, list[int]],
    ) -> None:
        self.subjects += 1
        self.changed += comparison.changed
        move = (comparison.baseline.tier, comparison.candidate.tier)
        self.moves[move] = self.moves.get(move, 0) + 1
        self.buckets[bucket_of(comparison.change)] += 1
        for offset, totals in ((0, baseline), (1, candidate)):
            for rule_id, (firings, points) in totals.items():
                row = self.rules.get(rule_id)
                if row is None:
                    row = self.rules[rule_id] = [0, 0, 0, 0]
                row[offset] += firings
                row[2 + offset] += points

    def merge(self, other: Tally) -> None:
        self.subjects += other.subjects
        self.changed += other.changed
        for move, subjects in other.moves.items():
            self.moves[move] = self.moves.get(move, 0) + subjects
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        for rule_id, row in other.rules.items():
            mine = self.rules.get(rule_id)
            if mine is None:
                self.rules[rule_id] = list(row)
            else:
                self.rules[rule_id] = [a + b for a, b in zip(mine, row, strict=True)]

    def breakdown(self, rule_limit: int | None, tier_rank: Mapping[str, int]) -> Breakdown:
        impacts = sorted(
            (RuleImpact(rule_id, *row) for rule_id, row in self.rules.items()),
            key=lambda r: (-abs(r.points_moved), r.rule_id),
        )
        return Breakdown(
            subjects=self.subjects,
            subjects_changed=self.changed,
            migrations=tuple(
                TierMove(a, b, n)
                for (a, b), n in sorted(
                    self.moves.items(), key=lambda m: (tier_rank[m[0][0]], tier_rank[m[0][1]])
                )
            ),
            score_changes=tuple(
                ScoreChangeBucket(label, low, high, count)
                for (label, low, high), count in zip(SCORE_CHANGE_BUCKETS, self.buckets, strict=True)
            ),
            rules=tuple(impacts if rule_limit is None else impacts[:rule_limit]),
        )
