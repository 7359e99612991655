"""Due process through score's real gRPC server on loopback, with authenticated principals
and one injected clock, on SQLite and PostgreSQL: disputes (filing, lapse at the deadline
written by the sweep, uphold, overturn), repairs, consent, reversals from ApplyOutcomes,
history rows and the audit chain.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from contracts.score_store import ScoreAuditHead, ScoreAuditLog, StoredEntry, StoredHistory, StoredScore
from devtools.localpki import LocalPki, create_local_pki
from egret.common.v1 import due_process_pb2 as dp
from egret.common.v1 import event_pb2, outcome_pb2
from egret.score.v1 import score_service_pb2 as pb
from egret.score.v1 import score_service_pb2_grpc as pb_grpc
from kit import audit
from kit.principal import Role
from kit.protoconv import to_timestamp
from services.score.bootstrap import MIGRATIONS, build
from tests.support.due_process import ALICE, ALICE_ID, BOB, BOB_ID, DAY, T0, Clock, negative, secured
from tests.support.outcomes import oid, outcome
from tests.support.score import score_settings
from tests.support.servers import running
from tests.support.status import bad_request, error_info
from tests.support.waiting import until

MINOR = outcome_pb2.SEVERITY_MINOR


@dataclass
class Score:
    clock: Clock
    pki: LocalPki
    address: str
    database_url: str
    channels: list[grpc.aio.Channel]

    def as_(self, subject: str, role: Role) -> pb_grpc.ScoreServiceAsyncStub:
        channel = self.pki.channel(self.address, self.pki.token(subject, role))
        self.channels.append(channel)
        return pb_grpc.ScoreServiceStub(channel)

    @property
    def alice(self) -> pb_grpc.ScoreServiceAsyncStub:
        return self.as_(ALICE_ID, Role.SUBJECT)

    @property
    def bob(self) -> pb_grpc.ScoreServiceAsyncStub:
        return self.as_(BOB_ID, Role.SUBJECT)

    @property
    def reviewer(self) -> pb_grpc.ScoreServiceAsyncStub:
        return self.as_("reviewer-7", Role.REVIEWER)

    @property
    def rules(self) -> pb_grpc.ScoreServiceAsyncStub:
        channel = self.pki.channel(self.address, self.pki.service_token("rules"))
        self.channels.append(channel)
        return pb_grpc.ScoreServiceStub(channel)

    async def apply(self, *outcomes: outcome_pb2.Outcome, reversals: tuple[pb.Reversal, ...] = ()) -> Any:
        return await self.rules.ApplyOutcomes(pb.ApplyOutcomesRequest(outcomes=outcomes, reversals=reversals))

    def read(self, work: Callable[[Any], Any]) -> Any:
        engine = sa.create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return work(connection)
        finally:
            engine.dispose()

    def history(self, subject_key: str) -> list[Any]:
        return list(
            self.read(
                lambda c: c.execute(
                    sa.select(StoredHistory)
                    .where(StoredHistory.subject_key == subject_key)
                    .order_by(StoredHistory.history_id)
                ).all()
            )
        )

    def status(self, entry_id: str) -> str:
        return str(
            self.read(
                lambda c: c.scalar(sa.select(StoredEntry.status).where(StoredEntry.entry_id == entry_id))
            )
        )

    def score(self, subject_key: str) -> int:
        return int(
            self.read(
                lambda c: c.scalar(sa.select(StoredScore.score).where(StoredScore.subject_key == subject_key))
            )
        )

    def verify_audit(self) -> audit.ChainReport:
        engine = sa.create_engine(self.database_url)
        try:
            with Session(engine) as session:
                return audit.verify(session, ScoreAuditLog, ScoreAuditHead)
        finally:
            engine.dispose()


@pytest.fixture
async def score(database_url: str, tmp_path: Path) -> AsyncIterator[Score]:
    pki = create_local_pki(tmp_path / "pki")
    clock = Clock(T0)
    settings = secured(score_settings(database_url, tmp_path), pki)
    async with running(settings, functools.partial(build, clock=clock), MIGRATIONS) as address:
        s = Score(clock, pki, address, database_url, [])
        try:
            yield s
        finally:
            for channel in s.channels:
                await channel.close()


def retraction(outcome_id: str, subject_key: str, event_id: str) -> pb.Reversal:
    return pb.Reversal(
        outcome_id=outcome_id,
        retraction=dp.Retraction(
            ref=event_pb2.EventRef(source="library", event_id=event_id),
            subject_key=subject_key,
            reason="sent in error",
            retracted_at=to_timestamp(T0),
            retracted_by="library",
        ),
    )


async def expect(code: grpc.StatusCode, call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    return raised.value


def notes(rows: list[Any]) -> list[tuple[str, str, list[str], list[str]]]:
    return [(r.cause, r.note, json.loads(r.ended_entry_ids), json.loads(r.resumed_entry_ids)) for r in rows]


async def test_a_dispute_lapses_at_its_deadline_and_counts_again_when_upheld(score: Score) -> None:
    await score.apply(negative(oid("o1"), ALICE))
    assert score.score(ALICE) == 990
    filed = (
        await score.alice.FileDispute(pb.FileDisputeRequest(entry_id=oid("o1"), statement="not me"))
    ).dispute
    deadline = T0 + 20 * DAY
    assert (filed.status, filed.filed_by_role, filed.deadline.ToDatetime(UTC)) == (
        dp.DISPUTE_STATUS_OPEN,
        "subject",
        deadline,
    )
    assert score.status(oid("o1")) == "disputed"
    # The instant before the deadline nothing happens; then the sweep writes the lapse at
    # the exact deadline, with no new event.
    score.clock.now = before = deadline - timedelta(microseconds=1)
    # Nothing else reads the clock meanwhile, and a sweep round reads it twice (the expiry
    # sweep first, then the overdue repairs): four reads at `before` include a whole expiry
    # sweep at it, even if a round read it up to three times.
    await until(lambda: score.clock.reads[before] >= 4, what="a whole sweep round at the deadline's eve")
    assert score.score(ALICE) == 990
    score.clock.now = deadline + 3 * DAY

    def lapsed() -> None:
        assert score.score(ALICE) == 1000

    await until(lapsed, what="the dispute's lapse restoring ALICE's score")
    rows = score.history(ALICE)
    lapse = rows[-1]
    assert (lapse.cause, lapse.changed_at.replace(tzinfo=UTC), lapse.score_before, lapse.score) == (
        "dispute",
        deadline,
        990,
        1000,
    )
    upheld = (
        await score.reviewer.ResolveDispute(
            pb.ResolveDisputeRequest(
                dispute_id=filed.dispute_id, decision=dp.DISPUTE_DECISION_UPHOLD, reason="the record is right"
            )
        )
    ).dispute
    assert (upheld.status, upheld.resolved_by, upheld.overdue) == (
        dp.DISPUTE_STATUS_UPHELD,
        "reviewer-7",
        False,
    )
    assert score.score(ALICE) == 990
    assert score.status(oid("o1")) == "active"
    assert notes(score.history(ALICE))[1:] == [
        ("dispute", f"dispute {filed.dispute_id} filed", [], []),
        ("dispute", f"dispute {filed.dispute_id} undecided at its deadline", [oid("o1")], []),
        ("dispute", f"dispute {filed.dispute_id} upheld: the record is right", [], [oid("o1")]),
    ]
    # Decided once.
    error = await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        score.reviewer.ResolveDispute(
            pb.ResolveDisputeRequest(
                dispute_id=filed.dispute_id, decision=dp.DISPUTE_DECISION_OVERTURN, reason="x"
            )
        ),
    )
    assert error_info(error) == ("egret.city", "ALREADY_DECIDED", {"status": "upheld"})


async def test_a_reviewer_takes_a_dispute_and_only_the_holder_decides_it_until_released(score: Score) -> None:
    await score.apply(negative(oid("o1"), ALICE))
    filed = (
        await score.alice.FileDispute(pb.FileDisputeRequest(entry_id=oid("o1"), statement="not me"))
    ).dispute
    assert (filed.assignee, filed.HasField("assigned_at")) == ("", False)
    other = score.as_("reviewer-9", Role.REVIEWER)
    admin = score.as_("admin-1", Role.ADMIN)
    score.clock.now = T0 + DAY
    taken = (await score.reviewer.AssignDispute(pb.AssignDisputeRequest(dispute_id=filed.dispute_id))).dispute
    assert (taken.assignee, taken.assigned_at.ToDatetime(UTC)) == ("reviewer-7", T0 + DAY)
    # Taking it again changes nothing.
    again = await score.reviewer.AssignDispute(pb.AssignDisputeRequest(dispute_id=filed.dispute_id))
    assert again.dispute.assigned_at.ToDatetime(UTC) == T0 + DAY
    # Another reviewer neither takes, releases nor decides it.
    for call in (
        other.AssignDispute(pb.AssignDisputeRequest(dispute_id=filed.dispute_id)),
        other.AssignDispute(pb.AssignDisputeRequest(dispute_id=filed.dispute_id, release=True)),
        other.ResolveDispute(
            pb.ResolveDisputeRequest(
                dispute_id=filed.dispute_id, decision=dp.DISPUTE_DECISION_OVERTURN, reason="mine now"
            )
        ),
    ):
        error = await expect(grpc.StatusCode.FAILED_PRECONDITION, call)
        assert error_info(error) == ("egret.city", "ASSIGNED_TO_ANOTHER", {"assignee": "reviewer-7"})
    assert score.status(oid("o1")) == "disputed"
    # A reviewer takes for itself only; an admin names the reviewer, and nothing else.
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        other.AssignDispute(pb.AssignDisputeRequest(dispute_id=filed.dispute_id, assignee="reviewer-7")),
    )
    for assignee, reason in (
        ("", "REQUIRED"),
        ("110101199003078888", "INVALID_ASSIGNEE"),
        ("a b", "INVALID_ASSIGNEE"),
    ):
        error = await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            admin.AssignDispute(pb.AssignDisputeRequest(dispute_id=filed.dispute_id, assignee=assignee)),
        )
        assert bad_request(error) == [("assignee", reason)]
    moved = await admin.AssignDispute(
        pb.AssignDisputeRequest(dispute_id=filed.dispute_id, assignee="reviewer-9")
    )
    assert moved.dispute.assignee == "reviewer-9"
    released = await other.AssignDispute(pb.AssignDisputeRequest(dispute_id=filed.dispute_id, release=True))
    assert (released.dispute.assignee, released.dispute.HasField("assigned_at")) == ("", False)
    # No one holds it: any reviewer decides, and a decided dispute is not assigned.
    decided = await score.reviewer.ResolveDispute(
        pb.ResolveDisputeRequest(
            dispute_id=filed.dispute_id, decision=dp.DISPUTE_DECISION_UPHOLD, reason="right"
        )
    )
    assert decided.dispute.status == dp.DISPUTE_STATUS_UPHELD
    error = await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        other.AssignDispute(pb.AssignDisputeRequest(dispute_id=filed.dispute_id)),
    )
    assert error_info(error) == ("egret.city", "ALREADY_DECIDED", {"status": "upheld"})
    await expect(
        grpc.StatusCode.PERMISSION_DENIED, score.alice.AssignDispute(pb.AssignDisputeRequest(dispute_id="1"))
    )
    # Every change under its caller's identity, in the audit chain.
    acts = score.read(
        lambda c: [
            (r.action, r.actor, r.role, json.loads(r.detail)["assignee"])
            for r in c.execute(
                sa.select(ScoreAuditLog.action, ScoreAuditLog.actor, ScoreAuditLog.role, ScoreAuditLog.detail)
                .where(ScoreAuditLog.action.in_(("dispute.assign", "dispute.release")))
                .order_by(ScoreAuditLog.seq)
            )
        ]
    )
    assert acts == [
        ("dispute.assign", "reviewer-7", "reviewer", "reviewer-7"),
        ("dispute.assign", "admin-1", "admin", "reviewer-9"),
        ("dispute.release", "reviewer-9", "reviewer", ""),
    ]
    assert score.verify_audit().intact


async def test_the_holder_decides_its_dispute(score: Score) -> None:
    await score.apply(negative(oid("o1"), ALICE))
    filed = (
        await score.alice.FileDispute(pb.FileDisputeRequest(entry_id=oid("o1"), statement="not me"))
    ).dispute
    await score.reviewer.AssignDispute(pb.AssignDisputeRequest(dispute_id=filed.dispute_id))
    decided = await score.reviewer.ResolveDispute(
        pb.ResolveDisputeRequest(
            dispute_id=filed.dispute_id, decision=dp.DISPUTE_DECISION_OVERTURN, reason="proof"
        )
    )
    assert (decided.dispute.status, decided.dispute.assignee) == (dp.DISPUTE_STATUS_OVERTURNED, "reviewer-7")
    assert score.status(oid("o1")) == "reversed"


async def test_an_overturned_dispute_reverses_the_entry(score: Score) -> None:
    await score.apply(negative(oid("o1"), ALICE))
    filed = (
        await score.alice.FileDispute(pb.FileDisputeRequest(entry_id=oid("o1"), statement="paid"))
    ).dispute
    score.clock.now = T0 + DAY
    await score.reviewer.ResolveDispute(
        pb.ResolveDisputeRequest(
            dispute_id=filed.dispute_id, decision=dp.DISPUTE_DECISION_OVERTURN, reason="proof"
        )
    )
    assert (score.score(ALICE), score.status(oid("o1"))) == (1000, "reversed")
    assert notes(score.history(ALICE))[-1] == (
        "dispute",
        f"dispute {filed.dispute_id} overturned: proof",
        [oid("o1")],
        [],
    )
    # A reversed entry is not disputed again.
    error = await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        score.alice.FileDispute(pb.FileDisputeRequest(entry_id=oid("o1"), statement="again")),
    )
    assert error_info(error) == ("egret.city", "ENTRY_NOT_DISPUTABLE", {"status": "reversed"})


async def test_who_may_dispute_and_what_a_request_must_hold(score: Score) -> None:
    await score.apply(negative(oid("o1"), ALICE))
    # Another subject, or a department whose events the entry does not rest on, finds nothing.
    await expect(
        grpc.StatusCode.NOT_FOUND,
        score.bob.FileDispute(pb.FileDisputeRequest(entry_id=oid("o1"), statement="x")),
    )
    courts = score.as_("courts", Role.DEPARTMENT)
    await expect(
        grpc.StatusCode.NOT_FOUND,
        courts.FileDispute(pb.FileDisputeRequest(entry_id=oid("o1"), statement="x")),
    )
    await expect(
        grpc.StatusCode.NOT_FOUND,
        score.alice.FileDispute(pb.FileDisputeRequest(entry_id="nope", statement="x")),
    )
    error = await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        score.alice.FileDispute(pb.FileDisputeRequest(entry_id=oid("o1"), statement="")),
    )
    assert [field for field, _ in bad_request(error)] == ["statement"]
    error = await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        score.alice.FileDispute(pb.FileDisputeRequest(entry_id=oid("o1"), statement="x" * 4001)),
    )
    assert [reason for _, reason in bad_request(error)] == ["TOO_LONG"]
    # The library reported the event, so it may dispute the entry.
    library = score.as_("library", Role.DEPARTMENT)
    filed = (
        await library.FileDispute(pb.FileDisputeRequest(entry_id=oid("o1"), statement="our error"))
    ).dispute
    assert filed.filed_by == "library"
    error = await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        score.alice.FileDispute(pb.FileDisputeRequest(entry_id=oid("o1"), statement="x")),
    )
    assert error_info(error) == ("egret.city", "DISPUTE_ALREADY_OPEN", {})
    error = await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        score.reviewer.ResolveDispute(pb.ResolveDisputeRequest(dispute_id=filed.dispute_id, reason="")),
    )
    assert [field for field, _ in bad_request(error)] == ["decision", "reason"]
    await expect(
        grpc.StatusCode.NOT_FOUND,
        score.reviewer.ResolveDispute(
            pb.ResolveDisputeRequest(dispute_id="999", decision=dp.DISPUTE_DECISION_UPHOLD, reason="x")
        ),
    )
    # Roles outside the policy are refused before any handler runs.
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        score.alice.ResolveDispute(
            pb.ResolveDisputeRequest(
                dispute_id=filed.dispute_id, decision=dp.DISPUTE_DECISION_UPHOLD, reason="x"
            )
        ),
    )


async def test_repair_waits_for_the_minimum_period_then_an_approval_ends_the_entry(score: Score) -> None:
    serious = outcome(
        oid("s1"), ALICE, -50, "legal", severity=outcome_pb2.SEVERITY_SERIOUS, occurred_at=T0 - 300 * DAY
    )
    await score.apply(serious, outcome(oid("p1"), ALICE, 5, "civic", occurred_at=T0 - DAY))
    error = await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        score.alice.ApplyForRepair(pb.ApplyForRepairRequest(entry_id=oid("s1"), evidence="paid")),
    )
    assert (T0 + 65 * DAY).date().isoformat() in (error.details() or "")
    domain, reason, metadata = error_info(error)
    assert (domain, reason) == ("egret.city", "REPAIR_TOO_EARLY")
    assert metadata == {
        "earliest_date": (T0 + 65 * DAY).date().isoformat(),
        "earliest_at": (T0 + 65 * DAY).isoformat(),
        "min_period_days": "365",
        "severity": "serious",
    }
    error = await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        score.alice.ApplyForRepair(pb.ApplyForRepairRequest(entry_id=oid("p1"), evidence="x")),
    )
    assert error_info(error)[1] == "ENTRY_NOT_NEGATIVE"
    await expect(
        grpc.StatusCode.NOT_FOUND,
        score.bob.ApplyForRepair(pb.ApplyForRepairRequest(entry_id=oid("s1"), evidence="x")),
    )
    score.clock.now = T0 + 65 * DAY  # a Friday: 365 days after the event
    application = (
        await score.alice.ApplyForRepair(
            pb.ApplyForRepairRequest(
                entry_id=oid("s1"), evidence="paid and apologised", evidence_uri="https://x.example/r"
            )
        )
    ).application
    assert application.status == dp.REPAIR_STATUS_PENDING
    # Three working days over the weekend: Friday -> Wednesday.
    assert application.decision_due.ToDatetime(UTC) == T0 + 70 * DAY
    error = await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        score.alice.ApplyForRepair(pb.ApplyForRepairRequest(entry_id=oid("s1"), evidence="again")),
    )
    assert error_info(error)[1] == "REPAIR_ALREADY_PENDING"
    before = score.score(ALICE)
    score.clock.now = T0 + 71 * DAY
    decided = (
        await score.reviewer.DecideRepair(
            pb.DecideRepairRequest(
                application_id=application.application_id,
                decision=dp.REPAIR_DECISION_APPROVE,
                reason="made good",
            )
        )
    ).application
    assert (decided.status, decided.decided_by) == (dp.REPAIR_STATUS_APPROVED, "reviewer-7")
    assert (score.score(ALICE), score.status(oid("s1"))) == (before + 50, "repaired")
    assert notes(score.history(ALICE))[-1] == (
        "repair",
        f"repair {application.application_id} approved: made good",
        [oid("s1")],
        [],
    )
    error = await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        score.reviewer.DecideRepair(
            pb.DecideRepairRequest(
                application_id=application.application_id, decision=dp.REPAIR_DECISION_REJECT, reason="x"
            )
        ),
    )
    assert error_info(error) == ("egret.city", "ALREADY_DECIDED", {"status": "approved"})
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        score.as_("library", Role.DEPARTMENT).ApplyForRepair(
            pb.ApplyForRepairRequest(entry_id=oid("s1"), evidence="x")
        ),
    )


async def test_consent_is_set_by_its_subject_or_recorded_on_paper_by_a_reviewer(score: Score) -> None:
    own = (await score.alice.SetConsent(pb.SetConsentRequest(granted=True))).consent
    assert (own.subject_key, own.granted, own.effective_at.ToDatetime(UTC)) == (ALICE, True, T0)
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        score.alice.SetConsent(pb.SetConsentRequest(subject_key=BOB, granted=True)),
    )
    request = pb.SetConsentRequest(subject_key=BOB, granted=True)
    request.effective_at.CopyFrom(to_timestamp(T0 + DAY))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, score.reviewer.SetConsent(request))
    request.effective_at.CopyFrom(to_timestamp(T0 - DAY))
    paper = (await score.reviewer.SetConsent(request)).consent
    assert (paper.subject_key, paper.recorded_by) == (BOB, "reviewer-7")
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT, score.reviewer.SetConsent(pb.SetConsentRequest(granted=True))
    )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED, score.rules.SetConsent(pb.SetConsentRequest(granted=True))
    )


async def test_consent_cannot_be_backdated_beyond_a_day_nor_dated_past_clock_skew(score: Score) -> None:
    def at(moment: datetime) -> pb.SetConsentRequest:
        request = pb.SetConsentRequest(subject_key=BOB, granted=True)
        request.effective_at.CopyFrom(to_timestamp(moment))
        return request

    refused = {
        T0 - DAY - timedelta(seconds=1): "TOO_OLD",
        T0 - 365 * DAY: "TOO_OLD",
        T0 + timedelta(minutes=5, seconds=1): "IN_FUTURE",
    }
    for moment, reason in refused.items():
        error = await expect(grpc.StatusCode.INVALID_ARGUMENT, score.reviewer.SetConsent(at(moment)))
        assert bad_request(error) == [("effective_at", reason)]
    for accepted in (T0 - DAY, T0 + timedelta(minutes=5)):
        consent = (await score.reviewer.SetConsent(at(accepted))).consent
        assert consent.effective_at.ToDatetime(UTC) == accepted


async def test_reversals_apply_once_and_wait_for_a_late_outcome(score: Score) -> None:
    await score.apply(negative(oid("o1"), ALICE))
    first = await score.apply(
        reversals=(retraction(oid("o1"), ALICE, "o1-0"), retraction(oid("late"), BOB, "late-0"))
    )
    assert (first.reversed, score.score(ALICE), score.status(oid("o1"))) == (1, 1000, "reversed")
    again = await score.apply(reversals=(retraction(oid("o1"), ALICE, "o1-0"),))
    assert again.reversed == 0
    assert [r for r in notes(score.history(ALICE)) if r[0] == "correction"] == [
        ("correction", "event library/o1-0 retracted", [oid("o1")], [])
    ]
    # The outcome retracted before it arrived never counts.
    await score.apply(negative(oid("late"), BOB))
    assert (score.score(BOB), score.status(oid("late"))) == (1000, "reversed")


async def test_the_audit_chain_holds_every_act_and_breaks_when_a_row_is_tampered_with(score: Score) -> None:
    await score.apply(
        negative(oid("o1"), ALICE),
        outcome(oid("o2"), ALICE, -3, "civic", severity=MINOR, occurred_at=T0 - 10 * DAY),
    )
    filed = (
        await score.alice.FileDispute(pb.FileDisputeRequest(entry_id=oid("o1"), statement="not me"))
    ).dispute
    await score.reviewer.ResolveDispute(
        pb.ResolveDisputeRequest(
            dispute_id=filed.dispute_id, decision=dp.DISPUTE_DECISION_UPHOLD, reason="right"
        )
    )
    application = (
        await score.alice.ApplyForRepair(pb.ApplyForRepairRequest(entry_id=oid("o2"), evidence="x"))
    ).application
    await score.reviewer.DecideRepair(
        pb.DecideRepairRequest(
            application_id=application.application_id, decision=dp.REPAIR_DECISION_REJECT, reason="not yet"
        )
    )
    await score.alice.SetConsent(pb.SetConsentRequest(granted=True))
    await score.apply(reversals=(retraction(oid("o1"), ALICE, "o1-0"),))
    report = score.verify_audit()
    assert report.intact, report.problems
    actions = score.read(
        lambda c: [r.action for r in c.execute(sa.select(ScoreAuditLog.action).order_by(ScoreAuditLog.seq))]
    )
    assert actions == [
        "policy.activate",
        "dispute.file",
        "dispute.resolve",
        "repair.apply",
        "repair.decide",
        "consent.set",
        "entry.reverse",
    ]
    engine = sa.create_engine(score.database_url)
    with engine.begin() as connection:
        connection.execute(
            sa.update(ScoreAuditLog).where(ScoreAuditLog.seq == 3).values(detail='{"decision":"overturned"}')
        )
    engine.dispose()
    broken = score.verify_audit()
    assert not broken.intact
    assert any("seq 3" in p for p in broken.problems)
