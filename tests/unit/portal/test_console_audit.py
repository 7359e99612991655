"""The auditor's area (/staff/audit) with fake services: a subject's access log looked up
by a POSTed identifier (never in a URL or a log line), read with the purpose `audit`; the
audit chains' state with an alarm when one does not verify; refusals by role and of
forged forms."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from egret.common.v1 import subject_pb2
from services.portal.backend import ServiceError
from tests.support.portal.console_fakes import StaffBackend
from tests.support.portal.fakes import RAW_ID, csrf_of, signed_in


@pytest.fixture
def backend() -> StaffBackend:
    return StaffBackend()


def as_role(client: TestClient, role: str = "auditor") -> TestClient:
    signed_in(client, role)
    client.get("/language/en?next=/staff")
    return client


def test_an_auditor_reads_a_subjects_access_log_by_the_identifier_the_resident_gave(
    client: TestClient, backend: StaffBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    form = as_role(client).get("/staff/audit")
    assert form.status_code == 200
    assert 'method="post" action="/staff/audit"' in form.text
    response = client.post(
        "/staff/audit",
        data={
            "csrf_token": csrf_of(form.text),
            "scheme": "resident-id",
            "identifier": RAW_ID,
            "note": "case 7",
        },
    )
    assert response.status_code == 200
    assert "reviewer-1" in response.text
    assert "Reviewing a dispute you filed (dispute-review)" in response.text
    (asked,) = backend.asked("ListAccessLog")
    assert asked.purpose == "audit"
    assert asked.purpose_note == "case 7"
    # The identifier goes to query in the SubjectRef, which hashes it; the portal does not.
    assert (asked.subject.subject.kind, asked.subject.subject.id_scheme, asked.subject.subject.id_value) == (
        subject_pb2.SUBJECT_KIND_PERSON,
        "resident-id",
        RAW_ID,
    )
    assert RAW_ID not in str(response.url)
    captured = capsys.readouterr()
    assert RAW_ID not in captured.out + captured.err


def test_the_lookup_form_is_checked_and_a_refusal_is_said_in_words(
    client: TestClient, backend: StaffBackend
) -> None:
    token = csrf_of(as_role(client).get("/staff/audit").text)
    empty = client.post(
        "/staff/audit", data={"csrf_token": token, "scheme": "resident-id", "identifier": " "}
    )
    assert empty.status_code == 400
    assert "Type the identifier the resident gave." in empty.text
    assert backend.asked("ListAccessLog") == []

    def refuse(request: object) -> object:
        raise ServiceError("INVALID_ARGUMENT", f"bad check character in {RAW_ID}")

    backend.handlers[("query", "ListAccessLog")] = refuse
    refused = client.post(
        "/staff/audit", data={"csrf_token": token, "scheme": "resident-id", "identifier": "12"}
    )
    assert refused.status_code == 400
    assert "Something in the request was not right" in refused.text
    forged = client.post(
        "/staff/audit", data={"csrf_token": "x", "scheme": "resident-id", "identifier": RAW_ID}
    )
    assert forged.status_code == 403


def test_the_chains_page_shows_each_service_and_alarms_when_one_does_not_verify(
    client: TestClient, backend: StaffBackend
) -> None:
    intact = as_role(client, "admin").get("/staff/audit/chains")
    assert intact.status_code == 200
    assert intact.text.count("Intact: 12 records verified") == 3
    assert "An audit log does not verify" not in intact.text
    assert f"Anchor: <code>12:{'b' * 64}</code>" in intact.text
    assert "Not checked from here" in intact.text
    assert "python -m services.ingest verify-audit" in intact.text
    backend.broken.add("score")
    broken = client.get("/staff/audit/chains")
    assert 'role="alert"' in broken.text
    assert "The chain of score is broken" in broken.text
    assert "seq 3: content does not match its hash" in broken.text

    def down(request: object) -> object:
        raise ServiceError("UNAVAILABLE", "connection refused")

    backend.handlers[("rules.audit", "VerifyAuditChain")] = down
    assert "The credit service cannot answer right now" in client.get("/staff/audit/chains").text


@pytest.mark.parametrize("role", ["subject", "reviewer", "benefit_provider"])
def test_only_auditors_and_admins_audit(client: TestClient, backend: StaffBackend, role: str) -> None:
    as_role(client, role)
    assert client.get("/staff/audit").status_code == 403
    assert client.get("/staff/audit/chains").status_code == 403
    assert client.post("/staff/audit", data={"identifier": RAW_ID}).status_code == 403
    assert backend.rpcs == []
