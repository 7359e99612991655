"""Wiring of the ingest service: settings → store → domain → servicer → runtime."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from domain.catalogue import load_catalogue
from egret.ingest.v1 import ingest_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2 as rules_pb
from egret.rules.v1 import rules_service_pb2_grpc as rules_grpc
from kit.app import run_cli
from kit.audit import audit_keys
from kit.db import create_engine, make_session_factory
from kit.env import SettingsError
from kit.outbox import OutboxRelay, relay_to_peer
from kit.outbox_send import merged_sender
from kit.pseudonym import Pseudonymiser
from kit.rekey import GenerationGuard, StaleKeyGeneration
from kit.security import channel_credentials
from kit.server import Service
from services.ingest.access import POLICY
from services.ingest.domain import Intake, Limits
from services.ingest.servicer import IngestServicer, register
from services.ingest.settings import IngestSettings
from services.ingest.stores.events import (
    KEYED,
    IngestAuditHead,
    IngestAuditLog,
    IngestSubjectKeyGeneration,
    Outbox,
    OutboxLease,
    SqlEventStore,
)

MIGRATIONS = Path(__file__).parent / "migrations"


# Rules applies a request's retractions after its events, and a retraction's row always
# follows its event's, so merging the rows (order kept within each field) keeps their effect.
send_to_rules = merged_sender(
    rules_pb.EvaluateEventsRequest,
    fields=("events", "retractions"),
    method=lambda channel: rules_grpc.RulesServiceStub(channel).EvaluateEvents,
)


def refuse_stranded_rows(store: SqlEventStore, shards: int) -> None:
    """Stop start-up when the outbox holds rows for shards this configuration does not have.

    They were written for a larger shard count, no relay would ever send them, and nothing
    else would say so. A database that cannot be read yet is left to the health check, one
    being re-keyed to the generation guard.
    """
    try:
        stranded = store.stranded_shards()
    except (SQLAlchemyError, StaleKeyGeneration):
        return
    if stranded:
        raise SettingsError(
            [
                f"the rules addresses name {shards} shard(s) but the outbox holds events for "
                f"shard(s) {', '.join(map(str, stranded))}: drain it with the old shard count first "
                "(resharding, docs/architecture.md)"
            ]
        )


def rules_relays(settings: IngestSettings, sessions: sessionmaker[Session]) -> list[OutboxRelay]:
    """One relay per rules shard, each claiming only its shard's outbox rows: order per subject
    holds (a subject's rows are one relay's, sent in id order), and a slow or failing shard
    holds back only its own subjects."""
    sharded = len(settings.rules) > 1
    return [
        relay_to_peer(
            name=f"ingest→rules-{shard}" if sharded else "ingest→rules",
            sessions=sessions,
            table=Outbox,
            leases=OutboxLease,
            peer=peer,
            settings=settings.relay,
            make_send=send_to_rules,
            instance=settings.common.instance,
            credentials=channel_credentials(settings.common.security),
            where=Outbox.shard == shard,
            max_call_bytes=settings.common.limits.max_message_bytes,
        )
        for shard, peer in enumerate(settings.rules)
    ]


def pseudonymiser_of(settings: IngestSettings) -> Pseudonymiser:
    return Pseudonymiser.from_settings(settings.pseudonym)


def build(settings: IngestSettings) -> Service:
    pseudonymiser = pseudonymiser_of(settings)
    engine = create_engine(
        settings.common.database_url,
        sqlite=settings.common.sqlite,
        pool_size=settings.db_workers + 2,
    )
    sessions = make_session_factory(engine)
    # Events and retractions are refused (UNAVAILABLE) while the stored keys are of another
    # generation than this instance's or being moved (kit.rekey). The relays have sessions
    # of their own: outbox rows carry their generation, and rules moves them forward.
    GenerationGuard(IngestSubjectKeyGeneration, pseudonymiser.current_key_id).install(sessions)
    store = SqlEventStore(
        sessions, audit_keys=audit_keys(settings.common.audit), rules_shards=len(settings.rules)
    )
    refuse_stranded_rows(store, len(settings.rules))
    intake = Intake(
        catalogue=load_catalogue(settings.catalogue_file),
        pseudonymiser=pseudonymiser,
        store=store,
        limits=Limits(
            max_batch_size=settings.max_batch_size,
            max_future_skew=timedelta(seconds=settings.max_future_skew_s),
            max_event_age=timedelta(days=settings.max_event_age_days),
        ),
        clock=lambda: datetime.now(UTC),
    )
    relays = rules_relays(settings, make_session_factory(engine))
    # One writer thread by default: SQLite has one writer at a time anyway, and a single
    # thread commits batches in arrival order without lock contention.
    executor = ThreadPoolExecutor(max_workers=settings.db_workers, thread_name_prefix="ingest-db")

    def committed() -> None:
        # A batch may hold subjects of every shard; an idle relay's wake-up is one cheap query.
        for relay in relays:
            relay.notify()

    servicer = IngestServicer(intake, executor, committed=committed)

    return Service(
        pseudonymiser=pseudonymiser,
        name="ingest",
        service_names=[pb.DESCRIPTOR.services_by_name["IngestService"].full_name],
        register=register(servicer),
        policy=POLICY,
        engines=[engine],
        background=[relay.run for relay in relays],
        executors=[executor],
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        name="ingest",
        load_settings=IngestSettings.from_env,
        build=build,
        migrations_dir=MIGRATIONS,
        audit=(IngestAuditLog, IngestAuditHead),
        keyed=(KEYED, pseudonymiser_of),
        argv=argv,
    )
