"""Sample records for the portal's unit tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.portal import records as r

NOW = datetime(2026, 6, 1, 4, 0, tzinfo=UTC)


def entry(entry_id: str = "e1", points: int = -10, **fields: object) -> r.Entry:
    values: dict[str, object] = {
        "entry_id": entry_id,
        "rule_id": "transport.metro_fare_evasion",
        "rule_title": "Metro fare evasion",
        "rule_description": "A passenger passed a gate without a valid fare.",
        "legal_basis": "Urban Rail Transit Operation Management Provisions",
        "rule_set": "egret-sample",
        "rule_set_version": 2,
        "points": points,
        "category": "transport",
        "severity": "general" if points < 0 else "positive",
        "status": "active",
        "occurred_at": NOW - timedelta(days=30),
        "recorded_at": NOW - timedelta(days=29),
        "visible_until": NOW + timedelta(days=335),
        "reason": "Passed the gate at Lianban without paying a 4.00 yuan fare",
        "black_list": False,
        "sources": ("metro",),
    }
    values.update(fields)
    return r.Entry(**values)  # type: ignore[arg-type]


def explained(e: r.Entry, *, counting: bool = True, possible: datetime | None = None) -> r.ExplainedEntry:
    return r.ExplainedEntry(e, e.points if counting else 0, 0, counting, possible)


def explanation(**fields: object) -> r.Explanation:
    fare = entry()
    blood = entry(
        "e2", 10, rule_title="Voluntary blood donation", category="civic", reason="Donated 400 ml of blood"
    )
    values: dict[str, object] = {
        "subject_kind": "person",
        "as_of": NOW,
        "policy_version": "2026.2",
        "base_score": 1000,
        "min_score": 0,
        "max_score": 2000,
        "score": 1000,
        "tier": "A",
        "tiers": (
            r.Tier("AAA", 1050),
            r.Tier("AA", 1030),
            r.Tier("A", 960),
            r.Tier("B", 850),
            r.Tier("C", 600),
            r.Tier("D", 0),
        ),
        "categories": (r.Category("transport", -10, 1), r.Category("civic", 10, 1, 5)),
        "lists": (),
        "entries": (explained(fare, possible=NOW + timedelta(days=60)), explained(blood)),
        "next_tier": r.NextTier("AA", 1030, 30),
        "projection": (r.Projection(NOW + timedelta(days=335), 1010, "A", ("e1",)),),
        "positive_behaviours": (
            r.PositiveBehaviour(
                "civic.blood_donation", "Voluntary blood donation", "Gave {ml} ml.", "10", "civic", 40
            ),
            r.PositiveBehaviour(
                "civic.volunteer_hours", "Volunteer service", "Hours.", "2 * (hours // 10)", "civic", -1
            ),
        ),
        "cap_window_days": 365,
    }
    values.update(fields)
    return r.Explanation(**values)  # type: ignore[arg-type]


def change(
    days_ago: float, score: int, before: int | None, cause: str = "entries", **fields: object
) -> r.ScoreChange:
    values: dict[str, object] = {
        "changed_at": NOW - timedelta(days=days_ago),
        "cause": cause,
        "score_before": before,
        "score": score,
        "tier_before": "" if before is None else "A",
        "tier": "A",
        "lists_before": (),
        "lists": (),
        "added_entry_ids": ("e1",) if cause == "entries" else (),
        "expired_entry_ids": (),
        "ended_entry_ids": ("e1",) if cause == "correction" else (),
        "resumed_entry_ids": (),
        "policy_version": "2026.2",
        "note": "",
    }
    values.update(fields)
    return r.ScoreChange(**values)  # type: ignore[arg-type]
