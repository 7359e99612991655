"""The pages: each reads what it needs through the Backend with the signed-in person's
token, shapes it with a view model and renders a template. Every form is CSRF-checked;
every refusal of a service becomes words (services.portal.views.errors)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from kit.auth import Role
from kit.logging import get_logger
from services.portal import charts, csrf
from services.portal import records as r
from services.portal.backend import Backend, Caller, ServiceError
from services.portal.i18n import HTML_LANG, LANGUAGES, NATIVE_NAMES, Localiser
from services.portal.signin import ACCESS_TOKEN, SUBJECT_ROLE, OAuthError, SignIn, claims_of
from services.portal.staff import STAFF_ROLES, NotAllowed, Staff, navigation
from services.portal.views import access as access_views
from services.portal.views import benefits as benefit_views
from services.portal.views import credit as credit_views
from services.portal.views import entries as entry_views
from services.portal.views import export as export_views
from services.portal.views import history as history_views
from services.portal.views import public as public_views
from services.portal.views.errors import ErrorView, error_view, refusal_view
from services.portal.web import STATIC, Renderer, trace_id

log = get_logger(__name__)

LANGUAGE_COOKIE = "egret_lang"
FLASH = "flash"
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

    # -- public pages ----------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return self.render(request, "home.html")

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def set_language(self, request: Request) -> Response:
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
            secure=self.secure_cookies,
            samesite="lax",
        )
        return response

    async def rules(self, request: Request) -> Response:
        t = self.t(request)
        rule_set, policy = await asyncio.gather(
            _settled(self.backend.rule_set()), _settled(self.backend.policy())
        )
        if isinstance(rule_set, ServiceError):
            return self.render(
                request, "rules.html", section="/rules", unavailable=self.unavailable(t, "rules", rule_set)
            )
        groups = public_views.rule_groups(t, rule_set, None if isinstance(policy, ServiceError) else policy)
        return self.render(
            request,
            "rules.html",
            section="/rules",
            rule_set=rule_set,
            since=t.date(rule_set.activated_at),
            groups=groups,
            unavailable="",
        )

    async def tiers(self, request: Request) -> Response:
        t = self.t(request)
        policy = await _settled(self.backend.policy())
        if isinstance(policy, ServiceError):
            return self.render(
                request, "tiers.html", section="/tiers", unavailable=self.unavailable(t, "policy", policy)
            )
        return self.render(
            request,
            "tiers.html",
            section="/tiers",
            policy=policy,
            since=t.date(policy.activated_at),
            kinds=public_views.kind_tiers(t, policy),
            unavailable="",
        )

    async def catalogue(self, request: Request) -> Response:
        t = self.t(request)
        benefits = await _settled(self.backend.public_benefits())
        if isinstance(benefits, ServiceError):
            return self.render(
                request,
                "catalogue.html",
                section="/catalogue",
                unavailable=self.unavailable(t, "benefits", benefits),
            )
        return self.render(
            request,
            "catalogue.html",
            section="/catalogue",
            rows=public_views.catalogue(t, benefits),
            unavailable="",
        )

    async def how_it_works(self, request: Request) -> Response:
        t = self.t(request)
        policy = await _settled(self.backend.policy())
        if isinstance(policy, ServiceError):
            return self.render(
                request,
                "how.html",
                section="/how-it-works",
                due=None,
                unavailable=self.unavailable(t, "policy", policy),
            )
        return self.render(
            request,
            "how.html",
            section="/how-it-works",
            due=public_views.due_process(t, policy),
            unavailable="",
        )

    def unavailable(self, t: Localiser, what: str, error: ServiceError) -> str:
        log.warning("public read failed", read=what, code=error.code, throttle=f"public-{what}")
        return t.gettext(
            "This information cannot be read from the credit services right now. Please try again later. "
            "Reference: %(ref)s",
            ref=trace_id(),
        )

    # -- sign-in -----------------------------------------------------------------------------

    async def sign_in(self, request: Request) -> Response:
        if self.signin.limited(request):
            return self.too_many(request)
        try:
            return await self.signin.start(request, request.query_params.get("next"))
        except (httpx.HTTPError, OAuthError, ValueError) as exc:
            # Discovery failed: the provider is down, or answers something that is not OpenID.
            log.warning("identity provider unreachable", error=type(exc).__name__, throttle="idp-down")
            t = self.t(request)
            return self.error_page(
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

    async def callback(self, request: Request) -> Response:
        if self.signin.limited(request):
            return self.too_many(request)
        try:
            target = await self.signin.finish(request)
        except OAuthError as exc:
            log.warning("sign-in failed", error=exc.error or "oauth_error", throttle="signin-failed")
            t = self.t(request)
            return self.error_page(
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

    def too_many(self, request: Request) -> HTMLResponse:
        t = self.t(request)
        log.warning("sign-in rate limited", throttle="signin-limited")
        return self.error_page(
            request,
            ErrorView(
                429,
                t.gettext("Too many sign-in attempts"),
                t.gettext("Please wait a minute and try again."),
                "",
                (),
            ),
        )

    async def sign_out(self, request: Request) -> Response:
        await self.form(request)
        return await self.signin.sign_out(request)

    async def signed_out(self, request: Request) -> Response:
        return self.render(request, "signed_out.html")

    # -- the person's pages ------------------------------------------------------------------

    async def credit(self, request: Request) -> Response:
        caller = self.person(request)
        t = self.t(request)
        try:
            explanation = await self.backend.explain(caller)
        except ServiceError as error:
            if error.code != "NOT_FOUND":
                raise
            return self.render(request, "credit.html", section="/credit", no_score=True)
        return self.render(
            request, "credit.html", section="/credit", no_score=False, v=credit_views.credit(t, explanation)
        )

    async def entries(self, request: Request) -> Response:
        caller = self.person(request)
        t = self.t(request)
        page_token = request.query_params.get("page", "")
        page = await self.backend.entries(caller, page_token)
        now = self.now()
        return self.render(
            request,
            "entries.html",
            section="/entries",
            rows=[entry_views.row(t, e, now) for e in page.items],
            page_token=page_token,
            next_page=page.next_page_token,
        )

    async def _entry_and_explanation(
        self, caller: Caller, entry_id: str
    ) -> tuple[r.Entry, r.ExplainedEntry | None]:
        entry, explanation = await asyncio.gather(
            self.backend.entry(caller, entry_id), _settled(self.backend.explain(caller))
        )
        explained = None
        if not isinstance(explanation, ServiceError):
            explained = next((e for e in explanation.entries if e.entry.entry_id == entry_id), None)
        return entry, explained

    async def entry(self, request: Request) -> Response:
        caller = self.person(request)
        entry_id = _entry_id(request)
        entry, explained = await self._entry_and_explanation(caller, entry_id)
        detail = entry_views.detail(self.t(request), entry, explained, self.now())
        return self.render(request, "entry.html", section="/entries", d=detail)

    async def dispute(self, request: Request) -> Response:
        caller = self.person(request)
        # A forged post is refused before anything is read or done.
        form = await self.form(request) if request.method == "POST" else None
        t = self.t(request)
        entry_id = _entry_id(request)
        entry = await self.backend.entry(caller, entry_id)
        row = entry_views.row(t, entry, self.now())
        deadline_days = await self._deadline_days(t)
        context: dict[str, Any] = {
            "section": "/entries",
            "entry_id": entry_id,
            "row": row,
            "deadline_days": deadline_days,
            "limit": t.number(entry_views.MAX_STATEMENT),
            "max_length": entry_views.MAX_STATEMENT,
            "refusal": None,
        }
        if form is None:
            return self.render(request, "dispute_form.html", errors=[], statement="", **context)
        statement = str(form.get("statement", ""))
        errors = entry_views.check_statement(t, statement)
        if errors or form.get("edit"):
            return self.render(
                request,
                "dispute_form.html",
                status=400 if errors else 200,
                errors=errors,
                statement=statement,
                **context,
            )
        if form.get("confirm") != "yes":
            return self.render(
                request,
                "dispute_confirm.html",
                section="/entries",
                entry_id=entry_id,
                row=row,
                statement=statement.strip(),
                deadline=await self._deadline_text(t),
            )
        try:
            filed = await self.backend.file_dispute(caller, entry_id, statement.strip())
        except ServiceError as error:
            return self._refused_form(request, "dispute_form.html", error, statement=statement, **context)
        request.session[FLASH] = {
            "kind": "dispute",
            "deadline": filed.deadline.isoformat() if filed.deadline else "",
        }
        log.info("dispute filed")
        return RedirectResponse("/contest", status_code=303)

    async def repair(self, request: Request) -> Response:
        caller = self.person(request)
        form = await self.form(request) if request.method == "POST" else None
        t = self.t(request)
        entry_id = _entry_id(request)
        entry, explained = await self._entry_and_explanation(caller, entry_id)
        now = self.now()
        detail = entry_views.detail(t, entry, explained, now)
        context: dict[str, Any] = {
            "section": "/entries",
            "entry_id": entry_id,
            "row": detail.row,
            "decision_days": await self._decision_days(t),
            "limit": t.number(entry_views.MAX_EVIDENCE),
            "max_length": entry_views.MAX_EVIDENCE,
            "refusal": None,
        }
        if form is None:
            if not detail.can_repair:
                # Too early, nothing to repair, already pending: say so before any typing.
                context["refusal"] = ErrorView(
                    409, t.gettext("This cannot be done now"), detail.cannot_repair_why, "", ()
                )
            return self.render(
                request, "repair_form.html", errors=[], evidence="", evidence_uri="", **context
            )
        evidence, uri = str(form.get("evidence", "")), str(form.get("evidence_uri", ""))
        errors = entry_views.check_repair(t, evidence, uri)
        if errors or form.get("edit"):
            return self.render(
                request,
                "repair_form.html",
                status=400 if errors else 200,
                errors=errors,
                evidence=evidence,
                evidence_uri=uri,
                **context,
            )
        if form.get("confirm") != "yes":
            return self.render(
                request,
                "repair_confirm.html",
                section="/entries",
                entry_id=entry_id,
                row=detail.row,
                evidence=evidence.strip(),
                evidence_uri=uri.strip(),
            )
        try:
            application = await self.backend.apply_for_repair(caller, entry_id, evidence.strip(), uri.strip())
        except ServiceError as error:
            return self._refused_form(
                request, "repair_form.html", error, evidence=evidence, evidence_uri=uri, **context
            )
        request.session[FLASH] = {
            "kind": "repair",
            "due": application.decision_due.isoformat() if application.decision_due else "",
        }
        log.info("repair applied for")
        return RedirectResponse("/contest", status_code=303)

    def _refused_form(self, request: Request, template: str, error: ServiceError, **context: Any) -> Response:
        """A form the service refused, shown again with its reasons in words."""
        if error.code in (
            "NOT_FOUND",
            "PERMISSION_DENIED",
            "UNAUTHENTICATED",
            "UNAVAILABLE",
            "DEADLINE_EXCEEDED",
        ):
            raise error
        view = refusal_view(self.t(request), error)
        log.info("form refused by the service", code=error.code)
        context["refusal"] = view
        return self.render(request, template, status=view.status, errors=list(view.violations), **context)

    async def _policy(self) -> r.PublishedPolicy | None:
        policy = await _settled(self.backend.policy())
        return None if isinstance(policy, ServiceError) else policy

    async def _deadline_days(self, t: Localiser) -> str:
        policy = await self._policy()
        return t.number(policy.dispute_deadline_days) if policy else t.gettext("a number of")

    async def _deadline_text(self, t: Localiser) -> str:
        policy = await self._policy()
        if policy is None:
            return t.gettext("The date is shown once you have filed.")
        return t.date(self.now() + timedelta(days=policy.dispute_deadline_days))

    async def _decision_days(self, t: Localiser) -> str:
        policy = await self._policy()
        return t.number(policy.repair_decision_working_days) if policy else t.gettext("a few")

    async def contest(self, request: Request) -> Response:
        caller = self.person(request)
        t = self.t(request)
        disputes, repairs, consent = await asyncio.gather(
            _settled(self.backend.disputes(caller)),
            _settled(self.backend.repairs(caller)),
            _settled(self.backend.consent(caller)),
        )
        flash = request.session.pop(FLASH, None)
        return self.render(
            request,
            "contest.html",
            section="/contest",
            done=_flash_view(t, flash),
            disputes=[]
            if isinstance(disputes, ServiceError)
            else [entry_views.dispute_view(t, d) for d in disputes],
            disputes_error=self._read_error(t, disputes),
            repairs=[]
            if isinstance(repairs, ServiceError)
            else [entry_views.repair_view(t, a) for a in repairs],
            repairs_error=self._read_error(t, repairs),
            consent=None if isinstance(consent, ServiceError) else entry_views.consent_view(t, consent),
            consent_error=self._read_error(t, consent),
        )

    def _read_error(self, t: Localiser, result: object) -> str:
        if not isinstance(result, ServiceError):
            return ""
        return error_view(
            t, result.code, result.message, reason=result.reason, metadata=result.metadata
        ).message

    async def consent(self, request: Request) -> Response:
        caller = self.person(request)
        form = await self.form(request)
        granted = form.get("granted") == "yes"
        if form.get("confirm") != "yes":
            return self.render(request, "consent_confirm.html", section="/contest", granted=granted)
        record = await self.backend.set_consent(caller, granted)
        request.session[FLASH] = {"kind": "consent", "granted": record.granted}
        log.info("consent set")
        return RedirectResponse("/contest", status_code=303)

    async def _history(self, caller: Caller, t: Localiser, *, tiers: bool) -> history_views.HistoryView:
        # The tier lines come from the published policy (cached), not the person's Explain,
        # which would cost query a projection of the whole ledger for a chart's thresholds.
        # Only the chart draws them; the page reads the history alone.
        reads: list[Awaitable[Any]] = [
            self.backend.history(caller, as_corrected=False),
            self.backend.history(caller, as_corrected=True),
        ]
        if tiers:
            reads.append(_settled(self.backend.policy()))
        known, corrected, *policy = await asyncio.gather(*reads)
        kinds = policy[0].kinds if policy and not isinstance(policy[0], ServiceError) else ()
        lines = next((k.tiers for k in kinds if k.kind == caller.subject.kind), ())
        return history_views.history(t, known, corrected, self.now(), lines)

    async def history(self, request: Request) -> Response:
        caller = self.person(request)
        view = await self._history(caller, self.t(request), tiers=False)
        return self.render(
            request,
            "history.html",
            section="/history",
            h=view,
            chart_width=charts.WIDTH,
            chart_height=charts.HEIGHT,
        )

    async def history_chart(self, request: Request) -> Response:
        """The History page's chart as an SVG image, in the language its `lang` names (the
        page's, even if the cookie changed since)."""
        caller = self.person(request)
        language = request.query_params.get("lang", "")
        t = self.localisers[language] if language in LANGUAGES else self.t(request)
        view = await self._history(caller, t, tiers=True)
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

    async def benefits(self, request: Request) -> Response:
        caller = self.person(request)
        t = self.t(request)
        catalogue = await self.backend.benefits(caller.token)
        offered = benefit_views.for_kind(catalogue, caller.subject.kind)
        results = await asyncio.gather(
            *(_settled(self.backend.eligibility(caller, b.benefit_id)) for b in offered)
        )
        rows = []
        for benefit, result in zip(offered, results, strict=True):
            if isinstance(result, ServiceError):
                message = error_view(
                    t, result.code, result.message, reason=result.reason, metadata=result.metadata
                ).message
                rows.append(benefit_views.benefit_row(t, benefit, None, message))
            else:
                rows.append(benefit_views.benefit_row(t, benefit, result))
        return self.render(request, "benefits.html", section="/benefits", rows=rows)

    async def access(self, request: Request) -> Response:
        caller = self.person(request)
        t = self.t(request)
        page_token = request.query_params.get("page", "")
        page = await self.backend.access_log(caller, page_token)
        return self.render(
            request,
            "access.html",
            section="/access",
            rows=[access_views.access_row(t, a) for a in page.items],
            page_token=page_token,
            next_page=page.next_page_token,
        )

    async def download(self, request: Request) -> Response:
        self.person(request)
        t = self.t(request)
        labels = {
            "entries": t.gettext("Your entries"),
            "history": t.gettext("Your score history, as known at the time"),
            "history-corrected": t.gettext("Your score history, as corrected"),
            "access-log": t.gettext("Who looked at your data"),
            "disputes": t.gettext("Your disputes"),
            "repairs": t.gettext("Your repair applications"),
            "benefits": t.gettext("Your benefits"),
        }
        return self.render(
            request,
            "download.html",
            section="/download",
            sections=[(s, labels[s]) for s in export_views.CSV_SECTIONS],
        )

    async def _export(self, caller: Caller) -> dict[str, Any]:
        explanation, entries, known, corrected, access, disputes, repairs, catalogue = await asyncio.gather(
            _settled(self.backend.explain(caller)),
            self.backend.all_entries(caller),
            self.backend.history(caller, as_corrected=False),
            self.backend.history(caller, as_corrected=True),
            self.backend.all_access_records(caller),
            self.backend.disputes(caller),
            self.backend.repairs(caller),
            self.backend.benefits(caller.token),
        )
        if isinstance(explanation, ServiceError) and explanation.code != "NOT_FOUND":
            raise explanation
        offered = benefit_views.for_kind(catalogue, caller.subject.kind)
        checks = await asyncio.gather(
            *(_settled(self.backend.eligibility(caller, b.benefit_id)) for b in offered)
        )
        return export_views.document(
            exported_at=self.now(),
            explanation=None if isinstance(explanation, ServiceError) else explanation,
            entries=entries,
            history=known,
            history_corrected=corrected,
            access_log=access,
            disputes=disputes,
            repairs=repairs,
            eligibility=tuple(c for c in checks if not isinstance(c, ServiceError)),
        )

    async def download_json(self, request: Request) -> Response:
        caller = self.person(request)
        doc = await self._export(caller)
        return Response(
            export_views.to_json(doc),
            media_type="application/json; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="my-credit-data.json"'},
        )

    async def download_csv(self, request: Request) -> Response:
        caller = self.person(request)
        section = request.path_params["section"]
        if section not in export_views.CSV_SECTIONS:
            raise HTTPException(404)
        doc = await self._export(caller)
        return Response(
            export_views.to_csv(section, export_views.section_rows(section, doc)),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="my-credit-{section}.csv"'},
        )

    # -- routing ---------------------------------------------------------------------------

    def routes(self, redirect_path: str) -> list[BaseRoute]:
        p = self.page
        return [
            Route("/", p(self.home)),
            Route("/healthz", self.healthz),
            Route("/language/{language}", p(self.set_language)),
            Route("/signin", p(self.sign_in)),
            Route(redirect_path, p(self.callback)),
            Route("/signout", p(self.sign_out), methods=["POST"]),
            Route("/signed-out", p(self.signed_out)),
            Route("/rules", p(self.rules)),
            Route("/tiers", p(self.tiers)),
            Route("/catalogue", p(self.catalogue)),
            Route("/how-it-works", p(self.how_it_works)),
            Route("/credit", p(self.credit)),
            Route("/entries", p(self.entries)),
            Route("/entries/{entry_id}", p(self.entry)),
            Route("/entries/{entry_id}/dispute", p(self.dispute), methods=["GET", "POST"]),
            Route("/entries/{entry_id}/repair", p(self.repair), methods=["GET", "POST"]),
            Route("/history", p(self.history)),
            Route("/history/chart.svg", p(self.history_chart)),
            Route("/benefits", p(self.benefits)),
            Route("/contest", p(self.contest)),
            Route("/consent", p(self.consent), methods=["POST"]),
            Route("/access", p(self.access)),
            Route("/download", p(self.download)),
            Route("/download/my-credit-data.json", p(self.download_json)),
            Route("/download/{section}.csv", p(self.download_csv)),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ]

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


@functools.lru_cache(maxsize=256)
def _history_svg(t: Localiser, chart: history_views.Chart) -> bytes:
    """A history chart as drawn before, if the same one was (matplotlib takes about 100 ms
    of CPU per chart; a person's history changes rarely, and the drawing is deterministic).
    Keyed by the localiser (one per language) and the chart's data: scores and dates, no
    identifier; at most 256 charts of some 20-40 KB are kept."""
    return charts.history(t, chart)


def _entry_id(request: Request) -> str:
    entry_id = str(request.path_params["entry_id"])
    # Entry ids are SHA-256 hex; anything else cannot be one, and is not sent on.
    if not 1 <= len(entry_id) <= 128 or not all(c.isalnum() or c in "-_" for c in entry_id):
        raise ServiceError("NOT_FOUND", "no such entry")
    return entry_id


def _quote(request: Request) -> str:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return quote(target, safe="")


async def _settled(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except ServiceError as error:
        return error


@dataclass(frozen=True)
class Done:
    title: str
    message: str


def _flash_view(t: Localiser, flash: object) -> Done | None:
    if not isinstance(flash, dict):
        return None
    kind = flash.get("kind")
    if kind == "dispute":
        deadline = _parse(flash.get("deadline"))
        return Done(
            t.gettext("Your dispute has been filed"),
            t.gettext(
                "A reviewer must decide by %(date)s. Until then the entry is shown as disputed.",
                date=t.date(deadline),
            ),
        )
    if kind == "repair":
        return Done(
            t.gettext("Your repair application has been sent"),
            t.gettext("A decision is due by %(date)s.", date=t.date(_parse(flash.get("due")))),
        )
    if kind == "consent":
        if flash.get("granted"):
            return Done(t.gettext("Consent given"), t.gettext("Your consent is recorded from now on."))
        return Done(t.gettext("Consent withdrawn"), t.gettext("Your withdrawal is recorded from now on."))
    return None


def _parse(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
