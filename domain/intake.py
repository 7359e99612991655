"""Outcomes and reversals as delivered by rules, and the checks they must pass before
the ledger takes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from domain.entries import RETRACTION, ReversalRecord, RuleRef
from kit.errors import Violation
from kit.vocabulary import SEVERITIES, SUBJECT_KINDS

MAX_ID_LENGTH = 128
MAX_SUBJECT_KEY_LENGTH = 64
MAX_CATEGORY_LENGTH = 64


@dataclass(frozen=True)
class IncomingOutcome:
    """An outcome as delivered, before validation. `snapshot` is the serialized outcome,
    kept verbatim as the entry's evidence."""

    outcome_id: str
    subject_key: str
    subject_kind: str | None
    rule: RuleRef
    points: int
    category: str
    severity: str | None
    occurred_at: datetime | None
    reason: str
    black_list: bool
    snapshot: bytes


_HEX_DIGITS = frozenset("0123456789abcdef")


def is_hex(value: str) -> bool:
    """Whether `value` is lowercase hexadecimal of whole bytes, as every subject key and
    outcome id is (an HMAC, a digest): what score's stores keep as bytes (kit.columns.Hex)."""
    return len(value) % 2 == 0 and _HEX_DIGITS.issuperset(value)


def not_hex(name: str) -> Violation:
    return Violation(name, "must be lowercase hexadecimal", "NOT_HEX")


def outcome_violations(outcome: IncomingOutcome) -> list[Violation]:
    """Every problem of one outcome; empty when it can become a ledger entry."""
    problems = []
    for name, value, limit in (
        ("outcome_id", outcome.outcome_id, MAX_ID_LENGTH),
        ("subject_key", outcome.subject_key, MAX_SUBJECT_KEY_LENGTH),
        ("category", outcome.category, MAX_CATEGORY_LENGTH),
    ):
        if not value:
            problems.append(Violation(name, "is required", "REQUIRED"))
        elif len(value) > limit:
            problems.append(Violation(name, f"must be at most {limit} characters", "TOO_LONG"))
        elif name != "category" and not is_hex(value):
            problems.append(not_hex(name))
    for name, value in (("rule.rule_id", outcome.rule.rule_id), ("rule.rule_set", outcome.rule.rule_set)):
        if len(value) > MAX_ID_LENGTH:
            problems.append(Violation(name, f"must be at most {MAX_ID_LENGTH} characters", "TOO_LONG"))
    if outcome.subject_kind not in SUBJECT_KINDS:
        problems.append(Violation("subject_kind", "is required", "REQUIRED"))
    if outcome.severity not in SEVERITIES:
        problems.append(Violation("severity", "is required", "REQUIRED"))
    if outcome.occurred_at is None:
        problems.append(Violation("occurred_at", "is required", "REQUIRED"))
    return problems


@dataclass(frozen=True)
class IncomingReversal:
    """A reversal as delivered: the outcome to reverse and the retraction (or late event) behind it."""

    outcome_id: str
    subject_key: str
    source: str
    event_id: str
    reason: str
    retracted_at: datetime | None
    retracted_by: str
    cause: str = RETRACTION

    def record(self, now: datetime) -> ReversalRecord:
        return ReversalRecord(
            outcome_id=self.outcome_id,
            subject_key=self.subject_key,
            source=self.source,
            event_id=self.event_id,
            reason=self.reason,
            retracted_at=self.retracted_at,
            retracted_by=self.retracted_by,
            reversed_at=now,
            cause=self.cause,
        )


def reversal_violations(reversal: IncomingReversal) -> list[Violation]:
    problems = []
    if not reversal.outcome_id:
        problems.append(Violation("outcome_id", "is required", "REQUIRED"))
    elif len(reversal.outcome_id) > MAX_ID_LENGTH:
        problems.append(Violation("outcome_id", f"must be at most {MAX_ID_LENGTH} characters", "TOO_LONG"))
    elif not is_hex(reversal.outcome_id):
        problems.append(not_hex("outcome_id"))
    if len(reversal.subject_key) > MAX_SUBJECT_KEY_LENGTH:
        problems.append(
            Violation(
                "retraction.subject_key", f"must be at most {MAX_SUBJECT_KEY_LENGTH} characters", "TOO_LONG"
            )
        )
    elif not is_hex(reversal.subject_key):
        problems.append(not_hex("retraction.subject_key"))
    for name, value in (
        ("retraction.ref.source", reversal.source),
        ("retraction.ref.event_id", reversal.event_id),
    ):
        if len(value) > MAX_ID_LENGTH:
            problems.append(Violation(name, f"must be at most {MAX_ID_LENGTH} characters", "TOO_LONG"))
    return problems
