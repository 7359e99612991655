"""Building outcomes as rules sends them to score, for score and query tests."""

from __future__ import annotations

from datetime import UTC, datetime

from egret.common.v1 import event_pb2, outcome_pb2
from kit.protoconv import to_timestamp
from tests.support.events import PERSON

OCCURRED = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def oid(name: str) -> str:
    """A test's readable outcome name as an outcome id: lowercase hex, as rules makes them
    (domain.ruleset.model.outcome_id) and as score stores them, in bytes (kit.columns.Hex)."""
    return name.encode().hex()


def outcome(
    outcome_id: str,
    subject_key: str,
    points: int,
    category: str,
    *,
    severity: int | None = None,
    occurred_at: datetime = OCCURRED,
    rule_set_version: int = 2,
    events: int = 1,
) -> outcome_pb2.Outcome:
    """An outcome of rule `<category>.rule` with `events` evidence events; severity defaults
    to positive for positive points and minor otherwise."""
    when = to_timestamp(occurred_at)
    if severity is None:
        severity = outcome_pb2.SEVERITY_POSITIVE if points > 0 else outcome_pb2.SEVERITY_MINOR
    return outcome_pb2.Outcome(
        outcome_id=outcome_id,
        rule=outcome_pb2.RuleRef(
            rule_id=f"{category}.rule",
            rule_set="sample",
            rule_set_version=rule_set_version,
            title="A rule",
            description="What it means",
            legal_basis="Regulation 7",
        ),
        subject_key=subject_key,
        subject_kind=PERSON,
        points=points,
        category=category,
        severity=severity,  # type: ignore[arg-type]
        occurred_at=when,
        reason=f"because of {outcome_id}",
        events=[
            event_pb2.RecordedEvent(
                ref=event_pb2.EventRef(source="library", event_id=f"{outcome_id}-{n}"),
                event_type="library.book_returned_late",
                subject_key=subject_key,
                subject_kind=PERSON,
                occurred_at=when,
                recorded_at=when,
                attributes={"days_late": event_pb2.AttributeValue(int_value=30 + n)},
                evidence_uri=f"https://records.example.gov/{outcome_id}/{n}",
            )
            for n in range(events)
        ],
    )
