"""What a refused or failed call to a service means to the person, in words: a page for a
read, a message on the form for an act. Never a stack trace, never the raw message of an
unexpected failure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from kit import reasons
from services.portal.i18n import Localiser
from services.portal.views.entries import FieldError

# The HTTP status each gRPC code becomes.
HTTP_STATUS = {
    "NOT_FOUND": 404,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 409,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 503,
}


@dataclass(frozen=True)
class ErrorView:
    status: int
    title: str
    message: str
    # The service's own words for a refusal whose reason the portal cannot word itself
    # (FAILED_PRECONDITION without a known reason); "" otherwise.
    service_says: str
    violations: tuple[FieldError, ...]


def field_label(t: Localiser, field: str) -> str:
    return {
        "statement": t.gettext("Your statement"),
        "evidence": t.gettext("What you did to put things right"),
        "evidence_uri": t.gettext("Link to your evidence"),
        "entry_id": t.gettext("The entry"),
        "effective_at": t.gettext("The date of your consent"),
        "purpose": t.gettext("The purpose of the read"),
        "purpose_note": t.gettext("The note to the purpose"),
        "page_token": t.gettext("The page"),
    }.get(field, field)


def violation_message(t: Localiser, field: str, reason: str, description: str) -> str:
    label = field_label(t, field)
    known = {
        "REQUIRED": t.gettext("%(field)s is required.", field=label),
        "TOO_LONG": t.gettext("%(field)s is too long.", field=label),
        "INVALID_PAGE_TOKEN": t.gettext("This page no longer exists; start again from the first page."),
        "IN_FUTURE": t.gettext("%(field)s cannot be in the future.", field=label),
        "TOO_OLD": t.gettext("%(field)s is too far in the past.", field=label),
    }
    return known.get(reason) or t.gettext(
        "%(field)s: %(problem)s", field=label, problem=description or reason
    )


def _date(t: Localiser, value: str) -> str:
    try:
        return t.date(datetime.fromisoformat(value))
    except ValueError:
        return value


def reason_message(t: Localiser, reason: str, metadata: Mapping[str, str]) -> str | None:
    """A refusal's reason (kit.reasons) in the reader's words; None for one not known here."""
    if reason == reasons.REPAIR_TOO_EARLY:
        earliest = metadata.get("earliest_at") or metadata.get("earliest_date") or ""
        return t.gettext(
            "Too early: you can apply for repair of this entry from %(date)s.", date=_date(t, earliest)
        )
    if reason == reasons.ENTRY_NOT_DISPUTABLE:
        if metadata.get("status") == "repaired":
            return t.gettext(
                "This entry has been repaired and no longer counts, so there is nothing to dispute."
            )
        return t.gettext("This entry has been reversed and no longer counts, so there is nothing to dispute.")
    if reason == reasons.ASSIGNED_TO_ANOTHER:
        return t.gettext(
            "Another reviewer (%(assignee)s) has taken this dispute: only they can decide or release it, "
            "or an administrator can assign it to someone else.",
            assignee=metadata.get("assignee", ""),
        )
    known = {
        reasons.DISPUTE_ALREADY_OPEN: t.gettext(
            "This entry already has an open dispute. You can follow it on your contest page."
        ),
        reasons.ALREADY_DECIDED: t.gettext("This has already been decided."),
        reasons.ENTRY_NOT_NEGATIVE: t.gettext("Only entries that take points away can be repaired."),
        reasons.ENTRY_NOT_COUNTING: t.gettext(
            "This entry does not count now, so there is nothing to repair."
        ),
        reasons.REPAIR_ALREADY_PENDING: t.gettext(
            "You have already applied for repair of this entry. Please wait for the decision."
        ),
        reasons.SEVERITY_NOT_REPAIRABLE: t.gettext(
            "Under the city's policy, entries of this severity cannot be repaired."
        ),
        reasons.SUBJECT_NOT_IDENTIFIED: t.gettext(
            "The credit service could not tell who you are from your sign-in. "
            "Please sign out and sign in again, or contact the credit office."
        ),
        reasons.CONSENT_REQUIRED: t.gettext(
            "The city's policy requires your consent before your score is shown, and you have not "
            "given it. You can give it on the contest page."
        ),
    }
    return known.get(reason)


class _Violation(Protocol):
    @property
    def field(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def description(self) -> str: ...


class Refusal(Protocol):
    """What a service's refusal carries (services.portal.backend.ServiceError)."""

    @property
    def code(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def violations(self) -> Sequence[_Violation]: ...
    @property
    def reason(self) -> str: ...
    @property
    def metadata(self) -> Mapping[str, str]: ...


def refusal_view(t: Localiser, error: Refusal, *, quote_message: bool = True) -> ErrorView:
    """A service's refusal in words: error_view of its code, violations, reason and metadata;
    without `quote_message` the service's own message is left out (it may quote what a
    person typed, e.g. an identifier)."""
    return error_view(
        t,
        error.code,
        error.message if quote_message else "",
        tuple((v.field, v.reason, v.description) for v in error.violations),
        reason=error.reason,
        metadata=error.metadata,
    )


def error_view(
    t: Localiser,
    code: str,
    message: str,
    violations: tuple[tuple[str, str, str], ...] = (),
    *,
    reason: str = "",
    metadata: Mapping[str, str] | None = None,
) -> ErrorView:
    status = HTTP_STATUS.get(code, 500)
    if code == "NOT_FOUND":
        return ErrorView(
            status,
            t.gettext("Not found"),
            t.gettext("We could not find this among your data. Check the link, or go back to your entries."),
            "",
            (),
        )
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return ErrorView(
            status,
            t.gettext("Not allowed"),
            t.gettext("You are not allowed to see or do this with the account you signed in with."),
            "",
            (),
        )
    if code == "INVALID_ARGUMENT":
        return ErrorView(
            status,
            t.gettext("Something in the request was not right"),
            t.gettext("Please correct the following and try again."),
            "",
            tuple(FieldError(f, violation_message(t, f, reason, d)) for f, reason, d in violations),
        )
    if code in ("FAILED_PRECONDITION", "ALREADY_EXISTS"):
        worded = reason_message(t, reason, metadata or {})
        if worded is not None:
            return ErrorView(status, t.gettext("This cannot be done now"), worded, "", ())
        return ErrorView(
            status,
            t.gettext("This cannot be done now"),
            t.gettext("The credit service refused it, and gave this reason:"),
            message,
            (),
        )
    if code == "RESOURCE_EXHAUSTED":
        return ErrorView(
            status, t.gettext("Too many requests"), t.gettext("Please wait a moment and try again."), "", ()
        )
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return ErrorView(
            status,
            t.gettext("The service is unavailable"),
            t.gettext("The credit service cannot answer right now. Please try again in a few minutes."),
            "",
            (),
        )
    return ErrorView(
        500,
        t.gettext("Something went wrong"),
        t.gettext("An unexpected error happened. It has been recorded; please try again later."),
        "",
        (),
    )
