"""The rules service's settings for tests, and the rule sets those tests publish."""

from __future__ import annotations

from pathlib import Path

from kit.settings import PeerSettings, RelaySettings
from services.rules.settings import RulesSettings
from tests.support.servers import common_settings

# Points divide by (days_late - 40): an event with days_late = 40 cannot be evaluated.
FRAGILE = """\
name: test-rules
version: {version}
rules:
  - id: library.late_return
    title: Book returned late
    description: Returned {{days_late}} days late.
    event_types: [library.book_returned_late]
    when: {{all: [{{attr: days_late, op: gt, value: 30}}]}}
    points: {points}
    category: civic
    severity: minor
    legal_basis: Library regulation (test)
    reason: Returned {{days_late}} days late
"""
V1 = FRAGILE.format(version=1, points='"-30 / abs(days_late - 40)"')
V2 = FRAGILE.format(version=2, points="-3")

WINDOW = """\
name: test-windows
version: 1
rules:
  - id: transport.fare_evasion_repeated
    title: Three fare evasions within 90 days
    description: Evaded the fare three times.
    event_types: [transport.metro.fare_evasion]
    window: {count: 3, within: 90d}
    points: -20
    category: transport
    severity: general
    legal_basis: Metro regulation (test)
    reason: Evaded the fare {count} times within 90 days
"""


def rules_settings(
    database_url: str, data_dir: Path, score_address: str, source: str = V1, attempts: int = 2
) -> RulesSettings:
    ruleset_file = data_dir / "ruleset.yaml"
    ruleset_file.write_text(source)
    return RulesSettings(
        common=common_settings("rules", database_url, data_dir),
        ruleset_file=ruleset_file,
        max_batch_size=100,
        score=PeerSettings(address=score_address, deadline_s=2.0),
        relay=RelaySettings(batch_size=50, poll_interval_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.2),
        dead_letter_after_attempts=attempts,
    )


def as_actor(name: str) -> tuple[tuple[str, str]]:
    return (("x-egret-actor", name),)
