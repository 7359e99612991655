"""Signing in and out: /signin starts the identity provider's flow, its callback finishes it
(services.portal.signin does both), both rate-limited per client address; /signout ends the
session at the provider too, which comes back to /signed-out."""

from __future__ import annotations

import httpx
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from kit.logging import get_logger
from services.portal.pages import Pages
from services.portal.signin import OAuthError
from services.portal.views.errors import ErrorView

log = get_logger(__name__)


def routes(pages: Pages, redirect_path: str) -> list[BaseRoute]:
    async def sign_in(request: Request) -> Response:
        if pages.signin.limited(request):
            return too_many(request)
        try:
            return await pages.signin.start(request, request.query_params.get("next"))
        except (httpx.HTTPError, OAuthError, ValueError) as exc:
            # Discovery failed: the provider is down, or answers something that is not OpenID.
            log.warning("identity provider unreachable", error=type(exc).__name__, throttle="idp-down")
            t = pages.t(request)
            return pages.error_page(
                request,
                ErrorView(
                    503,
                    t.gettext("Sign-in is unavailable"),
                    t.gettext(
                        "The sign-in service cannot be reached right now. Please try again in a few minutes."
                    ),
                    "",
                    (),
                ),
            )

    async def callback(request: Request) -> Response:
        if pages.signin.limited(request):
            return too_many(request)
        try:
            target = await pages.signin.finish(request)
        except OAuthError as exc:
            log.warning("sign-in failed", error=exc.error or "oauth_error", throttle="signin-failed")
            t = pages.t(request)
            return pages.error_page(
                request,
                ErrorView(
                    400,
                    t.gettext("Sign-in did not complete"),
                    t.gettext(
                        "The sign-in was cancelled, took too long or could not be checked. Please try again."
                    ),
                    "",
                    (),
                ),
            )
        return RedirectResponse(target, status_code=303)

    def too_many(request: Request) -> HTMLResponse:
        t = pages.t(request)
        log.warning("sign-in rate limited", throttle="signin-limited")
        return pages.error_page(
            request,
            ErrorView(
                429,
                t.gettext("Too many sign-in attempts"),
                t.gettext("Please wait a minute and try again."),
                "",
                (),
            ),
        )

    async def sign_out(request: Request) -> Response:
        await pages.form(request)
        return await pages.signin.sign_out(request)

    async def signed_out(request: Request) -> Response:
        return pages.render(request, "signed_out.html")

    p = pages.page
    return [
        Route("/signin", p(sign_in)),
        Route(redirect_path, p(callback)),
        Route("/signout", p(sign_out), methods=["POST"]),
        Route("/signed-out", p(signed_out)),
    ]
