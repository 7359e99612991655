"""Ledger entries as the person reads them: what happened, what it does, until when, and
what they can do about it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.portal import records as r
from services.portal.i18n import Localiser
from services.portal.views import words

# FileDispute takes a statement of at most this many characters (docs/due-process.md).
MAX_STATEMENT = 4000
MAX_EVIDENCE = 4000
MAX_EVIDENCE_URI = 2048


@dataclass(frozen=True)
class EntryRow:
    entry_id: str
    date: str
    points: str
    positive: bool
    category: str
    severity: str
    reason: str
    rule_title: str
    status: str
    status_code: str
    until: str  # when it stops (or stopped) counting, in words


def counting_until(t: Localiser, entry: r.Entry, now: datetime) -> str:
    """When an entry stops counting, or why it no longer does."""
    if entry.status in ("reversed", "repaired"):
        return words.status(t, entry.status)
    if entry.visible_until is None:
        return ""
    if entry.visible_until <= now or entry.status == "expired":
        return t.gettext("Stopped counting on %(date)s", date=t.date(entry.visible_until))
    return t.gettext("Counts until %(date)s", date=t.date(entry.visible_until))


def row(t: Localiser, entry: r.Entry, now: datetime) -> EntryRow:
    return EntryRow(
        entry_id=entry.entry_id,
        date=t.date(entry.occurred_at),
        points=t.signed(entry.points),
        positive=entry.points > 0,
        category=words.category(t, entry.category),
        severity=words.severity(t, entry.severity),
        reason=entry.reason,
        rule_title=entry.rule_title,
        status=words.status(t, entry.status),
        status_code=entry.status,
        until=counting_until(t, entry, now),
    )


@dataclass(frozen=True)
class EvidenceView:
    source: str
    event_id: str
    event_type: str
    date: str
    attributes: tuple[tuple[str, str], ...]
    evidence_uri: str


@dataclass(frozen=True)
class DisputeView:
    dispute_id: str
    entry_id: str
    statement: str
    filed: str
    deadline: str
    status: str
    status_code: str
    resolution: str
    resolved: str
    overdue: bool


@dataclass(frozen=True)
class RepairView:
    application_id: str
    entry_id: str
    evidence: str
    applied: str
    decision_due: str
    status: str
    status_code: str
    decision: str
    decided: str
    overdue: bool


def dispute_view(t: Localiser, d: r.Dispute) -> DisputeView:
    return DisputeView(
        dispute_id=d.dispute_id,
        entry_id=d.entry_id,
        statement=d.statement,
        filed=t.datetime(d.filed_at),
        deadline=t.date(d.deadline),
        status=words.dispute_status(t, d.status),
        status_code=d.status,
        resolution=d.resolution_reason,
        resolved=t.datetime(d.resolved_at),
        overdue=d.overdue,
    )


def repair_view(t: Localiser, a: r.Repair) -> RepairView:
    return RepairView(
        application_id=a.application_id,
        entry_id=a.entry_id,
        evidence=a.evidence,
        applied=t.datetime(a.applied_at),
        decision_due=t.date(a.decision_due),
        status=words.repair_status(t, a.status),
        status_code=a.status,
        decision=a.decision_reason,
        decided=t.datetime(a.decided_at),
        overdue=a.overdue,
    )


@dataclass(frozen=True)
class ConsentView:
    """The consent in force, in words: the state, since when, and what it means here."""

    state: str
    since: str
    meaning: str
    granted: bool


def consent_view(t: Localiser, c: r.ConsentState) -> ConsentView:
    if c.consent is None:
        state = t.gettext("You have not given or withdrawn consent.")
    elif c.granted:
        state = t.gettext("You have given consent.")
    else:
        state = t.gettext("You have withdrawn consent.")
    since = (
        t.gettext("In force since %(date)s.", date=t.datetime(c.consent.effective_at))
        if c.consent is not None and c.consent.effective_at is not None
        else ""
    )
    if not c.required:
        meaning = t.gettext(
            "The city's policy does not require consent now: your score is served either way."
        )
    elif c.granted:
        meaning = t.gettext(
            "The city's policy requires consent, and yours is in force: your score is served."
        )
    else:
        meaning = t.gettext("The city's policy requires consent: without it, no score is served about you.")
    return ConsentView(state, since, meaning, c.granted)


@dataclass(frozen=True)
class EntryDetail:
    row: EntryRow
    rule_id: str
    rule_description: str
    legal_basis: str
    rule_set: str
    sources: tuple[str, ...]
    recorded: str
    status_reason: str
    black_list: bool
    evidence: tuple[EvidenceView, ...]
    dispute: DisputeView | None
    repair: RepairView | None
    # From the explanation of the score (None when it could not be read).
    counting: bool | None
    contribution: str
    capped_points: int
    # What the person can do now, and when they could otherwise.
    can_dispute: bool
    cannot_dispute_why: str
    can_repair: bool
    cannot_repair_why: str
    repair_possible_from: str


def detail(t: Localiser, entry: r.Entry, explained: r.ExplainedEntry | None, now: datetime) -> EntryDetail:
    open_dispute = entry.dispute is not None and entry.dispute.status == "open"
    pending_repair = entry.repair is not None and entry.repair.status == "pending"
    ended = entry.status in ("reversed", "repaired")

    cannot_dispute = ""
    if ended:
        cannot_dispute = t.gettext("This entry no longer counts, so there is nothing to dispute.")
    elif open_dispute:
        cannot_dispute = t.gettext(
            "You have already disputed this entry; the dispute is waiting for a decision."
        )

    counting = explained.counting if explained is not None else None
    possible = explained.repair_possible_from if explained is not None else None
    cannot_repair = ""
    if entry.points >= 0:
        cannot_repair = t.gettext("Only entries that take points away can be repaired.")
    elif ended or counting is False or entry.status == "expired":
        cannot_repair = t.gettext("This entry does not count now, so there is nothing to repair.")
    elif pending_repair:
        cannot_repair = t.gettext("You have already applied for repair of this entry; a decision is pending.")
    elif possible is not None and possible > now:
        cannot_repair = t.gettext(
            "Too early: you can apply for repair of this entry from %(date)s.", date=t.date(possible)
        )
    return EntryDetail(
        row=row(t, entry, now),
        rule_id=entry.rule_id,
        rule_description=entry.rule_description,
        legal_basis=entry.legal_basis,
        rule_set=f"{entry.rule_set} v{entry.rule_set_version}" if entry.rule_set else "",
        sources=entry.sources,
        recorded=t.datetime(entry.recorded_at),
        status_reason=entry.status_reason,
        black_list=entry.black_list,
        evidence=tuple(
            EvidenceView(
                e.source, e.event_id, e.event_type, t.datetime(e.occurred_at), e.attributes, e.evidence_uri
            )
            for e in entry.evidence
        ),
        dispute=dispute_view(t, entry.dispute) if entry.dispute else None,
        repair=repair_view(t, entry.repair) if entry.repair else None,
        counting=counting,
        contribution=t.signed(explained.contribution) if explained is not None else "",
        capped_points=explained.capped_points if explained is not None else 0,
        can_dispute=not cannot_dispute,
        cannot_dispute_why=cannot_dispute,
        can_repair=not cannot_repair,
        cannot_repair_why=cannot_repair,
        repair_possible_from=t.date(possible) if possible is not None else "",
    )


@dataclass(frozen=True)
class FieldError:
    """A problem with one form field: its id (for the error summary's link) and the message."""

    field: str
    message: str


def check_statement(t: Localiser, statement: str) -> list[FieldError]:
    text = statement.strip()
    if not text:
        return [FieldError("statement", t.gettext("Say why the entry is wrong."))]
    if len(text) > MAX_STATEMENT:
        return [
            FieldError(
                "statement",
                t.gettext(
                    "Your statement is %(length)s characters long; it can be at most %(limit)s.",
                    length=t.number(len(text)),
                    limit=t.number(MAX_STATEMENT),
                ),
            )
        ]
    return []


def check_repair(t: Localiser, evidence: str, evidence_uri: str) -> list[FieldError]:
    errors = []
    text = evidence.strip()
    if not text:
        errors.append(FieldError("evidence", t.gettext("Describe what you did to put things right.")))
    elif len(text) > MAX_EVIDENCE:
        errors.append(
            FieldError(
                "evidence",
                t.gettext(
                    "Your description can be at most %(limit)s characters.", limit=t.number(MAX_EVIDENCE)
                ),
            )
        )
    uri = evidence_uri.strip()
    if uri and (len(uri) > MAX_EVIDENCE_URI or not uri.startswith(("https://", "http://"))):
        errors.append(
            FieldError("evidence_uri", t.gettext("The link must be a web address starting with https://."))
        )
    return errors
