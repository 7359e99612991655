"""The ingest service's gRPC API on loopback, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from egret.common.v1 import event_pb2
from egret.ingest.v1 import ingest_service_pb2 as pb
from egret.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from kit.env import SettingsError
from kit.pseudonym import Pseudonymiser
from kit.settings import PeerSettings
from kit.sharding import shard_of
from services.ingest.bootstrap import MIGRATIONS, build
from services.ingest.settings import IngestSettings
from tests.support.databases import create_postgres_database, drop_postgres_database
from tests.support.events import TEST_SUBJECT_KEY, event, full_width, resident_id
from tests.support.fakes import RecordingRules, serving_rules, serving_rules_shards
from tests.support.ingest import SUBJECT, ingest_settings, late
from tests.support.outbox import until_drained
from tests.support.servers import client_channel, running
from tests.support.status import bad_request
from tests.support.waiting import until


@pytest.fixture
async def ingest(
    database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[pb_grpc.IngestServiceAsyncStub, RecordingRules]]:
    rules = RecordingRules()
    async with (
        serving_rules(rules) as rules_address,
        running(ingest_settings(database_url, tmp_path, rules_address), build, MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        yield pb_grpc.IngestServiceStub(channel), rules


async def test_accepted_events_are_relayed_to_rules_pseudonymised(
    ingest: tuple[pb_grpc.IngestServiceAsyncStub, RecordingRules],
) -> None:
    stub, rules = ingest
    response = await stub.SubmitEvent(pb.SubmitEventRequest(source="library", event=late("e1")))
    assert response.result.status == pb.EVENT_STATUS_ACCEPTED
    await until(lambda: rules.event_ids() == ["e1"])
    (delivered,) = rules.batches[0].events
    assert delivered.subject_key == Pseudonymiser(TEST_SUBJECT_KEY, "k1").subject_key(
        "person", "resident-id", SUBJECT
    )
    assert SUBJECT not in str(delivered)
    assert delivered.attributes["days_late"] == event_pb2.AttributeValue(int_value=40)
    assert delivered.sequence > 0
    # The relay carries the trace context of the batch that stored the event.
    assert rules.metadata[0]["traceparent"].startswith("00-")


async def test_single_invalid_event_gets_invalid_argument_with_field_violations(
    ingest: tuple[pb_grpc.IngestServiceAsyncStub, RecordingRules],
) -> None:
    stub, _ = ingest
    bad = event("e2", "library.book_returned_late", SUBJECT, {"days_late": "late", "mood": "grumpy"})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitEvent(pb.SubmitEventRequest(source="library", event=bad))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(raised.value) == [
        ("event.attributes.days_late", "WRONG_TYPE"),
        ("event.attributes.mood", "UNKNOWN"),
    ]


async def test_one_resident_has_one_subject_key_however_the_id_is_written(
    ingest: tuple[pb_grpc.IngestServiceAsyncStub, RecordingRules],
) -> None:
    # Issue 12: "...234x" and "...234X" were two subjects, so a resident's token saw half
    # of its records and points could be dodged by writing the check character in lower case.
    stub, rules = ingest
    written = (
        "35020019920202234X",
        "35020019920202234x",
        "3502 0019 9202 0223 4X",
        full_width("35020019920202234x"),
    )
    events = [late(f"w{i}", subject=value) for i, value in enumerate(written)]
    response = await stub.SubmitEvents(pb.SubmitEventsRequest(source="library", events=events))
    assert response.counts.accepted == len(written)
    await until(lambda: len(rules.event_ids()) == len(written))
    keys = {e.subject_key for batch in rules.batches for e in batch.events}
    assert keys == {Pseudonymiser(TEST_SUBJECT_KEY, "k1").subject_key("person", "resident-id", written[0])}
    # A wrong check character is no subject at all: refused, naming the field.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitEvent(
            pb.SubmitEventRequest(source="library", event=late("w9", subject="350200199202022345"))
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(raised.value) == [("event.subject.id_value", "BAD_CHECK_CHARACTER")]


async def test_duplicate_is_acknowledged_and_conflict_is_already_exists(
    database_url: str, ingest: tuple[pb_grpc.IngestServiceAsyncStub, RecordingRules]
) -> None:
    stub, rules = ingest
    await stub.SubmitEvent(pb.SubmitEventRequest(source="library", event=late("e3")))
    again = await stub.SubmitEvent(pb.SubmitEventRequest(source="library", event=late("e3")))
    assert again.result.status == pb.EVENT_STATUS_DUPLICATE
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitEvent(pb.SubmitEventRequest(source="library", event=late("e3", days=41)))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # Drained, every row the three calls wrote has reached rules: the duplicate and the
    # conflict relayed nothing more.
    await until_drained(database_url, "ingest_outbox")
    assert rules.event_ids() == ["e3"]


async def test_batch_results_per_event_and_limits(
    ingest: tuple[pb_grpc.IngestServiceAsyncStub, RecordingRules],
) -> None:
    stub, _ = ingest
    response = await stub.SubmitEvents(
        pb.SubmitEventsRequest(source="library", events=[late("b1"), late("b2", days=0), late("b1")])
    )
    assert [r.status for r in response.results] == [
        pb.EVENT_STATUS_ACCEPTED,
        pb.EVENT_STATUS_REJECTED,
        pb.EVENT_STATUS_DUPLICATE,
    ]
    assert [(v.field, v.reason) for v in response.results[1].violations] == [
        ("events[1].attributes.days_late", "OUT_OF_RANGE")
    ]
    assert (response.counts.accepted, response.counts.rejected, response.counts.duplicate) == (1, 1, 1)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitEvents(
            pb.SubmitEventsRequest(source="library", events=[late(f"x{i}") for i in range(101)])
        )
    assert bad_request(raised.value) == [("events", "BATCH_TOO_LARGE")]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitEvents(pb.SubmitEventsRequest(source="zoo", events=[late("z")]))
    assert bad_request(raised.value) == [("source", "UNKNOWN_SOURCE")]


async def test_every_violation_names_its_field_from_the_root_of_the_request(
    ingest: tuple[pb_grpc.IngestServiceAsyncStub, RecordingRules],
) -> None:
    """One field-path convention (errors.proto): from the request message's root, proto
    field names, `[i]` for an index and `.key` for a map key; SubmitEvent's status,
    SubmitEvents' results and each StreamEvents acknowledgement alike."""
    stub, _ = ingest
    bad = late("p2", days=0)
    bad.subject.id_scheme = "shoe-size"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitEvent(pb.SubmitEventRequest(source="library", event=bad))
    assert bad_request(raised.value) == [
        ("event.subject.id_scheme", "INVALID"),
        ("event.attributes.days_late", "OUT_OF_RANGE"),
    ]
    batch = [late("p0"), late("p1"), bad]
    response = await stub.SubmitEvents(pb.SubmitEventsRequest(source="library", events=batch))
    assert [(v.field, v.reason) for v in response.results[2].violations] == [
        ("events[2].subject.id_scheme", "INVALID"),
        ("events[2].attributes.days_late", "OUT_OF_RANGE"),
    ]

    async def batches() -> AsyncIterator[pb.StreamEventsRequest]:
        yield pb.StreamEventsRequest(source="library", batch_id="a", events=[late("p3"), bad])
        yield pb.StreamEventsRequest(source="nobody", batch_id="b", events=[late("p4")])

    acks = [ack async for ack in stub.StreamEvents(batches(), timeout=30)]
    assert [(v.field, v.reason) for v in acks[0].results[1].violations] == [
        ("events[1].subject.id_scheme", "INVALID"),
        ("events[1].attributes.days_late", "OUT_OF_RANGE"),
    ]
    # A batch refused as a whole names the fields of its StreamEventsRequest.
    assert [(v.field, v.reason) for v in acks[1].results[0].violations] == [("source", "UNKNOWN_SOURCE")]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.RetractEvent(pb.RetractEventRequest(ref=event_pb2.EventRef(source="library")))
    assert bad_request(raised.value) == [("reason", "REQUIRED"), ("ref.event_id", "REQUIRED")]


async def test_stream_acknowledges_every_batch_in_order_and_survives_a_bad_batch(
    ingest: tuple[pb_grpc.IngestServiceAsyncStub, RecordingRules],
) -> None:
    stub, rules = ingest

    async def batches() -> AsyncIterator[pb.StreamEventsRequest]:
        yield pb.StreamEventsRequest(
            source="library", batch_id="one", events=[late(f"s{i}") for i in range(10)]
        )
        yield pb.StreamEventsRequest(source="nobody", batch_id="two", events=[late("s99")])
        yield pb.StreamEventsRequest(
            source="library", batch_id="three", events=[late("s0"), late("s10", subject=resident_id(1))]
        )

    acks = [ack async for ack in stub.StreamEvents(batches(), timeout=30)]
    assert [a.batch_id for a in acks] == ["one", "two", "three"]
    assert acks[0].counts.accepted == 10
    assert acks[1].counts.rejected == 1
    assert acks[1].results[0].violations[0].reason == "UNKNOWN_SOURCE"
    assert (acks[2].counts.duplicate, acks[2].counts.accepted) == (1, 1)
    await until(lambda: len(rules.event_ids()) == 11)
    assert sorted(rules.event_ids()) == sorted([f"s{i}" for i in range(11)])


async def test_relay_retries_with_backoff_until_rules_accepts(database_url: str, tmp_path: Path) -> None:
    rules = RecordingRules(failures=3)
    async with (
        serving_rules(rules) as rules_address,
        running(ingest_settings(database_url, tmp_path, rules_address), build, MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        stub = pb_grpc.IngestServiceStub(channel)
        await stub.SubmitEvents(pb.SubmitEventsRequest(source="library", events=[late("r1"), late("r2")]))
        await until(lambda: rules.event_ids() == ["r1", "r2"])
        assert rules.calls == 4
        engine = sa.create_engine(database_url)
        with engine.connect() as connection:
            await until(lambda: connection.scalar(sa.text("SELECT count(*) FROM ingest_outbox")) == 0)
            stored = connection.execute(sa.text("SELECT subject_key, record FROM ingest_events")).all()
        engine.dispose()
        assert len(stored) == 2
        assert all(SUBJECT.encode() not in row.record + bytes(row.subject_key) for row in stored)


async def test_events_committed_while_rules_is_down_are_delivered_after_restart(
    database_url: str, tmp_path: Path
) -> None:
    async with (
        running(ingest_settings(database_url, tmp_path, "127.0.0.1:9"), build, MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        stub = pb_grpc.IngestServiceStub(channel)
        await stub.SubmitEvents(pb.SubmitEventsRequest(source="library", events=[late("d1"), late("d2")]))
    rules = RecordingRules()
    async with (
        serving_rules(rules) as rules_address,
        running(ingest_settings(database_url, tmp_path, rules_address), build, MIGRATIONS),
    ):
        await until(lambda: sorted(rules.event_ids()) == ["d1", "d2"])


async def test_events_older_or_newer_than_allowed_are_rejected(
    ingest: tuple[pb_grpc.IngestServiceAsyncStub, RecordingRules],
) -> None:
    stub, _ = ingest
    future = event(
        "f1",
        "library.book_returned_late",
        SUBJECT,
        {"days_late": 40},
        occurred_at=datetime.now(UTC) + timedelta(hours=1),
    )
    response = await stub.SubmitEvents(pb.SubmitEventsRequest(source="library", events=[future]))
    assert response.results[0].violations[0].reason == "IN_FUTURE"


@pytest.mark.postgres
async def test_health_turns_not_serving_when_the_database_goes_away(tmp_path: Path) -> None:
    url = create_postgres_database()
    try:
        async with (
            running(ingest_settings(url, tmp_path, "127.0.0.1:9"), build, MIGRATIONS) as address,
            client_channel(address) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)

            async def status() -> int:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service="egret.ingest.v1.IngestService")
                )
                return int(reply.status)

            async def serving() -> bool:
                return await status() == int(health_pb2.HealthCheckResponse.SERVING)

            async def not_serving() -> bool:
                return not await serving()

            await until(serving, what="ingest serving", every_s=0.05)
            drop_postgres_database(url)
            await until(not_serving, what="ingest to stop serving without its database", every_s=0.05)
            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        drop_postgres_database(url)


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_the_service_and_health_under_v1_and_v1alpha(
    database_url: str, tmp_path: Path, version: str
) -> None:
    """grpcurl and others ask grpc.reflection.v1 first, older tools v1alpha; both answer,
    and each describes itself (the two protocols' messages are the same on the wire)."""
    async with (
        running(ingest_settings(database_url, tmp_path, "127.0.0.1:9"), build, MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol=f"grpc.reflection.{version}.ServerReflection"
            ),
        ]
        listed, described = [r async for r in info(iter(requests), timeout=5)]
        names = {s.name for s in listed.list_services_response.service}
        assert {
            "egret.ingest.v1.IngestService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in described.file_descriptor_response.file_descriptor_proto
        ]
        assert [f.package for f in files] == [f"grpc.reflection.{version}"]
        assert [m.input_type for m in files[0].service[0].method] == [
            f".grpc.reflection.{version}.ServerReflectionRequest"
        ]


def sharded_settings(database_url: str, data_dir: Path, addresses: list[str]) -> IngestSettings:
    single = ingest_settings(database_url, data_dir, addresses[0])
    return replace(single, rules=tuple(PeerSettings(address=a, deadline_s=2.0) for a in addresses))


def subject_key_of(subject: str) -> str:
    return Pseudonymiser(TEST_SUBJECT_KEY, "k1").subject_key("person", "resident-id", subject)


def shard_of_subject(subject: str, shards: int) -> int:
    return shard_of(subject_key_of(subject), shards)


SHARDED_SUBJECTS = [resident_id(i) for i in range(40)]


async def submit_three_each(stub: pb_grpc.IngestServiceAsyncStub) -> None:
    """Three rounds over every subject, so each subject has events in three batches."""
    for round_ in range(3):
        events = [late(f"{subject}-{round_}", subject=subject) for subject in SHARDED_SUBJECTS]
        response = await stub.SubmitEvents(pb.SubmitEventsRequest(source="library", events=events))
        assert response.counts.accepted == len(SHARDED_SUBJECTS)


async def test_sharded_rules_each_shard_receives_exactly_its_subjects_in_order(
    database_url: str, tmp_path: Path
) -> None:
    shards = [RecordingRules(), RecordingRules()]
    async with (
        serving_rules_shards(shards) as addresses,
        running(sharded_settings(database_url, tmp_path, addresses), build, MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        await submit_three_each(pb_grpc.IngestServiceStub(channel))
        await until(lambda: sum(len(s.event_ids()) for s in shards) == 3 * len(SHARDED_SUBJECTS))
    owners = {s: shard_of_subject(s, 2) for s in SHARDED_SUBJECTS}
    assert set(owners.values()) == {0, 1}
    for index, servicer in enumerate(shards):
        received = servicer.events()
        assert {e.subject_key for e in received} == {
            subject_key_of(s) for s, owner in owners.items() if owner == index
        }
        # Per subject, events arrive in the order ingest stored them.
        by_subject: dict[str, list[int]] = {}
        for e in received:
            by_subject.setdefault(e.subject_key, []).append(e.sequence)
        assert all(seqs == sorted(seqs) and len(seqs) == 3 for seqs in by_subject.values())


async def test_sharded_rules_a_failing_shard_holds_back_only_its_own_subjects(
    database_url: str, tmp_path: Path
) -> None:
    down, up = RecordingRules(failures=10**9), RecordingRules()
    expected_up = 3 * sum(1 for s in SHARDED_SUBJECTS if shard_of_subject(s, 2) == 1)
    async with (
        serving_rules_shards([down, up]) as addresses,
        running(sharded_settings(database_url, tmp_path, addresses), build, MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        await submit_three_each(pb_grpc.IngestServiceStub(channel))
        await until(lambda: len(up.event_ids()) == expected_up)
        assert down.calls > 0
        assert down.event_ids() == []
        # The up shard records a batch before its answer reaches the relay, which then
        # deletes the rows: wait for the outbox to hold only the down shard's rows.
        engine = sa.create_engine(database_url)
        try:

            def waiting() -> list[tuple[int, int]]:
                with engine.connect() as connection:
                    rows = connection.execute(
                        sa.text("SELECT shard, count(*) FROM ingest_outbox GROUP BY shard ORDER BY shard")
                    ).all()
                return [(int(shard), int(count)) for shard, count in rows]

            await until(lambda: waiting() == [(0, 3 * len(SHARDED_SUBJECTS) - expected_up)])
            assert down.event_ids() == []
        finally:
            engine.dispose()


async def test_fewer_rules_shards_than_the_outbox_was_written_for_stops_start_up(
    database_url: str, tmp_path: Path
) -> None:
    unreachable = ["127.0.0.1:9", "127.0.0.1:10"]
    async with (
        running(sharded_settings(database_url, tmp_path, unreachable), build, MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        await submit_three_each(pb_grpc.IngestServiceStub(channel))
    with pytest.raises(SettingsError) as raised:
        async with running(ingest_settings(database_url, tmp_path, "127.0.0.1:9"), build, MIGRATIONS):
            pass
    assert "the outbox holds events for shard(s) 1" in str(raised.value)


async def test_a_call_without_a_deadline_is_refused_before_any_work(
    database_url: str, tmp_path: Path
) -> None:
    rules = RecordingRules()
    async with (
        serving_rules(rules) as rules_address,
        running(ingest_settings(database_url, tmp_path, rules_address), build, MIGRATIONS) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.SubmitEvent(pb.SubmitEventRequest(source="library", event=late("nd1")))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(raised.value) == [("grpc-timeout", "REQUIRED")]
        accepted = await stub.SubmitEvent(
            pb.SubmitEventRequest(source="library", event=late("nd1")), timeout=5
        )
        assert accepted.result.status == pb.EVENT_STATUS_ACCEPTED  # the refused call stored nothing
