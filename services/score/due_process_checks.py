"""The checks of due process (pure): who may act on an entry, the limits of what they send,
and the deadlines of applications."""

from __future__ import annotations

from datetime import datetime, timedelta

from domain.entries import DisputeRecord, EntryFacts, EntryStatus, LedgerEntry
from domain.intake import MAX_SUBJECT_KEY_LENGTH, is_hex, not_hex
from kit import reasons
from kit.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Violation
from kit.principal import Principal, Role
from kit.purposes import Purposes

MAX_TEXT_LENGTH = 4000
MAX_URI_LENGTH = 2048
# How far a consent may be dated from the moment it is recorded: a little in the past (paper
# consent entered the next day), never further, since a backdated consent changes what past
# as-of reads return; in the future only by clock skew.
CONSENT_MAX_BACKDATE = timedelta(hours=24)
CONSENT_MAX_FUTURE_SKEW = timedelta(minutes=5)

# A reviewer's principal id as an admin names it in AssignDispute.
MAX_ASSIGNEE_LENGTH = 256
ASSIGNEE_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@:-")


def add_working_days(start: datetime, days: int) -> datetime:
    """`start` plus `days` working days (Monday to Friday, in `start`'s time zone, UTC
    for stored instants), at the same time of day. No holiday calendar: a city that
    needs one configures a longer period."""
    at = start
    added = 0
    while added < days:
        at += timedelta(days=1)
        if at.weekday() < 5:
            added += 1
    return at


def repair_possible_from(entry: LedgerEntry, min_period: timedelta) -> datetime:
    """The first instant a repair of `entry` may be applied for."""
    return entry.occurred_at + min_period


def text_violations(
    name: str, value: str, *, required: bool = True, limit: int = MAX_TEXT_LENGTH
) -> list[Violation]:
    if required and not value.strip():
        return [Violation(name, "is required", "REQUIRED")]
    if len(value) > limit:
        return [Violation(name, f"must be at most {limit:,} characters", "TOO_LONG")]
    return []


def check(violations: list[Violation]) -> None:
    if violations:
        raise InvalidArgument("invalid request", violations)


def numeric_id(name: str, value: str, what: str) -> int:
    """A server-assigned numeric id; an unknown or malformed one is NOT_FOUND alike."""
    if not value:
        raise InvalidArgument("invalid request", [Violation(name, "is required", "REQUIRED")])
    if not value.isdigit() or len(value) > 18:
        raise NotFound(f"no {what} {value!r}")
    return int(value)


def actor(principal: Principal | None) -> tuple[str, str]:
    if principal is None:
        return ("anonymous", "unauthenticated")
    return (principal.loggable_id, principal.role.value)


def may_dispute(principal: Principal | None, facts: EntryFacts) -> bool:
    """The entry's subject, or a department whose events the entry rests on (None:
    insecure development mode, where anyone may)."""
    if principal is None:
        return True
    if principal.role is Role.SUBJECT:
        return principal.subject_key == facts.entry.subject_key
    if principal.role is Role.DEPARTMENT:
        return principal.id in facts.sources
    return False


def owns(principal: Principal | None, facts: EntryFacts) -> bool:
    return principal is None or (
        principal.role is Role.SUBJECT and principal.subject_key == facts.entry.subject_key
    )


def check_assignee(assignee: str, release: bool, admin: bool, by: str, purposes: Purposes | None) -> None:
    """Who may take, assign or release a dispute, and that an admin names a reviewer's
    principal id, never a resident's identifier (`purposes`' patterns)."""
    if release:
        if assignee:
            check([Violation("assignee", "must be empty when releasing", "CONFLICTING_FIELDS")])
        return
    if not assignee:
        if admin:
            check([Violation("assignee", "an admin names the reviewer", "REQUIRED")])
        return
    if not admin:
        if assignee != by:
            raise PermissionDenied("a reviewer takes a dispute for itself only")
        return
    looks_like_id = (
        len(assignee) > MAX_ASSIGNEE_LENGTH
        or not set(assignee) <= ASSIGNEE_CHARACTERS
        or assignee.startswith("subject:")
        or (purposes is not None and purposes.names_identifier(assignee))
    )
    if looks_like_id:
        check([Violation("assignee", "must be a reviewer's principal id", "INVALID_ASSIGNEE")])


def held_by_another(dispute: DisputeRecord) -> FailedPrecondition:
    return FailedPrecondition(
        f"dispute {dispute.dispute_id} is assigned to {dispute.assignee}",
        reasons.ASSIGNED_TO_ANOTHER,
        {"assignee": dispute.assignee},
    )


def why_not(facts: EntryFacts, now: datetime) -> tuple[str, str]:
    """Why a recorded entry does not count at `now`: a reasons.WHY_* code, and in words."""
    status = facts.status
    if status is EntryStatus.REVERSED:
        return reasons.WHY_REVERSED, "reversed"
    if status is EntryStatus.REPAIRED:
        return reasons.WHY_REPAIRED, "repaired"
    if any(d.overdue(now) for d in facts.disputes):
        return reasons.WHY_DISPUTE_PAST_DEADLINE, "disputed past the deadline"
    return reasons.WHY_EXPIRED, "expired"


def consent_subject(
    principal: Principal | None, subject_key: str, effective_at: datetime | None, now: datetime
) -> str:
    """The subject whose consent a caller sets (a subject sets only its own), with the limits
    on when a consent may take effect; raises when the request is not acceptable."""
    problems: list[Violation] = []
    if principal is not None and principal.role is Role.SUBJECT:
        own = principal.subject_key or ""
        if not own:
            raise FailedPrecondition(
                "this service has no subject key configured; it cannot tell who you are",
                reasons.SUBJECT_NOT_IDENTIFIED,
            )
        if subject_key and subject_key != own:
            raise PermissionDenied("a subject may only set its own consent")
        subject_key = own
    elif not subject_key:
        problems.append(Violation("subject_key", "is required", "REQUIRED"))
    elif len(subject_key) > MAX_SUBJECT_KEY_LENGTH:
        problems.append(
            Violation("subject_key", f"must be at most {MAX_SUBJECT_KEY_LENGTH} characters", "TOO_LONG")
        )
    elif not is_hex(subject_key):
        problems.append(not_hex("subject_key"))
    if effective_at is not None and effective_at > now + CONSENT_MAX_FUTURE_SKEW:
        problems.append(
            Violation(
                "effective_at",
                f"must be at most {CONSENT_MAX_FUTURE_SKEW.total_seconds():g} seconds after now",
                "IN_FUTURE",
            )
        )
    if effective_at is not None and effective_at < now - CONSENT_MAX_BACKDATE:
        problems.append(
            Violation(
                "effective_at",
                f"must be at most {CONSENT_MAX_BACKDATE.total_seconds() / 3600:g} hours before now",
                "TOO_OLD",
            )
        )
    check(problems)
    return subject_key
