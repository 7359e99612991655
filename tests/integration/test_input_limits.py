"""Bad input gets a clean status naming what is wrong, on the real services: undecodable
bytes, out-of-range timestamps, YAML bombs, values that do not fit their proto fields, and
a stored row that cannot be shown (which must not break the listing for everyone)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from egret.common.v1 import due_process_pb2, event_pb2, subject_pb2
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.db import create_engine
from kit.protoconv import to_timestamp
from services.ingest import bootstrap as ingest_bootstrap
from services.rules import bootstrap as rules_bootstrap
from services.rules.stores.schema import EvaluatedEvent, RuleSetRow
from services.score import bootstrap as score_bootstrap
from tests.support.events import event
from tests.support.ingest import ingest_settings
from tests.support.rules import V1, rules_settings
from tests.support.score import score_settings
from tests.support.servers import client_channel, running
from tests.support.status import bad_request


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def test_a_stored_rule_set_that_cannot_be_shown_does_not_break_listings(
    database_url: str, tmp_path: Path
) -> None:
    settings = rules_settings(database_url, tmp_path, "127.0.0.1:9")
    async with running(settings, rules_bootstrap.build, rules_bootstrap.MIGRATIONS) as address:
        engine = create_engine(database_url)
        try:
            with engine.begin() as connection:
                planted = connection.execute(
                    sa.insert(RuleSetRow)
                    .values(
                        name="planted",
                        version=1,
                        state="archived",  # a state this code does not know
                        source="not: a rule set",
                        source_sha256="0" * 64,
                        created_at=datetime(2026, 1, 1, tzinfo=UTC),
                        created_by="a database administrator",
                    )
                    .returning(RuleSetRow.id)
                ).scalar_one()
        finally:
            engine.dispose()
        async with client_channel(address) as channel:
            stub = pb_grpc.RulesServiceStub(channel)
            listed = await stub.ListRuleSets(pb.ListRuleSetsRequest())
            assert [s.name for s in listed.rule_sets] == ["test-rules"]  # the imported one, still shown
            error = await _refused(stub.GetRuleSet(pb.GetRuleSetRequest(rule_set_id=planted)))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION

            # What let such a row in through the API before: a version beyond int32.
            too_big = V1.replace("version: 1", "version: 2147483648")
            error = await _refused(stub.CreateDraft(pb.CreateDraftRequest(source=too_big)))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ("source.version", "INVALID_RULE_SET") in bad_request(error)
            listed = await stub.ListRuleSets(pb.ListRuleSetsRequest())
            assert [s.name for s in listed.rule_sets] == ["test-rules"]


@pytest.mark.parametrize(
    ("source", "position"),
    [
        ("name: a\x00b\n", "line 1, column 8"),
        ("name: " + "[" * 20_000, "line 1, column"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "\n".join(
                f"a{i}: &a{i} [" + ", ".join(["*a" if i == 1 else f"*a{i - 1}"] * 10) + "]"
                for i in range(1, 8)
            ),
            "line",
        ),
    ],
    ids=["control character", "deep nesting", "billion laughs"],
)
async def test_rule_set_yaml_bombs_are_invalid_argument_with_their_position(
    tmp_path: Path, source: str, position: str
) -> None:
    settings = rules_settings(f"sqlite:///{tmp_path / 'rules.db'}", tmp_path, "127.0.0.1:9")
    async with (
        running(settings, rules_bootstrap.build, rules_bootstrap.MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        stub = pb_grpc.RulesServiceStub(channel)
        validated = await stub.ValidateRuleSet(pb.ValidateRuleSetRequest(source=source))
        assert not validated.valid
        assert [p.field for p in validated.problems] == ["source"]
        assert position in validated.problems[0].description
        error = await _refused(stub.CreateDraft(pb.CreateDraftRequest(source=source)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(error) == [("source", "INVALID_RULE_SET")]


async def test_policy_yaml_nested_too_deeply_is_invalid_argument(tmp_path: Path) -> None:
    settings = score_settings(f"sqlite:///{tmp_path / 'score.db'}", tmp_path)
    async with (
        running(settings, score_bootstrap.build, score_bootstrap.MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        stub = score_grpc.ScoreServiceStub(channel)
        deep = "version: " + "[" * 20_000
        for call in (
            stub.PreviewPolicy(score_pb.PreviewPolicyRequest(policy_yaml=deep)),
            stub.ActivatePolicy(score_pb.ActivatePolicyRequest(policy_yaml=deep)),
        ):
            error = await _refused(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_out_of_range_timestamps_and_undecodable_bytes_are_invalid_argument(tmp_path: Path) -> None:
    settings = ingest_settings(f"sqlite:///{tmp_path / 'ingest.db'}", tmp_path, "127.0.0.1:9")
    async with (
        running(settings, ingest_bootstrap.build, ingest_bootstrap.MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        stub = ingest_grpc.IngestServiceStub(channel)
        late = event("e1", "library.book_returned_late", "350200199001011230", {"days_late": 3})
        late.occurred_at.seconds = 253_402_300_800  # year 10000
        error = await _refused(stub.SubmitEvent(ingest_pb.SubmitEventRequest(source="library", event=late)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(error) == [("event.occurred_at", "OUT_OF_RANGE")]

        raw: Any = channel.unary_unary("/egret.ingest.v1.IngestService/SubmitEvent")
        error = await _refused(raw(b"\x12\x04\x0a\x02\xff\xfe"))  # bad UTF-8 in event.event_id
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(error) == [("event.event_id", "UNDECODABLE")]

        # A bad message in the middle of a stream ends it with INVALID_ARGUMENT, after the
        # good one before it was answered.
        good = ingest_pb.StreamEventsRequest(source="library", batch_id="b1").SerializeToString()
        stream: Any = channel.stream_stream("/egret.ingest.v1.IngestService/StreamEvents")
        answers: list[bytes] = []

        async def read_all() -> None:
            async for answer in stream(iter([good, b"\x0a\x01\xff"]), timeout=10):
                answers.append(answer)

        error = await _refused(read_all())
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(answers) == 1


async def test_a_subject_key_that_is_not_lowercase_hex_is_invalid_argument(tmp_path: Path) -> None:
    """Rules stores subject keys as the bytes their hex spells (kit.columns.Hex): a key
    that is not lowercase hex is refused at the boundary, and nothing of the call is stored."""
    database_url = f"sqlite:///{tmp_path / 'rules.db'}"
    settings = rules_settings(database_url, tmp_path, "127.0.0.1:9")
    request = pb.EvaluateEventsRequest(
        events=[
            event_pb2.RecordedEvent(
                ref=event_pb2.EventRef(source="library", event_id="e1"),
                subject_key="Person-1",
                subject_kind=subject_pb2.SUBJECT_KIND_PERSON,
                event_type="library.book_returned_late",
                occurred_at=to_timestamp(datetime(2026, 12, 7, tzinfo=UTC)),
            )
        ],
        retractions=[
            due_process_pb2.Retraction(
                ref=event_pb2.EventRef(source="library", event_id="e0"), subject_key="AB" * 32
            )
        ],
    )
    async with (
        running(settings, rules_bootstrap.build, rules_bootstrap.MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        error = await _refused(pb_grpc.RulesServiceStub(channel).EvaluateEvents(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(error) == [
        ("events[0].subject_key", "INVALID"),
        ("retractions[0].subject_key", "INVALID"),
    ]
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(sa.select(sa.func.count()).select_from(EvaluatedEvent)) == 0
    finally:
        engine.dispose()
