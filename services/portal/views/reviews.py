"""A reviewer's queues and cases as the console shows them: what is due when, what the
entry rests on, the subject's history around it, and the decision's form and outcome."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlencode

from services.portal import records as r
from services.portal.i18n import Localiser
from services.portal.staff_records import Queued, Score
from services.portal.views import words
from services.portal.views.entries import MAX_STATEMENT, EntryDetail, FieldError, detail

MAX_REASON = MAX_STATEMENT  # ResolveDispute and DecideRepair take a reason of at most 4,000 characters
EXCERPT = 140
# The subject's score changes shown around an entry: from this long before it happened.
HISTORY_BEFORE = timedelta(days=90)
HISTORY_ROWS = 12


@dataclass(frozen=True)
class QueueRow:
    entry_id: str
    received: str  # when it was filed or applied for
    due: str
    overdue: bool
    due_in: str  # "3 days left", "2 days overdue"
    title: str  # the rule's title, or why the entry could not be read
    category: str
    departments: str
    points: str
    excerpt: str  # the statement or the evidence, shortened
    held_by: str  # who holds a dispute ("You", a reviewer's id, "No one"); "" for a repair


@dataclass(frozen=True)
class Option:
    value: str
    label: str
    selected: bool


@dataclass(frozen=True)
class Filters:
    """The queue's filters as chosen (all sent to the service) and the form's choices."""

    department: str
    category: str
    overdue: bool
    held: str  # "", "me" or "none"
    departments: tuple[str, ...]  # suggestions: the departments of the entries shown
    categories: tuple[Option, ...]
    helds: tuple[Option, ...]

    def query(self, page_token: str) -> str:
        """The query string of the queue's next page, with the same filters."""
        chosen = {
            "department": self.department,
            "category": self.category,
            "overdue": "yes" if self.overdue else "",
            "held": self.held,
            "page": page_token,
        }
        return urlencode({k: v for k, v in chosen.items() if v})


def _due_in(t: Localiser, due: datetime | None, now: datetime) -> str:
    if due is None:
        return ""
    if due >= now:
        days = (due - now).days
        return t.ngettext("%(num)s day left", "%(num)s days left", days, num=t.number(days))
    late = math.ceil((now - due) / timedelta(days=1))
    return t.ngettext("%(num)s day overdue", "%(num)s days overdue", late, num=t.number(late))


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT else text[: EXCERPT - 1] + "…"


def held_by(t: Localiser, assignee: str, me: str) -> str:
    """Who holds a dispute, as the reviewer reads it."""
    if not assignee:
        return t.gettext("No one")
    return t.gettext("You") if assignee == me else assignee


def queue_row(t: Localiser, queued: Queued, now: datetime, me: str = "") -> QueueRow:
    item, entry = queued.item, queued.entry
    if isinstance(item, r.Dispute):
        received, due, text = item.filed_at, item.deadline, item.statement
    else:
        received, due, text = item.applied_at, item.decision_due, item.evidence
    overdue = item.overdue or (due is not None and due < now)
    if entry is None:
        title = t.gettext("The entry could not be read (%(code)s).", code=queued.problem)
    else:
        title = entry.reason or entry.rule_title
    return QueueRow(
        entry_id=item.entry_id,
        received=t.date(received),
        due=t.date(due),
        overdue=overdue,
        due_in=_due_in(t, due, now),
        title=title,
        category=words.category(t, entry.category) if entry else "",
        departments=", ".join(entry.sources) if entry else "",
        points=t.signed(entry.points) if entry else "",
        excerpt=_excerpt(text),
        held_by=held_by(t, item.assignee, me) if isinstance(item, r.Dispute) else "",
    )


def queue(t: Localiser, items: Iterable[Queued], now: datetime, *, me: str = "") -> tuple[QueueRow, ...]:
    """The queue's rows in the service's order (earliest due first, already filtered by it);
    `me` is the reviewer's principal id, to say "You" of the disputes it holds."""
    return tuple(queue_row(t, q, now, me) for q in items)


def filters(
    t: Localiser, items: Iterable[Queued], *, department: str, category: str, overdue: bool, held: str = ""
) -> Filters:
    """The filter form: every category the city scores (and any other seen or chosen), the
    departments of the entries shown as suggestions (any department id may be typed), and
    who holds the dispute."""
    entries = [q.entry for q in items if q.entry is not None]
    departments = sorted({s for e in entries for s in e.sources} | ({department} - {""}))
    categories = sorted(set(words.CATEGORIES) | {e.category for e in entries} | ({category} - {""}))
    helds = (
        ("", t.gettext("Anyone or no one")),
        ("me", t.gettext("Assigned to me")),
        ("none", t.gettext("Unassigned")),
    )
    return Filters(
        department,
        category,
        overdue,
        held,
        tuple(departments),
        tuple(Option(c, words.category(t, c), c == category) for c in categories),
        tuple(Option(v, label, v == held) for v, label in helds),
    )


@dataclass(frozen=True)
class HistoryRow:
    date: str
    cause: str
    score: str
    change: str
    tier: str
    this_entry: bool  # the change the entry (or a decision on it) made


def history_around(t: Localiser, entry: r.Entry, changes: Iterable[r.ScoreChange]) -> tuple[HistoryRow, ...]:
    """The subject's score changes from a while before the entry happened, oldest first."""
    since = entry.occurred_at - HISTORY_BEFORE if entry.occurred_at else None
    kept = [c for c in changes if since is None or c.changed_at is None or c.changed_at >= since]
    kept = sorted(kept, key=lambda c: c.changed_at.timestamp() if c.changed_at else 0.0)
    rows = []
    for c in kept[-HISTORY_ROWS:]:
        involved = entry.entry_id in (
            *c.added_entry_ids,
            *c.expired_entry_ids,
            *c.ended_entry_ids,
            *c.resumed_entry_ids,
        )
        rows.append(
            HistoryRow(
                date=t.date(c.changed_at),
                cause=words.cause(t, c.cause),
                score=t.number(c.score),
                change=t.signed(c.score - c.score_before) if c.score_before is not None else "",
                tier=c.tier
                if c.tier == c.tier_before or not c.tier_before
                else f"{c.tier_before} → {c.tier}",
                this_entry=involved,
            )
        )
    return tuple(rows)


def case_view(t: Localiser, entry: r.Entry, now: datetime) -> EntryDetail:
    """The entry as its own page shows it (rule, legal basis, evidence, dispute, repair)."""
    return detail(t, entry, None, now)


def decision_word(t: Localiser, code: str) -> str:
    return {
        "uphold": t.gettext("Uphold: the entry stands and counts again"),
        "overturn": t.gettext("Overturn: the entry is withdrawn and the score recomputed"),
        "approve": t.gettext("Approve: the entry stops counting from now on"),
        "reject": t.gettext("Reject: the entry keeps counting until it expires"),
    }.get(code, code)


def check_decision(t: Localiser, decision: str, reason: str, allowed: Iterable[str]) -> list[FieldError]:
    errors = []
    if decision not in tuple(allowed):
        errors.append(FieldError("decision", t.gettext("Choose a decision.")))
    text = reason.strip()
    if not text:
        errors.append(FieldError("reason", t.gettext("Give the reason for your decision.")))
    elif len(text) > MAX_REASON:
        errors.append(
            FieldError(
                "reason",
                t.gettext(
                    "The reason is %(length)s characters long; it can be at most %(limit)s.",
                    length=t.number(len(text)),
                    limit=t.number(MAX_REASON),
                ),
            )
        )
    return errors


def already_decided(t: Localiser, status: str) -> str:
    """A second reviewer's decision, refused: who won is on the page below."""
    return t.gettext(
        "Another reviewer decided this before you did (%(decision)s). Your decision was not recorded; "
        "the decision that stands is shown below.",
        decision=words.dispute_status(t, status)
        if status in ("upheld", "overturned")
        else words.repair_status(t, status),
    )


@dataclass(frozen=True)
class ScoreView:
    score: str
    tier: str
    as_of: str
    policy_version: str


def score_view(t: Localiser, s: Score) -> ScoreView:
    return ScoreView(t.number(s.score), s.tier, t.datetime(s.as_of), s.policy_version)
