"""A resident's score (/credit), their entries page by page (/entries) and one entry with how it
counts (/entries/{entry_id})."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.portal import records as r
from services.portal.backend import Caller, ServiceError
from services.portal.pages import Pages, settled
from services.portal.views import credit as credit_views
from services.portal.views import entries as entry_views


def routes(pages: Pages) -> list[BaseRoute]:
    async def credit(request: Request) -> Response:
        caller = pages.person(request)
        t = pages.t(request)
        try:
            explanation = await pages.backend.explain(caller)
        except ServiceError as error:
            if error.code != "NOT_FOUND":
                raise
            return pages.render(request, "credit.html", section="/credit", no_score=True)
        return pages.render(
            request, "credit.html", section="/credit", no_score=False, v=credit_views.credit(t, explanation)
        )

    async def entries(request: Request) -> Response:
        caller = pages.person(request)
        t = pages.t(request)
        page_token = request.query_params.get("page", "")
        page = await pages.backend.entries(caller, page_token)
        now = pages.now()
        return pages.render(
            request,
            "entries.html",
            section="/entries",
            rows=[entry_views.row(t, e, now) for e in page.items],
            page_token=page_token,
            next_page=page.next_page_token,
        )

    async def entry(request: Request) -> Response:
        caller = pages.person(request)
        entry_id = entry_id_of(request)
        entry, explained = await entry_and_explanation(pages, caller, entry_id)
        detail = entry_views.detail(pages.t(request), entry, explained, pages.now())
        return pages.render(request, "entry.html", section="/entries", d=detail)

    p = pages.page
    return [
        Route("/credit", p(credit)),
        Route("/entries", p(entries)),
        Route("/entries/{entry_id}", p(entry)),
    ]


def entry_id_of(request: Request) -> str:
    entry_id = str(request.path_params["entry_id"])
    # Entry ids are SHA-256 hex; anything else cannot be one, and is not sent on.
    if not 1 <= len(entry_id) <= 128 or not all(c.isalnum() or c in "-_" for c in entry_id):
        raise ServiceError("NOT_FOUND", "no such entry")
    return entry_id


async def entry_and_explanation(
    pages: Pages, caller: Caller, entry_id: str
) -> tuple[r.Entry, r.ExplainedEntry | None]:
    entry, explanation = await asyncio.gather(
        pages.backend.entry(caller, entry_id), settled(pages.backend.explain(caller))
    )
    explained = None
    if not isinstance(explanation, ServiceError):
        explained = next((e for e in explanation.entries if e.entry.entry_id == entry_id), None)
    return entry, explained
