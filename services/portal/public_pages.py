"""The public pages, open without signing in: the home page, the rules in force, the tiers,
the benefits catalogue and how disputes and repairs work (all published, non-personal data,
read with the portal's own token), the language switch and the health check."""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from kit.logging import get_logger
from services.portal.backend import ServiceError
from services.portal.i18n import LANGUAGES, Localiser
from services.portal.pages import LANGUAGE_COOKIE, Pages, settled
from services.portal.views import public as public_views
from services.portal.web import trace_id

log = get_logger(__name__)


def routes(pages: Pages) -> list[BaseRoute]:
    async def home(request: Request) -> Response:
        return pages.render(request, "home.html")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def set_language(request: Request) -> Response:
        language = request.path_params["language"]
        if language not in LANGUAGES:
            raise HTTPException(404)
        target = request.query_params.get("next", "/")
        if not target.startswith("/") or target.startswith("//") or "\\" in target:
            target = "/"
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            LANGUAGE_COOKIE,
            language,
            max_age=365 * 86_400,
            httponly=True,
            secure=pages.secure_cookies,
            samesite="lax",
        )
        return response

    async def rules(request: Request) -> Response:
        t = pages.t(request)
        rule_set, policy = await asyncio.gather(
            settled(pages.backend.rule_set()), settled(pages.backend.policy())
        )
        if isinstance(rule_set, ServiceError):
            return pages.render(
                request, "rules.html", section="/rules", unavailable=unavailable(t, "rules", rule_set)
            )
        groups = public_views.rule_groups(t, rule_set, None if isinstance(policy, ServiceError) else policy)
        return pages.render(
            request,
            "rules.html",
            section="/rules",
            rule_set=rule_set,
            since=t.date(rule_set.activated_at),
            groups=groups,
            unavailable="",
        )

    async def tiers(request: Request) -> Response:
        t = pages.t(request)
        policy = await settled(pages.backend.policy())
        if isinstance(policy, ServiceError):
            return pages.render(
                request, "tiers.html", section="/tiers", unavailable=unavailable(t, "policy", policy)
            )
        return pages.render(
            request,
            "tiers.html",
            section="/tiers",
            policy=policy,
            since=t.date(policy.activated_at),
            kinds=public_views.kind_tiers(t, policy),
            unavailable="",
        )

    async def catalogue(request: Request) -> Response:
        t = pages.t(request)
        benefits = await settled(pages.backend.public_benefits())
        if isinstance(benefits, ServiceError):
            return pages.render(
                request,
                "catalogue.html",
                section="/catalogue",
                unavailable=unavailable(t, "benefits", benefits),
            )
        return pages.render(
            request,
            "catalogue.html",
            section="/catalogue",
            rows=public_views.catalogue(t, benefits),
            unavailable="",
        )

    async def how_it_works(request: Request) -> Response:
        t = pages.t(request)
        policy = await settled(pages.backend.policy())
        if isinstance(policy, ServiceError):
            return pages.render(
                request,
                "how.html",
                section="/how-it-works",
                due=None,
                unavailable=unavailable(t, "policy", policy),
            )
        return pages.render(
            request,
            "how.html",
            section="/how-it-works",
            due=public_views.due_process(t, policy),
            unavailable="",
        )

    def unavailable(t: Localiser, what: str, error: ServiceError) -> str:
        log.warning("public read failed", read=what, code=error.code, throttle=f"public-{what}")
        return t.gettext(
            "This information cannot be read from the credit services right now. Please try again later. "
            "Reference: %(ref)s",
            ref=trace_id(),
        )

    p = pages.page
    return [
        Route("/", p(home)),
        Route("/healthz", healthz),
        Route("/language/{language}", p(set_language)),
        Route("/rules", p(rules)),
        Route("/tiers", p(tiers)),
        Route("/catalogue", p(catalogue)),
        Route("/how-it-works", p(how_it_works)),
    ]
