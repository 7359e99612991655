"""BacktestRuleSet's wire: the request checked into a plan, the report into its response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from domain.ruleset.model import RuleSet
from egret.rules.v1 import backtest_pb2 as pb
from kit.errors import InvalidArgument, Violation
from kit.protoconv import to_datetime, to_timestamp
from services.rules.backtest import BacktestScope
from services.rules.backtest_report import BacktestReport, Breakdown

DEFAULT_RULE_LIMIT: Final = 20
MAX_RULE_LIMIT: Final = 1000
MAX_SUBJECT_LIMIT: Final = 10_000


@dataclass(frozen=True)
class Contender:
    """A rule set taking part in a backtest; rule_set_id 0 when it is not stored."""

    rule_set_id: int
    rule_set: RuleSet
    source: str  # the YAML it was parsed from, which worker processes parse again


class Plan(NamedTuple):
    """A checked backtest request: what to replay, and what to list."""

    request: pb.BacktestRuleSetRequest
    scope: BacktestScope
    rule_limit: int
    subject_limit: int  # 0 when no purpose was stated


def parse(request: pb.BacktestRuleSetRequest) -> tuple[BacktestScope, int, int]:
    problems: list[Violation] = []
    if request.rule_set_id <= 0:
        problems.append(Violation("rule_set_id", "is required", "REQUIRED"))
    occurred_from = to_datetime(request.occurred_from) if request.HasField("occurred_from") else None
    occurred_to = to_datetime(request.occurred_to) if request.HasField("occurred_to") else None
    if occurred_from is not None and occurred_to is not None and occurred_from >= occurred_to:
        problems.append(Violation("occurred_to", "must be after occurred_from", "OUT_OF_RANGE"))
    fraction = request.sample_fraction
    if not 0.0 <= fraction <= 1.0:  # also refuses NaN
        problems.append(
            Violation("sample_fraction", "must lie in [0, 1] (0 means every subject)", "OUT_OF_RANGE")
        )
    if not 0 <= request.rule_limit <= MAX_RULE_LIMIT:
        problems.append(Violation("rule_limit", f"must lie in 0..{MAX_RULE_LIMIT}", "OUT_OF_RANGE"))
    if not 0 <= request.subject_limit <= MAX_SUBJECT_LIMIT:
        problems.append(Violation("subject_limit", f"must lie in 0..{MAX_SUBJECT_LIMIT}", "OUT_OF_RANGE"))
    if problems:
        raise InvalidArgument("invalid backtest request", problems)
    scope = BacktestScope(occurred_from, occurred_to, fraction or 1.0)
    return scope, request.rule_limit or DEFAULT_RULE_LIMIT, request.subject_limit


def backtest_scope(
    request: pb.BacktestRuleSetRequest, response: pb.BacktestRuleSetResponse
) -> dict[str, object]:
    """What a backtest's read record keeps of the request: its scope and the instant
    scored (rerun over the same history, it lists the same subjects: the digest checks)."""
    scope: dict[str, object] = {
        "as_of": to_datetime(response.as_of).isoformat(),
        "sample_fraction": request.sample_fraction,
        "subject_limit": request.subject_limit,
    }
    for field in ("occurred_from", "occurred_to"):
        if request.HasField(field):
            scope[field] = to_datetime(getattr(request, field)).isoformat()
    return scope


def response(
    report: BacktestReport, baseline: Contender, candidate: Contender, *, subject_limit: int, elapsed: float
) -> pb.BacktestRuleSetResponse:
    return pb.BacktestRuleSetResponse(
        baseline=_rule_set(baseline),
        candidate=_rule_set(candidate),
        policy_version=report.policy_version,
        events_replayed=report.events_replayed,
        batches_replayed=report.batches_replayed,
        overall=_breakdown(report.overall),
        cohorts=[
            pb.BacktestCohort(dimension=c.dimension, value=c.value, breakdown=_breakdown(c.breakdown))
            for c in report.cohorts
        ],
        subjects=[
            pb.BacktestSubject(
                subject_key=s.subject_key,
                subject_kind=s.subject_kind,
                baseline_score=s.baseline.score,
                baseline_tier=s.baseline.tier,
                candidate_score=s.candidate.score,
                candidate_tier=s.candidate.tier,
            )
            for s in report.subjects[:subject_limit]
        ],
        elapsed_seconds=elapsed,
        baseline_failed_events=report.baseline_failed_events,
        candidate_failed_events=report.candidate_failed_events,
        as_of=to_timestamp(report.as_of),
    )


def _rule_set(contender: Contender) -> pb.BacktestedRuleSet:
    rule_set = contender.rule_set
    return pb.BacktestedRuleSet(
        rule_set_id=contender.rule_set_id,
        name=rule_set.name,
        version=rule_set.version,
        source_sha256=rule_set.source_sha256,
    )


def _breakdown(breakdown: Breakdown) -> pb.BacktestBreakdown:
    buckets = []
    for bucket in breakdown.score_changes:
        fields: dict[str, Any] = {"label": bucket.label, "subjects": bucket.subjects}
        if bucket.min_change is not None:
            fields["min_change"] = bucket.min_change
        if bucket.max_change is not None:
            fields["max_change"] = bucket.max_change
        buckets.append(pb.ScoreChangeBucket(**fields))
    return pb.BacktestBreakdown(
        subjects=breakdown.subjects,
        subjects_changed=breakdown.subjects_changed,
        migrations=[
            pb.TierMigration(from_tier=m.from_tier, to_tier=m.to_tier, subjects=m.subjects)
            for m in breakdown.migrations
        ],
        score_changes=buckets,
        rules=[
            pb.RuleImpact(
                rule_id=r.rule_id,
                baseline_firings=r.baseline_firings,
                candidate_firings=r.candidate_firings,
                baseline_points=r.baseline_points,
                candidate_points=r.candidate_points,
                points_moved=r.points_moved,
            )
            for r in breakdown.rules
        ],
    )
