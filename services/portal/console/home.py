"""/staff: the areas of the console open to the signed-in staff member's role."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.portal.pages import Pages
from services.portal.staff import STAFF_ROLES
from services.portal.views import words


def routes(pages: Pages) -> list[BaseRoute]:
    async def home(request: Request) -> Response:
        staff = pages.staff(request, *STAFF_ROLES)
        return pages.render(
            request, "staff/home.html", section="/staff", role_name=words.role(pages.t(request), staff.role)
        )

    return [Route("/staff", pages.page(home))]
