"""The benefit provider's area (/staff/eligibility) with fake services: a subject's
eligibility for one of the provider's own benefits, the subject named by a POSTed
identifier (never in a URL or a log line), read with the purpose `eligibility-check`; the
answer in words in both languages; refusals in words; refusals by role and of forged forms."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from starlette.testclient import TestClient

from egret.common.v1 import subject_pb2
from egret.query.v1 import query_service_pb2 as query_pb
from services.portal import records as r
from services.portal.backend import ServiceError, Violation
from tests.support.portal.console_fakes import StaffBackend
from tests.support.portal.fakes import RAW_ID, csrf_of, signed_in
from tests.support.portal.samples import NOW

METRO = "metro"


class ProviderBackend(StaffBackend):
    """StaffBackend with a catalogue of two providers' benefits and CheckEligibility."""

    def __init__(self) -> None:
        super().__init__()
        self.handlers[("query", "CheckEligibility")] = self._check

    async def benefits(self, token: str | None) -> tuple[r.Benefit, ...]:
        self._record("benefits")
        return (
            r.Benefit(
                "library.deposit_free",
                "Borrow books",
                "Library",
                ("civic",),
                False,
                ("person",),
                "A",
                "library",
            ),
            r.Benefit(
                "metro.discount",
                "Discounted metro fares",
                "Metro",
                ("transport",),
                False,
                ("person",),
                "AA",
                METRO,
            ),
        )

    def _check(self, request: query_pb.CheckEligibilityRequest) -> query_pb.CheckEligibilityResponse:
        as_of = Timestamp()
        as_of.FromDatetime(NOW)
        return query_pb.CheckEligibilityResponse(
            eligible=False,
            reasons=[
                query_pb.EligibilityReason(
                    path="condition",
                    condition="tier at least AA",
                    met=False,
                    explanation="tier A is below AA",
                    entry_ids=["e" * 64, "f" * 64],
                )
            ],
            purpose_bound_score=query_pb.PurposeBoundScore(considers=["transport"], score=1010, tier="A"),
            as_of=as_of,
            policy_version="2026.2",
        )


@pytest.fixture
def backend() -> ProviderBackend:
    return ProviderBackend()


def as_provider(client: TestClient, language: str = "en", role: str = "benefit_provider") -> TestClient:
    signed_in(client, role, sub=METRO)
    client.get(f"/language/{language}?next=/staff")
    return client


def check(client: TestClient, token: str, **fields: str) -> Any:
    data = {"csrf_token": token, "benefit": "metro.discount", "scheme": "resident-id", "identifier": RAW_ID}
    return client.post("/staff/eligibility", data={**data, **fields})


def test_a_provider_checks_a_subject_for_its_own_benefit_and_reads_the_answer_in_words(
    client: TestClient, backend: ProviderBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    form = as_provider(client).get("/staff/eligibility")
    assert form.status_code == 200
    assert 'method="post" action="/staff/eligibility"' in form.text
    # Only the provider's own benefits are offered.
    assert 'value="metro.discount"' in form.text
    assert "library.deposit_free" not in form.text
    assert (
        "Checking eligibility for a benefit or service the subject applied for (eligibility-check)"
        in form.text
    )
    response = check(client, csrf_of(form.text), note="application 2026-41")
    assert response.status_code == 200
    assert "Not eligible: the subject does not meet this benefit&#39;s conditions now." in response.text
    assert "tier at least AA" in response.text
    assert "Rests on 2 entries." in response.text
    assert "1,010 (tier A)" in response.text
    assert "Transport" in response.text
    (asked,) = backend.asked("CheckEligibility")
    assert (asked.benefit_id, asked.purpose, asked.purpose_note) == (
        "metro.discount",
        "eligibility-check",
        "application 2026-41",
    )
    # The identifier goes to query in the SubjectRef, which hashes it; the portal does not.
    assert (asked.subject.subject.kind, asked.subject.subject.id_scheme, asked.subject.subject.id_value) == (
        subject_pb2.SUBJECT_KIND_PERSON,
        "resident-id",
        RAW_ID,
    )
    # No entry id reaches the provider: only how many entries the answer rests on.
    assert "e" * 64 not in response.text
    assert RAW_ID not in str(response.url)
    captured = capsys.readouterr()
    assert RAW_ID not in captured.out + captured.err


def test_the_answer_in_chinese(client: TestClient, backend: ProviderBackend) -> None:
    form = as_provider(client, "zh_Hans").get("/staff/eligibility")
    response = check(client, csrf_of(form.text))
    assert response.status_code == 200
    assert "不符合条件" in response.text
    assert "资格核验" in form.text


def test_the_form_is_checked_before_anything_is_read(client: TestClient, backend: ProviderBackend) -> None:
    token = csrf_of(as_provider(client).get("/staff/eligibility").text)
    other = check(client, token, benefit="library.deposit_free", identifier=" ")
    assert other.status_code == 400
    assert "Choose one of your organisation&#39;s benefits." in other.text
    assert "Type the identifier the resident gave." in other.text
    assert backend.asked("CheckEligibility") == []


@pytest.mark.parametrize(
    ("error", "status", "words"),
    [
        (
            ServiceError("NOT_FOUND", "no score is held for this subject"),
            404,
            "No credit record for this subject",
        ),
        (
            ServiceError("PERMISSION_DENIED", "a benefit provider may check only its own benefits"),
            403,
            "Not one of your benefits",
        ),
        (
            ServiceError(
                "INVALID_ARGUMENT",
                "invalid request",
                (Violation("purpose", "one of: eligibility-check", "NOT_PERMITTED"),),
            ),
            400,
            "does not accept this purpose from your role",
        ),
        (
            ServiceError(
                "INVALID_ARGUMENT", f"bad {RAW_ID}", (Violation("subject.id_value", "bad check", "INVALID"),)
            ),
            400,
            "This is not a valid identifier of that kind",
        ),
    ],
)
def test_refusals_are_said_in_words(
    client: TestClient, backend: ProviderBackend, error: ServiceError, status: int, words: str
) -> None:
    def refuse(request: object) -> object:
        raise error

    backend.handlers[("query", "CheckEligibility")] = refuse
    response = check(client, csrf_of(as_provider(client).get("/staff/eligibility").text))
    assert response.status_code == status
    assert words in response.text
    assert RAW_ID not in response.text.replace(f'value="{RAW_ID}"', "")


def test_a_forged_form_is_refused(client: TestClient, backend: ProviderBackend) -> None:
    as_provider(client).get("/staff/eligibility")
    assert check(client, "forged").status_code == 403
    assert backend.asked("CheckEligibility") == []


@pytest.mark.parametrize("role", ["subject", "reviewer", "auditor"])
def test_only_benefit_providers_check_eligibility(
    client: TestClient, backend: ProviderBackend, role: str
) -> None:
    as_provider(client, role=role)
    page = client.get("/staff/eligibility")
    assert page.status_code == 403
    assert client.post("/staff/eligibility", data={"identifier": RAW_ID}).status_code == 403
    assert backend.rpcs == []
