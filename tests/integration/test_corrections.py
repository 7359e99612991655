"""Source corrections (retractions and corrections) over real gRPC on loopback, on SQLite
and on PostgreSQL: ingest's RetractEvent / CorrectEvent and their outbox rows, rules'
reversal and re-evaluation of what a retracted event caused, and both audit chains.

Another department naming a source that is not its own is PERMISSION_DENIED, decided
before anything is read (tests/unit/ingest/test_corrections.py: the integration servers
here run without authentication, where the request's source is taken at its word).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from egret.common.v1 import due_process_pb2, event_pb2, subject_pb2
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit import audit
from kit.protoconv import Scalar, to_attribute_value, to_timestamp
from services.ingest import bootstrap as ingest_bootstrap
from services.ingest.stores.events import IngestAuditHead, IngestAuditLog
from services.rules import bootstrap as rules_bootstrap
from services.rules.stores.schema import RulesAuditHead, RulesAuditLog
from tests.support.fakes import RecordingRules, serving_rules
from tests.support.ingest import ingest_settings, late
from tests.support.outbox import until_drained
from tests.support.recording_score import RecordingScore
from tests.support.rules import as_actor, rules_settings
from tests.support.servers import client_channel, running
from tests.support.status import bad_request
from tests.support.waiting import until

SUBJECT = "a" * 64
WHEN = datetime(2026, 1, 1, tzinfo=UTC)

RULES = """\
name: test-corrections
version: 1
rules:
  - id: fare.each
    title: Fare evasion
    event_types: [transport.metro.fare_evasion]
    points: -10
    category: transport
    severity: general
    legal_basis: Metro regulation (test)
    reason: Evaded a fare
  - id: fare.repeated
    title: Three fare evasions within 90 days
    event_types: [transport.metro.fare_evasion]
    window: {count: 3, within: 90d}
    points: -20
    category: transport
    severity: general
    legal_basis: Metro regulation (test)
    reason: Evaded the fare {count} times within 90 days
  - id: loan.early_default
    title: Default soon after taking a loan
    sequence:
      steps:
        - event_types: [finance.loan_taken]
        - event_types: [finance.loan_default]
      within: 180d
      correlate_by: loan_id
    points: -20
    category: finance
    severity: general
    legal_basis: Credit regulation (test)
    reason: Defaulted on loan {loan_id}
"""


def expected_id(rule_id: str, *keys: str) -> str:
    """The deterministic outcome id, computed by hand (docs/architecture.md)."""
    text = f"test-corrections|1|{rule_id}|" + "|".join(sorted(keys))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def verify_chain(database_url: str, log: Any, head: Any) -> audit.ChainReport:
    engine = sa.create_engine(database_url)
    try:
        with Session(engine) as session:
            return audit.verify(session, log, head)
    finally:
        engine.dispose()


def audit_actions(database_url: str, table: str) -> list[tuple[str, str, str]]:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text(f"SELECT action, actor, target FROM {table} ORDER BY seq"))
            return [(r.action, r.actor, r.target) for r in rows]
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------
# Ingest


@pytest.fixture
async def ingest(
    database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[ingest_grpc.IngestServiceAsyncStub, RecordingRules]]:
    rules = RecordingRules()
    async with (
        serving_rules(rules) as rules_address,
        running(
            ingest_settings(database_url, tmp_path, rules_address),
            ingest_bootstrap.build,
            ingest_bootstrap.MIGRATIONS,
        ) as address,
        client_channel(address) as channel,
    ):
        yield ingest_grpc.IngestServiceStub(channel), rules


def ref(event_id: str, source: str = "library") -> event_pb2.EventRef:
    return event_pb2.EventRef(source=source, event_id=event_id)


def delivered(rules: RecordingRules) -> list[tuple[str, str]]:
    """What rules received, in order: ("event" | "retraction", event_id); within one request
    the events come first, as rules applies them."""
    order: list[tuple[str, str]] = []
    for batch in rules.batches:
        order += [("event", e.ref.event_id) for e in batch.events]
        order += [("retraction", r.ref.event_id) for r in batch.retractions]
    return order


async def code_of(call: Any) -> tuple[grpc.StatusCode, Any]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value.code(), raised.value


async def test_retracting_an_unknown_event_is_not_found_and_a_bad_reason_invalid(
    ingest: tuple[ingest_grpc.IngestServiceAsyncStub, RecordingRules],
) -> None:
    stub, _ = ingest
    await stub.SubmitEvent(ingest_pb.SubmitEventRequest(source="library", event=late("e1")))
    code, _ = await code_of(stub.RetractEvent(ingest_pb.RetractEventRequest(ref=ref("nope"), reason="wrong")))
    assert code == grpc.StatusCode.NOT_FOUND
    # Another source's id space: the library never sent metro's "e1".
    code, _ = await code_of(
        stub.RetractEvent(ingest_pb.RetractEventRequest(ref=ref("e1", "metro"), reason="wrong"))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    for reason, expected in (("", "REQUIRED"), ("   ", "REQUIRED"), ("x" * 1001, "TOO_LONG")):
        code, error = await code_of(
            stub.RetractEvent(ingest_pb.RetractEventRequest(ref=ref("e1"), reason=reason))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in bad_request(error)] == ["reason"], expected
    ok = await stub.RetractEvent(ingest_pb.RetractEventRequest(ref=ref("e1"), reason="x" * 1000))
    assert not ok.already_retracted


async def test_a_retraction_is_stored_once_and_reaches_rules_after_its_event(
    database_url: str, ingest: tuple[ingest_grpc.IngestServiceAsyncStub, RecordingRules]
) -> None:
    stub, rules = ingest
    await stub.SubmitEvents(ingest_pb.SubmitEventsRequest(source="library", events=[late("e1"), late("e2")]))
    first = await stub.RetractEvent(
        ingest_pb.RetractEventRequest(ref=ref("e1"), reason="the book was returned on time")
    )
    assert not first.already_retracted
    retraction = first.retraction
    assert (retraction.ref.event_id, retraction.reason, retraction.retracted_by) == (
        "e1",
        "the book was returned on time",
        "library",
    )
    assert not retraction.HasField("replaced_by")
    again = await stub.RetractEvent(ingest_pb.RetractEventRequest(ref=ref("e1"), reason="another reason"))
    assert again.already_retracted
    assert again.retraction == retraction  # the first, unchanged

    # The event stays: a resend of it is still a duplicate, never a new event.
    resent = await stub.SubmitEvent(ingest_pb.SubmitEventRequest(source="library", event=late("e1")))
    assert resent.result.status == ingest_pb.EVENT_STATUS_DUPLICATE

    await until(lambda: ("retraction", "e1") in delivered(rules))
    assert delivered(rules) == [("event", "e1"), ("event", "e2"), ("retraction", "e1")]
    (sent,) = [r for b in rules.batches for r in b.retractions]
    event_sent = rules.events()[0]
    assert sent.subject_key == event_sent.subject_key  # so it goes to the event's shard
    assert sent == retraction

    report = verify_chain(database_url, IngestAuditLog, IngestAuditHead)
    assert report.intact, report.problems
    assert audit_actions(database_url, "ingest_audit_log") == [
        ("event.retract", "library", "event:library/e1")
    ]


async def test_a_correction_retracts_and_replaces_in_one_step_and_a_resend_is_idempotent(
    database_url: str, ingest: tuple[ingest_grpc.IngestServiceAsyncStub, RecordingRules]
) -> None:
    stub, rules = ingest
    await stub.SubmitEvent(ingest_pb.SubmitEventRequest(source="library", event=late("e1", days=40)))

    # The replacement is validated like a submitted event, its violations under "replacement.".
    bad = late("e1-fixed", days=-3)
    bad.attributes["colour"].string_value = "red"
    code, error = await code_of(
        stub.CorrectEvent(ingest_pb.CorrectEventRequest(ref=ref("e1"), reason="typo", replacement=bad))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    fields = [f for f, _ in bad_request(error)]
    assert fields
    assert all(f.startswith("replacement.") for f in fields), fields
    assert "replacement.attributes.days_late" in fields
    code, error = await code_of(
        stub.CorrectEvent(ingest_pb.CorrectEventRequest(ref=ref("e1"), reason="typo", replacement=late("e1")))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(error)] == ["replacement.event_id"]
    code, _ = await code_of(
        stub.CorrectEvent(
            ingest_pb.CorrectEventRequest(ref=ref("nope"), reason="typo", replacement=late("e1-fixed"))
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND

    request = ingest_pb.CorrectEventRequest(
        ref=ref("e1"), reason="days_late was 4, not 40", replacement=late("e1-fixed", days=4)
    )
    corrected = await stub.CorrectEvent(request)
    assert corrected.replacement.status == ingest_pb.EVENT_STATUS_ACCEPTED
    assert corrected.retraction.replaced_by == ref("e1-fixed")
    resent = await stub.CorrectEvent(request)
    assert resent.replacement.status == ingest_pb.EVENT_STATUS_DUPLICATE
    assert resent.retraction == corrected.retraction

    # Corrected once: another correction, or one with another replacement, is refused.
    code, _ = await code_of(
        stub.CorrectEvent(
            ingest_pb.CorrectEventRequest(ref=ref("e1"), reason="again", replacement=late("e1-other", days=5))
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    retracted = await stub.RetractEvent(ingest_pb.RetractEventRequest(ref=ref("e1"), reason="again"))
    assert retracted.already_retracted
    assert retracted.retraction == corrected.retraction
    # A retracted event cannot be corrected either.
    await stub.SubmitEvent(ingest_pb.SubmitEventRequest(source="library", event=late("e2")))
    await stub.RetractEvent(ingest_pb.RetractEventRequest(ref=ref("e2"), reason="wrong person"))
    code, _ = await code_of(
        stub.CorrectEvent(
            ingest_pb.CorrectEventRequest(ref=ref("e2"), reason="x", replacement=late("e2-fixed"))
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION

    await until(lambda: ("retraction", "e2") in delivered(rules))
    order = delivered(rules)
    assert sorted(order) == sorted(
        [("event", "e1"), ("retraction", "e1"), ("event", "e1-fixed"), ("event", "e2"), ("retraction", "e2")]
    )
    # Each retraction after its event (a correction's two rows may share one request, where
    # rules applies the retraction after the events).
    assert order.index(("event", "e1")) < order.index(("retraction", "e1"))
    assert order.index(("event", "e2")) < order.index(("retraction", "e2"))
    fixed = next(e for e in rules.events() if e.ref.event_id == "e1-fixed")
    assert fixed.attributes["days_late"].int_value == 4

    report = verify_chain(database_url, IngestAuditLog, IngestAuditHead)
    assert report.intact, report.problems
    assert report.records == 2
    assert [a for a, _, _ in audit_actions(database_url, "ingest_audit_log")] == [
        "event.correct",
        "event.retract",
    ]


@pytest.fixture
async def rules(
    database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[pb_grpc.RulesServiceAsyncStub, RecordingScore]]:
    score = RecordingScore()
    server = grpc.aio.server()
    score_grpc.add_ScoreServiceServicer_to_server(score, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        settings = rules_settings(database_url, tmp_path, f"127.0.0.1:{port}", source=RULES)
        async with (
            running(settings, rules_bootstrap.build, rules_bootstrap.MIGRATIONS) as address,
            client_channel(address) as channel,
        ):
            yield pb_grpc.RulesServiceStub(channel), score
    finally:
        await server.stop(0)


def recorded(
    event_id: str, event_type: str, day: int, attributes: dict[str, Scalar], source: str = "metro"
) -> event_pb2.RecordedEvent:
    when = to_timestamp(WHEN + timedelta(days=day))
    return event_pb2.RecordedEvent(
        ref=event_pb2.EventRef(source=source, event_id=event_id),
        event_type=event_type,
        subject_key=SUBJECT,
        subject_kind=subject_pb2.SUBJECT_KIND_PERSON,
        occurred_at=when,
        recorded_at=when,
        attributes={k: to_attribute_value(v) for k, v in attributes.items()},
        subject_key_id="k1",
    )


def fare(event_id: str, day: int) -> event_pb2.RecordedEvent:
    return recorded(event_id, "transport.metro.fare_evasion", day, {"station": "Lucuo", "amount": 4.0})


def loan(event_id: str, day: int, loan_id: str) -> event_pb2.RecordedEvent:
    return recorded(event_id, "finance.loan_taken", day, {"loan_id": loan_id}, source="bank")


def default(event_id: str, day: int, loan_id: str) -> event_pb2.RecordedEvent:
    return recorded(event_id, "finance.loan_default", day, {"loan_id": loan_id}, source="bank")


def retraction(event_id: str, source: str = "metro") -> due_process_pb2.Retraction:
    return due_process_pb2.Retraction(
        ref=event_pb2.EventRef(source=source, event_id=event_id),
        subject_key=SUBJECT,
        reason="reported in error",
        retracted_at=to_timestamp(WHEN + timedelta(days=400)),
        retracted_by=source,
    )


async def send(
    stub: pb_grpc.RulesServiceAsyncStub,
    events: list[event_pb2.RecordedEvent] = (),  # type: ignore[assignment]
    retractions: list[due_process_pb2.Retraction] = (),  # type: ignore[assignment]
) -> pb.EvaluateEventsResponse:
    return await stub.EvaluateEvents(pb.EvaluateEventsRequest(events=events, retractions=retractions))


async def test_retracting_one_event_of_a_window_reverses_it_and_another_event_re_forms_it(
    database_url: str, rules: tuple[pb_grpc.RulesServiceAsyncStub, RecordingScore]
) -> None:
    stub, score = rules
    # Days 0, 10, 20 complete "3 within 90 days"; day 60 is left over, unused.
    first = await send(stub, [fare("f1", 0), fare("f2", 10), fare("f3", 20), fare("f4", 60)])
    assert first.outcomes == 5  # four per-event, one window
    window = expected_id("fare.repeated", "metro/f1", "metro/f2", "metro/f3")
    await until(lambda: len(score.outcomes) == 5)
    assert score.ids("fare.repeated") == [window]
    each_f2 = expected_id("fare.each", "metro/f2")

    # f2 is retracted: its own outcome and the window go; f1 and f3 are free again and,
    # with f4 (day 60 - day 0 = 60 days <= 90), form a new window, whose id is new.
    response = await send(stub, retractions=[retraction("f2")])
    assert (response.retracted, response.reversed, response.outcomes) == (1, 2, 1)
    re_formed = expected_id("fare.repeated", "metro/f1", "metro/f3", "metro/f4")
    await until(lambda: len(score.outcomes) == 6 and len(score.reversals) == 2)
    assert sorted(r.outcome_id for r in score.reversals) == sorted([window, each_f2])
    # Rules passes the retraction on with its key's generation (its current one).
    relayed = retraction("f2")
    relayed.subject_key_id = "k1"
    assert all(r.retraction == relayed for r in score.reversals)
    assert score.ids("fare.repeated") == [window, re_formed]
    assert score.keys(re_formed) == ["metro/f1", "metro/f3", "metro/f4"]
    new = score.outcomes[-1]
    assert (new.points, new.occurred_at.ToDatetime(tzinfo=UTC)) == (-20, WHEN + timedelta(days=60))

    # Redelivered (the relay retried): applied once, nothing reversed or emitted again.
    again = await send(stub, [fare("f2", 10)], [retraction("f2")])
    assert (again.retracted, again.reversed, again.outcomes, again.evaluated) == (0, 0, 0, 0)

    # The retracted event is in no later window: without it, days 70 and 75 have no third.
    later = await send(stub, [fare("f5", 70), fare("f6", 75)])
    assert later.outcomes == 2  # their per-event outcomes only
    # Drained, everything rules emitted has reached score: nothing was emitted twice.
    await until_drained(database_url, "rules_outbox")
    assert len(score.outcomes) == 8
    assert len(score.reversals) == 2
    assert score.ids("fare.repeated") == [window, re_formed]


async def test_retracting_the_second_step_of_a_sequence_reverses_it_and_frees_the_first(
    rules: tuple[pb_grpc.RulesServiceAsyncStub, RecordingScore],
) -> None:
    stub, score = rules
    await send(stub, [loan("a1", 0, "L1"), default("b1", 30, "L1"), default("b2", 40, "L1")])
    pair = expected_id("loan.early_default", "bank/a1", "bank/b1")
    await until(lambda: len(score.outcomes) == 1)
    assert score.ids("loan.early_default") == [pair]  # b2 found a1 used

    response = await send(stub, retractions=[retraction("b1", "bank")])
    assert (response.retracted, response.reversed, response.outcomes) == (1, 1, 1)
    await until(lambda: len(score.outcomes) == 2 and len(score.reversals) == 1)
    assert score.reversals[0].outcome_id == pair
    assert score.ids("loan.early_default") == [pair, expected_id("loan.early_default", "bank/a1", "bank/b2")]


async def test_retracting_an_event_that_caused_nothing_only_records_it(
    database_url: str, rules: tuple[pb_grpc.RulesServiceAsyncStub, RecordingScore]
) -> None:
    stub, score = rules
    await send(stub, [loan("a1", 0, "L1")])
    response = await send(stub, retractions=[retraction("a1", "bank")])
    assert (response.retracted, response.reversed, response.outcomes) == (1, 0, 0)
    # A retraction of an event rules never saw is recorded too, and the event is then skipped.
    early = await send(stub, retractions=[retraction("a9", "bank")])
    assert early.retracted == 1
    late_event = await send(stub, [loan("a9", 5, "L9"), default("b9", 20, "L9")])
    assert (late_event.evaluated, late_event.duplicate, late_event.outcomes) == (1, 1, 0)
    await until_drained(database_url, "rules_outbox")
    assert score.outcomes == []
    assert score.reversals == []


async def test_rule_set_lifecycle_changes_are_in_an_intact_audit_chain(
    database_url: str, rules: tuple[pb_grpc.RulesServiceAsyncStub, RecordingScore]
) -> None:
    stub, _ = rules
    first = (await stub.GetActiveRuleSet(pb.GetActiveRuleSetRequest())).rule_set.rule_set_id
    source = RULES.replace("version: 1", "version: 2")
    draft = (
        await stub.CreateDraft(pb.CreateDraftRequest(source=source), metadata=as_actor("alice"))
    ).rule_set
    second = draft.rule_set_id
    await stub.PublishRuleSet(pb.PublishRuleSetRequest(rule_set_id=second), metadata=as_actor("bob"))
    await stub.ActivateRuleSet(pb.ActivateRuleSetRequest(rule_set_id=second), metadata=as_actor("carol"))
    await stub.RetireRuleSet(pb.RetireRuleSetRequest(rule_set_id=first), metadata=as_actor("dave"))
    await stub.RedriveDeadLetters(pb.RedriveDeadLettersRequest(all=True), metadata=as_actor("erin"))

    report = verify_chain(database_url, RulesAuditLog, RulesAuditHead)
    assert report.intact, report.problems
    assert report.records == 6
    assert audit_actions(database_url, "rules_audit_log") == [
        ("ruleset.import", "system:import", f"rule_set:{first}"),
        ("ruleset.draft", "alice", f"rule_set:{second}"),
        ("ruleset.publish", "bob", f"rule_set:{second}"),
        ("ruleset.activate", "carol", f"rule_set:{second}"),
        ("ruleset.retire", "dave", f"rule_set:{first}"),
        ("deadletter.redrive", "erin", "dead_letters"),
    ]
    # The chain catches an edit of any record.
    engine = sa.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE rules_audit_log SET actor = 'mallory' WHERE seq = 4"))
    engine.dispose()
    assert not verify_chain(database_url, RulesAuditLog, RulesAuditHead).intact


async def test_a_malformed_retraction_is_refused_before_anything_is_recorded(
    rules: tuple[pb_grpc.RulesServiceAsyncStub, RecordingScore],
) -> None:
    stub, _ = rules
    malformed = due_process_pb2.Retraction(ref=event_pb2.EventRef(source="metro"))
    code, error = await code_of(send(stub, retractions=[malformed]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(error)] == ["retractions[0].ref", "retractions[0].subject_key"]
