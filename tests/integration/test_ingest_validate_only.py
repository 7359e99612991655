"""SubmitEvents with validate_only (AIP-163): the answer a real submission gives, with nothing
stored and nothing relayed, on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from egret.ingest.v1 import ingest_service_pb2 as pb
from egret.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from services.ingest.bootstrap import MIGRATIONS, build
from tests.support.events import event
from tests.support.fakes import RecordingRules, serving_rules
from tests.support.ingest import SUBJECT, ingest_settings, late
from tests.support.outbox import until_drained
from tests.support.servers import client_channel, running
from tests.support.waiting import until

TABLES = ("ingest_events", "ingest_outbox", "ingest_retractions", "ingest_audit_log")


def row_counts(database_url: str) -> dict[str, int]:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            return {
                table: int(connection.scalar(sa.text(f"SELECT count(*) FROM {table}")) or 0)
                for table in TABLES
            }
    finally:
        engine.dispose()


def summary(response: pb.SubmitEventsResponse) -> list[tuple[int, str, int, list[tuple[str, str]]]]:
    return [
        (r.index, r.event_id, r.status, [(v.field, v.reason) for v in r.violations]) for r in response.results
    ]


async def test_validate_only_answers_as_a_submission_does_and_stores_nothing(
    database_url: str, tmp_path: Path
) -> None:
    rules = RecordingRules()
    async with (
        serving_rules(rules) as rules_address,
        running(ingest_settings(database_url, tmp_path, rules_address), build, MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        stub = pb_grpc.IngestServiceStub(channel)
        await stub.SubmitEvents(pb.SubmitEventsRequest(source="library", events=[late("kept", 10)]))
        await until(lambda: rules.event_ids() == ["kept"])
        await until_drained(database_url, "ingest_outbox")
        before = row_counts(database_url)

        batch = [
            late("kept", 10),  # stored already, same payload: a duplicate
            late("kept", 11),  # stored already, another payload: a conflict
            late("new", 3),
            late("zero", 0),  # below the catalogue's minimum
            event("red", "traffic.red_light", SUBJECT, {"camera_id": "c-1"}),  # not the library's
            late("new", 3),  # again in the same batch: a duplicate of the one before
        ]
        checked = await stub.SubmitEvents(
            pb.SubmitEventsRequest(source="library", events=batch, validate_only=True)
        )
        assert [r.status for r in checked.results] == [
            pb.EVENT_STATUS_DUPLICATE,
            pb.EVENT_STATUS_CONFLICT,
            pb.EVENT_STATUS_ACCEPTED,
            pb.EVENT_STATUS_REJECTED,
            pb.EVENT_STATUS_REJECTED,
            pb.EVENT_STATUS_DUPLICATE,
        ]
        assert (checked.counts.accepted, checked.counts.duplicate) == (1, 2)
        assert (checked.counts.rejected, checked.counts.conflict) == (2, 1)
        # Field paths from the request's root, as a real submission names them.
        assert [(v.field, v.reason) for v in checked.results[3].violations] == [
            ("events[3].attributes.days_late", "OUT_OF_RANGE")
        ]

        # Nothing stored, nothing waiting in the outbox, nothing relayed.
        await until_drained(database_url, "ingest_outbox")
        assert row_counts(database_url) == before
        assert rules.event_ids() == ["kept"]

        # The real submission answers exactly what the check said.
        submitted = await stub.SubmitEvents(pb.SubmitEventsRequest(source="library", events=batch))
        assert summary(submitted) == summary(checked)
        assert submitted.counts == checked.counts
        await until(lambda: rules.event_ids() == ["kept", "new"])
        assert row_counts(database_url)["ingest_events"] == before["ingest_events"] + 1
