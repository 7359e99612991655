"""/staff/repairs (reviewers): pending credit repair applications by their decision date (a
number of working days after the application; overdue ones flagged), an application's page
(its entry, evidence of the subject's amends, the subject's history), and the decision:
approve or reject with a reason, confirmed. Reads state the purpose `repair-review`."""

from __future__ import annotations

from starlette.routing import BaseRoute

from services.portal.console.casework import Work
from services.portal.console.casework import routes as casework_routes
from services.portal.pages import Pages
from services.portal.staffcalls import reviews

REPAIRS = Work(
    kind="repair",
    path="/staff/repairs",
    purpose=reviews.REPAIR_REVIEW,
    decisions=reviews.REPAIR_DECISIONS,
    queue=reviews.repair_queue,
    decide=reviews.decide_repair,
    queue_template="staff/repairs.html",
    case_template="staff/repair.html",
    item=lambda entry: entry.repair,
    open_status="pending",
)


def routes(pages: Pages) -> list[BaseRoute]:
    return casework_routes(pages, REPAIRS)
