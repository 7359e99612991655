"""What the reviewer's two areas share (services.portal.console.disputes and .repairs): a
queue of open items, earliest due first; an item's page with its entry, evidence and the
subject's history; a decision with a required reason, a confirmation step, and the outcome.

Two reviewers deciding the same item: score decides once and refuses the second with
ALREADY_DECIDED; the second reviewer sees that in words with the decision that stands.
A reviewer takes a dispute before working it (score's AssignDispute); one another reviewer
holds is refused with ASSIGNED_TO_ANOTHER, shown in words."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from kit import reasons
from kit.logging import get_logger
from kit.principal import Role
from services.portal import records as r
from services.portal.backend import Backend, ServiceError
from services.portal.pages import Pages
from services.portal.staff import Staff
from services.portal.staff_records import Case
from services.portal.staffcalls import reviews
from services.portal.views import reviews as views
from services.portal.views.entries import FieldError
from services.portal.views.errors import error_view, refusal_view

log = get_logger(__name__)

FLASH = "staff_flash"


@dataclass(frozen=True)
class Work:
    """One kind of review: disputes or repair applications."""

    kind: str  # "dispute" or "repair"
    path: str  # the area's path, e.g. /staff/disputes
    purpose: reviews.Purpose
    decisions: tuple[str, ...]
    queue: Callable[..., Awaitable[r.Page[Any]]]
    decide: Callable[[Backend, str, str, str, str], Awaitable[Any]]
    queue_template: str
    case_template: str
    # The item under review on an entry (its latest dispute or repair application).
    item: Callable[[r.Entry], r.Dispute | r.Repair | None]
    # Whether it still waits for a decision.
    open_status: str
    # Taking or releasing an item (disputes: score's AssignDispute); None where items are
    # not assigned. Its queue then filters by department, category and who holds it too.
    assign: Callable[..., Awaitable[Any]] | None = None

    def item_id(self, item: r.Dispute | r.Repair) -> str:
        return item.dispute_id if isinstance(item, r.Dispute) else item.application_id


def entry_id_of(request: Request) -> str:
    entry_id = str(request.path_params["entry_id"])
    # Entry ids are SHA-256 hex; anything else cannot be one, and is not sent on.
    if not 1 <= len(entry_id) <= 128 or not all(c.isalnum() or c in "-_" for c in entry_id):
        raise ServiceError("NOT_FOUND", "no such entry")
    return entry_id


def routes(pages: Pages, work: Work) -> list[BaseRoute]:
    async def queue(request: Request) -> Response:
        staff = pages.staff(request, Role.REVIEWER)
        t = pages.t(request)
        params = request.query_params
        overdue = params.get("overdue") == "yes"
        page_token = params.get("page", "")
        department = category = held = ""
        if work.assign is not None:
            # Sent to the service, which filters the whole queue (never a page here).
            department, category = params.get("department", "").strip(), params.get("category", "")
            held = params.get("held", "")
            held = held if held in reviews.HELD else ""
            page = await work.queue(
                pages.backend,
                staff.token,
                overdue_only=overdue,
                page_token=page_token,
                department=department,
                category=category,
                held=held,
            )
        else:
            page = await work.queue(pages.backend, staff.token, overdue_only=overdue, page_token=page_token)
        filters = views.filters(
            t, page.items, department=department, category=category, overdue=overdue, held=held
        )
        return pages.render(
            request,
            work.queue_template,
            section=work.path,
            rows=views.queue(t, page.items, pages.now(), me=staff.principal_id),
            filters=filters,
            assignable=work.assign is not None,
            page_token=page_token,
            next_page=filters.query(page.next_page_token) if page.next_page_token else "",
            total=len(page.items),
        )

    async def show(
        request: Request,
        staff: Staff,
        case: Case,
        *,
        status: int = 200,
        errors: tuple[FieldError, ...] = (),
        refusal: Any = None,
        form: dict[str, str] | None = None,
    ) -> Response:
        t = pages.t(request)
        item = work.item(case.entry)
        if item is None:
            raise ServiceError("NOT_FOUND", f"no {work.kind} on this entry")
        decided = item.status != work.open_status
        changes, score = await asyncio.gather(
            _settled(reviews.history(pages.backend, staff.token, case, work.purpose)),
            _settled(reviews.score(pages.backend, staff.token, case, work.purpose)) if decided else _none(),
        )
        flash = request.session.pop(FLASH, None)
        assignee = item.assignee if isinstance(item, r.Dispute) else ""
        return pages.render(
            request,
            work.case_template,
            status=status,
            section=work.path,
            c=views.case_view(t, case.entry, pages.now()),
            item_id=work.item_id(item),
            decided_by=item.resolved_by if isinstance(item, r.Dispute) else item.decided_by,
            evidence_uri=item.evidence_uri if isinstance(item, r.Repair) else "",
            decided=decided,
            decided_now=flash == {"kind": work.kind, "entry": case.entry.entry_id},
            assignable=work.assign is not None and not decided,
            held_by=views.held_by(t, assignee, staff.principal_id),
            held_by_me=bool(assignee) and assignee == staff.principal_id,
            held_by_other=bool(assignee) and assignee != staff.principal_id,
            assigned_now=flash == {"kind": work.kind, "entry": case.entry.entry_id, "assigned": True},
            released_now=flash == {"kind": work.kind, "entry": case.entry.entry_id, "assigned": False},
            history=() if isinstance(changes, ServiceError) else views.history_around(t, case.entry, changes),
            history_error=_words(pages, request, changes),
            score=None if score is None or isinstance(score, ServiceError) else views.score_view(t, score),
            score_error=_words(pages, request, score),
            decisions=[(d, views.decision_word(t, d)) for d in work.decisions],
            errors=list(errors),
            refusal=refusal,
            form=form or {"decision": "", "reason": ""},
            max_length=views.MAX_REASON,
        )

    async def case(request: Request) -> Response:
        staff = pages.staff(request, Role.REVIEWER)
        entry_id = entry_id_of(request)
        return await show(
            request, staff, await reviews.case_of(pages.backend, staff.token, entry_id, work.purpose)
        )

    async def decide(request: Request) -> Response:
        staff = pages.staff(request, Role.REVIEWER)
        entry_id = entry_id_of(request)
        form = await pages.form(request)
        t = pages.t(request)
        decision, reason = str(form.get("decision", "")), str(form.get("reason", ""))
        item_id = str(form.get("item_id", ""))
        case = await reviews.case_of(pages.backend, staff.token, entry_id, work.purpose)
        values = {"decision": decision, "reason": reason}
        errors = views.check_decision(t, decision, reason, work.decisions)
        if errors:
            return await show(request, staff, case, status=400, errors=tuple(errors), form=values)
        if form.get("confirm") != "yes" or form.get("edit") == "yes":
            if form.get("edit") == "yes":
                return await show(request, staff, case, form=values)
            return pages.render(
                request,
                "staff/decision_confirm.html",
                section=work.path,
                c=views.case_view(t, case.entry, pages.now()),
                action=f"{work.path}/{entry_id}",
                kind=work.kind,
                item_id=item_id,
                decision=decision,
                decision_words=views.decision_word(t, decision),
                reason=reason,
            )
        try:
            await work.decide(pages.backend, staff.token, item_id, decision, reason.strip())
        except ServiceError as error:
            if error.reason == reasons.ALREADY_DECIDED:
                log.info("decision refused: already decided", kind=work.kind)
                fresh = await reviews.case_of(pages.backend, staff.token, entry_id, work.purpose)
                refusal = error_view(
                    t, error.code, error.message, reason=error.reason, metadata=error.metadata
                )
                refusal = type(refusal)(
                    refusal.status,
                    refusal.title,
                    views.already_decided(t, error.metadata.get("status", "")),
                    "",
                    (),
                )
                return await show(request, staff, fresh, status=409, refusal=refusal)
            if error.code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):
                refusal = refusal_view(t, error)
                log.info("decision refused by the service", kind=work.kind, code=error.code)
                return await show(
                    request,
                    staff,
                    case,
                    status=refusal.status,
                    errors=refusal.violations,
                    refusal=refusal,
                    form=values,
                )
            raise
        log.info("decision recorded", kind=work.kind, decision=decision)
        request.session[FLASH] = {"kind": work.kind, "entry": entry_id}
        return RedirectResponse(f"{work.path}/{entry_id}", status_code=303)

    async def assign(request: Request) -> Response:
        """Take the item or release it (a POSTed form with the CSRF token), with the
        reviewer's own token: the service decides who may."""
        staff = pages.staff(request, Role.REVIEWER)
        entry_id = entry_id_of(request)
        form = await pages.form(request)
        action = str(form.get("action", ""))
        if work.assign is None or action not in ("take", "release"):
            raise ServiceError("INVALID_ARGUMENT", "unknown action")
        try:
            await work.assign(
                pages.backend, staff.token, str(form.get("item_id", "")), release=action == "release"
            )
        except ServiceError as error:
            if error.code != "FAILED_PRECONDITION":
                raise
            log.info("assignment refused by the service", kind=work.kind, reason=error.reason)
            t = pages.t(request)
            refusal = error_view(t, error.code, error.message, reason=error.reason, metadata=error.metadata)
            fresh = await reviews.case_of(pages.backend, staff.token, entry_id, work.purpose)
            return await show(request, staff, fresh, status=refusal.status, refusal=refusal)
        log.info("assignment recorded", kind=work.kind, action=action)
        request.session[FLASH] = {"kind": work.kind, "entry": entry_id, "assigned": action == "take"}
        return RedirectResponse(f"{work.path}/{entry_id}", status_code=303)

    return [
        Route(work.path, pages.page(queue)),
        Route(work.path + "/{entry_id}", pages.page(case), methods=["GET"]),
        Route(work.path + "/{entry_id}", pages.page(decide), methods=["POST"]),
        Route(work.path + "/{entry_id}/assign", pages.page(assign), methods=["POST"]),
    ]


async def _settled(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except ServiceError as error:
        return error


async def _none() -> None:
    return None


def _words(pages: Pages, request: Request, result: object) -> str:
    if not isinstance(result, ServiceError):
        return ""
    return error_view(
        pages.t(request), result.code, result.message, reason=result.reason, metadata=result.metadata
    ).message
