"""A resident's data to take away (/download): all of it as one JSON document, or one section
as CSV."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.portal.backend import Caller, ServiceError
from services.portal.pages import Pages, settled
from services.portal.resident.benefits import eligibility_of
from services.portal.views import benefits as benefit_views
from services.portal.views import export as export_views


def routes(pages: Pages) -> list[BaseRoute]:
    async def download(request: Request) -> Response:
        pages.person(request)
        t = pages.t(request)
        labels = {
            "entries": t.gettext("Your entries"),
            "history": t.gettext("Your score history, as known at the time"),
            "history-corrected": t.gettext("Your score history, as corrected"),
            "access-log": t.gettext("Who looked at your data"),
            "disputes": t.gettext("Your disputes"),
            "repairs": t.gettext("Your repair applications"),
            "benefits": t.gettext("Your benefits"),
        }
        return pages.render(
            request,
            "download.html",
            section="/download",
            sections=[(s, labels[s]) for s in export_views.CSV_SECTIONS],
        )

    async def export(caller: Caller) -> dict[str, Any]:
        explanation, entries, known, corrected, access, disputes, repairs, catalogue = await asyncio.gather(
            settled(pages.backend.explain(caller)),
            pages.backend.all_entries(caller),
            pages.backend.history(caller, as_corrected=False),
            pages.backend.history(caller, as_corrected=True),
            pages.backend.all_access_records(caller),
            pages.backend.disputes(caller),
            pages.backend.repairs(caller),
            pages.backend.benefits(caller.token),
        )
        if isinstance(explanation, ServiceError) and explanation.code != "NOT_FOUND":
            raise explanation
        offered = benefit_views.for_kind(catalogue, caller.subject.kind)
        checks = await eligibility_of(pages, caller, offered)
        return export_views.document(
            exported_at=pages.now(),
            explanation=None if isinstance(explanation, ServiceError) else explanation,
            entries=entries,
            history=known,
            history_corrected=corrected,
            access_log=access,
            disputes=disputes,
            repairs=repairs,
            eligibility=tuple(c for c in checks if not isinstance(c, ServiceError)),
        )

    async def download_json(request: Request) -> Response:
        caller = pages.person(request)
        doc = await export(caller)
        return Response(
            export_views.to_json(doc),
            media_type="application/json; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="my-credit-data.json"'},
        )

    async def download_csv(request: Request) -> Response:
        caller = pages.person(request)
        section = request.path_params["section"]
        if section not in export_views.CSV_SECTIONS:
            raise HTTPException(404)
        doc = await export(caller)
        return Response(
            export_views.to_csv(section, export_views.section_rows(section, doc)),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="my-credit-{section}.csv"'},
        )

    p = pages.page
    return [
        Route("/download", p(download)),
        Route("/download/my-credit-data.json", p(download_json)),
        Route("/download/{section}.csv", p(download_csv)),
    ]
