"""The rules service's lifecycle, hot swap, event-time restarts and dead letters over real
gRPC on loopback, on SQLite and on PostgreSQL, with a recording score service.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from egret.common.v1 import event_pb2, outcome_pb2, subject_pb2
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.protoconv import Scalar, to_attribute_value, to_timestamp
from services.rules.bootstrap import MIGRATIONS, build
from services.rules.bootstrap import main as rules_main
from services.rules.stores.schema import RulesAuditLog
from tests.support.outbox import until_drained
from tests.support.purposes import assert_bad_purposes_refused
from tests.support.rules import V2, WINDOW, as_actor, rules_settings
from tests.support.servers import running
from tests.support.status import bad_request
from tests.support.waiting import until

SUBJECT = "a" * 64
OTHER = "b" * 64
WHEN = datetime(2026, 6, 1, tzinfo=UTC)


# Typed as Any: the stand-in implements only ApplyOutcomes, which the relay calls.
_ScoreServicer: Any = score_grpc.ScoreServiceServicer


class RecordingScore(_ScoreServicer):  # type: ignore[misc]
    """A stand-in score service that keeps every outcome it is sent."""

    def __init__(self) -> None:
        self.outcomes: list[outcome_pb2.Outcome] = []

    async def ApplyOutcomes(self, request: score_pb.ApplyOutcomesRequest, context: Any) -> Any:
        self.outcomes.extend(request.outcomes)
        return score_pb.ApplyOutcomesResponse()

    def versions(self) -> list[tuple[str, int]]:
        return [(o.events[0].ref.event_id, o.rule.rule_set_version) for o in self.outcomes]


@pytest.fixture
async def score() -> AsyncIterator[tuple[RecordingScore, str]]:
    servicer = RecordingScore()
    server = grpc.aio.server()
    score_grpc.add_ScoreServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def late(event_id: str, days: int, subject: str = SUBJECT, day: int = 0) -> event_pb2.RecordedEvent:
    return recorded(event_id, "library.book_returned_late", {"days_late": days}, subject, day)


def recorded(
    event_id: str, event_type: str, attributes: dict[str, Scalar], subject: str = SUBJECT, day: int = 0
) -> event_pb2.RecordedEvent:
    when = to_timestamp(WHEN + timedelta(days=day))
    return event_pb2.RecordedEvent(
        ref=event_pb2.EventRef(source="library", event_id=event_id),
        event_type=event_type,
        subject_key=subject,
        subject_kind=subject_pb2.SUBJECT_KIND_PERSON,
        occurred_at=when,
        recorded_at=when,
        attributes={k: to_attribute_value(v) for k, v in attributes.items()},
        subject_key_id="k1",
    )


async def evaluate(stub: pb_grpc.RulesServiceAsyncStub, *events: event_pb2.RecordedEvent) -> Any:
    return await stub.EvaluateEvents(pb.EvaluateEventsRequest(events=list(events)))


async def publish_and_activate(stub: pb_grpc.RulesServiceAsyncStub, source: str, actor: str = "carol") -> int:
    draft = await stub.CreateDraft(pb.CreateDraftRequest(source=source), metadata=as_actor(actor))
    rule_set_id = draft.rule_set.rule_set_id
    await stub.PublishRuleSet(pb.PublishRuleSetRequest(rule_set_id=rule_set_id), metadata=as_actor(actor))
    await stub.ActivateRuleSet(pb.ActivateRuleSetRequest(rule_set_id=rule_set_id), metadata=as_actor(actor))
    return rule_set_id


async def test_lifecycle_from_draft_to_retirement_is_audited(
    database_url: str, tmp_path: Path, score: tuple[RecordingScore, str]
) -> None:
    async with (
        running(rules_settings(database_url, tmp_path, score[1]), build, MIGRATIONS) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.RulesServiceStub(channel)
        # The file seeded the empty database and is active.
        active = (await stub.GetActiveRuleSet(pb.GetActiveRuleSetRequest())).rule_set
        assert (active.name, active.version, list(active.rule_ids)) == (
            "test-rules",
            1,
            ["library.late_return"],
        )
        first = active.rule_set_id

        checked = await stub.ValidateRuleSet(pb.ValidateRuleSetRequest(source=V2))
        assert (checked.valid, checked.name, checked.version) == (True, "test-rules", 2)

        draft = (
            await stub.CreateDraft(pb.CreateDraftRequest(source=V2), metadata=as_actor("alice"))
        ).rule_set
        assert (draft.status, draft.created_by, draft.version) == (pb.RULE_SET_STATUS_DRAFT, "alice", 2)
        assert not draft.HasField("published_at")
        second = draft.rule_set_id

        published = await stub.PublishRuleSet(
            pb.PublishRuleSetRequest(rule_set_id=second), metadata=as_actor("bob")
        )
        assert (published.rule_set.status, published.rule_set.published_by) == (
            pb.RULE_SET_STATUS_PUBLISHED,
            "bob",
        )

        activated = await stub.ActivateRuleSet(
            pb.ActivateRuleSetRequest(rule_set_id=second), metadata=as_actor("carol")
        )
        assert activated.rule_set.status == pb.RULE_SET_STATUS_ACTIVE
        assert activated.previous_rule_set_id == first
        again = await stub.ActivateRuleSet(pb.ActivateRuleSetRequest(rule_set_id=second))
        assert again.previous_rule_set_id == 0  # already active: nothing changed, nothing recorded
        assert (await stub.GetActiveRuleSet(pb.GetActiveRuleSetRequest())).rule_set.version == 2

        retired = await stub.RetireRuleSet(
            pb.RetireRuleSetRequest(rule_set_id=first), metadata=as_actor("dave")
        )
        assert (retired.rule_set.status, retired.rule_set.retired_by) == (pb.RULE_SET_STATUS_RETIRED, "dave")

        got = (await stub.GetRuleSet(pb.GetRuleSetRequest(rule_set_id=second))).rule_set
        assert got.source == V2
        assert list(got.rule_ids) == ["library.late_return"]
        assert got.created_at.ToDatetime() <= got.published_at.ToDatetime() <= got.activated_at.ToDatetime()

        page = await stub.ListRuleSets(pb.ListRuleSetsRequest(page_size=1))
        assert [s.rule_set_id for s in page.rule_sets] == [first]
        assert page.next_page_token
        rest = await stub.ListRuleSets(pb.ListRuleSetsRequest(page_size=1, page_token=page.next_page_token))
        assert [(s.rule_set_id, s.status) for s in rest.rule_sets] == [(second, pb.RULE_SET_STATUS_ACTIVE)]
        assert rest.next_page_token == ""
        retired_only = await stub.ListRuleSets(pb.ListRuleSetsRequest(status=pb.RULE_SET_STATUS_RETIRED))
        assert [s.rule_set_id for s in retired_only.rule_sets] == [first]

        changes = (await stub.ListRuleSetChanges(pb.ListRuleSetChangesRequest())).changes
        assert [(c.rule_set_id, c.action, c.actor) for c in changes] == [
            (first, "import", "system:import"),
            (second, "create_draft", "alice"),
            (second, "publish", "bob"),
            (second, "activate", "carol"),
            (first, "retire", "dave"),
        ]
        assert json.loads(changes[3].detail_json)["previous_rule_set_id"] == first


async def test_lifecycle_refuses_every_wrong_step(
    database_url: str, tmp_path: Path, score: tuple[RecordingScore, str]
) -> None:
    async with (
        running(rules_settings(database_url, tmp_path, score[1]), build, MIGRATIONS) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.RulesServiceStub(channel)
        first = (await stub.GetActiveRuleSet(pb.GetActiveRuleSetRequest())).rule_set.rule_set_id
        broken = "name: x\nversion: 0\nrules:\n  - id: r\n    points: 0\n    extra: 1\n"
        report = await stub.ValidateRuleSet(pb.ValidateRuleSetRequest(source=broken))
        assert not report.valid
        fields = [p.field for p in report.problems]
        assert "source.version" in fields
        assert "source.rules[0] (r).extra" in fields
        assert "source.rules[0] (r).title" in fields
        assert len(fields) >= 6  # every problem at once
        not_yaml = await stub.ValidateRuleSet(pb.ValidateRuleSetRequest(source="rules: [unclosed"))
        assert [p.field for p in not_yaml.problems] == ["source"]

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateDraft(pb.CreateDraftRequest(source=broken))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in bad_request(raised.value)] == fields

        draft = (await stub.CreateDraft(pb.CreateDraftRequest(source=V2))).rule_set.rule_set_id

        async def refused(call: Any, code: grpc.StatusCode) -> str:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == code, raised.value.details()
            return str(raised.value.details())

        failed = grpc.StatusCode.FAILED_PRECONDITION
        assert "only a published" in await refused(
            stub.ActivateRuleSet(pb.ActivateRuleSetRequest(rule_set_id=draft)), failed
        )
        await stub.PublishRuleSet(pb.PublishRuleSetRequest(rule_set_id=draft))
        assert "only a draft" in await refused(
            stub.PublishRuleSet(pb.PublishRuleSetRequest(rule_set_id=draft)), failed
        )
        same_version = (await stub.CreateDraft(pb.CreateDraftRequest(source=V2))).rule_set.rule_set_id
        assert "must be greater" in await refused(
            stub.PublishRuleSet(pb.PublishRuleSetRequest(rule_set_id=same_version)), failed
        )
        assert "is active" in await refused(
            stub.RetireRuleSet(pb.RetireRuleSetRequest(rule_set_id=first)), failed
        )
        await stub.RetireRuleSet(pb.RetireRuleSetRequest(rule_set_id=draft))
        assert "retired" in await refused(
            stub.ActivateRuleSet(pb.ActivateRuleSetRequest(rule_set_id=draft)), failed
        )
        assert "already retired" in await refused(
            stub.RetireRuleSet(pb.RetireRuleSetRequest(rule_set_id=draft)), failed
        )
        await refused(stub.GetRuleSet(pb.GetRuleSetRequest(rule_set_id=9999)), grpc.StatusCode.NOT_FOUND)
        await refused(
            stub.ListRuleSets(pb.ListRuleSetsRequest(page_token="garbage!")), grpc.StatusCode.INVALID_ARGUMENT
        )
        await refused(
            stub.RedriveDeadLetters(pb.RedriveDeadLettersRequest()), grpc.StatusCode.INVALID_ARGUMENT
        )
        await refused(
            stub.RedriveDeadLetters(pb.RedriveDeadLettersRequest(dead_letter_ids=[42])),
            grpc.StatusCode.NOT_FOUND,
        )
        # Refused steps change nothing and record nothing.
        actions = [c.action for c in (await stub.ListRuleSetChanges(pb.ListRuleSetChangesRequest())).changes]
        assert actions == ["import", "create_draft", "publish", "create_draft", "retire"]
        assert (await stub.GetActiveRuleSet(pb.GetActiveRuleSetRequest())).rule_set.rule_set_id == first


async def test_version_swap_in_the_middle_of_a_stream_loses_nothing(
    database_url: str, tmp_path: Path, score: tuple[RecordingScore, str]
) -> None:
    recording, score_address = score
    async with (
        running(rules_settings(database_url, tmp_path, score_address), build, MIGRATIONS) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.RulesServiceStub(channel)

        async def stream() -> None:
            for i in range(20):
                await evaluate(stub, late(f"s{i}", 50, subject=f"{i:064x}"))
                await asyncio.sleep(0.01)

        async def swap() -> None:
            await until(lambda: len(recording.outcomes) >= 5)
            await publish_and_activate(stub, V2)

        await asyncio.gather(stream(), swap())
        await until(lambda: len(recording.outcomes) == 20)
        versions = [v for _, v in sorted(recording.versions(), key=lambda p: int(p[0][1:]))]
        # Every outcome before the swap carries v1, every one after v2, and none is lost.
        assert versions == sorted(versions)
        assert versions[0] == 1
        assert versions[-1] == 2
        points = {o.rule.rule_set_version: o.points for o in recording.outcomes}
        assert points == {1: -3, 2: -3}
        # Drained, everything rules emitted has reached score: none was emitted twice.
        await until_drained(database_url, "rules_outbox")
        assert len(recording.outcomes) == 20


async def test_replicas_converge_on_the_activated_version_and_a_restart_keeps_it(
    database_url: str, tmp_path: Path, score: tuple[RecordingScore, str]
) -> None:
    recording, score_address = score
    settings = rules_settings(database_url, tmp_path, score_address)
    async with (
        running(settings, build, MIGRATIONS) as first_address,
        running(settings, build, MIGRATIONS) as second_address,
        grpc.aio.insecure_channel(first_address) as first_channel,
        grpc.aio.insecure_channel(second_address) as second_channel,
    ):
        first, second = pb_grpc.RulesServiceStub(first_channel), pb_grpc.RulesServiceStub(second_channel)
        await evaluate(second, late("r1", 50))
        await publish_and_activate(first, V2)
        # The second replica was not told; it reads the active id at its next batch.
        await evaluate(second, late("r2", 50))
        await until(lambda: len(recording.outcomes) == 2)
        assert sorted(recording.versions()) == [("r1", 1), ("r2", 2)]
    # The file still says v1, but the database is the source of truth after the first start.
    async with (
        running(settings, build, MIGRATIONS) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.RulesServiceStub(channel)
        assert (await stub.GetActiveRuleSet(pb.GetActiveRuleSetRequest())).rule_set.version == 2
        changes = (await stub.ListRuleSetChanges(pb.ListRuleSetChangesRequest())).changes
        assert [c.action for c in changes].count("import") == 1


async def test_a_window_open_across_a_restart_fires_exactly_once(
    database_url: str, tmp_path: Path, score: tuple[RecordingScore, str]
) -> None:
    recording, score_address = score
    settings = rules_settings(database_url, tmp_path, score_address, source=WINDOW)

    def evasion(event_id: str, day: int) -> event_pb2.RecordedEvent:
        return recorded(event_id, "transport.metro.fare_evasion", {"station": "X", "amount": 4.0}, day=day)

    for batch in ([evasion("f1", 0)], [evasion("f2", 10)], [evasion("f3", 20), evasion("f4", 25)]):
        # A fresh process for every batch: all the window state must come from the database.
        async with (
            running(settings, build, MIGRATIONS) as address,
            grpc.aio.insecure_channel(address) as channel,
        ):
            await evaluate(pb_grpc.RulesServiceStub(channel), *batch)
            # Delivered again after the restart (at least once): no second firing.
            await evaluate(pb_grpc.RulesServiceStub(channel), *batch)
            # Every firing leaves before the process stops, so a second one would be counted.
            await until_drained(database_url, "rules_outbox")
    assert len(recording.outcomes) == 1
    (outcome,) = recording.outcomes
    assert sorted(e.ref.event_id for e in outcome.events) == ["f1", "f2", "f3"]
    assert outcome.points == -20


async def test_a_poison_event_is_parked_listed_and_redriven_once_fixed(
    database_url: str, tmp_path: Path, score: tuple[RecordingScore, str]
) -> None:
    recording, score_address = score
    async with (
        running(
            rules_settings(database_url, tmp_path, score_address, attempts=2), build, MIGRATIONS
        ) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.RulesServiceStub(channel)
        batch = [late("good", 50), late("poison", 40), late("other", 50, subject=OTHER)]
        # First attempt: the rest of the batch is committed, the call fails visibly to be retried.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await evaluate(stub, *batch)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "library/poison" in str(raised.value.details())
        assert "division by zero" in str(raised.value.details())
        await until(lambda: len(recording.outcomes) == 2)
        # Second attempt: the poison event is parked and the call succeeds.
        second = await evaluate(stub, *batch)
        assert (second.evaluated, second.duplicate, second.parked) == (0, 2, 1)
        # The subject is not blocked: its next event is evaluated.
        after = await evaluate(stub, late("later", 60, day=1))
        assert (after.evaluated, after.outcomes) == (1, 1)
        # Delivered once more, a parked event stays parked.
        assert (await evaluate(stub, late("poison", 40))).duplicate == 1

        letters = (await stub.ListDeadLetters(pb.ListDeadLettersRequest())).dead_letters
        assert [d.event_ref.event_id for d in letters] == ["poison"]
        (letter,) = letters
        assert letter.attempts == 2
        assert letter.rule_set_version == 1
        assert "[library.late_return]" in letter.reason
        assert "division by zero" in letter.reason
        assert letter.HasField("parked_at")

        # Redriving with the same rule set fails again and keeps it parked.
        still = await stub.RedriveDeadLetters(
            pb.RedriveDeadLettersRequest(dead_letter_ids=[letter.dead_letter_id]), metadata=as_actor("erin")
        )
        assert (still.redriven, [d.attempts for d in still.still_failing]) == (0, [3])
        assert [d.HasField("event") for d in still.still_failing] == [False]

        await publish_and_activate(stub, V2)
        fixed = await stub.RedriveDeadLetters(
            pb.RedriveDeadLettersRequest(all=True), metadata=as_actor("erin")
        )
        assert (fixed.redriven, fixed.outcomes, len(fixed.still_failing)) == (1, 1, 0)
        assert not (await stub.ListDeadLetters(pb.ListDeadLettersRequest())).dead_letters
        await until(lambda: len(recording.outcomes) == 4)
        assert ("poison", 2) in recording.versions()
        # Redriven or delivered again, it is evaluated once.
        assert (await evaluate(stub, late("poison", 40))).duplicate == 1
        nothing = await stub.RedriveDeadLetters(pb.RedriveDeadLettersRequest(all=True))
        assert nothing.redriven == 0
        await until_drained(database_url, "rules_outbox")
        assert sorted(e for e, _ in recording.versions()) == ["good", "later", "other", "poison"]
        changes = (await stub.ListRuleSetChanges(pb.ListRuleSetChangesRequest())).changes
        assert [(c.action, c.actor) for c in changes if c.action == "redrive"] == [
            ("redrive", "erin"),
            ("redrive", "erin"),
            ("redrive", "anonymous"),
        ]
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(sa.text("SELECT count(*) FROM rules_dead_letters")) == 0
            assert connection.scalar(sa.text("SELECT count(*) FROM rules_evaluated_events")) == 4
    finally:
        engine.dispose()


async def test_dead_letters_page(
    database_url: str, tmp_path: Path, score: tuple[RecordingScore, str]
) -> None:
    async with (
        running(rules_settings(database_url, tmp_path, score[1], attempts=1), build, MIGRATIONS) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.RulesServiceStub(channel)
        parked = await evaluate(stub, *(late(f"p{i}", 40, subject=f"{i:064x}") for i in range(3)))
        assert parked.parked == 3
        first = await stub.ListDeadLetters(pb.ListDeadLettersRequest(page_size=2))
        second = await stub.ListDeadLetters(
            pb.ListDeadLettersRequest(page_size=2, page_token=first.next_page_token)
        )
        ids = [d.event_ref.event_id for d in [*first.dead_letters, *second.dead_letters]]
        assert sorted(ids) == ["p0", "p1", "p2"]
        assert second.next_page_token == ""


async def test_dead_letters_show_their_events_only_for_a_purpose_and_the_read_is_recorded(
    database_url: str, tmp_path: Path, score: tuple[RecordingScore, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = rules_settings(database_url, tmp_path, score[1], attempts=1)
    async with running(settings, build, MIGRATIONS) as address, grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RulesServiceStub(channel)
        assert (await evaluate(stub, late("p0", 40), late("p1", 40, subject=OTHER))).parked == 2
        # Without a purpose: ids, keys, reasons, attempts; no event, no subject, no record.
        bare = (await stub.ListDeadLetters(pb.ListDeadLettersRequest())).dead_letters
        assert [(d.event_ref.source, d.event_ref.event_id, d.attempts) for d in bare] == [
            ("library", "p0", 1),
            ("library", "p1", 1),
        ]
        assert not any(d.HasField("event") for d in bare)
        assert all("division by zero" in d.reason for d in bare)
        assert SUBJECT.encode() not in b"".join(d.SerializeToString() for d in bare)
        await assert_bad_purposes_refused(
            lambda code, note: stub.ListDeadLetters(
                pb.ListDeadLettersRequest(purpose=code, purpose_note=note)
            )
        )
        assert read_records(database_url) == []
        # With one: the events, and one record per subject on the page.
        full = await stub.ListDeadLetters(
            pb.ListDeadLettersRequest(purpose="operations", purpose_note="INC 9")
        )
        assert [d.event.subject_key for d in full.dead_letters] == [SUBJECT, OTHER]
        ids = [d.dead_letter_id for d in full.dead_letters]
        detail = {"purpose_note": "INC 9", "subjects": 2, "dead_letter_range": [min(ids), max(ids)]}
        assert read_records(database_url) == [
            ("read:ListDeadLetters", SUBJECT, "operations", "dead_letters", detail),
            ("read:ListDeadLetters", OTHER, "operations", "dead_letters", detail),
        ]
    monkeypatch.setenv("EGRET_DATABASE_URL", database_url)
    monkeypatch.setenv("EGRET_RULESET_FILE", str(settings.ruleset_file))
    assert rules_main(["verify-audit"]) == 0


def read_records(database_url: str) -> list[tuple[str, str | None, str, str, dict[str, object]]]:
    """The read records of rules' audit log, in order."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(
                    RulesAuditLog.action,
                    RulesAuditLog.subject_key,
                    RulesAuditLog.purpose,
                    RulesAuditLog.target,
                    RulesAuditLog.detail,
                )
                .where(RulesAuditLog.action.startswith("read:"))
                .order_by(RulesAuditLog.seq)
            ).all()
    finally:
        engine.dispose()
    return [(a, k, p, t, json.loads(d)) for a, k, p, t, d in rows]
