"""The console's rule-set pages as view models: the list with states, one version (its
rules in plain language as the public rules page shows them, its YAML, its changes), the
difference between two versions rule by rule, a draft's problems at their place in the
YAML, and a backtest's report (headline, migration matrix, score changes, rules, cohorts).

The difference compares the two YAML documents generically, by rule id and field, so it
needs no model of a rule set beyond "a mapping with a list of rules that have ids": the
rules service owns the format (docs/rules.md), the portal only reads it."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import yaml

from kit.safeyaml import YamlError, load_yaml
from services.portal import authoring_records as a
from services.portal import convert
from services.portal import records as r
from services.portal.backend import Violation
from services.portal.i18n import Localiser
from services.portal.views import figures
from services.portal.views.public import RuleGroup, rule_groups

# -- the list ----------------------------------------------------------------------------------


def state(t: Localiser, code: str) -> str:
    return {
        "draft": t.gettext("Draft"),
        "published": t.gettext("Published"),
        "active": t.gettext("Active"),
        "retired": t.gettext("Retired"),
    }.get(code, code)


def action(t: Localiser, code: str) -> str:
    return {
        "create_draft": t.gettext("Draft created"),
        "publish": t.gettext("Published"),
        "activate": t.gettext("Activated"),
        "retire": t.gettext("Retired"),
        "import": t.gettext("Imported at start-up"),
        "redrive": t.gettext("Dead letters evaluated again"),
    }.get(code, code)


@dataclass(frozen=True)
class RuleSetRow:
    rule_set_id: int
    name: str
    version: str
    state: str
    state_code: str
    created: str
    created_by: str


def rows(t: Localiser, rule_sets: tuple[a.RuleSetInfo, ...]) -> tuple[RuleSetRow, ...]:
    """Newest first: the versions an author works on lead the list."""
    return tuple(
        RuleSetRow(
            s.rule_set_id,
            s.name,
            t.number(s.version),
            state(t, s.state),
            s.state,
            t.datetime(s.created_at) if s.created_at else "",
            s.created_by,
        )
        for s in sorted(rule_sets, key=lambda s: s.rule_set_id, reverse=True)
    )


# -- one version -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangeRow:
    when: str
    action: str
    actor: str
    detail: str


@dataclass(frozen=True)
class RuleSetView:
    rule_set_id: int
    title: str
    state: str
    state_code: str
    facts: tuple[tuple[str, str], ...]
    groups: tuple[RuleGroup, ...]
    source: str
    changes: tuple[ChangeRow, ...]
    can_publish: bool
    can_activate: bool
    can_retire: bool
    can_backtest: bool


def _detail(detail_json: str) -> str:
    try:
        detail = json.loads(detail_json) if detail_json else {}
    except ValueError:
        return detail_json
    if not isinstance(detail, Mapping):
        return detail_json
    return ", ".join(f"{key}: {value}" for key, value in sorted(detail.items()))


def rule_set_view(
    t: Localiser,
    s: a.RuleSetInfo,
    changes: tuple[a.RuleSetChange, ...],
    policy: r.PublishedPolicy | None,
    *,
    author: bool,
    backtester: bool,
) -> RuleSetView:
    """`author`: the reader may change rule sets; `backtester`: it may backtest them (the
    rules service decides all the same)."""
    facts = [(t.gettext("State"), state(t, s.state)), (t.gettext("Source SHA-256"), s.source_sha256)]
    for label, at, who in (
        (t.gettext("Created"), s.created_at, s.created_by),
        (t.gettext("Published"), s.published_at, s.published_by),
        (t.gettext("Last activated"), s.activated_at, s.activated_by),
        (t.gettext("Retired"), s.retired_at, s.retired_by),
    ):
        if at is not None:
            facts.append((label, t.gettext("%(when)s by %(who)s", when=t.datetime(at), who=who or "—")))
    published = convert.published_rule_set(s.name, s.version, s.activated_at, s.source)
    return RuleSetView(
        rule_set_id=s.rule_set_id,
        title=t.gettext("%(name)s, version %(version)s", name=s.name, version=t.number(s.version)),
        state=state(t, s.state),
        state_code=s.state,
        facts=tuple(facts),
        groups=rule_groups(t, published, policy),
        source=s.source,
        changes=tuple(
            ChangeRow(
                t.datetime(c.changed_at) if c.changed_at else "",
                action(t, c.action),
                c.actor,
                _detail(c.detail_json),
            )
            for c in changes
        ),
        can_publish=author and s.state == "draft",
        can_activate=author and s.state == "published",
        can_retire=author and s.state in ("draft", "published"),
        can_backtest=backtester and s.state != "retired",
    )


# -- the difference between two versions -------------------------------------------------------


@dataclass(frozen=True)
class FieldChange:
    field: str
    before: str  # empty when the field was added
    after: str  # empty when the field was removed


@dataclass(frozen=True)
class RuleDiff:
    rule_id: str
    kind: str  # "added", "removed", "changed"
    label: str  # the kind in the reader's language
    title: str
    fields: tuple[FieldChange, ...]


@dataclass(frozen=True)
class Diff:
    rules: tuple[RuleDiff, ...]
    document: tuple[FieldChange, ...]  # fields outside `rules` (name, version, ...)
    unchanged: int


def _show(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str | int | float | bool):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _fields(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[FieldChange, ...]:
    keys = list(before) + [k for k in after if k not in before]
    return tuple(
        FieldChange(str(k), _show(before.get(k)), _show(after.get(k)))
        for k in keys
        if before.get(k) != after.get(k)
    )


def _document(source: str) -> Mapping[str, Any]:
    try:
        document, _ = load_yaml(source)
    except YamlError:
        return {}
    return document if isinstance(document, Mapping) else {}


def _rules(document: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    found: dict[str, Mapping[str, Any]] = {}
    for rule in document.get("rules") or ():
        if isinstance(rule, Mapping) and rule.get("id") is not None:
            found[str(rule["id"])] = rule
    return found


def diff(t: Localiser, before_source: str, after_source: str) -> Diff:
    """Rule by rule, by id: added, removed, and changed with each changed field's values on
    both sides; rules in the order of the newer source, the removed ones after them."""
    before_doc, after_doc = _document(before_source), _document(after_source)
    before, after = _rules(before_doc), _rules(after_doc)
    labels = {"added": t.gettext("Added"), "removed": t.gettext("Removed"), "changed": t.gettext("Changed")}
    found: list[RuleDiff] = []
    unchanged = 0
    for rule_id, rule in after.items():
        old = before.get(rule_id)
        if old is None:
            found.append(
                RuleDiff(rule_id, "added", labels["added"], _show(rule.get("title")), _fields({}, rule))
            )
        elif old != rule:
            found.append(
                RuleDiff(rule_id, "changed", labels["changed"], _show(rule.get("title")), _fields(old, rule))
            )
        else:
            unchanged += 1
    for rule_id, rule in before.items():
        if rule_id not in after:
            found.append(
                RuleDiff(rule_id, "removed", labels["removed"], _show(rule.get("title")), _fields(rule, {}))
            )
    outside = _fields(
        {k: v for k, v in before_doc.items() if k != "rules"},
        {k: v for k, v in after_doc.items() if k != "rules"},
    )
    return Diff(tuple(found), outside, unchanged)


# -- a draft's problems ------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    anchor: str  # the element id the error summary links to
    path: str  # where in the document, as the rules service names it
    line: int  # 1-based line of the source it points at; 0 if not found
    where: str  # "line 14" in the reader's language, or ""
    message: str


_SEGMENT = re.compile(r"\.?([A-Za-z_][\w-]*)|\[(\d+)\]|\s*\([^)]*\)")


def _line(source: str, path: str) -> int:
    """The line the service's field path ("source.rules[2] (traffic.red_light).points")
    points at: the deepest node of the path found in the document, 0 if none."""
    try:
        load_yaml(source)  # bounds checked first: composing below is then safe
        node: yaml.Node | None = yaml.compose(source, Loader=yaml.SafeLoader)
    except (YamlError, yaml.YAMLError):
        return 0
    rest = path.removeprefix("source")
    line = 0
    for match in _SEGMENT.finditer(rest):
        key, index = match.group(1), match.group(2)
        if node is None or (key is None and index is None):
            continue
        found: yaml.Node | None = None
        if key is not None and isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == key:
                    found, line = v, k.start_mark.line + 1
                    break
        elif index is not None and isinstance(node, yaml.SequenceNode) and int(index) < len(node.value):
            found = node.value[int(index)]
            line = found.start_mark.line + 1
        node = found
    return line


def problems(t: Localiser, source: str, violations: tuple[Violation, ...]) -> tuple[Problem, ...]:
    found = []
    for i, v in enumerate(violations, start=1):
        line = _line(source, v.field)
        found.append(
            Problem(
                anchor=f"problem-{i}",
                path=v.field.removeprefix("source").lstrip(".") or v.field,
                line=line,
                where=t.gettext("line %(line)s", line=t.number(line)) if line else "",
                message=v.description or v.reason,
            )
        )
    return tuple(found)


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
