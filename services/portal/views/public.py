"""The public pages, without sign-in: the published rules in plain language, the tiers and
their thresholds, the benefits catalogue, and how disputes and repair work, all from what
the running services publish (the active rule set, the active policy, the catalogue)."""

from __future__ import annotations

from dataclasses import dataclass

from services.portal import records as r
from services.portal.i18n import Localiser
from services.portal.views import words
from services.portal.views.benefits import considers
from services.portal.views.credit import TierRow, tier_rows


@dataclass(frozen=True)
class RuleRow:
    rule_id: str
    title: str
    description: str
    points: str
    positive: bool
    category: str
    severity: str
    legal_basis: str
    counts_for: str
    window: str
    cap: str
    black_list: bool
    who: str


@dataclass(frozen=True)
class RuleGroup:
    category: str
    rules: tuple[RuleRow, ...]


def _points(t: Localiser, points: str) -> tuple[str, bool]:
    if points.lstrip("-").isdigit():
        value = int(points)
        return t.signed(value), value > 0
    return t.gettext("computed: %(expression)s", expression=points), not points.startswith("-")


def rule_groups(
    t: Localiser, rule_set: r.PublishedRuleSet, policy: r.PublishedPolicy | None
) -> tuple[RuleGroup, ...]:
    visibility: dict[str, int] = {}
    if policy is not None and policy.kinds:
        person = next((k for k in policy.kinds if k.kind == "person"), policy.kinds[0])
        visibility = dict(person.visibility_days)
    groups: dict[str, list[RuleRow]] = {}
    for rule in rule_set.rules:
        points, positive = _points(t, rule.points)
        days = visibility.get(rule.severity)
        groups.setdefault(rule.category, []).append(
            RuleRow(
                rule_id=rule.rule_id,
                title=rule.title,
                description=words.general(rule.description),
                points=points,
                positive=positive,
                category=words.category(t, rule.category),
                severity=words.severity(t, rule.severity),
                legal_basis=rule.legal_basis,
                counts_for=t.ngettext("%(num)s day", "%(num)s days", days) if days is not None else "",
                window=rule.window,
                cap=rule.cap,
                black_list=rule.black_list,
                who=", ".join(words.kind(t, k) for k in rule.subject_kinds),
            )
        )
    return tuple(RuleGroup(words.category(t, name), tuple(rows)) for name, rows in sorted(groups.items()))


@dataclass(frozen=True)
class KindTiers:
    kind: str
    base: str
    bounds: str
    tiers: tuple[TierRow, ...]
    red: str
    black: str
    cap: str
    visibility: tuple[tuple[str, str], ...]


def kind_tiers(t: Localiser, policy: r.PublishedPolicy) -> tuple[KindTiers, ...]:
    found = []
    for k in policy.kinds:
        black = t.gettext("Tier %(tiers)s", tiers=", ".join(k.black_tiers)) if k.black_tiers else ""
        if k.black_flagged_entries:
            black = (black + "; " if black else "") + t.gettext("or any counting entry of a black-list rule")
        found.append(
            KindTiers(
                kind=words.kind(t, k.kind),
                base=t.number(k.base),
                bounds=t.gettext("%(min)s to %(max)s", min=t.number(k.min_score), max=t.number(k.max_score)),
                tiers=tier_rows(t, k.tiers, ""),
                red=t.gettext("Tier %(tiers)s and no negative entry counting", tiers=", ".join(k.red_tiers)),
                black=black,
                cap=t.gettext(
                    "At most %(points)s positive points per category in any %(days)s days",
                    points=t.number(k.positive_per_category),
                    days=t.number(k.cap_window_days),
                ),
                visibility=tuple(
                    (words.severity(t, severity), t.ngettext("%(num)s day", "%(num)s days", days))
                    for severity, days in k.visibility_days
                ),
            )
        )
    return tuple(found)


@dataclass(frozen=True)
class CatalogueRow:
    benefit_id: str
    purpose: str
    provider: str
    who: str
    considers: str
    condition: str


def catalogue(t: Localiser, benefits: tuple[r.Benefit, ...]) -> tuple[CatalogueRow, ...]:
    return tuple(
        CatalogueRow(
            b.benefit_id,
            b.purpose,
            b.provider,
            ", ".join(words.kind(t, k) for k in b.subject_kinds),
            considers(t, b),
            b.condition,
        )
        for b in benefits
    )


@dataclass(frozen=True)
class DueProcess:
    dispute_days: str
    repair_periods: tuple[tuple[str, str], ...]
    decision_days: str


def due_process(t: Localiser, policy: r.PublishedPolicy) -> DueProcess:
    return DueProcess(
        dispute_days=t.number(policy.dispute_deadline_days),
        repair_periods=tuple(
            (
                words.severity(t, severity),
                t.gettext("at once") if days == 0 else t.ngettext("%(num)s day", "%(num)s days", days),
            )
            for severity, days in policy.repair_min_period_days
        ),
        decision_days=t.number(policy.repair_decision_working_days),
    )
