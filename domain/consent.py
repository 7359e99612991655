"""Consent records: whether a subject's consent is in force at an instant, and whether a
read that requires consent may be served.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Consent:
    """One consent record (table score_consents, append-only): `granted` from
    `effective_at` on, until a later record says otherwise."""

    subject_key: str
    granted: bool
    effective_at: datetime
    recorded_at: datetime
    recorded_by: str
    consent_id: int = 0


def consent_in_force(records: Iterable[Consent], at: datetime) -> Consent | None:
    """The consent in force at `at`: the record with the latest effective_at at or before
    `at`, ties broken by recording order (consent_id); None when none is."""
    chosen: Consent | None = None
    for r in records:
        if r.effective_at <= at and (
            chosen is None or (r.effective_at, r.consent_id) > (chosen.effective_at, chosen.consent_id)
        ):
            chosen = r
    return chosen


def may_serve(consent_required: bool, consent: Consent | None) -> bool:
    """Whether a score may be served: the policy does not require consent, or consent is
    granted at the instant read."""
    return not consent_required or (consent is not None and consent.granted)
