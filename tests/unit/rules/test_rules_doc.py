"""docs/rules.md's worked examples: one per sample rule, each run through the engine as written."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from domain.ruleset.model import EngineEvent
from domain.ruleset.parsing import load_rule_set
from services.rules.engine import RuleEngine

REPO = Path(__file__).resolve().parents[3]
SAMPLE = load_rule_set(REPO / "config" / "rulesets" / "sample.yaml")
EXAMPLES: dict[str, dict[str, Any]] = {
    match[1]: yaml.safe_load(match[0])
    for match in re.finditer(
        r"# example: (\S+)\n.*?(?=\n```)", (REPO / "docs" / "rules.md").read_text(), flags=re.DOTALL
    )
}


def test_every_sample_rule_has_a_worked_example() -> None:
    assert set(EXAMPLES) == {rule.id for rule in SAMPLE.rules}


@pytest.mark.parametrize("rule_id", sorted(EXAMPLES))
def test_the_worked_example_gives_the_documented_outcome(rule_id: str) -> None:
    example = EXAMPLES[rule_id]
    events = sorted(
        (
            EngineEvent(
                key=item["key"],
                subject_key=item["subject"],
                subject_kind=item["subject"],
                event_type=item["type"],
                occurred_at=datetime.fromisoformat(item["at"]),
                attributes=item["attributes"],
            )
            for item in example["input"]
        ),
        key=lambda e: (e.occurred_at, e.key),
    )

    outcome = [
        {
            "events": list(f.event_keys),
            "points": f.points,
            "occurred_at": f.occurred_at.isoformat().replace("+00:00", "Z"),
            "black_list": f.black_list,
            "reason": f.reason,
        }
        for f in RuleEngine(SAMPLE).evaluate(events).firings
        if f.rule_id == rule_id
    ]

    assert outcome == example["outcome"]
