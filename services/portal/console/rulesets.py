"""/staff/rule-sets: the rule sets with their states, a version's rules in plain language and
as YAML with its changes (rules' audit trail), the difference between two versions, a new
draft (pasted or uploaded, validated with every problem at its place, saved), a backtest's
report with its charts, and publish, activate and retire with a confirmation.

Reviewers own rule sets; auditors and admins read them (services/rules/access.py). Every
call carries the staff member's own token, so the rules service decides and its audit log
names them."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from kit.logging import get_logger
from kit.principal import Role
from services.portal import authoring_records as a
from services.portal import charts, csrf
from services.portal.backend import ServiceError
from services.portal.i18n import LANGUAGES, Localiser
from services.portal.pages import CHART_CSP, CsrfRefused, Pages
from services.portal.staffcalls.authoring import LIFECYCLE, AuthoringCalls
from services.portal.views import backtests as backtest_views
from services.portal.views import figures
from services.portal.views import rulesets as views
from services.portal.views.entries import FieldError

log = get_logger(__name__)

READERS = (Role.REVIEWER, Role.AUDITOR, Role.ADMIN)
AUTHORS = (Role.REVIEWER,)
# Reviewers backtest what they author; admins may backtest any stored rule set.
BACKTESTERS = (Role.REVIEWER, Role.ADMIN)
# The portal reads no request body over 64 KiB (bootstrap.MAX_BODY_BYTES): a source of at
# most 48 KiB (the sample rule set is 10 KiB) leaves room for the form around it and is
# refused in words; a larger one goes to the rules service's CreateDraft directly (1 MiB).
MAX_SOURCE_BYTES = 48 * 1024
FLASH = "rule_set_flash"
# The purpose a rule author states to see the subjects a backtest affects (config/purposes.yaml).
RULE_BACKTEST = "rule-backtest"
PURPOSE_ROLES = (Role.REVIEWER, Role.ADMIN)
# A reviewer cancels the backtests it started, an admin any (services/rules/access.py).
CANCELLERS = (Role.REVIEWER, Role.ADMIN)


def _backtest_id(request: Request) -> str:
    backtest_id = str(request.path_params["backtest_id"])
    if not 0 < len(backtest_id) <= 64 or not all(c.isalnum() or c in "-_" for c in backtest_id):
        raise ServiceError("NOT_FOUND", "no such backtest")
    return backtest_id


def _rule_set_id(request: Request) -> int:
    raw = str(request.path_params["rule_set_id"])
    if not raw.isdigit() or len(raw) > 18:
        raise ServiceError("NOT_FOUND", "no such rule set")
    return int(raw)


async def _source_form(pages: Pages, request: Request) -> tuple[str, str, list[FieldError]]:
    """The draft form: its action and the source, from the file if one was chosen, else the
    text area; CSRF checked first. Too large, or not UTF-8: an error at the field."""
    t = pages.t(request)
    async with request.form(max_files=1, max_fields=5, max_part_size=MAX_SOURCE_BYTES + 4096) as form:
        if not csrf.valid(request.session, form.get(csrf.FIELD)):
            raise CsrfRefused
        act = str(form.get("action", "validate"))
        upload = form.get("upload")
        if isinstance(upload, UploadFile) and upload.filename:
            data = await upload.read(MAX_SOURCE_BYTES + 1)
            if len(data) > MAX_SOURCE_BYTES:
                return act, "", [FieldError("upload", _too_large(t))]
            try:
                return act, data.decode("utf-8-sig"), []
            except UnicodeDecodeError:
                return act, "", [FieldError("upload", t.gettext("The file is not UTF-8 text."))]
        source = str(form.get("source", ""))
    if len(source.encode("utf-8")) > MAX_SOURCE_BYTES:
        return act, "", [FieldError("source", _too_large(t))]
    if not source.strip():
        return act, source, [FieldError("source", t.gettext("Paste the rule set's YAML or choose a file."))]
    return act, source, []


def _too_large(t: Localiser) -> str:
    return t.gettext("The rule set is larger than %(size)s KiB.", size=t.number(MAX_SOURCE_BYTES // 1024))


def routes(pages: Pages) -> list[BaseRoute]:
    def calls() -> AuthoringCalls:
        return AuthoringCalls(pages.backend)

    async def index(request: Request) -> Response:
        staff = pages.staff(request, *READERS)
        t = pages.t(request)
        rule_sets = await calls().rule_sets(staff.token)
        return pages.render(
            request,
            "staff/rule_sets.html",
            section="/staff/rule-sets",
            rows=views.rows(t, rule_sets),
            author=staff.role in AUTHORS,
            done=request.session.pop(FLASH, None),
        )

    async def show(request: Request) -> Response:
        staff = pages.staff(request, *READERS)
        t = pages.t(request)
        rule_set_id = _rule_set_id(request)
        rule_set, changes, policy, backtests = await asyncio.gather(
            calls().rule_set(staff.token, rule_set_id),
            calls().changes(staff.token, rule_set_id),
            _settled(pages.backend.policy()),
            calls().backtests(staff.token, rule_set_id),
        )
        view = views.rule_set_view(
            t,
            rule_set,
            changes,
            None if isinstance(policy, ServiceError) else policy,
            author=staff.role in AUTHORS,
            backtester=staff.role in BACKTESTERS,
        )
        return pages.render(
            request,
            "staff/rule_set.html",
            section="/staff/rule-sets",
            v=view,
            done=request.session.pop(FLASH, None),
            backtest=await latest_headline(t, staff.token, backtests),
            backtests=backtest_views.job_rows(t, backtests),
            purpose=RULE_BACKTEST,
        )

    async def compare(request: Request) -> Response:
        staff = pages.staff(request, *READERS)
        t = pages.t(request)
        params = request.query_params
        older, newer = params.get("from", ""), params.get("to", "")
        if not (older.isdigit() and newer.isdigit()) or len(older) > 18 or len(newer) > 18:
            raise ServiceError("NOT_FOUND", "no such rule set")
        before, after = await asyncio.gather(
            calls().rule_set(staff.token, int(older)), calls().rule_set(staff.token, int(newer))
        )
        return pages.render(
            request,
            "staff/rule_set_diff.html",
            section="/staff/rule-sets",
            before=before,
            after=after,
            d=views.diff(t, before.source, after.source),
        )

    async def draft(request: Request) -> Response:
        staff = pages.staff(request, *AUTHORS)
        t = pages.t(request)
        context: dict[str, Any] = {
            "section": "/staff/rule-sets",
            "limit": t.number(MAX_SOURCE_BYTES // 1024),
            "problems": (),
            "valid": None,
        }
        if request.method != "POST":
            return pages.render(request, "staff/draft.html", errors=[], source="", **context)
        act, source, errors = await _source_form(pages, request)
        if errors:
            return pages.render(
                request, "staff/draft.html", status=400, errors=errors, source=source, **context
            )
        validation = await calls().validate(staff.token, source)
        if not validation.valid:
            found = views.problems(t, source, validation.problems)
            summary = [FieldError(p.anchor, f"{p.path}: {p.message}") for p in found]
            log.info("rule set draft invalid", problems=len(found))
            return pages.render(
                request,
                "staff/draft.html",
                status=400,
                errors=summary,
                source=source,
                **{**context, "problems": found, "valid": False},
            )
        if act != "save":
            return pages.render(
                request, "staff/draft.html", errors=[], source=source, **{**context, "valid": validation}
            )
        saved = await calls().create_draft(staff.token, source)
        log.info("rule set draft created", rule_set_id=saved.rule_set_id)
        request.session[FLASH] = t.gettext(
            "Draft saved: %(name)s, version %(version)s.", name=saved.name, version=t.number(saved.version)
        )
        return RedirectResponse(f"/staff/rule-sets/{saved.rule_set_id}", status_code=303)

    async def latest_headline(t: Localiser, token: str, jobs: tuple[a.BacktestJob, ...]) -> str:
        """The headline of the rule set's newest backtest that succeeded, or ""."""
        done = next((job for job in jobs if job.state == "succeeded"), None)
        if done is None:
            return ""
        read = await calls().backtest(token, done.backtest_id)
        return (
            backtest_views.headline_text(t, backtest_views.headline(read.report).as_dict())
            if read.report
            else ""
        )

    async def start_backtest(request: Request) -> Response:
        staff = pages.staff(request, *BACKTESTERS)
        form = await pages.form(request)
        rule_set_id = _rule_set_id(request)
        purpose = RULE_BACKTEST if form.get("subjects") == "yes" else ""
        job = await calls().start_backtest(staff.token, rule_set_id, purpose)
        log.info("rule set backtest started", rule_set_id=rule_set_id, with_subjects=bool(purpose))
        return RedirectResponse(f"/staff/backtests/{job.backtest_id}", status_code=303)

    async def backtest(request: Request) -> Response:
        """A background backtest: its state and progress while it runs (the page offers to
        look again; nothing refreshes by itself), its report once it succeeded."""
        staff = pages.staff(request, *READERS)
        t = pages.t(request)
        backtest_id = _backtest_id(request)
        # The subjects only for a role that may state the purpose (config/purposes.yaml).
        job = await calls().backtest(staff.token, backtest_id, subjects=staff.role in PURPOSE_ROLES)
        if job.report is None:
            return pages.render(
                request,
                "staff/backtest_job.html",
                section="/staff/rule-sets",
                j=backtest_views.job_view(t, job, may_cancel=staff.role in CANCELLERS),
            )
        return pages.render(
            request,
            "staff/backtest.html",
            section="/staff/rule-sets",
            rule_set_id=job.rule_set_id,
            b=backtest_views.backtest_view(t, job.report),
            subjects=backtest_views.subject_rows(t, job.report),
            lang=pages.language(request),
        )

    async def cancel_backtest(request: Request) -> Response:
        staff = pages.staff(request, *CANCELLERS)
        await pages.form(request)
        backtest_id = _backtest_id(request)
        await calls().cancel_backtest(staff.token, backtest_id)
        log.info("backtest cancelled", backtest_id=backtest_id)
        return RedirectResponse(f"/staff/backtests/{backtest_id}", status_code=303)

    async def act(request: Request) -> Response:
        staff = pages.staff(request, *AUTHORS)
        form = await pages.form(request)
        t = pages.t(request)
        rule_set_id = _rule_set_id(request)
        what = str(request.path_params["act"])
        if what not in LIFECYCLE:
            raise HTTPException(404)
        if form.get("confirm") != "yes":
            rule_set, jobs = await asyncio.gather(
                calls().rule_set(staff.token, rule_set_id), calls().backtests(staff.token, rule_set_id)
            )
            return pages.render(
                request,
                "staff/rule_set_confirm.html",
                section="/staff/rule-sets",
                act=what,
                rule_set=rule_set,
                title=views.rule_set_view(t, rule_set, (), None, author=True, backtester=True).title,
                backtest=await latest_headline(t, staff.token, jobs),
            )
        done = await calls().change(staff.token, what, rule_set_id)
        log.info("rule set changed", act=what, rule_set_id=rule_set_id)
        request.session[FLASH] = {
            "publish": t.gettext("Published: %(name)s, version %(version)s."),
            "activate": t.gettext(
                "Activated: %(name)s, version %(version)s. New events are evaluated with it."
            ),
            "retire": t.gettext("Retired: %(name)s, version %(version)s."),
        }[what] % {"name": done.name, "version": t.number(done.version)}
        return RedirectResponse(f"/staff/rule-sets/{rule_set_id}", status_code=303)

    async def chart(request: Request) -> Response:
        """A backtest's or a policy preview's chart, drawn from the numbers in its URL (views/figures)."""
        pages.staff(request, *READERS)
        language = request.query_params.get("lang", "")
        t = pages.localisers[language] if language in LANGUAGES else pages.t(request)
        kind, data = request.path_params["kind"], request.query_params.get("d", "")
        try:
            if kind == "migration":
                drawn = figures.migration_map(t, *figures.decode_matrix(data))
                svg = await asyncio.to_thread(charts.heat_map, drawn)
            elif kind in ("changes", "rules"):
                make = figures.change_histogram if kind == "changes" else figures.rules_bars
                svg = await asyncio.to_thread(charts.bars, make(t, *figures.decode_bars(data)))
            else:
                raise HTTPException(404)
        except figures.BadChartData:
            raise HTTPException(404) from None
        return Response(svg, media_type="image/svg+xml", headers={"Content-Security-Policy": CHART_CSP})

    p = pages.page
    return [
        Route("/staff/rule-sets", p(index)),
        Route("/staff/rule-sets/new", p(draft), methods=["GET", "POST"]),
        Route("/staff/rule-sets/compare", p(compare)),
        Route("/staff/rule-sets/{rule_set_id}", p(show)),
        Route("/staff/rule-sets/{rule_set_id}/backtest", p(start_backtest), methods=["POST"]),
        Route("/staff/backtests/{backtest_id}", p(backtest)),
        Route("/staff/backtests/{backtest_id}/cancel", p(cancel_backtest), methods=["POST"]),
        Route("/staff/rule-sets/{rule_set_id}/{act}", p(act), methods=["POST"]),
        Route("/staff/charts/{kind}.svg", p(chart)),
    ]


async def _settled(call: Any) -> Any:
    try:
        return await call
    except ServiceError as error:
        return error
