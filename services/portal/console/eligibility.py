"""/staff/eligibility (benefit providers): a subject's eligibility for one of the provider's
own benefits (query's CheckEligibility, purpose `eligibility-check`). The subject is named by
the identifier the applicant gave, typed into a form that is POSTed (never in a URL, a log
line or a span; query hashes it from the request's SubjectRef). The benefits offered are
those the catalogue (ListBenefits) says this provider grants, by its token's `sub`, which is
how query tells whose benefit it is; query refuses any other all the same."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from kit.logging import get_logger
from kit.principal import Role
from services.portal import records as r
from services.portal.backend import ServiceError
from services.portal.pages import Pages
from services.portal.signin import claims_of
from services.portal.staff import Staff
from services.portal.staffcalls import eligibility as calls
from services.portal.views import audit as lookup
from services.portal.views import eligibility as views

log = get_logger(__name__)


def routes(pages: Pages) -> list[BaseRoute]:
    async def own(staff: Staff) -> tuple[r.Benefit, ...]:
        # The services name a staff principal by its token's `sub` (kit.principal), as query does
        # when it compares a benefit's provider_id with the caller.
        provider_id = str(claims_of(staff.token).get("sub", ""))
        return views.own_benefits(await pages.backend.benefits(staff.token), provider_id)

    def form_page(
        request: Request, benefits: tuple[r.Benefit, ...], status: int = 200, **context: object
    ) -> Response:
        t = pages.t(request)
        base: dict[str, object] = {
            "form": {"benefit": "", "scheme": "resident-id", "identifier": "", "note": ""},
            "errors": [],
            "answer": None,
            "refusal": None,
        }
        return pages.render(
            request,
            "staff/eligibility.html",
            status=status,
            section="/staff/eligibility",
            benefits=[(b.benefit_id, b.purpose) for b in benefits],
            schemes=[(s, lookup.scheme_label(t, s)) for k in lookup.SCHEMES for s in lookup.SCHEMES[k]],
            purpose=views.purpose(t, calls.ELIGIBILITY_CHECK),
            **{**base, **context},
        )

    async def show(request: Request) -> Response:
        staff = pages.staff(request, Role.BENEFIT_PROVIDER)
        return form_page(request, await own(staff))

    async def check(request: Request) -> Response:
        staff = pages.staff(request, Role.BENEFIT_PROVIDER)
        form = await pages.form(request)
        t = pages.t(request)
        benefits = await own(staff)
        scheme = str(form.get("scheme", ""))
        kind = next((k for k, schemes in lookup.SCHEMES.items() if scheme in schemes), "")
        value, note = str(form.get("identifier", "")), str(form.get("note", "")).strip()
        benefit_id = str(form.get("benefit", ""))
        values = {"benefit": benefit_id, "scheme": scheme, "identifier": value, "note": note}
        errors = views.check_form(t, kind, scheme, value, note, benefit_id=benefit_id, own=benefits)
        if errors:
            return form_page(request, benefits, 400, form=values, errors=errors)
        benefit = next(b for b in benefits if b.benefit_id == benefit_id)
        try:
            result = await calls.check(
                pages.backend,
                staff.token,
                kind=kind,
                scheme=scheme,
                value=value.strip(),
                benefit_id=benefit_id,
                note=note,
            )
        except ServiceError as error:
            if error.code not in (
                "INVALID_ARGUMENT",
                "NOT_FOUND",
                "PERMISSION_DENIED",
                "FAILED_PRECONDITION",
            ):
                raise
            # Only the code: the service's message may quote what was typed.
            log.info("eligibility check refused", code=error.code, benefit_id=benefit_id)
            refusal = views.refusal(t, error)
            return form_page(
                request,
                benefits,
                refusal.status,
                form=values,
                refusal=refusal,
                errors=list(refusal.violations),
            )
        log.info("eligibility checked", benefit_id=benefit_id, eligible=result.eligible)
        return form_page(request, benefits, form=values, answer=views.answer(t, benefit, result))

    return [
        Route("/staff/eligibility", pages.page(show), methods=["GET"]),
        Route("/staff/eligibility", pages.page(check), methods=["POST"]),
    ]
