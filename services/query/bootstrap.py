"""Wiring of the query service: settings → read-only score store → domain → servicer → runtime."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from egret.query.v1 import query_service_pb2 as pb
from kit.app import run_cli
from kit.db import create_engine, make_session_factory
from kit.pseudonym import Pseudonymiser
from kit.server import Service
from services.query.access import POLICY
from services.query.benefits import load_catalogue
from services.query.domain import Reader
from services.query.servicer import QueryServicer, register
from services.query.settings import QuerySettings
from services.query.storage import SqlScoreReader
from services.score.policy import load_policy


def _utc_now() -> datetime:
    return datetime.now(UTC)


def build(settings: QuerySettings, clock: Callable[[], datetime] = _utc_now) -> Service:
    pseudonymiser = Pseudonymiser(settings.pseudonym.key, settings.pseudonym.key_id)
    policy = load_policy(settings.policy_file)
    # Checked against the policy's tiers and for purpose binding before serving: a bad
    # catalogue stops start-up with every problem listed.
    catalogue = load_catalogue(settings.benefits_file, policy)
    engine = create_engine(settings.score_database_url, read_only=True, pool_size=settings.db_workers + 2)
    reader = Reader(
        store=SqlScoreReader(make_session_factory(engine)),
        pseudonymiser=pseudonymiser,
        policy=policy,
        catalogue=catalogue,
        clock=clock,
    )
    # Several threads: reads do not contend the way writes do.
    executor = ThreadPoolExecutor(max_workers=settings.db_workers, thread_name_prefix="query-db")
    servicer = QueryServicer(reader, executor)
    return Service(
        pseudonymiser=pseudonymiser,
        name="query",
        service_names=[pb.DESCRIPTOR.services_by_name["QueryService"].full_name],
        register=register(servicer),
        policy=POLICY,
        # Watched by the runtime: NOT_SERVING until score's store exists and answers.
        engines=[engine],
        executors=[executor],
    )


def main(argv: list[str] | None = None) -> int:
    # No migrations: the schema is score's, migrated by the score service.
    return run_cli(
        name="query", load_settings=QuerySettings.from_env, build=build, migrations_dir=None, argv=argv
    )
