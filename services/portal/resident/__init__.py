"""The signed-in resident's pages: their score, entries, disputes and repairs, history,
benefits, who looked at their data, and their data to take away. Every read is made with
their own token (the services decide what they may see). Each area is a module of this
package with its own routes, as the staff console's are."""

from __future__ import annotations

from starlette.routing import BaseRoute

from services.portal.pages import Pages
from services.portal.resident import access, benefits, contest, download, entries, history


def routes(pages: Pages) -> list[BaseRoute]:
    return [
        *entries.routes(pages),
        *contest.routes(pages),
        *history.routes(pages),
        *benefits.routes(pages),
        *access.routes(pages),
        *download.routes(pages),
    ]
