"""Wiring of the ingest service: settings → store → domain → servicer → runtime."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from egret.common.v1 import event_pb2
from egret.ingest.v1 import ingest_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2 as rules_pb
from egret.rules.v1 import rules_service_pb2_grpc as rules_grpc
from kit.app import run_cli
from kit.db import create_engine, make_session_factory
from kit.outbox import Send, relay_to_peer
from kit.pseudonym import Pseudonymiser
from kit.server import Service
from services.ingest.catalogue import load_catalogue
from services.ingest.domain import Intake, Limits
from services.ingest.servicer import IngestServicer, register
from services.ingest.settings import IngestSettings
from services.ingest.storage import Outbox, SqlEventStore

MIGRATIONS = Path(__file__).parent / "migrations"


def send_to_rules(channel: grpc.aio.Channel, deadline_s: float) -> Send:
    rules = rules_grpc.RulesServiceStub(channel)

    async def send(payloads: Sequence[bytes]) -> None:
        events = [event_pb2.RecordedEvent.FromString(p) for p in payloads]
        await rules.EvaluateEvents(rules_pb.EvaluateEventsRequest(events=events), timeout=deadline_s)

    return send


def build(settings: IngestSettings) -> Service:
    engine = create_engine(
        settings.common.database_url,
        sqlite_synchronous=settings.common.sqlite_synchronous,
        pool_size=settings.db_workers + 2,
    )
    sessions = make_session_factory(engine)
    intake = Intake(
        catalogue=load_catalogue(settings.catalogue_file),
        pseudonymiser=Pseudonymiser(settings.pseudonym.key, settings.pseudonym.key_id),
        store=SqlEventStore(sessions),
        limits=Limits(
            max_batch_size=settings.max_batch_size,
            max_future_skew=timedelta(seconds=settings.max_future_skew_s),
            max_event_age=timedelta(days=settings.max_event_age_days),
        ),
        clock=lambda: datetime.now(UTC),
    )
    relay = relay_to_peer(
        name="ingest→rules",
        sessions=sessions,
        table=Outbox,
        peer=settings.rules,
        settings=settings.relay,
        make_send=send_to_rules,
    )
    # One writer thread by default: SQLite has one writer at a time anyway, and a single
    # thread commits batches in arrival order without lock contention.
    executor = ThreadPoolExecutor(max_workers=settings.db_workers, thread_name_prefix="ingest-db")
    servicer = IngestServicer(intake, executor, committed=relay.notify)

    return Service(
        name="ingest",
        service_names=[pb.DESCRIPTOR.services_by_name["IngestService"].full_name],
        register=register(servicer),
        engines=[engine],
        background=[relay.run],
        executors=[executor],
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        name="ingest",
        load_settings=IngestSettings.from_env,
        build=build,
        migrations_dir=MIGRATIONS,
        argv=argv,
    )
