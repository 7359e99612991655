"""What every page of the portal shares: the language, the frame each template is rendered
in, who is signed in (a resident or a staff member of some role), the CSRF-checked form, and
the wrapper that turns each refusal into its page (sign in, not allowed, expired form, a
service's refusal in words: services.portal.views.errors). The pages themselves are in
public_pages, signin_pages, resident/ and console/, each a `routes(pages)`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from kit.logging import get_logger
from kit.principal import Role
from services.portal import csrf
from services.portal.backend import Backend, Caller, ServiceError
from services.portal.i18n import HTML_LANG, LANGUAGES, NATIVE_NAMES, Localiser
from services.portal.signin import ACCESS_TOKEN, SUBJECT_ROLE, SignIn, claims_of
from services.portal.staff import STAFF_ROLES, NotAllowed, Staff, navigation
from services.portal.views.errors import ErrorView, error_view, refusal_view
from services.portal.web import Renderer, trace_id

log = get_logger(__name__)

LANGUAGE_COOKIE = "egret_lang"
# Form bodies are small: a statement of 4,000 characters is at most 16 KB in UTF-8.
MAX_FORM_FIELDS = 20
# Form fields beyond what any form posts are refused before anything else is read.
MAX_FIELD_BYTES = 64 * 1024
# A chart is a standalone image: nothing to load, no script (an image cannot run any), only
# its own inline styles (matplotlib styles each SVG element inline). The pages' CSP stays strict.
CHART_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"


class NotSignedIn(Exception):
    pass


class CsrfRefused(Exception):
    pass


@dataclass
class Pages:
    backend: Backend
    signin: SignIn
    renderer: Renderer
    localisers: Mapping[str, Localiser]
    default_language: str
    secure_cookies: bool
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    # -- shared helpers --------------------------------------------------------------------

    def language(self, request: Request) -> str:
        chosen = request.cookies.get(LANGUAGE_COOKIE, "")
        return chosen if chosen in LANGUAGES else self.default_language

    def t(self, request: Request) -> Localiser:
        return self.localisers[self.language(request)]

    def render(
        self, request: Request, template: str, status: int = 200, section: str = "", **context: Any
    ) -> HTMLResponse:
        language = self.language(request)
        person = self.signin.signed_in(request.session)
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        base = {
            "lang": language,
            "html_lang": HTML_LANG[language],
            "html_langs": HTML_LANG,
            "languages": [(code, NATIVE_NAMES[code]) for code in LANGUAGES],
            "here": here,
            "section": section,
            "signed_in": person is not None,
            "resident": person is not None and person.role == SUBJECT_ROLE,
            "staff_nav": navigation(self.localisers[language], person.role) if person else (),
            "user_name": (person.name if person else "") or self.localisers[language].gettext("you"),
            # Made on first use: a page without a form leaves an anonymous visitor cookie-free.
            "csrf_token": _LazyCsrf(request.session),
            "notice": "",
        }
        return HTMLResponse(self.renderer.render(language, template, {**base, **context}), status_code=status)

    def error_page(self, request: Request, view: ErrorView) -> HTMLResponse:
        return self.render(request, "error.html", status=view.status, e=view, trace_id=trace_id())

    def service_error_page(self, request: Request, error: ServiceError) -> HTMLResponse:
        view = refusal_view(self.t(request), error)
        # The code and trace id only: a service's message may quote an entry id or a note.
        log.warning("service refused", code=error.code, status=view.status, throttle="service-refused")
        return self.error_page(request, view)

    def person(self, request: Request) -> Caller:
        person = self.signin.signed_in(request.session)
        if person is None:
            raise NotSignedIn
        if person.role != SUBJECT_ROLE or person.caller is None:
            raise _NotSubject
        return person.caller

    def staff(self, request: Request, *roles: Role) -> Staff:
        """The signed-in staff member, if their role is one of `roles` (NotAllowed if not)."""
        person = self.signin.signed_in(request.session)
        if person is None:
            raise NotSignedIn
        if person.role not in STAFF_ROLES or person.role not in roles:
            raise NotAllowed
        token = request.session.get(ACCESS_TOKEN)
        assert isinstance(token, str)
        return Staff(token, Role(person.role), person.name, str(claims_of(token).get("sub", "")))

    async def form(self, request: Request) -> FormData:
        """The posted form, once its CSRF token matched this session's."""
        async with request.form(
            max_files=0, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
        ) as form:
            if not csrf.valid(request.session, form.get(csrf.FIELD)):
                raise CsrfRefused
            return form

    def now(self) -> datetime:
        return self.clock()

    # -- wrapping every page ---------------------------------------------------------------

    def page(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except NotSignedIn:
                if request.scope.get("session_expired") or request.method != "GET":
                    return self.session_ended(request)
                return RedirectResponse(f"/signin?next={_quote(request)}", status_code=303)
            except _NotSubject:
                return self.render(request, "not_subject.html", status=403)
            except NotAllowed:
                return self.render(request, "staff/not_allowed.html", status=403)
            except CsrfRefused:
                t = self.t(request)
                log.warning("form refused: CSRF token missing or wrong", throttle="csrf")
                return self.error_page(
                    request,
                    ErrorView(
                        403,
                        t.gettext("This form has expired"),
                        t.gettext(
                            "The form was not sent from this website, or your session changed since it was "
                            "shown. Go back, reload the page and try again."
                        ),
                        "",
                        (),
                    ),
                )
            except ServiceError as error:
                if error.code == "UNAUTHENTICATED":
                    # The services no longer accept the token: the session is over.
                    request.session.clear()
                    return self.session_ended(request)
                return self.service_error_page(request, error)
            except HTTPException:
                raise
            except Exception:
                log.exception("page failed")
                return self.error_page(request, error_view(self.t(request), "INTERNAL", ""))

        return endpoint

    def session_ended(self, request: Request) -> HTMLResponse:
        t = self.t(request)
        return self.render(
            request,
            "error.html",
            status=401,
            e=ErrorView(
                401,
                t.gettext("Your session has ended"),
                t.gettext("For your safety you were signed out after a while. Please sign in again."),
                "",
                (),
            ),
            trace_id="",
        )

    async def not_found(self, request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        t = self.t(request)
        if code == 405:
            view = ErrorView(
                405, t.gettext("Not found"), t.gettext("This page cannot be used that way."), "", ()
            )
        else:
            view = error_view(t, "NOT_FOUND", "")
        return self.error_page(request, view)


class _NotSubject(Exception):
    pass


class _LazyCsrf:
    def __init__(self, session: dict[str, Any]) -> None:
        self._session = session

    def __str__(self) -> str:
        return csrf.token(self._session)


def _quote(request: Request) -> str:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return quote(target, safe="")


async def settled(call: Awaitable[Any]) -> Any:
    """What `call` returns, or the ServiceError it raised: for reads a page can do without."""
    try:
        return await call
    except ServiceError as error:
        return error
