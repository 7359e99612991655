"""The HTTP plumbing every page shares: templates per language, security headers (a
Content-Security-Policy without unsafe-inline), and one span and one log line per request,
named by the route's template (never its path: no identifier reaches a span or a log)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kit.logging import get_logger
from services.portal.i18n import Localiser

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"

log = get_logger("services.portal.requests")
tracer = trace.get_tracer("services.portal")


class Renderer:
    """One Jinja2 environment per language, its catalogue installed (newstyle gettext:
    `_("... %(name)s", name=x)`, autoescaped)."""

    def __init__(
        self, localisers: Mapping[str, Localiser], templates: Path = TEMPLATES, static: Path = STATIC
    ):
        versions = {
            path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            for path in static.iterdir()
            if path.is_file()
        }

        def static_url(name: str) -> str:
            # The content's hash in the URL: browsers may cache it for good.
            return f"/static/{name}?v={versions.get(name, '0')}"

        self._environments: dict[str, Environment] = {}
        for language, localiser in localisers.items():
            env = Environment(
                loader=FileSystemLoader(templates),
                autoescape=select_autoescape(["html"]),
                extensions=["jinja2.ext.i18n"],
                trim_blocks=True,
                lstrip_blocks=True,
            )
            env.install_gettext_translations(localiser.translations, newstyle=True)  # type: ignore[attr-defined]
            env.globals["static"] = static_url
            self._environments[language] = env

    def render(self, language: str, template: str, context: Mapping[str, Any]) -> str:
        return self._environments[language].get_template(template).render(context)


def content_security_policy(issuer: str) -> str:
    """No script at all, styles and images from the portal only, forms to the portal and
    (sign-out redirects there) the identity provider."""
    parts = urlsplit(issuer)
    provider = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""
    return "; ".join(
        [
            "default-src 'none'",
            "style-src 'self'",
            "img-src 'self'",
            f"form-action 'self' {provider}".strip(),
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ]
    )


class SecurityHeaders:
    def __init__(self, app: ASGIApp, *, csp: str, hsts: bool) -> None:
        self._app = app
        self._headers = [
            ("Content-Security-Policy", csp),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "same-origin"),
            ("Permissions-Policy", "camera=(), microphone=(), geolocation=()"),
            ("Cross-Origin-Opener-Policy", "same-origin"),
        ]
        if hsts:
            self._headers.append(("Strict-Transport-Security", "max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self._headers:
                    headers.setdefault(name, value)
                # Pages hold personal data: never cached. Static files carry their hash.
                headers["Cache-Control"] = "public, max-age=31536000, immutable" if static else "no-store"
            await send(message)

        await self._app(scope, receive, send_with_headers)


class RequestSpans:
    """A SERVER span and a log line per request, named by the route template, and the
    server's time in a Server-Timing header (`app;dur=<ms>`)."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute]) -> None:
        self._app = app
        self._routes = routes

    def route_of(self, scope: Scope) -> str:
        for route in self._routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", "?"))
        return "(unmatched)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        route = self.route_of(scope)
        method = scope.get("method", "")
        started = time.perf_counter()
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                # Pages are rendered whole before they start: this is the server's time
                # for the page, which bench.portal sets against what the client waited.
                elapsed_ms = (time.perf_counter() - started) * 1000
                MutableHeaders(scope=message).append("Server-Timing", f"app;dur={elapsed_ms:.1f}")
            await send(message)

        with tracer.start_as_current_span(
            f"{method} {route}",
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        ) as span:
            try:
                await self._app(scope, receive, send_status)
            finally:
                span.set_attribute("http.response.status_code", status["code"])
                if status["code"] >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                if route != "/static":
                    log.info(
                        "request",
                        method=method,
                        route=route,
                        status=status["code"],
                        duration_ms=round((time.perf_counter() - started) * 1000, 1),
                    )


class BodyLimit:
    """Refuses a request body over `max_bytes` (413) before a handler reads it: forms are
    parsed whole in memory, so an unbounded body would be an unbounded allocation."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self._app = app
        self._max = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self._max:
                await _too_large(send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self._max:
                    raise _TooLarge
            return message

        try:
            await self._app(scope, limited, send)
        except _TooLarge:
            await _too_large(send)


class _TooLarge(Exception):
    pass


async def _too_large(send: Send) -> None:
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"request body too large"})


def trace_id() -> str:
    """The current trace id, to quote on an error page and find the logs by."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""
