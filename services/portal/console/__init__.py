"""The staff console (issue 14; docs/portal.md, "The staff console"): reviewers decide
disputes and repairs, auditors audit, rule authors validate, backtest and activate, benefit
providers check eligibility. It is part of the portal application and follows its rules:
every call with the staff member's own token (the services decide), CSRF on every form,
the same CSP, both languages. Each area is a module of this package with its own routes;
services.portal.staff says which roles see which area."""

from __future__ import annotations

from starlette.routing import BaseRoute

from services.portal.console import audit, disputes, eligibility, home, policy, repairs, rulesets
from services.portal.pages import Pages


def routes(pages: Pages) -> list[BaseRoute]:
    return [
        *home.routes(pages),
        *disputes.routes(pages),
        *repairs.routes(pages),
        *audit.routes(pages),
        *rulesets.routes(pages),
        *policy.routes(pages),
        *eligibility.routes(pages),
    ]
