"""The reviewer's disputes area (/staff/disputes) with fake services: the queue by
deadline with its filters, a dispute's page, the decision with its confirmation, a second
reviewer refused in words, refusals by role and of forged forms."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from egret.common.v1 import due_process_pb2 as dp
from egret.query.v1 import query_service_pb2 as query_pb
from services.portal.backend import ServiceError
from services.portal.staffcalls.reviews import DISPUTE_REVIEW
from tests.support.portal.console_fakes import FRESH_ENTRY, OVERDUE_ENTRY, SUBJECT_KEY, StaffBackend
from tests.support.portal.fakes import csrf_of, signed_in


@pytest.fixture
def backend() -> StaffBackend:
    return StaffBackend()


def reviewer(client: TestClient, role: str = "reviewer", sub: str = "reviewer-1") -> TestClient:
    signed_in(client, role, sub=sub)
    client.get("/language/en?next=/staff")
    return client


def test_the_queue_lists_open_disputes_by_deadline_and_flags_the_overdue(
    client: TestClient, backend: StaffBackend
) -> None:
    page = reviewer(client).get("/staff/disputes")
    assert page.status_code == 200
    text = page.text
    assert text.index(f"/staff/disputes/{OVERDUE_ENTRY}") < text.index(f"/staff/disputes/{FRESH_ENTRY}")
    assert text.count('class="overdue"') == 1
    assert "2 days overdue" in text
    assert "15 days left" in text
    # Every read states the reviewer's purpose, with the reviewer's own token.
    (listed,) = backend.asked("ListDisputes")
    assert (listed.purpose, listed.status) == (DISPUTE_REVIEW, dp.DISPUTE_STATUS_OPEN)
    assert {r.purpose for r in backend.asked("GetEntry")} == {DISPUTE_REVIEW}
    assert all(token != "" for *_, token in backend.rpcs)
    assert SUBJECT_KEY not in text


def test_the_queue_filters_are_the_services_and_apply_to_the_whole_queue(
    client: TestClient, backend: StaffBackend
) -> None:
    reviewer(client)
    metro = client.get("/staff/disputes?department=metro").text
    assert OVERDUE_ENTRY in metro
    assert FRESH_ENTRY not in metro
    assert 'value="metro"' in metro
    civic = client.get("/staff/disputes?category=civic").text
    assert FRESH_ENTRY in civic
    assert OVERDUE_ENTRY not in civic
    assert '<option value="civic" selected>' in civic
    assert '<option value="finance">' in civic  # every category is offered, not only the page's
    overdue = client.get("/staff/disputes?overdue=yes").text
    assert OVERDUE_ENTRY in overdue
    assert FRESH_ENTRY not in overdue
    nothing = client.get("/staff/disputes?department=metro&category=civic").text
    assert "No open dispute matches." in nothing
    # Each filter is sent to query, which filters (and pages) the whole queue.
    sent = backend.asked("ListDisputes")
    assert [(r.department, r.category, r.overdue_only) for r in sent] == [
        ("metro", "", False),
        ("", "civic", False),
        ("", "", True),
        ("metro", "civic", False),
    ]


def test_the_queue_shows_who_holds_each_dispute_and_filters_mine_and_unassigned(
    client: TestClient, backend: StaffBackend
) -> None:
    backend.cases[OVERDUE_ENTRY].dispute.assignee = "reviewer-1"
    backend.cases[FRESH_ENTRY].dispute.assignee = "reviewer-2"
    backend.add_dispute("d" * 64, "metro", "transport", "Second fare evasion", days_left=5)
    reviewer(client)
    everything = client.get("/staff/disputes").text
    assert "<td>You</td>" in everything
    assert "<td>reviewer-2</td>" in everything
    assert "<td>No one</td>" in everything
    mine = client.get("/staff/disputes?held=me").text
    assert OVERDUE_ENTRY in mine
    assert FRESH_ENTRY not in mine
    assert "d" * 64 not in mine
    assert '<option value="me" selected>' in mine
    unassigned = client.get("/staff/disputes?held=none").text
    assert "d" * 64 in unassigned
    assert OVERDUE_ENTRY not in unassigned
    assert FRESH_ENTRY not in unassigned
    sent = backend.asked("ListDisputes")
    assert [(r.assigned_to_caller, r.unassigned_only) for r in sent] == [
        (False, False),
        (True, False),
        (False, True),
    ]
    client.get("/staff/disputes?held=someone")  # not a choice: every holder
    assert backend.asked("ListDisputes")[-1].assigned_to_caller is False


def test_the_next_page_keeps_the_filters(client: TestClient, backend: StaffBackend) -> None:
    def paged(request: object) -> object:
        return query_pb.ListDisputesResponse(next_page_token="tok/2")

    backend.handlers[("query", "ListDisputes")] = paged
    page = reviewer(client).get("/staff/disputes?department=metro&held=me&overdue=yes").text
    assert 'href="/staff/disputes?department=metro&amp;overdue=yes&amp;held=me&amp;page=tok%2F2"' in page


def test_a_reviewer_takes_a_dispute_then_releases_it(client: TestClient, backend: StaffBackend) -> None:
    url = f"/staff/disputes/{OVERDUE_ENTRY}"
    page = reviewer(client).get(url).text
    assert "Take this dispute" in page
    assert "No one" in page
    form = {"csrf_token": csrf_of(page), "item_id": "1"}
    taken = client.post(url + "/assign", data={**form, "action": "take"}, follow_redirects=False)
    assert (taken.status_code, taken.headers["location"]) == (303, url)
    (asked,) = backend.asked("AssignDispute")
    assert (asked.dispute_id, asked.release, asked.assignee) == ("1", False, "")
    assert backend.cases[OVERDUE_ENTRY].dispute.assignee == "reviewer-1"
    held = client.get(url).text
    assert "You have taken this dispute." in held
    assert "Release" in held
    assert "Take this dispute" not in held
    released = client.post(url + "/assign", data={**form, "action": "release"})
    assert released.status_code == 200
    assert "You have released this dispute." in released.text
    assert backend.asked("AssignDispute")[-1].release
    assert backend.cases[OVERDUE_ENTRY].dispute.assignee == ""
    # Every call with the reviewer's own token.
    assert all(token != "" for *_, token in backend.rpcs)


def test_a_dispute_another_reviewer_holds_is_refused_in_words_in_both_languages(
    client: TestClient, backend: StaffBackend
) -> None:
    url = f"/staff/disputes/{OVERDUE_ENTRY}"
    page = reviewer(client).get(url).text
    form = {"csrf_token": csrf_of(page), "item_id": "1"}
    backend.cases[OVERDUE_ENTRY].dispute.assignee = "reviewer-2"  # taken meanwhile
    refused = client.post(url + "/assign", data={**form, "action": "take"})
    assert refused.status_code == 409
    assert "Another reviewer (reviewer-2) has taken this dispute" in refused.text
    assert "Take this dispute" not in refused.text  # the page as it stands now
    decided = client.post(
        url, data={**form, "decision": "uphold", "reason": "The fare was not paid.", "confirm": "yes"}
    )
    assert decided.status_code == 409
    assert "Another reviewer (reviewer-2) has taken this dispute" in decided.text
    assert backend.cases[OVERDUE_ENTRY].dispute.status == dp.DISPUTE_STATUS_OPEN
    client.get(f"/language/zh_Hans?next={url}")
    zh = client.post(url + "/assign", data={**form, "action": "take"})
    assert "另一位复核人员（reviewer-2）已领取此异议" in zh.text  # noqa: RUF001


def test_taking_needs_the_forms_token_and_a_known_action(client: TestClient, backend: StaffBackend) -> None:
    url = f"/staff/disputes/{OVERDUE_ENTRY}"
    page = reviewer(client).get(url).text
    forged = client.post(url + "/assign", data={"csrf_token": "forged", "item_id": "1", "action": "take"})
    assert forged.status_code == 403
    steal = {"csrf_token": csrf_of(page), "item_id": "1", "action": "steal"}
    unknown = client.post(url + "/assign", data=steal)
    assert unknown.status_code == 400
    assert backend.asked("AssignDispute") == []


def test_a_dispute_page_shows_the_entry_its_rule_evidence_history_and_statement(
    client: TestClient, backend: StaffBackend
) -> None:
    page = reviewer(client).get(f"/staff/disputes/{OVERDUE_ENTRY}")
    assert page.status_code == 200
    for shown in (
        "Metro fare evasion at Lianban",
        "Urban Rail Transit Operation Management Provisions, art. 40",
        "metro.fare_evaded",
        "Lianban",
        "I had a valid ticket; the gate was broken.",
        "(this entry)",
        "Overdue",
    ):
        assert shown in page.text, shown
    (history,) = backend.asked("ListScoreHistory")
    assert (history.purpose, history.subject.subject_key) == (DISPUTE_REVIEW, SUBJECT_KEY)
    assert SUBJECT_KEY not in page.text
    assert reviewer(client).get(f"/staff/disputes/{'0' * 64}").status_code == 404
    assert client.get("/staff/disputes/not%20an%20id").status_code == 404


def test_a_decision_needs_a_reason_and_a_confirmation_then_shows_the_outcome(
    client: TestClient, backend: StaffBackend
) -> None:
    page = reviewer(client).get(f"/staff/disputes/{OVERDUE_ENTRY}")
    token = csrf_of(page.text)
    url = f"/staff/disputes/{OVERDUE_ENTRY}"
    form = {"csrf_token": token, "item_id": "1"}

    missing = client.post(url, data={**form, "reason": "  "})
    assert missing.status_code == 400
    assert "Choose a decision." in missing.text
    assert "Give the reason for your decision." in missing.text
    assert 'href="#decision"' in missing.text
    assert 'href="#reason"' in missing.text

    check = client.post(url, data={**form, "decision": "overturn", "reason": "The gate log shows a fault."})
    assert check.status_code == 200
    assert "Check your decision" in check.text
    assert "Overturn: the entry is withdrawn" in check.text
    assert backend.asked("ResolveDispute") == []

    edit = client.post(url, data={**form, "decision": "overturn", "reason": "The gate log.", "edit": "yes"})
    assert "The gate log." in edit.text
    assert "Check your decision" not in edit.text

    done = client.post(
        url,
        data={**form, "decision": "overturn", "reason": "The gate log shows a fault.", "confirm": "yes"},
        follow_redirects=False,
    )
    assert (done.status_code, done.headers["location"]) == (303, url)
    (resolved,) = backend.asked("ResolveDispute")
    assert (resolved.dispute_id, resolved.decision) == ("1", dp.DISPUTE_DECISION_OVERTURN)
    assert resolved.reason == "The gate log shows a fault."
    outcome = client.get(url).text
    assert "Your decision has been recorded." in outcome
    assert "Decided: the entry was withdrawn" in outcome
    assert "dispute.resolve by reviewer-1" in outcome
    assert "1,000, tier A" in outcome  # the new score, read with the same purpose
    assert backend.asked("GetScore")[-1].purpose == DISPUTE_REVIEW
    # Shown once: a reload no longer says "your decision".
    assert "Your decision has been recorded." not in client.get(url).text


def test_a_second_reviewer_is_told_it_was_already_decided_and_nothing_is_decided_twice(
    client: TestClient, backend: StaffBackend
) -> None:
    url = f"/staff/disputes/{OVERDUE_ENTRY}"
    # Both reviewers opened the page while the dispute was open.
    token = csrf_of(reviewer(client).get(url).text)
    form = {"csrf_token": token, "item_id": "1", "confirm": "yes"}
    first = client.post(url, data={**form, "decision": "uphold", "reason": "The fare was not paid."})
    assert first.status_code == 200  # followed to the outcome
    second = client.post(url, data={**form, "decision": "overturn", "reason": "The gate was broken."})
    assert second.status_code == 409
    assert "Another reviewer decided this before you did (Decided: the entry stands)" in second.text
    assert "Your decision was not recorded" in second.text
    assert "The fare was not paid." in second.text  # the decision that stands
    assert backend.cases[OVERDUE_ENTRY].dispute.status == dp.DISPUTE_STATUS_UPHELD


def test_a_forged_form_is_refused_and_nothing_is_decided(client: TestClient, backend: StaffBackend) -> None:
    reviewer(client)
    response = client.post(
        f"/staff/disputes/{OVERDUE_ENTRY}",
        data={
            "csrf_token": "forged",
            "item_id": "1",
            "decision": "overturn",
            "reason": "x",
            "confirm": "yes",
        },
    )
    assert response.status_code == 403
    assert "This form has expired" in response.text
    assert backend.asked("ResolveDispute") == []


@pytest.mark.parametrize("role", ["subject", "auditor", "benefit_provider", "admin"])
def test_only_a_reviewer_works_disputes(client: TestClient, backend: StaffBackend, role: str) -> None:
    reviewer(client, role)
    for path in ("/staff/disputes", f"/staff/disputes/{OVERDUE_ENTRY}"):
        response = client.get(path)
        assert response.status_code == 403
        assert "This page is not part of your work" in response.text
    posted = client.post(f"/staff/disputes/{OVERDUE_ENTRY}", data={"decision": "uphold", "reason": "x"})
    assert posted.status_code == 403
    taken = client.post(f"/staff/disputes/{OVERDUE_ENTRY}/assign", data={"item_id": "1", "action": "take"})
    assert taken.status_code == 403
    assert backend.rpcs == []


def test_a_refusal_of_the_service_is_said_in_words(client: TestClient, backend: StaffBackend) -> None:
    def refuse(request: object) -> object:
        raise ServiceError("PERMISSION_DENIED", "role reviewer may not call ListDisputes")

    backend.handlers[("query", "ListDisputes")] = refuse
    response = reviewer(client).get("/staff/disputes")
    assert response.status_code == 403
    assert "You are not allowed to see or do this" in response.text


def test_the_queue_in_chinese(client: TestClient) -> None:
    signed_in(client, "reviewer")
    page = client.get("/staff/disputes")
    assert page.status_code == 200
    assert 'lang="zh-CN"' in page.text or 'lang="zh-Hans"' in page.text
    assert "Disputes to decide" not in page.text
