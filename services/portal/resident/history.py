"""A resident's score history (/history), as known at the time and as corrected, and its chart
as an SVG image (/history/chart.svg), drawn with the published policy's tier lines."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.portal import charts
from services.portal.backend import Caller, ServiceError
from services.portal.i18n import LANGUAGES, Localiser
from services.portal.pages import CHART_CSP, Pages, settled
from services.portal.views import history as history_views


def routes(pages: Pages) -> list[BaseRoute]:
    async def history_view(caller: Caller, t: Localiser, *, tiers: bool) -> history_views.HistoryView:
        # The tier lines come from the published policy (cached), not the person's Explain,
        # which would cost query a projection of the whole ledger for a chart's thresholds.
        # Only the chart draws them; the page reads the history alone.
        reads: list[Awaitable[Any]] = [
            pages.backend.history(caller, as_corrected=False),
            pages.backend.history(caller, as_corrected=True),
        ]
        if tiers:
            reads.append(settled(pages.backend.policy()))
        known, corrected, *policy = await asyncio.gather(*reads)
        kinds = policy[0].kinds if policy and not isinstance(policy[0], ServiceError) else ()
        lines = next((k.tiers for k in kinds if k.kind == caller.subject.kind), ())
        return history_views.history(t, known, corrected, pages.now(), lines)

    async def history(request: Request) -> Response:
        caller = pages.person(request)
        view = await history_view(caller, pages.t(request), tiers=False)
        return pages.render(
            request,
            "history.html",
            section="/history",
            h=view,
            chart_width=charts.WIDTH,
            chart_height=charts.HEIGHT,
        )

    async def history_chart(request: Request) -> Response:
        """The History page's chart as an SVG image, in the language its `lang` names (the
        page's, even if the cookie changed since)."""
        caller = pages.person(request)
        language = request.query_params.get("lang", "")
        t = pages.localisers[language] if language in LANGUAGES else pages.t(request)
        view = await history_view(caller, t, tiers=True)
        if view.chart is None:
            raise HTTPException(404)
        # Drawn in a thread (the event loop keeps serving meanwhile), once per distinct chart.
        svg = await asyncio.to_thread(_history_svg, t, view.chart)
        return Response(
            svg,
            media_type="image/svg+xml",
            # Its own CSP, which SecurityHeaders keeps; no-store as every personal page.
            headers={"Content-Security-Policy": CHART_CSP},
        )

    p = pages.page
    return [
        Route("/history", p(history)),
        Route("/history/chart.svg", p(history_chart)),
    ]


@functools.lru_cache(maxsize=256)
def _history_svg(t: Localiser, chart: history_views.Chart) -> bytes:
    """A history chart as drawn before, if the same one was (matplotlib takes about 100 ms
    of CPU per chart; a person's history changes rarely, and the drawing is deterministic).
    Keyed by the localiser (one per language) and the chart's data: scores and dates, no
    identifier; at most 256 charts of some 20-40 KB are kept."""
    return charts.history(t, chart)
