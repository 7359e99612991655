"""Due process on the ledger (pure domain): disputes, credit repair and consent.

Every act is one transaction of a `DueProcessStore`: the facts are read under the
subject's lock, checked here, written with their history row and audit record, and the
subject is rescored. Nothing here edits an entry's facts: disputes and repairs end or
resume its effect through pauses (`domain.entries.pauses_of`), so any past score
is still a pure function of the ledger (docs/due-process.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from domain.consent import Consent
from domain.entries import (
    APPROVED,
    DISPUTE,
    OPEN,
    OVERTURNED,
    PENDING,
    REJECTED,
    REPAIR,
    UPHELD,
    DisputeRecord,
    EntryFacts,
    EntryStatus,
    LedgerEntry,
    RepairRecord,
    counts_at,
)
from domain.history import Event
from domain.intake import MAX_ID_LENGTH, MAX_SUBJECT_KEY_LENGTH
from kit import reasons
from kit.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Violation
from kit.principal import Principal, Role
from kit.pseudonym import Pseudonymiser
from kit.purposes import Purposes
from services.score.ledger import Ledger, Rescore

MAX_TEXT_LENGTH = 4000
MAX_URI_LENGTH = 2048
# How far a consent may be dated from the moment it is recorded: a little in the past (paper
# consent entered the next day), never further, since a backdated consent changes what past
# as-of reads return; in the future only by clock skew.
CONSENT_MAX_BACKDATE = timedelta(hours=24)
CONSENT_MAX_FUTURE_SKEW = timedelta(minutes=5)

# A reviewer's principal id as an admin names it in AssignDispute.
MAX_ASSIGNEE_LENGTH = 256
_ASSIGNEE_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@:-")

UPHOLD = "uphold"
OVERTURN = "overturn"
APPROVE = "approve"
REJECT = "reject"


@dataclass(frozen=True)
class Audited:
    """An audit record to append with the act: what, about whom, and the facts."""

    action: str
    subject_key: str | None
    target: str
    detail: Mapping[str, Any] = field(default_factory=dict)


class DueProcessTx(Protocol):
    """One transaction of the due-process store."""

    def entry(self, entry_id: str) -> EntryFacts | None:
        """The entry's facts, its subject locked until commit; None if there is none."""
        ...

    def dispute(self, dispute_id: int) -> DisputeRecord | None: ...

    def repair(self, application_id: int) -> RepairRecord | None: ...

    def add_dispute(self, dispute: DisputeRecord) -> DisputeRecord:
        """Store a new dispute; returns it with its assigned id."""
        ...

    def save_dispute(self, dispute: DisputeRecord) -> None: ...

    def add_repair(self, repair: RepairRecord) -> RepairRecord:
        """Store a new application; returns it with its assigned id."""
        ...

    def save_repair(self, repair: RepairRecord) -> None: ...

    def add_consent(self, consent: Consent) -> Consent:
        """Append a consent record; returns it with its assigned id."""
        ...

    def stored_subject(self, subject_keys: Sequence[str]) -> str | None:
        """The first of `subject_keys` the store holds a score or a consent record of."""
        ...

    def set_status(self, entry_id: str, status: EntryStatus) -> None: ...

    def rescore(self, subject_key: str, rescore: Rescore, now: datetime) -> None:
        """Rescore one subject and store its row and history rows."""
        ...

    def audit(self, act: Audited, at: datetime) -> None:
        """Append the act's audit record in this transaction."""
        ...


class DueProcessStore(Protocol):
    def transaction(self) -> AbstractContextManager[DueProcessTx]: ...

    def overdue_repairs(self, now: datetime, limit: int) -> list[RepairRecord]:
        """Pending applications whose decision is past due at `now`, oldest due first."""
        ...


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


def _check(violations: list[Violation]) -> None:
    if violations:
        raise InvalidArgument("invalid request", violations)


def _id(name: str, value: str, what: str) -> int:
    """A server-assigned numeric id; an unknown or malformed one is NOT_FOUND alike."""
    if not value:
        raise InvalidArgument("invalid request", [Violation(name, "is required", "REQUIRED")])
    if not value.isdigit() or len(value) > 18:
        raise NotFound(f"no {what} {value!r}")
    return int(value)


def _actor(principal: Principal | None) -> tuple[str, str]:
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


def _owns(principal: Principal | None, facts: EntryFacts) -> bool:
    return principal is None or (
        principal.role is Role.SUBJECT and principal.subject_key == facts.entry.subject_key
    )


class DueProcess:
    """Disputes, repairs and consent, each one transaction with its history row and
    audit record."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        store: DueProcessStore,
        clock: Callable[[], datetime],
        pseudonymiser: Pseudonymiser | None = None,
        purposes: Purposes | None = None,
    ) -> None:
        self._ledger = ledger
        self._store = store
        self._clock = clock
        self._pseudonymiser = pseudonymiser
        # Its identifier patterns keep a resident's id from being stored as an assignee.
        self._purposes = purposes

    def _requested_subject(self, tx: DueProcessTx, subject_key: str) -> str:
        """The subject a caller names by key: the key as given, or, after a rotation, a key
        of the previous generation (one a read returned before it) moved to the current
        one. Every stored key is of the current generation while this instance serves
        (kit.rekey's guard), so a given key the store holds nothing of, whose moved form it
        does, was of the previous generation. A key it knows in neither form is taken as given."""
        chain = self._pseudonymiser
        previous = None if chain is None else chain.previous_key_id
        if chain is None or previous is None:
            return subject_key
        moved = chain.rekey(subject_key, previous)
        return tx.stored_subject((subject_key, moved)) or subject_key

    def _entry(self, tx: DueProcessTx, entry_id: str) -> EntryFacts:
        facts = tx.entry(entry_id) if len(entry_id) <= MAX_ID_LENGTH else None
        if facts is None:
            raise NotFound(f"no ledger entry {entry_id!r}")
        return facts

    def _rescore(self, tx: DueProcessTx, subject_key: str, event: Event, now: datetime) -> None:
        tx.rescore(subject_key, self._ledger.rescorer(now, {subject_key: event}), now)

    def _open_dispute(self, tx: DueProcessTx, number: int) -> tuple[EntryFacts, DisputeRecord]:
        """The dispute with its entry's facts, read under the subject's lock (a concurrent
        decision or assignment may have won): ALREADY_DECIDED unless it is still open."""
        found = tx.dispute(number)
        if found is None:
            raise NotFound(f"no dispute {str(number)!r}")
        facts = self._entry(tx, found.entry_id)
        dispute = next(d for d in facts.disputes if d.dispute_id == number)
        if dispute.status != OPEN:
            raise FailedPrecondition(
                f"dispute {number} was decided before ({dispute.status})",
                reasons.ALREADY_DECIDED,
                {"status": dispute.status},
            )
        return facts, dispute

    def file_dispute(self, principal: Principal | None, entry_id: str, statement: str) -> DisputeRecord:
        _check(
            text_violations("entry_id", entry_id, limit=MAX_ID_LENGTH)
            + text_violations("statement", statement)
        )
        now = self._clock()
        with self._store.transaction() as tx:
            facts = self._entry(tx, entry_id)
            if not may_dispute(principal, facts):
                # The same answer as for a missing entry, so existence does not leak.
                raise NotFound(f"no ledger entry {entry_id!r}")
            if any(d.status == OPEN for d in facts.disputes):
                raise FailedPrecondition(
                    f"entry {entry_id!r} already has an open dispute", reasons.DISPUTE_ALREADY_OPEN
                )
            if facts.status in (EntryStatus.REVERSED, EntryStatus.REPAIRED):
                raise FailedPrecondition(
                    f"entry {entry_id!r} is {facts.status.value}; it no longer counts",
                    reasons.ENTRY_NOT_DISPUTABLE,
                    {"status": facts.status.value},
                )
            by, role = _actor(principal)
            deadline = now + self._ledger.policy.due_process.dispute_deadline
            dispute = tx.add_dispute(
                DisputeRecord(0, entry_id, facts.entry.subject_key, statement, by, role, now, deadline)
            )
            tx.set_status(entry_id, EntryStatus.DISPUTED)
            self._rescore(
                tx,
                facts.entry.subject_key,
                Event(DISPUTE, note=f"dispute {dispute.dispute_id} filed", always=True),
                now,
            )
            tx.audit(
                Audited(
                    "dispute.file",
                    facts.entry.subject_key,
                    entry_id,
                    {
                        "dispute_id": dispute.dispute_id,
                        "deadline": deadline.isoformat(),
                        "statement": statement,
                    },
                ),
                now,
            )
            return dispute

    def resolve_dispute(
        self, principal: Principal | None, dispute_id: str, decision: str | None, reason: str
    ) -> DisputeRecord:
        problems = text_violations("reason", reason)
        if decision not in (UPHOLD, OVERTURN):
            problems.insert(0, Violation("decision", "must be UPHOLD or OVERTURN", "REQUIRED"))
        _check(problems)
        number = _id("dispute_id", dispute_id, "dispute")
        now = self._clock()
        with self._store.transaction() as tx:
            facts, dispute = self._open_dispute(tx, number)
            by, _ = _actor(principal)
            if dispute.assignee and dispute.assignee != by:
                # Held by another reviewer: only they decide it, unless it is released.
                raise _held_by_another(dispute)
            decided = replace(
                dispute,
                status=UPHELD if decision == UPHOLD else OVERTURNED,
                resolution_reason=reason,
                resolved_by=by,
                resolved_at=now,
            )
            tx.save_dispute(decided)
            after = replace(
                facts, disputes=tuple(decided if d.dispute_id == number else d for d in facts.disputes)
            )
            tx.set_status(dispute.entry_id, after.status)
            if decision == UPHOLD:
                lapsed = now > dispute.deadline
                event = Event(
                    DISPUTE,
                    resumed=(dispute.entry_id,) if lapsed else (),
                    note=f"dispute {number} upheld: {reason}",
                    always=True,
                )
            else:
                event = Event(
                    DISPUTE,
                    ended=(dispute.entry_id,),
                    note=f"dispute {number} overturned: {reason}",
                    always=True,
                )
            self._rescore(tx, dispute.subject_key, event, now)
            tx.audit(
                Audited(
                    "dispute.resolve",
                    dispute.subject_key,
                    dispute.entry_id,
                    {"dispute_id": number, "decision": decided.status, "reason": reason},
                ),
                now,
            )
            return decided

    def assign_dispute(
        self, principal: Principal | None, dispute_id: str, assignee: str, release: bool
    ) -> DisputeRecord:
        """A reviewer takes an open dispute (or releases the one it holds); an admin assigns
        one to a named reviewer or releases it from whoever holds it. Taking or releasing a
        dispute another reviewer holds is refused with ASSIGNED_TO_ANOTHER; only an admin
        moves it. Each change is an audit record under the caller's identity."""
        by, role = _actor(principal)
        admin = principal is not None and principal.role is Role.ADMIN
        self._check_assignee(assignee, release, admin, by)
        number = _id("dispute_id", dispute_id, "dispute")
        now = self._clock()
        with self._store.transaction() as tx:
            _, dispute = self._open_dispute(tx, number)
            target = "" if release else (assignee or by)
            if not admin and dispute.assignee and dispute.assignee != by:
                raise _held_by_another(dispute)
            if dispute.assignee == target:
                return dispute  # already so: nothing changes, nothing to record
            changed = replace(dispute, assignee=target, assigned_at=None if release else now)
            tx.save_dispute(changed)
            tx.audit(
                Audited(
                    "dispute.release" if release else "dispute.assign",
                    dispute.subject_key,
                    dispute.entry_id,
                    {
                        "dispute_id": number,
                        "assignee": target,
                        "previous_assignee": dispute.assignee,
                        "by_role": role,
                    },
                ),
                now,
            )
            return changed

    def _check_assignee(self, assignee: str, release: bool, admin: bool, by: str) -> None:
        if release:
            if assignee:
                _check([Violation("assignee", "must be empty when releasing", "CONFLICTING_FIELDS")])
            return
        if not assignee:
            if admin:
                _check([Violation("assignee", "an admin names the reviewer", "REQUIRED")])
            return
        if not admin:
            if assignee != by:
                raise PermissionDenied("a reviewer takes a dispute for itself only")
            return
        looks_like_id = (
            len(assignee) > MAX_ASSIGNEE_LENGTH
            or not set(assignee) <= _ASSIGNEE_CHARACTERS
            or assignee.startswith("subject:")
            or (self._purposes is not None and self._purposes.names_identifier(assignee))
        )
        if looks_like_id:
            _check([Violation("assignee", "must be a reviewer's principal id", "INVALID_ASSIGNEE")])

    def apply_for_repair(
        self, principal: Principal | None, entry_id: str, evidence: str, evidence_uri: str
    ) -> RepairRecord:
        _check(
            text_violations("entry_id", entry_id, limit=MAX_ID_LENGTH)
            + text_violations("evidence", evidence)
            + text_violations("evidence_uri", evidence_uri, required=False, limit=MAX_URI_LENGTH)
        )
        now = self._clock()
        policy = self._ledger.policy
        with self._store.transaction() as tx:
            facts = self._entry(tx, entry_id)
            if not _owns(principal, facts):
                raise NotFound(f"no ledger entry {entry_id!r}")
            entry = facts.entry
            if entry.points >= 0:
                raise FailedPrecondition(
                    f"entry {entry_id!r} is not negative; only negative entries are repaired",
                    reasons.ENTRY_NOT_NEGATIVE,
                )
            if not counts_at(facts.scored, policy.for_kind(entry.subject_kind), now):
                why, words = _why_not(facts, now)
                raise FailedPrecondition(
                    f"entry {entry_id!r} does not count now ({words}); there is nothing to repair",
                    reasons.ENTRY_NOT_COUNTING,
                    {"why": why},
                )
            if any(r.status == PENDING for r in facts.repairs):
                raise FailedPrecondition(
                    f"entry {entry_id!r} already has a pending repair application",
                    reasons.REPAIR_ALREADY_PENDING,
                )
            period = policy.due_process.repair_min_period(entry.severity)
            if period is None:
                raise FailedPrecondition(
                    f"entries of severity {entry.severity!r} cannot be repaired",
                    reasons.SEVERITY_NOT_REPAIRABLE,
                    {"severity": entry.severity},
                )
            possible = repair_possible_from(entry, period)
            if now < possible:
                raise FailedPrecondition(
                    f"a repair of this {entry.severity} entry may be applied for from "
                    f"{possible.date().isoformat()} ({possible.isoformat()}), "
                    f"{period.days} days after the event",
                    reasons.REPAIR_TOO_EARLY,
                    {
                        "earliest_date": possible.date().isoformat(),
                        "earliest_at": possible.isoformat(),
                        "min_period_days": str(period.days),
                        "severity": entry.severity,
                    },
                )
            due = add_working_days(now, policy.due_process.repair_decision_working_days)
            repair = tx.add_repair(
                RepairRecord(0, entry_id, entry.subject_key, evidence, evidence_uri, now, due)
            )
            tx.audit(
                Audited(
                    "repair.apply",
                    entry.subject_key,
                    entry_id,
                    {"application_id": repair.application_id, "decision_due": due.isoformat()},
                ),
                now,
            )
            return repair

    def decide_repair(
        self, principal: Principal | None, application_id: str, decision: str | None, reason: str
    ) -> RepairRecord:
        problems = text_violations("reason", reason)
        if decision not in (APPROVE, REJECT):
            problems.insert(0, Violation("decision", "must be APPROVE or REJECT", "REQUIRED"))
        _check(problems)
        number = _id("application_id", application_id, "repair application")
        now = self._clock()
        with self._store.transaction() as tx:
            found = tx.repair(number)
            if found is None:
                raise NotFound(f"no repair application {application_id!r}")
            facts = self._entry(tx, found.entry_id)
            repair = next(r for r in facts.repairs if r.application_id == number)
            if repair.status != PENDING:
                raise FailedPrecondition(
                    f"repair application {application_id} was decided before ({repair.status})",
                    reasons.ALREADY_DECIDED,
                    {"status": repair.status},
                )
            by, _ = _actor(principal)
            decided = replace(
                repair,
                status=APPROVED if decision == APPROVE else REJECTED,
                decision_reason=reason,
                decided_by=by,
                decided_at=now,
            )
            tx.save_repair(decided)
            if decided.status == APPROVED:
                after = replace(
                    facts, repairs=tuple(decided if r.application_id == number else r for r in facts.repairs)
                )
                tx.set_status(repair.entry_id, after.status)
                self._rescore(
                    tx,
                    repair.subject_key,
                    Event(
                        REPAIR,
                        ended=(repair.entry_id,),
                        note=f"repair {number} approved: {reason}",
                        always=True,
                    ),
                    now,
                )
            tx.audit(
                Audited(
                    "repair.decide",
                    repair.subject_key,
                    repair.entry_id,
                    {"application_id": number, "decision": decided.status, "reason": reason},
                ),
                now,
            )
            return decided

    def set_consent(
        self, principal: Principal | None, subject_key: str, granted: bool, effective_at: datetime | None
    ) -> Consent:
        now = self._clock()
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
        _check(problems)
        by, _ = _actor(principal)
        staff = principal is None or principal.role is not Role.SUBJECT
        with self._store.transaction() as tx:
            if staff:
                subject_key = self._requested_subject(tx, subject_key)
            consent = tx.add_consent(Consent(subject_key, granted, effective_at or now, now, by))
            tx.audit(
                Audited(
                    "consent.set",
                    subject_key,
                    subject_key,
                    {"granted": granted, "effective_at": consent.effective_at.isoformat()},
                ),
                now,
            )
            return consent

    def overdue_repairs(self, limit: int = 100) -> list[RepairRecord]:
        return self._store.overdue_repairs(self._clock(), limit)


def _held_by_another(dispute: DisputeRecord) -> FailedPrecondition:
    return FailedPrecondition(
        f"dispute {dispute.dispute_id} is assigned to {dispute.assignee}",
        reasons.ASSIGNED_TO_ANOTHER,
        {"assignee": dispute.assignee},
    )


def _why_not(facts: EntryFacts, now: datetime) -> tuple[str, str]:
    """Why a recorded entry does not count at `now`: a reasons.WHY_* code, and in words."""
    status = facts.status
    if status is EntryStatus.REVERSED:
        return reasons.WHY_REVERSED, "reversed"
    if status is EntryStatus.REPAIRED:
        return reasons.WHY_REPAIRED, "repaired"
    if any(d.overdue(now) for d in facts.disputes):
        return reasons.WHY_DISPUTE_PAST_DEADLINE, "disputed past the deadline"
    return reasons.WHY_EXPIRED, "expired"
