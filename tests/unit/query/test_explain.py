"""Explain's arithmetic (pure): contributions after caps, statuses and reasons, the next
tier, the projection at each future change, cap room for positive behaviours, and the
corrected timeline."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from domain.entries import (
    OPEN,
    OVERTURNED,
    DisputeRecord,
    EntryFacts,
    EntryStatus,
    LedgerEntry,
    ReversalRecord,
    RuleRef,
)
from domain.policy import ActivatedPolicy, Caps, PolicyBook, load_policy
from domain.ruleset.parsing import rule_set_from_yaml
from services.query.corrected import corrected_history
from services.query.explain import (
    MAX_PROJECTED,
    PositiveRule,
    cap_remaining,
    explain,
    next_tier,
    project,
    shown_status,
)
from services.query.rules_client import positive_rules

POLICY = load_policy(Path(__file__).parents[3] / "config" / "policy.yaml")
PERSON = POLICY.for_kind("person")
NOW = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
DAY = timedelta(days=1)
KEY = "a" * 64


def facts(
    entry_id: str,
    points: int,
    category: str,
    severity: str,
    *,
    days_ago: float,
    recorded_days_ago: float = 0,
    disputes: tuple[DisputeRecord, ...] = (),
    reversals: tuple[ReversalRecord, ...] = (),
) -> EntryFacts:
    occurred = NOW - timedelta(days=days_ago)
    return EntryFacts(
        entry=LedgerEntry(
            entry_id=entry_id,
            subject_key=KEY,
            subject_kind="person",
            rule=RuleRef(rule_id=f"{category}.rule", title="A rule"),
            points=points,
            category=category,
            severity=severity,
            status=EntryStatus.ACTIVE,
            occurred_at=occurred,
            recorded_at=NOW - timedelta(days=recorded_days_ago),
            visible_until=occurred + PERSON.visibility(severity),
            reason="",
            black_list=False,
            snapshot=b"",
        ),
        disputes=disputes,
        reversals=reversals,
    )


def dispute(entry_id: str, filed_days_ago: float, status: str = OPEN) -> DisputeRecord:
    filed = NOW - timedelta(days=filed_days_ago)
    resolved = NOW if status != OPEN else None
    return DisputeRecord(
        1, entry_id, KEY, "not me", "s", "subject", filed, filed + 20 * DAY, status, "wrong", "r", resolved
    )


LEDGER = (
    facts("c1", 30, "civic", "positive", days_ago=10),
    facts("c2", 30, "civic", "positive", days_ago=5),
    facts("f1", -10, "finance", "general", days_ago=200),
    facts("t1", -5, "traffic", "minor", days_ago=30),
)


def test_contributions_after_caps_add_up_to_the_score() -> None:
    x = explain(
        subject_key=KEY,
        subject_kind="person",
        facts=LEDGER,
        policy=PERSON,
        due_process=POLICY.due_process,
        now=NOW,
    )
    assert (x.score, x.tier) == (1035, "AA")
    assert x.base_score + sum(e.contribution for e in x.entries) == x.score
    assert [(e.facts.entry.entry_id, e.contribution, e.capped_points) for e in x.entries] == [
        ("c2", 20, 10),
        ("c1", 30, 0),
        ("t1", -5, 0),
        ("f1", -10, 0),
    ]
    by_id = {e.facts.entry.entry_id: e for e in x.entries}
    assert by_id["f1"].repair_possible_from == NOW - 110 * DAY
    assert by_id["c1"].repair_possible_from is None
    assert x.next_tier is not None
    assert (x.next_tier.tier, x.next_tier.points_needed) == ("AAA", 15)


def test_the_projection_is_the_score_at_each_expiry() -> None:
    entries = [f.scored for f in LEDGER]
    assert [(p.at, p.score, p.tier, p.expiring_entry_ids) for p in project(entries, PERSON, NOW)] == [
        (NOW + 60 * DAY, 1040, "AA", ("t1",)),
        (NOW + 165 * DAY, 1050, "AAA", ("f1",)),
        (NOW + 720 * DAY, 1020, "A", ("c1",)),
        (NOW + 725 * DAY, 1000, "A", ("c2",)),
    ]


def test_the_projection_shows_the_next_changes_only() -> None:
    """Each projected date costs a whole score computation: a long ledger projects its
    next MAX_PROJECTED changes, in date order, not all of them."""
    ledger = [
        facts(f"t{i}", -1, "traffic", "minor", days_ago=30 - i).scored for i in range(MAX_PROJECTED + 8)
    ]
    projected = project(ledger, PERSON, NOW)
    assert len(projected) == MAX_PROJECTED
    assert [p.expiring_entry_ids for p in projected] == [(f"t{i}",) for i in range(MAX_PROJECTED)]
    assert projected[-1].score == 1000 - 8  # the entries not yet expired still count


def test_an_open_dispute_lapsing_is_part_of_the_projection() -> None:
    disputed = facts("t1", -5, "traffic", "minor", days_ago=30, disputes=(dispute("t1", 5),))
    (first, *_) = project([disputed.scored], PERSON, NOW)
    assert (first.at, first.score, first.expiring_entry_ids) == (NOW + 15 * DAY, 1000, ("t1",))


def test_no_next_tier_at_the_top() -> None:
    assert next_tier(PERSON, 2000) is None
    nearest = next_tier(PERSON, 1000)
    assert nearest is not None
    assert (nearest.tier, nearest.min_score, nearest.points_needed) == ("AA", 1030, 30)


def test_cap_room_counts_what_positives_were_granted_in_the_window() -> None:
    entries = [f.scored for f in LEDGER]
    assert cap_remaining(entries, PERSON, "civic", NOW) == 0
    assert cap_remaining(entries, PERSON, "transport", NOW) == 50
    uncapped = replace(PERSON, caps=Caps(window_days=365))
    assert cap_remaining(entries, uncapped, "civic", NOW) == -1


def test_statuses_say_why_an_entry_does_not_count() -> None:
    reversal = ReversalRecord("r1", KEY, "library", "ev-9", "sent in error", NOW, "library", NOW - DAY)
    reversed_ = facts("r1", -5, "civic", "minor", days_ago=3, reversals=(reversal,))
    assert shown_status(reversed_, NOW) == (
        EntryStatus.REVERSED,
        "reversed: event library/ev-9 retracted: sent in error",
    )
    overturned = facts("o1", -5, "civic", "minor", days_ago=3, disputes=(dispute("o1", 2, OVERTURNED),))
    assert shown_status(overturned, NOW)[1] == "reversed: dispute 1 overturned: wrong"
    lapsed = facts("l1", -5, "civic", "minor", days_ago=30, disputes=(dispute("l1", 25),))
    status, why = shown_status(lapsed, NOW)
    assert status is EntryStatus.DISPUTED
    assert "past the deadline" in why
    expired = facts("e1", -5, "civic", "minor", days_ago=100)
    assert shown_status(expired, NOW)[0] is EntryStatus.EXPIRED
    assert shown_status(LEDGER[0], NOW) == (EntryStatus.ACTIVE, "")


def test_positive_rules_of_the_sample_rule_set() -> None:
    rule_set = rule_set_from_yaml(
        (Path(__file__).parents[3] / "config" / "rulesets" / "sample.yaml").read_bytes()
    )
    found = {r.rule_id: r for r in positive_rules(rule_set)}
    positives = {
        r.id
        for r in rule_set.rules
        if r.severity == "positive" or (isinstance(r.points, int) and r.points > 0)
    }
    assert set(found) == positives
    assert found
    assert all(not r.points.lstrip().startswith("-") for r in found.values())


def test_positive_behaviours_carry_cap_room() -> None:
    rule = PositiveRule("civic.volunteer", "Volunteering", "per 10 hours", "2", "civic")
    x = explain(
        subject_key=KEY,
        subject_kind="person",
        facts=LEDGER,
        policy=PERSON,
        due_process=POLICY.due_process,
        now=NOW,
        positive_rules=[rule],
    )
    assert [(b.rule.rule_id, b.cap_remaining) for b in x.positive_behaviours] == [("civic.volunteer", 0)]


def test_the_corrected_timeline_drops_void_entries_and_counts_late_ones_from_their_event() -> None:
    reversal = ReversalRecord("wrong", KEY, "library", "ev-1", "error", NOW, "library", NOW + DAY)
    ledger = [
        facts("keep", 5, "civic", "positive", days_ago=10).scored,
        facts("wrong", -10, "finance", "minor", days_ago=10, reversals=(reversal,)).scored,
        facts("fixed", -4, "finance", "minor", days_ago=9, recorded_days_ago=-1).scored,
    ]
    book = PolicyBook((ActivatedPolicy(POLICY, NOW, "seed", ""),))
    rows = corrected_history(ledger, book, "person", NOW + 2 * DAY)
    assert [(r.changed_at, r.score, r.score_before, r.added_entry_ids) for r in rows] == [
        (NOW - 10 * DAY, 1005, None, ("keep",)),
        (NOW - 9 * DAY, 1001, 1005, ("fixed",)),
    ]
