"""/staff/disputes (reviewers): the open disputes by deadline, a dispute's page (its entry,
rule and legal basis, evidence, the subject's history around it, the statement), and the
decision: uphold or overturn with a reason, confirmed, then the outcome with the new score.
The queue filters (department, category, overdue, assigned to me, unassigned) are the
service's; the reviewer takes a dispute ("Take this dispute") or releases it.
Reads state the purpose `dispute-review`; the subject sees each in its access log."""

from __future__ import annotations

from starlette.routing import BaseRoute

from services.portal.console.casework import Work
from services.portal.console.casework import routes as casework_routes
from services.portal.pages import Pages
from services.portal.staffcalls import reviews

DISPUTES = Work(
    kind="dispute",
    path="/staff/disputes",
    purpose=reviews.DISPUTE_REVIEW,
    decisions=reviews.DISPUTE_DECISIONS,
    queue=reviews.dispute_queue,
    decide=reviews.resolve_dispute,
    queue_template="staff/disputes.html",
    case_template="staff/dispute.html",
    item=lambda entry: entry.dispute,
    open_status="open",
    assign=reviews.assign_dispute,
)


def routes(pages: Pages) -> list[BaseRoute]:
    return casework_routes(pages, DISPUTES)
