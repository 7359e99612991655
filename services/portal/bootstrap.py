"""Wiring of the portal: settings → catalogues, templates, sign-in, gRPC backend → the
Starlette application; `main()` serves it with uvicorn (`python -m services.portal`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import cast

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from kit.env import SettingsError
from kit.logging import configure_logging, get_logger
from kit.rate_limit import RateLimiter
from kit.security import channel_credentials
from kit.tracing import configure_tracing
from services.portal import console, public_pages, resident, signin_pages
from services.portal.backend import Backend
from services.portal.i18n import compile_all, localisers
from services.portal.pages import Pages
from services.portal.sessions import EncryptedSessionMiddleware
from services.portal.settings import PortalSettings
from services.portal.signin import SignIn
from services.portal.web import (
    STATIC,
    BodyLimit,
    Renderer,
    RequestSpans,
    SecurityHeaders,
    content_security_policy,
)

log = get_logger("services.portal")

# The largest form body: a 4,000-character statement in UTF-8, URL-encoded, with room.
MAX_BODY_BYTES = 64 * 1024


def _utc_now() -> datetime:
    return datetime.now(UTC)


def connect(settings: PortalSettings) -> Backend:
    """The CA, the client certificate and key, and the portal's own token are read as the
    services read theirs (kit.security): again when their files change, no restart."""
    return Backend.connect(
        query_address=settings.query_address,
        score_address=settings.score_address,
        rules_address=settings.rules_address,
        ingest_address=settings.ingest_address,
        credentials=channel_credentials(settings),
        deadline_s=settings.deadline_s,
    )


def build(
    settings: PortalSettings,
    *,
    backend: Callable[[], Backend] | None = None,
    clock: Callable[[], datetime] = _utc_now,
) -> Starlette:
    """The application. `backend` makes the gRPC backend at start-up, inside the serving
    event loop (gRPC channels bind to it); by default from the settings."""
    languages = localisers(settings.timezone)
    signin = SignIn(
        settings.oidc,
        redirect_uri=settings.redirect_uri,
        post_logout_uri=settings.public_base_url + "/signed-out",
        limiter=RateLimiter(rate=settings.signin_rate_per_minute / 60.0, burst=settings.signin_burst),
    )
    pages = Pages(
        backend=cast(Backend, None),  # set at start-up, below
        signin=signin,
        renderer=Renderer(languages),
        localisers=languages,
        default_language=settings.default_language,
        secure_cookies=settings.secure_cookies,
        clock=clock,
    )
    make_backend = backend or (lambda: connect(settings))

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        pages.backend = make_backend()
        log.info("portal started", public_url=settings.public_base_url)
        try:
            yield
        finally:
            await pages.backend.close()

    routes = [
        *public_pages.routes(pages),
        *signin_pages.routes(pages, settings.oidc.redirect_path),
        *resident.routes(pages),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        *console.routes(pages),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestSpans, routes=routes),
            Middleware(
                SecurityHeaders,
                csp=content_security_policy(settings.oidc.issuer),
                hsts=settings.secure_cookies,
            ),
            Middleware(BodyLimit, max_bytes=MAX_BODY_BYTES),
            Middleware(
                EncryptedSessionMiddleware,
                secrets=settings.session_secrets,
                idle_s=settings.session_idle_s,
                absolute_s=settings.session_absolute_s,
                secure=settings.secure_cookies,
            ),
        ],
        exception_handlers={404: pages.not_found, 405: pages.not_found},
        lifespan=lifespan,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.portal", description="Egret portal (web)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the website (the default)")
    sub.add_parser("compile-translations", help="compile the message catalogues (.po → .mo), for images")
    args = parser.parse_args(argv)
    if args.command == "compile-translations":
        for path in compile_all():
            print(path)
        return 0
    try:
        settings = PortalSettings.from_env()
    except SettingsError as exc:
        print(f"egret-portal: {exc}", file=sys.stderr)
        return 2
    configure_logging("portal", log_format=settings.log_format, level=settings.log_level)
    try:
        configure_tracing("portal")
    except SettingsError as exc:
        print(f"egret-portal: {exc}", file=sys.stderr)
        return 2
    if settings.insecure_http:
        log.warning("PLAIN HTTP: session cookies are not marked Secure (loopback development only)")
    host, _, port = settings.listen_address.rpartition(":")
    uvicorn.run(
        build(settings),
        host=host.strip("[]"),
        port=int(port),
        log_config=None,  # uvicorn's lines go through kit.logging (JSON, trace ids)
        access_log=False,  # RequestSpans logs each request by its route, never its path
        proxy_headers=True,
        forwarded_allow_ips=list(settings.trusted_proxies),
        server_header=False,
    )
    return 0
