"""The benefit catalogue: purpose binding at load time, and eligibility with reasons."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from domain.benefits import BenefitCatalogueError, check, load_benefits, parse_benefits
from domain.entries import EntryStatus, ScoredEntry
from domain.policy import load_policy
from domain.scoring import compute_score

ROOT = Path(__file__).parents[3]
POLICY = load_policy(ROOT / "config" / "policy.yaml")
CATALOGUE = load_benefits(ROOT / "config" / "benefits.yaml", POLICY)
PERSON = POLICY.for_kind("person")
ORGANIZATION = POLICY.for_kind("organization")
T0 = datetime(2026, 6, 1, tzinfo=UTC)
NOW = T0 + timedelta(days=1)


def entry(entry_id: str, points: int, category: str, severity: str, *, flag: bool = False) -> ScoredEntry:
    return ScoredEntry(entry_id, points, category, severity, EntryStatus.ACTIVE, T0, T0, flag)


def decide(benefit_id: str, entries: list[ScoredEntry], kind: str = "person") -> Any:
    benefit = CATALOGUE.benefits[benefit_id]
    policy = POLICY.for_kind(kind)
    return check(benefit, kind, policy, compute_score(entries, policy, NOW, categories=benefit.considers))


def test_the_shipped_catalogue_holds_the_domain_samples() -> None:
    assert sorted(CATALOGUE.benefits) == [
        "bike.deposit_free",
        "library.deposit_free",
        "metro.discount",
        "priority_service",
        "procurement.eligible",
    ]
    assert CATALOGUE.benefits["priority_service"].considers is None
    assert CATALOGUE.benefits["procurement.eligible"].subject_kinds == ("organization",)
    assert CATALOGUE.benefits["bike.deposit_free"].condition.describe() == (
        "(tier at least A and no active negative transport)"
    )


def test_a_condition_reading_an_undeclared_category_is_rejected_with_every_problem_and_its_path() -> None:
    document = yaml.safe_load((ROOT / "config" / "benefits.yaml").read_text())
    broken = copy.deepcopy(document)
    broken["benefits"][0]["condition"] = {
        "all": [{"tier_at_least": "A"}, {"no_active_negative": "legal"}, {"tier_at_least": "Z"}]
    }
    broken["benefits"][2]["condition"] = {"category_points_at_least": {"category": "finance", "points": 5}}
    broken["benefits"][3]["considers"] = []
    broken["benefits"][4]["condition"] = {"on_list": "green"}
    with pytest.raises(BenefitCatalogueError) as caught:
        parse_benefits(broken, POLICY)
    assert caught.value.problems == [
        "benefits[0].condition.all[1].no_active_negative: category 'legal' is not among the categories"
        " the benefit considers (civic)",
        "benefits[0].condition.all[2].tier_at_least: 'Z' is not a tier of the policy for every subject kind"
        " of the benefit",
        "benefits[2].condition.category_points_at_least.category: category 'finance' is not among the"
        " categories the benefit considers (transport)",
        "benefits[3].considers: must be `all` or a non-empty list of categories",
        "benefits[4].condition.on_list: must be one of red, black",
    ]


def test_considers_all_may_read_any_category() -> None:
    document = {
        "benefits": [
            {
                "id": "x",
                "purpose": "p",
                "provider": "q",
                "provider_id": "q",
                "subject_kinds": ["person"],
                "considers": "all",
                "condition": {"no_active_negative": "legal"},
            }
        ]
    }
    assert parse_benefits(document, POLICY).benefits["x"].considers is None


def test_eligibility_reasons_cite_the_entries_they_rest_on() -> None:
    entries = [entry("bike-1", 2, "transport", "positive"), entry("fence-1", -5, "transport", "minor")]
    result = decide("bike.deposit_free", entries)
    assert result.eligible is False
    assert [(r.path, r.met, r.entry_ids) for r in result.reasons] == [
        ("condition.all[0]", True, ("bike-1", "fence-1")),
        ("condition.all[1]", False, ("fence-1",)),
    ]
    assert result.reasons[1].explanation == "1 counting negative entries in transport"


def test_purpose_binding_keeps_unrelated_categories_out_of_the_decision() -> None:
    # A judgment defaulter (legal, black-list flag) sinks the whole score to tier B and onto
    # the black list, but the bike deposit waiver considers only transport.
    entries = [
        entry("bike-1", 2, "transport", "positive"),
        entry("court-1", -100, "legal", "serious", flag=True),
    ]
    bike = decide("bike.deposit_free", entries)
    assert bike.eligible is True
    assert (bike.score.score, bike.score.tier) == (1002, "A")
    assert "court-1" not in {i for r in bike.reasons for i in r.entry_ids}
    priority = decide("priority_service", entries)
    assert priority.eligible is False
    assert priority.score.tier == "B"


def test_procurement_is_refused_to_a_black_listed_organization_citing_the_flagged_entry() -> None:
    entries = [
        entry("food-1", -50, "commerce", "serious"),
        entry("court-1", -100, "legal", "serious", flag=True),
    ]
    result = decide("procurement.eligible", entries, "organization")
    assert result.eligible is False
    (reason,) = result.reasons
    assert (reason.path, reason.met, reason.entry_ids) == ("condition", False, ("court-1",))
    assert "on the black list" in reason.explanation
    clean = decide("procurement.eligible", [entry("insp-1", 5, "commerce", "positive")], "organization")
    assert clean.eligible is True


def test_a_benefit_for_another_kind_of_subject_is_refused_with_that_reason() -> None:
    result = decide("procurement.eligible", [], "person")
    assert result.eligible is False
    assert [(r.path, r.explanation) for r in result.reasons] == [
        ("subject_kinds", "the benefit is not for a person")
    ]
