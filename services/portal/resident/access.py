"""Who looked at a resident's data (/access): their access log, page by page."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.portal.pages import Pages
from services.portal.views import access as access_views


def routes(pages: Pages) -> list[BaseRoute]:
    async def access(request: Request) -> Response:
        caller = pages.person(request)
        t = pages.t(request)
        page_token = request.query_params.get("page", "")
        page = await pages.backend.access_log(caller, page_token)
        return pages.render(
            request,
            "access.html",
            section="/access",
            rows=[access_views.access_row(t, a) for a in page.items],
            page_token=page_token,
            next_page=page.next_page_token,
        )

    return [Route("/access", pages.page(access))]
