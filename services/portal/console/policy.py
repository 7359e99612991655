"""/staff/policy: the active score policy with its earlier activations, a candidate's
preview (score's PreviewPolicy: its tier migration as heat maps, its list moves), and its
activation (ActivatePolicy) after a confirmation restating the preview.

Reviewers and admins preview, admins activate, auditors read (services/score/access.py);
every call carries the staff member's own token, and score records who activated."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from kit.logging import get_logger
from kit.principal import Role
from services.portal.backend import ServiceError
from services.portal.pages import Pages
from services.portal.staffcalls.authoring import AuthoringCalls
from services.portal.views import policy as views
from services.portal.views.entries import FieldError
from services.portal.views.errors import refusal_view

log = get_logger(__name__)

READERS = (Role.REVIEWER, Role.AUDITOR, Role.ADMIN)
PREVIEWERS = (Role.REVIEWER, Role.ADMIN)
ACTIVATORS = (Role.ADMIN,)
FLASH = "policy_flash"


def routes(pages: Pages) -> list[BaseRoute]:
    def calls() -> AuthoringCalls:
        return AuthoringCalls(pages.backend)

    async def show(request: Request, staff_role: Role, token: str, **context: Any) -> Response:
        t = pages.t(request)
        activations = await calls().policies(token)
        return pages.render(
            request,
            "staff/policy.html",
            status=context.pop("status", 200),
            section="/staff/policy",
            p=views.active(t, activations),
            can_preview=staff_role in PREVIEWERS,
            can_activate=staff_role in ACTIVATORS,
            done=request.session.pop(FLASH, None),
            lang=pages.language(request),
            **{"errors": [], "candidate": "", "preview": None, "refusal": None, **context},
        )

    async def _active_yaml(token: str) -> str:
        activations = await calls().policies(token)
        return activations[-1].policy_yaml if activations else ""

    async def index(request: Request) -> Response:
        staff = pages.staff(request, *READERS)
        return await show(request, staff.role, staff.token)

    async def _candidate(request: Request) -> tuple[str, dict[str, Any]]:
        form = await pages.form(request)
        return str(form.get("policy_yaml", "")), dict(form)

    async def preview(request: Request) -> Response:
        staff = pages.staff(request, *PREVIEWERS)
        t = pages.t(request)
        candidate, _ = await _candidate(request)
        if not candidate.strip():
            errors = [FieldError("policy_yaml", t.gettext("Paste the candidate policy's YAML."))]
            return await show(request, staff.role, staff.token, status=400, errors=errors)
        try:
            report = await calls().preview_policy(staff.token, candidate)
        except ServiceError as error:
            return await _refused(request, staff.role, staff.token, error, candidate)
        # The matrices in the active policy's tier order (highest first), as on confirmation.
        preview = views.preview(t, report, await _active_yaml(staff.token))
        return await show(request, staff.role, staff.token, candidate=candidate, preview=preview)

    async def activate(request: Request) -> Response:
        staff = pages.staff(request, *ACTIVATORS)
        t = pages.t(request)
        candidate, form = await _candidate(request)
        expected = str(form.get("expected_current", ""))
        if form.get("confirm") != "yes":
            report = await calls().preview_policy(staff.token, candidate)
            return pages.render(
                request,
                "staff/policy_confirm.html",
                section="/staff/policy",
                candidate=candidate,
                expected=report.current_version,
                preview=views.preview(t, report, await _active_yaml(staff.token)),
            )
        try:
            report = await calls().activate_policy(staff.token, candidate, expected)
        except ServiceError as error:
            return await _refused(request, staff.role, staff.token, error, candidate)
        log.info("policy activated", version=report.proposed_version)
        request.session[FLASH] = t.gettext("Policy %(version)s is active.", version=report.proposed_version)
        return RedirectResponse("/staff/policy", status_code=303)

    async def _refused(
        request: Request, role: Role, token: str, error: ServiceError, candidate: str
    ) -> Response:
        if error.code in ("PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
            raise error
        t = pages.t(request)
        view = refusal_view(t, error)
        log.info("policy refused by score", code=error.code)
        return await show(
            request,
            role,
            token,
            status=view.status,
            candidate=candidate,
            refusal=view,
            # Every problem is in the one text area; its path inside the YAML says where.
            errors=[FieldError("policy_yaml", f"{v.field}: {v.message}") for v in view.violations],
        )

    p = pages.page
    return [
        Route("/staff/policy", p(index)),
        Route("/staff/policy/preview", p(preview), methods=["POST"]),
        Route("/staff/policy/activate", p(activate), methods=["POST"]),
    ]
