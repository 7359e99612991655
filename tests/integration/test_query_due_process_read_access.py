"""Query's half of due process over real gRPC on loopback (score's real server writing the
store, authenticated principals, one injected clock; SQLite and PostgreSQL): who may read what:
another subject's entry, consent when the policy requires it, the subject its token names, staff
naming the subject, the portal's public token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any

import grpc
import pytest

from egret.common.v1 import subject_pb2
from egret.query.v1 import query_service_pb2 as pb
from egret.query.v1 import query_service_pb2_grpc as pb_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from kit.principal import Role
from kit.protoconv import to_timestamp
from tests.support.due_process import ALICE, ALICE_ID, BOB, DAY, T0
from tests.support.purposes import purposed
from tests.support.score_and_query import Egret, access_log, code_of, consenting, egret, entry, key, refused
from tests.support.status import error_info

__all__ = ["consenting", "egret"]  # fixtures, used by name


async def test_another_subjects_entry_is_not_found_exactly_as_an_unknown_one(egret: Egret) -> None:
    await egret.apply(
        entry("a1", 10, "civic", days_ago=5), entry("b1", 2, "civic", days_ago=1, subject_key=BOB)
    )
    with pytest.raises(grpc.aio.AioRpcError) as theirs:
        await egret.alice.GetEntry(pb.GetEntryRequest(entry_id="b1"))
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await egret.alice.GetEntry(pb.GetEntryRequest(entry_id="b2"))
    assert theirs.value.code() is unknown.value.code() is grpc.StatusCode.NOT_FOUND
    assert (theirs.value.details() or "").replace("b1", "b2") == unknown.value.details()
    assert (await egret.alice.GetEntry(pb.GetEntryRequest(entry_id="a1"))).entry.entry_id == "a1"
    assert [x.method for x in await access_log(egret, BOB)] == ["ListAccessLog"]


async def test_no_score_without_consent_when_the_policy_requires_it(consenting: Egret) -> None:
    e = consenting
    await e.apply(entry("a1", 10, "civic", days_ago=5), entry("b1", 2, "civic", days_ago=5, subject_key=BOB))
    alice = e.alice
    reads: dict[str, Callable[[], Awaitable[Any]]] = {
        "GetScore": lambda: alice.GetScore(pb.GetScoreRequest(subject=key())),
        "Explain": lambda: alice.Explain(pb.ExplainRequest(subject=key())),
        "ListScoreHistory": lambda: alice.ListScoreHistory(pb.ListScoreHistoryRequest(subject=key())),
        "CheckEligibility": lambda: alice.CheckEligibility(
            pb.CheckEligibilityRequest(subject=key(), benefit_id="library.deposit_free")
        ),
    }
    for name, read in reads.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read()
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION, name
        assert "consent" in (caught.value.details() or "")
    # The subject still sees its entries, so it can dispute them.
    entries = await e.alice.ListEntries(pb.ListEntriesRequest(subject=key()))
    assert [x.entry_id for x in entries.entries] == ["a1"]
    await e.score(ALICE_ID, Role.SUBJECT).SetConsent(score_pb.SetConsentRequest(granted=True))
    for read in reads.values():
        await read()
    assert (await e.alice.GetScore(pb.GetScoreRequest(subject=key()))).score.score == 1010
    # A batch fails whole, naming how many lack consent.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await e.reviewer.BatchGetScores(pb.BatchGetScoresRequest(subjects=[key(), key(BOB)]))
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "1 of the 2 subjects" in (caught.value.details() or "")
    # Consent is judged at the instant asked about: before it was given, still refused.
    e.clock.now = T0 + DAY
    assert (
        await code_of(e.alice.GetScore(pb.GetScoreRequest(subject=key(), as_of=to_timestamp(T0 - DAY))))
        is grpc.StatusCode.FAILED_PRECONDITION
    )


def myself() -> subject_pb2.SubjectRef:
    """An unset SubjectRef: for a subject caller, the subject its token names."""
    return subject_pb2.SubjectRef()


async def test_consent_in_force_is_read_by_its_subject_and_by_staff_stating_a_purpose(
    consenting: Egret,
) -> None:
    e = consenting
    await e.apply(entry("a1", 10, "civic", days_ago=5))
    never = await e.alice.GetConsent(pb.GetConsentRequest(subject=myself()))
    assert (never.HasField("consent"), never.granted, never.consent_required) == (False, False, True)
    assert never.as_of.ToDatetime(UTC) == T0
    assert never.policy_version
    # Without consent a score read is refused with a reason a client can word.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await e.alice.GetScore(pb.GetScoreRequest(subject=myself()))
    assert error_info(caught.value) == ("egret.city", "CONSENT_REQUIRED", {"as_of": T0.isoformat()})
    await e.score(ALICE_ID, Role.SUBJECT).SetConsent(score_pb.SetConsentRequest(granted=True))
    given = await e.alice.GetConsent(pb.GetConsentRequest(subject=key()))
    assert (given.granted, given.consent.granted, given.consent.subject_key) == (True, True, ALICE)
    assert given.consent.effective_at.ToDatetime(UTC) == T0
    # Read at an instant before it was given: none in force then.
    e.clock.now = T0 + DAY
    before = await e.alice.GetConsent(pb.GetConsentRequest(as_of=to_timestamp(T0 - DAY)))
    assert (before.HasField("consent"), before.granted) == (False, False)
    # Staff state a purpose and name the subject; another subject may not read it.
    reviewer = e.query("reviewer-7", Role.REVIEWER)
    assert await refused(reviewer.GetConsent(pb.GetConsentRequest(subject=key()))) == [
        ("purpose", "REQUIRED")
    ]
    assert await refused(reviewer.GetConsent(pb.GetConsentRequest(purpose="subject-request"))) == [
        ("subject", "REQUIRED")
    ]
    staff = await reviewer.GetConsent(pb.GetConsentRequest(subject=key(), purpose="subject-request"))
    assert staff.granted
    assert await code_of(e.bob.GetConsent(pb.GetConsentRequest(subject=key()))) is (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # Each read is on the subject's access log, as every read of its data.
    records = [(x.method, x.role, x.purpose) for x in await access_log(e)]
    assert records[:2] == [
        ("ListAccessLog", "auditor", "audit"),
        ("GetConsent", "reviewer", "subject-request"),
    ]
    assert [m for m, _, _ in records].count("GetConsent") == 4


async def test_a_subject_names_itself_by_its_token_and_staff_must_name_the_subject(egret: Egret) -> None:
    await egret.apply(
        entry("a1", -5, "transport", days_ago=3), entry("b1", 2, "civic", days_ago=1, subject_key=BOB)
    )
    await egret.dispute("a1")
    alice = egret.alice
    assert (await alice.GetScore(pb.GetScoreRequest(subject=myself()))).score.subject_key == ALICE
    assert (await alice.GetScore(pb.GetScoreRequest())).score.score == 995
    entries = await alice.ListEntries(pb.ListEntriesRequest())
    assert [x.entry_id for x in entries.entries] == ["a1"]
    assert (await alice.ListScoreHistory(pb.ListScoreHistoryRequest())).changes
    assert (await alice.Explain(pb.ExplainRequest())).explanation.subject_key == ALICE
    eligibility = await alice.CheckEligibility(pb.CheckEligibilityRequest(benefit_id="library.deposit_free"))
    assert eligibility.reasons
    disputes = await alice.ListDisputes(pb.ListDisputesRequest())
    assert [d.entry_id for d in disputes.disputes] == ["a1"]
    assert not (await alice.GetConsent(pb.GetConsentRequest())).granted
    # Bob's token names Bob: his own data, never Alice's.
    assert (await egret.bob.GetScore(pb.GetScoreRequest())).score.subject_key == BOB
    own = await alice.ListAccessLog(pb.ListAccessLogRequest())
    assert [x.method for x in own.records] == [
        "ListAccessLog",
        "GetConsent",
        "ListDisputes",
        "CheckEligibility",
        "Explain",
        "ListScoreHistory",
        "ListEntries",
        "GetScore",
        "GetScore",
    ]
    assert {x.role for x in own.records} == {"subject"}
    # Staff name the subject: an unset SubjectRef is a field violation, and nothing is recorded.
    reviewer = egret.reviewer
    for call in (
        reviewer.GetScore(pb.GetScoreRequest()),
        reviewer.ListEntries(pb.ListEntriesRequest()),
        reviewer.ListScoreHistory(pb.ListScoreHistoryRequest()),
        reviewer.Explain(pb.ExplainRequest()),
        reviewer.CheckEligibility(pb.CheckEligibilityRequest(benefit_id="library.deposit_free")),
        reviewer.GetConsent(pb.GetConsentRequest()),
        purposed(egret.query("auditor-1", Role.AUDITOR), "audit").ListAccessLog(pb.ListAccessLogRequest()),
    ):
        assert await refused(call) == [("subject", "REQUIRED")]
    assert len(await access_log(egret)) == len(own.records) + 1


async def test_the_portals_public_token_reads_the_catalogue_and_nothing_personal(egret: Egret) -> None:
    await egret.apply(entry("a1", 10, "civic", days_ago=5))
    public = egret.pki.channel(egret.query_address, egret.pki.service_token("portal"))
    egret.channels.append(public)
    query = pb_grpc.QueryServiceStub(public)
    benefits = await query.ListBenefits(pb.ListBenefitsRequest())
    assert "library.deposit_free" in [b.benefit_id for b in benefits.benefits]
    # Each benefit names its provider's principal id: the one CheckEligibility answers about it.
    assert {b.benefit_id: b.provider_id for b in benefits.benefits}["library.deposit_free"] == "library"
    for call in (
        query.GetScore(pb.GetScoreRequest(subject=key(), purpose="audit")),
        query.ListEntries(pb.ListEntriesRequest(subject=key(), purpose="audit")),
        query.GetConsent(pb.GetConsentRequest(subject=key(), purpose="audit")),
        query.ListDisputes(pb.ListDisputesRequest(purpose="audit")),
    ):
        assert await code_of(call) is grpc.StatusCode.PERMISSION_DENIED
    # Another service's token lacks the scope.
    other = egret.pki.channel(egret.query_address, egret.pki.service_token("rules"))
    egret.channels.append(other)
    assert await code_of(pb_grpc.QueryServiceStub(other).ListBenefits(pb.ListBenefitsRequest())) is (
        grpc.StatusCode.PERMISSION_DENIED
    )
