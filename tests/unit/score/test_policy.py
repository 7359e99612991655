"""Loading and checking the score policy file."""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from domain.policy import ListCriteria, PolicyError, Tier, load_policy, parse_policy
from kit.protoconv import SEVERITY_NAMES, SUBJECT_KIND_NAMES
from kit.vocabulary import SEVERITIES, SUBJECT_KINDS

POLICY_FILE = Path(__file__).parents[3] / "config" / "policy.yaml"

KIND: dict[str, Any] = {
    "base": 1000,
    "bounds": {"min": 0, "max": 2000},
    "tiers": [{"name": "A", "min": 960}, {"name": "B", "min": 0}],
    "visibility_days": {"positive": 730, "minor": 90, "general": 365, "serious": 1095},
    "caps": {"window_days": 365, "positive_per_category": 50},
    "lists": {
        "red": {"tiers": ["A"], "no_active_negative": True},
        "black": {"tiers": ["B"], "flagged_entries": True},
    },
    "consent_required": False,
}


def document(**person_changes: Any) -> dict[str, Any]:
    person = copy.deepcopy(KIND)
    person.update(person_changes)
    return {"version": "t1", "policies": {"person": person, "organization": copy.deepcopy(KIND)}}


def problems_of(doc: Any) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(doc)
    return caught.value.problems


def test_the_shipped_policy_carries_the_domain_defaults() -> None:
    policy = load_policy(POLICY_FILE)
    assert policy.version == "2026.2"
    for kind in ("person", "organization"):
        p = policy.for_kind(kind)
        assert (p.base, p.min_score, p.max_score, p.version) == (1000, 0, 2000, "2026.2")
        assert p.lists == ListCriteria(frozenset({"AAA"}), True, frozenset({"D"}), True)
        assert (p.caps.window_days, p.consent_required) == (365, False)
        assert p.tiers == (
            Tier("AAA", 1050),
            Tier("AA", 1030),
            Tier("A", 960),
            Tier("B", 850),
            Tier("C", 600),
            Tier("D", 0),
        )
        assert p.visibility("positive") == timedelta(days=730)
        assert p.visibility("minor") == timedelta(days=90)
        assert p.visibility("general") == timedelta(days=365)
        assert p.visibility("serious") == timedelta(days=1095)
    # Organizations differ deliberately: routine compliance weighs less (config/policy.yaml).
    assert policy.for_kind("person").caps.limit("civic") == 50
    assert policy.for_kind("organization").caps.limit("commerce") == 30


def test_policy_vocabulary_matches_the_protocol_enums() -> None:
    assert set(SEVERITIES) == set(SEVERITY_NAMES.values())
    assert set(SUBJECT_KINDS) == set(SUBJECT_KIND_NAMES.values())


def test_a_numeric_version_is_read_as_a_label() -> None:
    doc = document()
    doc["version"] = 3
    assert parse_policy(doc).version == "3"


def test_every_problem_is_reported_with_its_path_at_once() -> None:
    doc = document(
        base="high",
        bounds={"min": 10, "max": 5},
        tiers=[{"name": "A", "min": 900}, {"name": "A", "min": 950}, {"min": 1}],
        visibility_days={"positive": 0, "minor": 90, "general": 365, "forever": 1},
        colour="red",
    )
    del doc["policies"]["organization"]
    doc["policies"]["robot"] = copy.deepcopy(KIND)
    doc["version"] = ""
    problems = problems_of(doc)
    assert problems == [
        "version: must be a non-empty string",
        "policies.robot: unknown subject kind (expected one of person, organization)",
        "policies.person: unknown keys colour",
        "policies.person.base: must be a whole number",
        "policies.person.bounds: min must be below max",
        "policies.person.tiers[1].name: duplicate tier 'A'",
        "policies.person.tiers[1].min: must be below the previous tier's min 900",
        "policies.person.tiers[2].name: must be a non-empty string",
        "policies.person.visibility_days: unknown keys forever",
        "policies.person.visibility_days.positive: must be at least 1 day",
        "policies.person.visibility_days.serious: must be a whole number",
        # The list criteria name tiers, checked against this kind's (broken) tiers.
        "policies.person.lists.black.tiers[0]: unknown tier 'B'",
        "policies.organization: is required",
    ]


def test_the_base_must_lie_within_the_bounds() -> None:
    assert problems_of(document(base=2500)) == ["policies.person.base: must lie within bounds 0..2000"]


def test_the_lowest_tier_must_cover_the_lowest_score() -> None:
    problems = problems_of(document(tiers=[{"name": "A", "min": 960}, {"name": "B", "min": 100}]))
    assert problems == ["policies.person.tiers: the lowest tier's min 100 must not exceed bounds.min 0"]


def test_tiers_and_visibility_are_required() -> None:
    doc = document()
    del doc["policies"]["person"]["tiers"]
    del doc["policies"]["person"]["visibility_days"]
    assert problems_of(doc) == [
        "policies.person.tiers: must be a non-empty list, highest tier first",
        "policies.person.visibility_days: must be a mapping with days for each of "
        "positive, minor, general, serious",
    ]


def test_a_document_that_is_not_a_mapping_is_rejected() -> None:
    assert problems_of(["not", "a", "policy"]) == ["the policy must be a mapping"]


def test_an_unreadable_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"no-such-policy\.yaml"):
        load_policy(tmp_path / "no-such-policy.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: [unclosed")
    with pytest.raises(PolicyError, match=r"broken\.yaml"):
        load_policy(broken)


def test_caps_lists_and_consent_are_checked_with_paths() -> None:
    doc = document(
        caps={"window_days": 0, "positive_per_category": -1, "by_category": {"civic": "x"}},
        lists={"red": {"tiers": ["Z"], "no_active_negative": "yes"}, "black": []},
        consent_required="no",
    )
    assert problems_of(doc) == [
        "policies.person.caps.window_days: must be at least 1 day",
        "policies.person.caps.positive_per_category: must not be negative",
        "policies.person.caps.by_category.civic: must be a whole number",
        "policies.person.lists.red.tiers[0]: unknown tier 'Z'",
        "policies.person.lists.red.no_active_negative: must be true or false",
        "policies.person.lists.black: must be a mapping with tiers and flagged_entries",
        "policies.person.consent_required: must be true or false",
    ]


def test_a_null_cap_leaves_positive_points_uncapped_and_overrides_apply_per_category() -> None:
    doc = document(caps={"window_days": 365, "positive_per_category": None, "by_category": {"civic": 20}})
    caps = parse_policy(doc).for_kind("person").caps
    assert (caps.limit("transport"), caps.limit("civic")) == (None, 20)
