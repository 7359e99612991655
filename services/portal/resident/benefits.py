"""The benefits a resident's kind of subject is offered (/benefits), each with whether they are
eligible now."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.portal import records as r
from services.portal.backend import Caller, ServiceError
from services.portal.pages import Pages, settled
from services.portal.views import benefits as benefit_views
from services.portal.views.errors import error_view


def routes(pages: Pages) -> list[BaseRoute]:
    async def benefits(request: Request) -> Response:
        caller = pages.person(request)
        t = pages.t(request)
        catalogue = await pages.backend.benefits(caller.token)
        offered = benefit_views.for_kind(catalogue, caller.subject.kind)
        results = await eligibility_of(pages, caller, offered)
        rows = []
        for benefit, result in zip(offered, results, strict=True):
            if isinstance(result, ServiceError):
                message = error_view(
                    t, result.code, result.message, reason=result.reason, metadata=result.metadata
                ).message
                rows.append(benefit_views.benefit_row(t, benefit, None, message))
            else:
                rows.append(benefit_views.benefit_row(t, benefit, result))
        return pages.render(request, "benefits.html", section="/benefits", rows=rows)

    return [Route("/benefits", pages.page(benefits))]


async def eligibility_of(
    pages: Pages, caller: Caller, offered: Sequence[r.Benefit]
) -> list[r.Eligibility | ServiceError]:
    """Each offered benefit's eligibility check, or the ServiceError that refused it."""
    checks: list[r.Eligibility | ServiceError] = await asyncio.gather(
        *(settled(pages.backend.eligibility(caller, b.benefit_id)) for b in offered)
    )
    return checks
