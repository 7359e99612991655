"""Contesting an entry: a dispute (/entries/{entry_id}/dispute) or a repair application
(/entries/{entry_id}/repair), each a form, then a confirmation, then filed; /contest lists
what the resident filed and their consent, which /consent sets."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from kit.logging import get_logger
from services.portal import records as r
from services.portal.backend import ServiceError
from services.portal.i18n import Localiser
from services.portal.pages import Pages, settled
from services.portal.resident.entries import entry_and_explanation, entry_id_of
from services.portal.views import entries as entry_views
from services.portal.views.errors import ErrorView, error_view, refusal_view

log = get_logger(__name__)

# The session key of what was just filed, shown once on /contest.
FLASH = "flash"


def routes(pages: Pages) -> list[BaseRoute]:
    async def dispute(request: Request) -> Response:
        caller = pages.person(request)
        # A forged post is refused before anything is read or done.
        form = await pages.form(request) if request.method == "POST" else None
        t = pages.t(request)
        entry_id = entry_id_of(request)
        entry = await pages.backend.entry(caller, entry_id)
        row = entry_views.row(t, entry, pages.now())
        deadline_days = await dispute_days(t)
        context: dict[str, Any] = {
            "section": "/entries",
            "entry_id": entry_id,
            "row": row,
            "deadline_days": deadline_days,
            "limit": t.number(entry_views.MAX_STATEMENT),
            "max_length": entry_views.MAX_STATEMENT,
            "refusal": None,
        }
        if form is None:
            return pages.render(request, "dispute_form.html", errors=[], statement="", **context)
        statement = str(form.get("statement", ""))
        errors = entry_views.check_statement(t, statement)
        if errors or form.get("edit"):
            return pages.render(
                request,
                "dispute_form.html",
                status=400 if errors else 200,
                errors=errors,
                statement=statement,
                **context,
            )
        if form.get("confirm") != "yes":
            return pages.render(
                request,
                "dispute_confirm.html",
                section="/entries",
                entry_id=entry_id,
                row=row,
                statement=statement.strip(),
                deadline=await deadline_text(t),
            )
        try:
            filed = await pages.backend.file_dispute(caller, entry_id, statement.strip())
        except ServiceError as error:
            return refused_form(request, "dispute_form.html", error, statement=statement, **context)
        request.session[FLASH] = {
            "kind": "dispute",
            "deadline": filed.deadline.isoformat() if filed.deadline else "",
        }
        log.info("dispute filed")
        return RedirectResponse("/contest", status_code=303)

    async def repair(request: Request) -> Response:
        caller = pages.person(request)
        form = await pages.form(request) if request.method == "POST" else None
        t = pages.t(request)
        entry_id = entry_id_of(request)
        entry, explained = await entry_and_explanation(pages, caller, entry_id)
        now = pages.now()
        detail = entry_views.detail(t, entry, explained, now)
        context: dict[str, Any] = {
            "section": "/entries",
            "entry_id": entry_id,
            "row": detail.row,
            "decision_days": await decision_days(t),
            "limit": t.number(entry_views.MAX_EVIDENCE),
            "max_length": entry_views.MAX_EVIDENCE,
            "refusal": None,
        }
        if form is None:
            if not detail.can_repair:
                # Too early, nothing to repair, already pending: say so before any typing.
                context["refusal"] = ErrorView(
                    409, t.gettext("This cannot be done now"), detail.cannot_repair_why, "", ()
                )
            return pages.render(
                request, "repair_form.html", errors=[], evidence="", evidence_uri="", **context
            )
        evidence, uri = str(form.get("evidence", "")), str(form.get("evidence_uri", ""))
        errors = entry_views.check_repair(t, evidence, uri)
        if errors or form.get("edit"):
            return pages.render(
                request,
                "repair_form.html",
                status=400 if errors else 200,
                errors=errors,
                evidence=evidence,
                evidence_uri=uri,
                **context,
            )
        if form.get("confirm") != "yes":
            return pages.render(
                request,
                "repair_confirm.html",
                section="/entries",
                entry_id=entry_id,
                row=detail.row,
                evidence=evidence.strip(),
                evidence_uri=uri.strip(),
            )
        try:
            application = await pages.backend.apply_for_repair(
                caller, entry_id, evidence.strip(), uri.strip()
            )
        except ServiceError as error:
            return refused_form(
                request, "repair_form.html", error, evidence=evidence, evidence_uri=uri, **context
            )
        request.session[FLASH] = {
            "kind": "repair",
            "due": application.decision_due.isoformat() if application.decision_due else "",
        }
        log.info("repair applied for")
        return RedirectResponse("/contest", status_code=303)

    def refused_form(request: Request, template: str, error: ServiceError, **context: Any) -> Response:
        """A form the service refused, shown again with its reasons in words."""
        if error.code in (
            "NOT_FOUND",
            "PERMISSION_DENIED",
            "UNAUTHENTICATED",
            "UNAVAILABLE",
            "DEADLINE_EXCEEDED",
        ):
            raise error
        view = refusal_view(pages.t(request), error)
        log.info("form refused by the service", code=error.code)
        context["refusal"] = view
        return pages.render(request, template, status=view.status, errors=list(view.violations), **context)

    async def published_policy() -> r.PublishedPolicy | None:
        policy = await settled(pages.backend.policy())
        return None if isinstance(policy, ServiceError) else policy

    async def dispute_days(t: Localiser) -> str:
        policy = await published_policy()
        return t.number(policy.dispute_deadline_days) if policy else t.gettext("a number of")

    async def deadline_text(t: Localiser) -> str:
        policy = await published_policy()
        if policy is None:
            return t.gettext("The date is shown once you have filed.")
        return t.date(pages.now() + timedelta(days=policy.dispute_deadline_days))

    async def decision_days(t: Localiser) -> str:
        policy = await published_policy()
        return t.number(policy.repair_decision_working_days) if policy else t.gettext("a few")

    async def contest(request: Request) -> Response:
        caller = pages.person(request)
        t = pages.t(request)
        disputes, repairs, consent = await asyncio.gather(
            settled(pages.backend.disputes(caller)),
            settled(pages.backend.repairs(caller)),
            settled(pages.backend.consent(caller)),
        )
        flash = request.session.pop(FLASH, None)
        return pages.render(
            request,
            "contest.html",
            section="/contest",
            done=_flash_view(t, flash),
            disputes=[]
            if isinstance(disputes, ServiceError)
            else [entry_views.dispute_view(t, d) for d in disputes],
            disputes_error=read_error(t, disputes),
            repairs=[]
            if isinstance(repairs, ServiceError)
            else [entry_views.repair_view(t, a) for a in repairs],
            repairs_error=read_error(t, repairs),
            consent=None if isinstance(consent, ServiceError) else entry_views.consent_view(t, consent),
            consent_error=read_error(t, consent),
        )

    def read_error(t: Localiser, result: object) -> str:
        if not isinstance(result, ServiceError):
            return ""
        return error_view(
            t, result.code, result.message, reason=result.reason, metadata=result.metadata
        ).message

    async def consent(request: Request) -> Response:
        caller = pages.person(request)
        form = await pages.form(request)
        granted = form.get("granted") == "yes"
        if form.get("confirm") != "yes":
            return pages.render(request, "consent_confirm.html", section="/contest", granted=granted)
        record = await pages.backend.set_consent(caller, granted)
        request.session[FLASH] = {"kind": "consent", "granted": record.granted}
        log.info("consent set")
        return RedirectResponse("/contest", status_code=303)

    p = pages.page
    return [
        Route("/entries/{entry_id}/dispute", p(dispute), methods=["GET", "POST"]),
        Route("/entries/{entry_id}/repair", p(repair), methods=["GET", "POST"]),
        Route("/contest", p(contest)),
        Route("/consent", p(consent), methods=["POST"]),
    ]


@dataclass(frozen=True)
class Done:
    title: str
    message: str


def _flash_view(t: Localiser, flash: object) -> Done | None:
    if not isinstance(flash, dict):
        return None
    kind = flash.get("kind")
    if kind == "dispute":
        deadline = _parse(flash.get("deadline"))
        return Done(
            t.gettext("Your dispute has been filed"),
            t.gettext(
                "A reviewer must decide by %(date)s. Until then the entry is shown as disputed.",
                date=t.date(deadline),
            ),
        )
    if kind == "repair":
        return Done(
            t.gettext("Your repair application has been sent"),
            t.gettext("A decision is due by %(date)s.", date=t.date(_parse(flash.get("due")))),
        )
    if kind == "consent":
        if flash.get("granted"):
            return Done(t.gettext("Consent given"), t.gettext("Your consent is recorded from now on."))
        return Done(t.gettext("Consent withdrawn"), t.gettext("Your withdrawal is recorded from now on."))
    return None


def _parse(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
