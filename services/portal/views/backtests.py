"""The console's backtest pages as view models: a backtest's report (headline, migration
matrix, score changes, rules, cohorts, subjects) and the background backtest jobs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.portal import authoring_records as a
from services.portal.i18n import Localiser
from services.portal.views import figures

# -- a backtest's report -----------------------------------------------------------------------


@dataclass(frozen=True)
class Headline:
    subjects: int
    changed: int
    tier_moves: int

    def as_dict(self) -> dict[str, int]:
        return {"subjects": self.subjects, "changed": self.changed, "tier_moves": self.tier_moves}


def headline(report: a.BacktestReport) -> Headline:
    overall = report.overall
    moves = sum(m.subjects for m in overall.migrations if m.from_tier != m.to_tier)
    return Headline(overall.subjects, overall.subjects_changed, moves)


def headline_text(t: Localiser, h: Mapping[str, Any]) -> str:
    return t.gettext(
        "%(changed)s of %(subjects)s subjects would change score or tier; %(moves)s would change tier.",
        changed=t.number(int(h.get("changed", 0))),
        subjects=t.number(int(h.get("subjects", 0))),
        moves=t.number(int(h.get("tier_moves", 0))),
    )


def tier_order(migrations: tuple[a.Migration, ...], known: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Tiers in `known` order (the policy's, highest first), then any other as the report
    lists them (a backtest's in policy order; a policy preview's in no stated order)."""
    seen: dict[str, None] = {
        tier: None for tier in known if any(tier in (m.from_tier, m.to_tier) for m in migrations)
    }
    for m in migrations:
        seen.setdefault(m.from_tier)
    for m in migrations:
        seen.setdefault(m.to_tier)
    return tuple(seen)


def matrix(
    migrations: tuple[a.Migration, ...], known: tuple[str, ...] = ()
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    tiers = tier_order(migrations, known)
    counts = {(m.from_tier, m.to_tier): m.subjects for m in migrations}
    return tiers, tuple(tuple(counts.get((f, c), 0) for c in tiers) for f in tiers)


@dataclass(frozen=True)
class MatrixTable:
    tiers: tuple[str, ...]
    rows: tuple[tuple[str, tuple[str, ...]], ...]  # (tier now, a count per tier under the candidate)
    chart: str  # the chart's data for its URL


def matrix_table(
    t: Localiser, migrations: tuple[a.Migration, ...], known: tuple[str, ...] = ()
) -> MatrixTable | None:
    tiers, counts = matrix(migrations, known)
    if not tiers:
        return None
    return MatrixTable(
        tiers,
        tuple((tier, tuple(t.number(n) for n in row)) for tier, row in zip(tiers, counts, strict=True)),
        figures.matrix_data(tiers, tiers, counts),
    )


@dataclass(frozen=True)
class CohortRow:
    dimension: str
    value: str
    subjects: str
    changed: str
    up: str
    down: str
    share_changed: str


def cohort_rows(t: Localiser, report: a.BacktestReport) -> tuple[CohortRow, ...]:
    """Per cohort: subjects, those changing, moving up a tier and down (tier order from the
    whole report, highest first, so "up" is towards the first)."""
    order = {tier: i for i, tier in enumerate(tier_order(report.overall.migrations))}
    found = []
    for c in report.cohorts:
        b = c.breakdown
        up = sum(m.subjects for m in b.migrations if order.get(m.to_tier, 0) < order.get(m.from_tier, 0))
        down = sum(m.subjects for m in b.migrations if order.get(m.to_tier, 0) > order.get(m.from_tier, 0))
        share = b.subjects_changed / b.subjects if b.subjects else 0.0
        found.append(
            CohortRow(
                dimension=t.gettext("Subject kind") if c.dimension == "subject_kind" else c.dimension,
                value=_cohort_value(t, c),
                subjects=t.number(b.subjects),
                changed=t.number(b.subjects_changed),
                up=t.number(up),
                down=t.number(down),
                share_changed=t.number(round(share * 100, 1)) + " %",
            )
        )
    return tuple(found)


def _kind(t: Localiser, code: str) -> str:
    return {"person": t.gettext("Person"), "organization": t.gettext("Organisation")}.get(code, code)


def _cohort_value(t: Localiser, c: a.Cohort) -> str:
    if c.dimension == "subject_kind":
        return _kind(t, c.value)
    return c.value or t.gettext("(not stated)")


@dataclass(frozen=True)
class BacktestView:
    title: str
    summary: str
    headline: Headline
    headline_text: str
    warnings: tuple[str, ...]
    matrix: MatrixTable | None
    buckets: tuple[tuple[str, str], ...]
    buckets_chart: str
    rules: tuple[
        tuple[str, str, str, str], ...
    ]  # rule id, firings now → candidate, points now → candidate, moved
    rules_chart: str
    cohorts: tuple[CohortRow, ...]


def backtest_view(t: Localiser, report: a.BacktestReport) -> BacktestView:
    h = headline(report)
    overall = report.overall
    warnings = []
    if report.candidate_failed_events:
        warnings.append(
            t.gettext(
                "The candidate failed to evaluate %(n)s stored events: fix it before activating it.",
                n=t.number(report.candidate_failed_events),
            )
        )
    moving = tuple(rule for rule in overall.rules if rule.points_moved)
    return BacktestView(
        title=t.gettext("Backtest of %(candidate)s", candidate=report.candidate),
        summary=t.gettext(
            "%(events)s stored events replayed through %(candidate)s and through the active %(baseline)s, "
            "scored under policy %(policy)s as of %(when)s.",
            events=t.number(report.events_replayed),
            candidate=report.candidate,
            baseline=report.baseline or "—",
            policy=report.policy_version,
            when=t.datetime(report.as_of) if report.as_of else "—",
        ),
        headline=h,
        headline_text=headline_text(t, h.as_dict()),
        warnings=tuple(warnings),
        matrix=matrix_table(t, overall.migrations),
        buckets=tuple((b.label, t.number(b.subjects)) for b in overall.score_changes),
        buckets_chart=figures.bars_data(
            tuple(b.label for b in overall.score_changes), tuple(b.subjects for b in overall.score_changes)
        )
        if overall.score_changes
        else "",
        rules=tuple(
            (
                rule.rule_id,
                f"{t.number(rule.baseline_firings)} → {t.number(rule.candidate_firings)}",
                f"{t.signed(rule.baseline_points)} → {t.signed(rule.candidate_points)}",
                t.signed(rule.points_moved),
            )
            for rule in overall.rules
        ),
        rules_chart=figures.bars_data(
            tuple(rule.rule_id for rule in moving), tuple(rule.points_moved for rule in moving)
        )
        if moving
        else "",
        cohorts=cohort_rows(t, report),
    )


# -- background backtests ----------------------------------------------------------------------


def job_state(t: Localiser, code: str) -> str:
    return {
        "queued": t.gettext("Waiting to start"),
        "running": t.gettext("Running"),
        "succeeded": t.gettext("Finished"),
        "failed": t.gettext("Failed"),
        "cancelled": t.gettext("Cancelled"),
    }.get(code, code)


@dataclass(frozen=True)
class JobView:
    backtest_id: str
    rule_set_id: int
    state: str
    state_code: str
    percent: int  # 0 to 100
    progress: str  # "1,234 of 5,000 stored events replayed (25 %)"
    started: str
    error: str
    cancelled: str  # "<when> by <who>" once cancelled; "" otherwise
    can_cancel: bool


def job_view(t: Localiser, job: a.BacktestJob, *, may_cancel: bool = False) -> JobView:
    """``may_cancel``: the viewer's role may cancel a backtest (the rules service still
    decides whose): the page then offers it while the backtest is queued or running."""
    percent = round(job.progress * 100)
    return JobView(
        backtest_id=job.backtest_id,
        rule_set_id=job.rule_set_id,
        state=job_state(t, job.state),
        state_code=job.state,
        percent=percent,
        progress=t.gettext(
            "%(done)s of %(total)s stored events replayed (%(percent)s %%).",
            done=t.number(job.events_replayed),
            total=t.number(job.events_total),
            percent=t.number(percent),
        )
        if job.events_total
        else "",
        started=_when_by(t, job.started_at, job.started_by),
        error=job.error,
        cancelled=_when_by(t, job.finished_at, job.cancelled_by) if job.state == "cancelled" else "",
        can_cancel=may_cancel and job.state in ("queued", "running"),
    )


def _when_by(t: Localiser, at: datetime | None, who: str) -> str:
    return t.gettext("%(when)s by %(who)s", when=t.datetime(at) if at else "—", who=who or "—")


def job_rows(t: Localiser, jobs: tuple[a.BacktestJob, ...]) -> tuple[JobView, ...]:
    return tuple(job_view(t, job) for job in jobs)


@dataclass(frozen=True)
class SubjectRow:
    key: str  # the pseudonymous key, shortened: enough to tell rows apart, never a raw id
    kind: str
    score: str
    tier: str


def subject_rows(t: Localiser, report: a.BacktestReport) -> tuple[SubjectRow, ...]:
    return tuple(
        SubjectRow(
            key=s.subject_key[:12] + "…",
            kind=_kind(t, s.kind),
            score=f"{t.number(s.baseline_score)} → {t.number(s.candidate_score)}",
            tier=s.baseline_tier
            if s.baseline_tier == s.candidate_tier
            else f"{s.baseline_tier} → {s.candidate_tier}",
        )
        for s in report.subjects
    )
