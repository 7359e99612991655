"""*Benefits*: which benefits the person can use and why, citing the entries that decide."""

from __future__ import annotations

from dataclasses import dataclass

from services.portal import records as r
from services.portal.i18n import Localiser
from services.portal.views import words


@dataclass(frozen=True)
class ReasonRow:
    condition: str
    met: bool
    explanation: str
    entry_ids: tuple[str, ...]
    disputed_entry_ids: tuple[str, ...]


@dataclass(frozen=True)
class BenefitRow:
    benefit_id: str
    purpose: str
    provider: str
    considers: str
    condition: str
    eligible: bool | None  # None: the check was refused (error says why)
    verdict: str
    score: str
    tier: str
    reasons: tuple[ReasonRow, ...]
    error: str


def considers(t: Localiser, b: r.Benefit) -> str:
    if b.considers_all:
        return t.gettext("Your whole score")
    return ", ".join(words.category(t, c) for c in b.considers)


def benefit_row(t: Localiser, b: r.Benefit, result: r.Eligibility | None, error: str = "") -> BenefitRow:
    if result is None:
        return BenefitRow(
            b.benefit_id, b.purpose, b.provider, considers(t, b), b.condition, None, error, "", "", (), error
        )
    return BenefitRow(
        benefit_id=b.benefit_id,
        purpose=b.purpose,
        provider=b.provider,
        considers=considers(t, b),
        condition=b.condition,
        eligible=result.eligible,
        verdict=t.gettext("You can use this benefit")
        if result.eligible
        else t.gettext("Not available to you now"),
        score=t.number(result.score),
        tier=result.tier,
        reasons=tuple(
            ReasonRow(x.condition, x.met, x.explanation, x.entry_ids, x.disputed_entry_ids)
            for x in result.reasons
        ),
        error="",
    )


def for_kind(benefits: tuple[r.Benefit, ...], kind: str) -> tuple[r.Benefit, ...]:
    """The benefits open to a subject of `kind` (person or organization)."""
    return tuple(b for b in benefits if not b.subject_kinds or kind in b.subject_kinds)
