"""Wiring of the query service: settings → read-only score store and query's own access-log
database → domain → servicer → runtime."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from domain.benefits import load_benefits
from domain.policy import load_policy
from egret.query.v1 import query_service_pb2 as pb
from kit.app import run_cli
from kit.audit import audit_keys
from kit.db import create_engine
from kit.logging import get_logger
from kit.page_tokens import PageTokens
from kit.pseudonym import Pseudonymiser
from kit.purposes import load_purposes
from kit.security import channel_credentials
from kit.server import Service
from services.query.access import POLICY
from services.query.domain import Reader
from services.query.read_pipeline import ReadPipeline
from services.query.rules_client import RulesClient
from services.query.servicer import QueryServicer, register
from services.query.settings import QuerySettings
from services.query.stores.access_log import AccessRecorder, QueryAuditHead, QueryAuditLog, SqlAccessLog
from services.query.stores.due_process import SqlDueProcessReader
from services.query.stores.scores import SqlScoreReader

MIGRATIONS = Path(__file__).parent / "migrations"
log = get_logger(__name__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def build(settings: QuerySettings, clock: Callable[[], datetime] = _utc_now) -> Service:
    pseudonymiser = Pseudonymiser.from_settings(settings.pseudonym)
    policy = load_policy(settings.policy_file)
    # Checked against the policy's tiers and for purpose binding before serving: a bad
    # catalogue stops start-up with every problem listed.
    catalogue = load_benefits(settings.benefits_file, policy)
    purposes = load_purposes(settings.purposes_file)
    engine = create_engine(settings.score_database_url, read_only=True, pool_size=settings.db_workers + 2)
    reader = Reader(
        store=SqlScoreReader(engine),
        pseudonymiser=pseudonymiser,
        policy=policy,
        catalogue=catalogue,
        clock=clock,
        tokens=PageTokens.from_audit(settings.common.audit),
    )
    # Several threads: reads do not contend the way writes do.
    executor = ThreadPoolExecutor(max_workers=settings.db_workers, thread_name_prefix="query-db")
    # Query's own database, read-write: the access log. One thread writes it, a group
    # commit at a time, so records of concurrent reads share a commit.
    log_engine = create_engine(settings.common.database_url, sqlite=settings.common.sqlite)
    access_log = SqlAccessLog(log_engine, audit_keys=audit_keys(settings.common.audit))
    recorder_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="query-access-log")
    if settings.rules is None:
        log.warning("EGRET_RULES_ADDRESS is not set: explanations list no positive behaviours")
    rules = (
        None
        if settings.rules is None
        else RulesClient(settings.rules, channel_credentials(settings.common.security))
    )
    servicer = QueryServicer(
        reader=reader,
        due_process=SqlDueProcessReader(engine),
        access_log=access_log,
        reads=ReadPipeline(
            AccessRecorder(
                access_log, recorder_executor, clock, settings.access_log_commit_interval_ms / 1000
            ),
            purposes,
            pseudonymiser,
        ),
        executor=executor,
        rules=rules,
        inline_reads=settings.inline_reads,
    )
    return Service(
        pseudonymiser=pseudonymiser,
        name="query",
        service_names=[pb.DESCRIPTOR.services_by_name["QueryService"].full_name],
        register=register(servicer),
        policy=POLICY,
        # Watched by the runtime: NOT_SERVING until score's store and query's own answer.
        engines=[engine, log_engine],
        executors=[executor, recorder_executor],
        closers=[] if rules is None else [rules.close],
    )


def main(argv: list[str] | None = None) -> int:
    # Migrations are query's own (the access log); score's schema is migrated by score.
    return run_cli(
        name="query",
        load_settings=QuerySettings.from_env,
        build=build,
        migrations_dir=MIGRATIONS,
        audit=(QueryAuditLog, QueryAuditHead),
        argv=argv,
    )
