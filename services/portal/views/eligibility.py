"""A benefit provider's eligibility check in words: the form's checks (the subject lookup's,
shared with the auditor's, and a benefit of the provider's own), the answer (eligible or
not, each condition, and the purpose-bound score: only the categories the benefit may
consider) and the refusals."""

from __future__ import annotations

from dataclasses import dataclass

from services.portal import records as r
from services.portal.backend import ServiceError
from services.portal.i18n import Localiser
from services.portal.views import audit, words
from services.portal.views.benefits import considers
from services.portal.views.entries import FieldError
from services.portal.views.errors import ErrorView, refusal_view


def purpose(t: Localiser, code: str) -> str:
    """The purpose the check states, in the provider's words, with its code."""
    stated = {
        "eligibility-check": t.gettext(
            "Checking eligibility for a benefit or service the subject applied for"
        )
    }.get(code, code)
    return f"{stated} ({code})"


def own_benefits(benefits: tuple[r.Benefit, ...], provider_id: str) -> tuple[r.Benefit, ...]:
    """The benefits the catalogue says `provider_id` grants: the only ones query answers it for."""
    return tuple(b for b in benefits if provider_id and b.provider_id == provider_id)


def check_form(
    t: Localiser,
    kind: str,
    scheme: str,
    value: str,
    note: str,
    *,
    benefit_id: str,
    own: tuple[r.Benefit, ...],
) -> list[FieldError]:
    errors = audit.check_lookup(t, kind, scheme, value, note)
    if not any(b.benefit_id == benefit_id for b in own):
        errors.insert(0, FieldError("benefit", t.gettext("Choose one of your organisation's benefits.")))
    return errors


@dataclass(frozen=True)
class ConditionRow:
    condition: str
    met: bool
    explanation: str
    entries: str  # how many entries the answer rests on, in words; "" for none


@dataclass(frozen=True)
class Answer:
    eligible: bool
    verdict: str
    benefit: str
    considers: str
    score: str
    tier: str
    lists: str
    as_of: str
    policy_version: str
    conditions: tuple[ConditionRow, ...]


def answer(t: Localiser, benefit: r.Benefit, result: r.Eligibility) -> Answer:
    return Answer(
        eligible=result.eligible,
        verdict=t.gettext("Eligible: the subject meets this benefit's conditions.")
        if result.eligible
        else t.gettext("Not eligible: the subject does not meet this benefit's conditions now."),
        benefit=benefit.purpose,
        considers=t.gettext("The whole score") if benefit.considers_all else considers(t, benefit),
        score=t.number(result.score),
        tier=result.tier,
        lists=", ".join(words.list_name(t, name) for name in result.lists) or t.gettext("None"),
        as_of=t.datetime(result.as_of) if result.as_of else "",
        policy_version=result.policy_version,
        conditions=tuple(
            ConditionRow(x.condition, x.met, x.explanation, _entries(t, x)) for x in result.reasons
        ),
    )


def _entries(t: Localiser, reason: r.EligibilityReason) -> str:
    if not reason.entry_ids:
        return ""
    text = t.ngettext(
        "Rests on %(num)s entry.",
        "Rests on %(num)s entries.",
        len(reason.entry_ids),
        num=len(reason.entry_ids),
    )
    if reason.disputed_entry_ids:
        text += " " + t.ngettext(
            "%(num)s of them is disputed by the subject.",
            "%(num)s of them are disputed by the subject.",
            len(reason.disputed_entry_ids),
            num=len(reason.disputed_entry_ids),
        )
    return text


def refusal(t: Localiser, error: ServiceError) -> ErrorView:
    """Query's refusal of a check, in the provider's words. Never the service's message: it
    may quote what was typed."""
    if error.code == "NOT_FOUND":
        return ErrorView(
            404,
            t.gettext("No credit record for this subject"),
            t.gettext(
                "The credit service holds no score for the subject you named. Check the kind of "
                "identifier and the identifier with the applicant."
            ),
            "",
            (),
        )
    if error.code == "PERMISSION_DENIED":
        return ErrorView(
            403,
            t.gettext("Not one of your benefits"),
            t.gettext("The credit service answers a benefit provider only about the benefits it grants."),
            "",
            (),
        )
    fields = {v.field for v in error.violations}
    if error.code == "INVALID_ARGUMENT" and fields & {"purpose", "purpose_note"}:
        note = "purpose_note" in fields and "purpose" not in fields
        return ErrorView(
            400,
            t.gettext("The purpose was refused"),
            t.gettext(
                "The credit service refused the note to the purpose: it may hold a case or application "
                "number, never an identifier."
            )
            if note
            else t.gettext(
                "The credit service does not accept this purpose from your role, so it read nothing. "
                "Ask the credit office which purposes your organisation may state."
            ),
            "",
            (),
        )
    if error.code == "INVALID_ARGUMENT" and any(f.startswith("subject") for f in fields):
        return ErrorView(
            400,
            t.gettext("Something in the request was not right"),
            t.gettext("Please correct the following and try again."),
            "",
            (
                FieldError(
                    "identifier",
                    t.gettext("This is not a valid identifier of that kind: check it with the applicant."),
                ),
            ),
        )
    return refusal_view(t, error, quote_message=False)
