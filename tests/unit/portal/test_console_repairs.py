"""The reviewer's repair area (/staff/repairs) with fake services: the queue by decision
date with the overdue flagged, an application's page, the decision with its confirmation,
a second reviewer refused in words, refusals by role and of forged forms."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from egret.common.v1 import due_process_pb2 as dp
from services.portal.staffcalls.reviews import REPAIR_REVIEW
from tests.support.portal.console_fakes import SUBJECT_KEY, StaffBackend
from tests.support.portal.fakes import csrf_of, signed_in

LATE = "1" * 64
DUE = "2" * 64


@pytest.fixture
def backend() -> StaffBackend:
    staff = StaffBackend()
    staff.add_repair(DUE, days_left=3)
    staff.add_repair(LATE, days_left=-1)
    return staff


def as_role(client: TestClient, role: str = "reviewer") -> TestClient:
    signed_in(client, role)
    client.get("/language/en?next=/staff")
    return client


def test_the_queue_lists_pending_applications_by_decision_date_and_flags_the_overdue(
    client: TestClient, backend: StaffBackend
) -> None:
    text = as_role(client).get("/staff/repairs").text
    assert text.index(f"/staff/repairs/{LATE}") < text.index(f"/staff/repairs/{DUE}")
    assert text.count('class="overdue"') == 1
    assert "1 day overdue" in text
    assert "3 days left" in text
    assert "I paid the whole debt" in text
    (listed,) = backend.asked("ListRepairApplications")
    assert (listed.purpose, listed.status) == (REPAIR_REVIEW, dp.REPAIR_STATUS_PENDING)
    assert {r.purpose for r in backend.asked("GetEntry")} == {REPAIR_REVIEW}
    only_late = client.get("/staff/repairs?overdue=yes").text
    assert LATE in only_late
    assert DUE not in only_late
    assert SUBJECT_KEY not in text


def test_an_application_is_decided_with_a_reason_after_a_confirmation(
    client: TestClient, backend: StaffBackend
) -> None:
    url = f"/staff/repairs/{DUE}"
    page = as_role(client).get(url)
    assert "What the subject did to put things right" in page.text
    assert "https://example.org/receipt" in page.text
    form = {"csrf_token": csrf_of(page.text), "item_id": backend.cases[DUE].repair.application_id}
    missing = client.post(url, data={**form, "decision": "approve"})
    assert missing.status_code == 400
    assert "Give the reason for your decision." in missing.text
    check = client.post(url, data={**form, "decision": "approve", "reason": "Paid in full."})
    assert "Approve: the entry stops counting from now on" in check.text
    assert backend.asked("DecideRepair") == []
    done = client.post(url, data={**form, "decision": "approve", "reason": "Paid in full.", "confirm": "yes"})
    assert done.status_code == 200
    (decided,) = backend.asked("DecideRepair")
    assert (decided.decision, decided.reason) == (dp.REPAIR_DECISION_APPROVE, "Paid in full.")
    assert "Your decision has been recorded." in done.text
    assert "Approved: the entry no longer counts" in done.text
    assert "repair.decide by reviewer-1" in done.text
    again = client.post(url, data={**form, "decision": "reject", "reason": "No.", "confirm": "yes"})
    assert again.status_code == 409
    assert "Another reviewer decided this before you did (Approved: the entry no longer counts)" in again.text
    assert backend.cases[DUE].repair.status == dp.REPAIR_STATUS_APPROVED


def test_a_forged_form_is_refused(client: TestClient, backend: StaffBackend) -> None:
    as_role(client)
    response = client.post(
        f"/staff/repairs/{DUE}",
        data={"csrf_token": "x", "decision": "approve", "reason": "y", "confirm": "yes"},
    )
    assert response.status_code == 403
    assert backend.asked("DecideRepair") == []


@pytest.mark.parametrize("role", ["subject", "auditor", "benefit_provider"])
def test_only_a_reviewer_decides_repairs(client: TestClient, backend: StaffBackend, role: str) -> None:
    as_role(client, role)
    assert client.get("/staff/repairs").status_code == 403
    assert client.get(f"/staff/repairs/{DUE}").status_code == 403
    assert backend.rpcs == []
