"""/staff/audit (auditors, admins): a subject's access log, looked up by the identifier the
resident gives, typed into a form that is POSTed (never in a URL, a log line or a span; query
hashes it from the request's SubjectRef), read with the purpose `audit`; and
/staff/audit/chains: each service's audit chain state (AuditChainService), with an alarm
when one does not verify. Ingest's is read too when EGRET_INGEST_ADDRESS is set (the chart
sets it and lets the portal reach ingest's port); without it, ingest's chain is shown as
not checked here, with the command to run."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from kit.logging import get_logger
from kit.principal import Role
from services.portal.backend import ServiceError
from services.portal.pages import Pages
from services.portal.staffcalls import audit as calls
from services.portal.views import audit as views
from services.portal.views.errors import error_view, refusal_view

log = get_logger(__name__)
ROLES = (Role.AUDITOR, Role.ADMIN)


def routes(pages: Pages) -> list[BaseRoute]:
    def lookup_page(request: Request, status: int = 200, **context: object) -> Response:
        t = pages.t(request)
        schemes = [(s, views.scheme_label(t, s)) for kind in views.SCHEMES for s in views.SCHEMES[kind]]
        base: dict[str, object] = {
            "form": {"scheme": "resident-id", "identifier": "", "note": ""},
            "errors": [],
            "rows": None,
            "refusal": None,
            "next_page": "",
        }
        return pages.render(
            request,
            "staff/audit.html",
            status=status,
            section="/staff/audit",
            schemes=schemes,
            **{**base, **context},
        )

    async def show(request: Request) -> Response:
        pages.staff(request, *ROLES)
        return lookup_page(request)

    async def look_up(request: Request) -> Response:
        staff = pages.staff(request, *ROLES)
        form = await pages.form(request)
        t = pages.t(request)
        scheme = str(form.get("scheme", ""))
        kind = next((k for k, schemes in views.SCHEMES.items() if scheme in schemes), "")
        value, note = str(form.get("identifier", "")), str(form.get("note", "")).strip()
        values = {"scheme": scheme, "identifier": value, "note": note}
        errors = views.check_lookup(t, kind, scheme, value, note)
        if errors:
            return lookup_page(request, 400, form=values, errors=errors)
        try:
            page = await calls.access_log(
                pages.backend,
                staff.token,
                kind=kind,
                scheme=scheme,
                value=value.strip(),
                note=note,
                page_token=str(form.get("page", "")),
            )
        except ServiceError as error:
            if error.code not in ("INVALID_ARGUMENT", "NOT_FOUND"):
                raise
            # Only the code: the service's message may quote what was typed.
            log.info("access log lookup refused", code=error.code)
            refusal = refusal_view(t, error, quote_message=False)
            return lookup_page(request, refusal.status, form=values, refusal=refusal)
        log.info("access log read", records=len(page.items))
        return lookup_page(
            request,
            form=values,
            rows=[views.access_row(t, a) for a in page.items],
            next_page=page.next_page_token,
        )

    async def chains(request: Request) -> Response:
        staff = pages.staff(request, *ROLES)
        t = pages.t(request)
        reachable = [s for s in views.SERVICES if pages.backend.serves(f"{s}.audit")]
        results = await asyncio.gather(
            *(calls.chain_state(pages.backend, staff.token, s) for s in reachable), return_exceptions=True
        )
        found = dict(zip(reachable, results, strict=True))
        rows = []
        for service in views.SERVICES:
            result = found.get(service)
            if isinstance(result, ServiceError):
                message = error_view(
                    t, result.code, "", reason=result.reason, metadata=result.metadata
                ).message
                rows.append(views.chain_row(t, service, None, message))
            elif isinstance(result, BaseException):
                raise result
            else:
                rows.append(views.chain_row(t, service, result, ""))
        broken = [row for row in rows if row.state == "broken"]
        if broken:
            log.warning("audit chain does not verify", services=",".join(r.service for r in broken))
        return pages.render(
            request, "staff/audit_chains.html", section="/staff/audit", rows=rows, broken=broken
        )

    return [
        Route("/staff/audit", pages.page(show), methods=["GET"]),
        Route("/staff/audit", pages.page(look_up), methods=["POST"]),
        Route("/staff/audit/chains", pages.page(chains)),
    ]
