"""The console's policy page as view models: the active policy (as the public tiers page
shows it) with every earlier activation, and a candidate's preview (PreviewPolicy): its
headline, the tier migration per subject kind and the list moves."""

from __future__ import annotations

from dataclasses import dataclass

from services.portal import authoring_records as a
from services.portal import convert
from services.portal.i18n import Localiser
from services.portal.views import words
from services.portal.views.backtests import MatrixTable, matrix_table
from services.portal.views.public import KindTiers, kind_tiers


@dataclass(frozen=True)
class ActivePolicy:
    version: str
    since: str
    by: str
    source: str
    kinds: tuple[KindTiers, ...]
    earlier: tuple[tuple[str, str, str], ...]  # version, when, by; newest first


def active(t: Localiser, activations: tuple[a.PolicyActivation, ...]) -> ActivePolicy | None:
    if not activations:
        return None
    now = activations[-1]
    return ActivePolicy(
        version=now.version,
        since=t.datetime(now.activated_at) if now.activated_at else "",
        by=now.activated_by,
        source=now.policy_yaml,
        kinds=kind_tiers(t, convert.published_policy(now.policy_yaml, now.activated_at)),
        earlier=tuple(
            (p.version, t.datetime(p.activated_at) if p.activated_at else "", p.activated_by)
            for p in reversed(activations[:-1])
        ),
    )


@dataclass(frozen=True)
class KindMigration:
    kind: str
    matrix: MatrixTable


@dataclass(frozen=True)
class Preview:
    current_version: str
    proposed_version: str
    headline: str
    kinds: tuple[KindMigration, ...]
    list_moves: tuple[tuple[str, str, str, str], ...]  # kind, list, entering, leaving


def preview(t: Localiser, report: a.PolicyReport, active_yaml: str = "") -> Preview:
    """`active_yaml`: the active policy, whose tiers (highest first) order the matrices."""
    order = {
        k.kind: tuple(tier.name for tier in k.tiers)
        for k in convert.published_policy(active_yaml, None).kinds
    }
    kinds = []
    for kind in dict.fromkeys(m.kind for m in report.migrations):
        table = matrix_table(t, tuple(m for m in report.migrations if m.kind == kind), order.get(kind, ()))
        if table is not None:
            kinds.append(KindMigration(words.kind(t, kind), table))
    return Preview(
        current_version=report.current_version,
        proposed_version=report.proposed_version,
        headline=t.gettext(
            "Of %(subjects)s subjects, %(scores)s would change score and %(tiers)s would change tier.",
            subjects=t.number(report.subjects),
            scores=t.number(report.score_changed),
            tiers=t.number(report.tier_changed),
        ),
        kinds=tuple(kinds),
        list_moves=tuple(
            (
                words.kind(t, m.kind),
                t.gettext("Red list") if m.list_name == "red" else t.gettext("Black list"),
                t.number(m.entering),
                t.number(m.leaving),
            )
            for m in report.list_moves
        ),
    )
