"""A rules shard on loopback refuses another shard's subjects, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from egret.common.v1 import event_pb2, subject_pb2
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from kit.env import SettingsError
from kit.protoconv import to_attribute_value, to_timestamp
from kit.sharding import shard_of
from services.rules.bootstrap import MIGRATIONS, build
from services.rules.settings import RulesSettings
from tests.support.servers import common_settings, running

SHARDS = 2
THIS_SHARD = 1


def subject_of_shard(shard: int, start: int = 0) -> str:
    """A subject key owned by `shard` (hex, like ingest's HMACs)."""
    return next(k for i in range(start, start + 1000) if shard_of(k := f"{i:064x}", SHARDS) == shard)


def recorded(event_id: str, subject_key: str) -> event_pb2.RecordedEvent:
    return event_pb2.RecordedEvent(
        ref=event_pb2.EventRef(source="library", event_id=event_id),
        event_type="library.book_returned_late",
        subject_key=subject_key,
        subject_kind=subject_pb2.SUBJECT_KIND_PERSON,
        occurred_at=to_timestamp(datetime(2026, 6, 1, tzinfo=UTC)),
        recorded_at=to_timestamp(datetime(2026, 6, 1, tzinfo=UTC)),
        attributes={"days_late": to_attribute_value(40)},
        subject_key_id="k1",
    )


def shard_settings(database_url: str, data_dir: Path, shard: int, shards: int) -> RulesSettings:
    # From the environment as in production, so the test also proves the settings' names.
    settings = RulesSettings.from_env(
        {
            "EGRET_RULES_SHARD": str(shard),
            "EGRET_RULES_SHARDS": str(shards),
            "EGRET_SCORE_ADDRESS": "127.0.0.1:9",  # outcomes wait in the outbox; not under test
            "EGRET_INSECURE": "true",
        }
    )
    return replace(settings, common=common_settings("rules", database_url, data_dir))


@pytest.fixture
async def shard_one(database_url: str, tmp_path: Path) -> AsyncIterator[pb_grpc.RulesServiceAsyncStub]:
    async with (
        running(shard_settings(database_url, tmp_path, THIS_SHARD, SHARDS), build, MIGRATIONS) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        yield pb_grpc.RulesServiceStub(channel)


async def test_shard_evaluates_the_subjects_it_owns(shard_one: pb_grpc.RulesServiceAsyncStub) -> None:
    ours = [
        recorded("own-1", subject_of_shard(THIS_SHARD)),
        recorded("own-2", subject_of_shard(THIS_SHARD, 500)),
    ]
    response = await shard_one.EvaluateEvents(pb.EvaluateEventsRequest(events=ours))
    assert (response.evaluated, response.outcomes) == (2, 2)


async def test_shard_refuses_a_batch_holding_another_shards_subject_as_failed_precondition(
    shard_one: pb_grpc.RulesServiceAsyncStub,
) -> None:
    ours, theirs = subject_of_shard(THIS_SHARD), subject_of_shard(0)
    batch = [recorded("mixed-1", ours), recorded("mixed-2", theirs)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await shard_one.EvaluateEvents(pb.EvaluateEventsRequest(events=batch))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = raised.value.details() or ""
    assert "shard 1 of 2" in details
    assert "events[1] → shard 0" in details
    # Refused as a whole: nothing of the batch was recorded, so the owner's copy is the only one.
    again = await shard_one.EvaluateEvents(pb.EvaluateEventsRequest(events=[recorded("mixed-1", ours)]))
    assert (again.evaluated, again.duplicate) == (1, 0)


@pytest.mark.parametrize(("shard", "shards"), [(0, 2), (1, 3), (0, 1)])
async def test_a_database_of_one_shard_refuses_to_start_as_another(
    database_url: str, tmp_path: Path, shard: int, shards: int
) -> None:
    async with running(shard_settings(database_url, tmp_path, THIS_SHARD, SHARDS), build, MIGRATIONS):
        pass
    with pytest.raises(SettingsError) as raised:
        async with running(shard_settings(database_url, tmp_path, shard, shards), build, MIGRATIONS):
            pass
    assert f"EGRET_RULES_SHARD={shard} of EGRET_RULES_SHARDS={shards} does not match" in str(raised.value)
    assert "holds shard 1 of 2" in str(raised.value)
    # The recorded layout still starts.
    async with running(shard_settings(database_url, tmp_path, THIS_SHARD, SHARDS), build, MIGRATIONS):
        pass
