"""An auditor's pages in words: the subject lookup form's checks, a subject's access log,
and the state of each service's audit chain with an alarm when one does not verify."""

from __future__ import annotations

from dataclasses import dataclass

from services.portal import records as r
from services.portal.i18n import Localiser
from services.portal.staff_records import ChainState
from services.portal.views import words
from services.portal.views.entries import FieldError

# The services in the order their pipeline runs.
SERVICES = ("ingest", "rules", "score", "query")
SCHEMES = {"person": ("resident-id", "passport"), "organization": ("uscc",)}
MAX_IDENTIFIER = 128
MAX_NOTE = 200


def check_lookup(t: Localiser, kind: str, scheme: str, value: str, note: str) -> list[FieldError]:
    errors = []
    if scheme not in SCHEMES.get(kind, ()):
        errors.append(FieldError("scheme", t.gettext("Choose the kind of identifier the resident gave.")))
    text = value.strip()
    if not text:
        errors.append(FieldError("identifier", t.gettext("Type the identifier the resident gave.")))
    elif len(text) > MAX_IDENTIFIER:
        errors.append(
            FieldError(
                "identifier",
                t.gettext("An identifier has at most %(limit)s characters.", limit=t.number(MAX_IDENTIFIER)),
            )
        )
    if len(note) > MAX_NOTE:
        errors.append(
            FieldError(
                "note", t.gettext("The note can be at most %(limit)s characters.", limit=t.number(MAX_NOTE))
            )
        )
    return errors


def scheme_label(t: Localiser, scheme: str) -> str:
    return {
        "resident-id": t.gettext("Resident identity number"),
        "passport": t.gettext("Passport number"),
        "uscc": t.gettext("Unified social credit code (organisation)"),
    }.get(scheme, scheme)


@dataclass(frozen=True)
class AccessRow:
    at: str
    actor: str
    role: str
    purpose: str
    method: str
    note: str


def access_row(t: Localiser, a: r.AccessRecord) -> AccessRow:
    return AccessRow(
        at=t.datetime(a.at),
        actor=a.actor,
        role=words.role(t, a.role) if a.role != "subject" else t.gettext("The subject"),
        purpose=f"{words.purpose(t, a.purpose)} ({a.purpose})" if a.purpose else words.purpose(t, ""),
        method=a.method.removeprefix("read:"),
        note=a.purpose_note,
    )


@dataclass(frozen=True)
class ChainRow:
    service: str
    state: str  # intact, broken, unavailable, not-checked
    summary: str
    anchor: str
    problems: tuple[str, ...]


def chain_row(t: Localiser, service: str, state: ChainState | None, problem: str) -> ChainRow:
    """`state` None: not checked (`problem` says why, "" for a service the portal cannot reach)."""
    command = f"python -m services.{service} verify-audit"
    if state is None and not problem:
        return ChainRow(
            service,
            "not-checked",
            t.gettext(
                "Not checked from here: the portal has no connection to this service. Run %(command)s "
                "where the service runs.",
                command=command,
            ),
            "",
            (),
        )
    if state is None:
        return ChainRow(service, "unavailable", problem, "", ())
    anchor = f"{state.last_seq}:{state.last_hash}" if state.records else ""
    checked = t.datetime(state.verified_at)
    if state.intact:
        summary = t.ngettext(
            "Intact: %(num)s record verified on %(when)s.",
            "Intact: %(num)s records verified on %(when)s.",
            state.records,
            num=t.number(state.records),
            when=checked,
        )
        return ChainRow(service, "intact", summary, anchor, ())
    summary = t.gettext(
        "DOES NOT VERIFY: %(count)s problems in %(records)s records (checked %(when)s). Treat the log as "
        "tampered with until it is explained; run %(command)s for the full report.",
        count=t.number(len(state.problems)),
        records=t.number(state.records),
        when=checked,
        command=command,
    )
    return ChainRow(service, "broken", summary, anchor, state.problems)
