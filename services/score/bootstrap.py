"""Wiring of the score service: settings → store → domain → servicer → runtime."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import Engine

from egret.score.v1 import score_service_pb2 as pb
from kit.app import run_cli
from kit.db import create_engine, make_session_factory
from kit.logging import get_logger
from kit.server import Service
from services.score.domain import Ledger
from services.score.policy import load_policy
from services.score.servicer import DEFAULT_MAX_MISMATCHES, ScoreServicer, register
from services.score.settings import ScoreSettings
from services.score.storage import SqlLedgerStore

MIGRATIONS = Path(__file__).parent / "migrations"


def _ledger(settings: ScoreSettings) -> tuple[Ledger, Engine]:
    engine = create_engine(
        settings.common.database_url,
        sqlite_synchronous=settings.common.sqlite_synchronous,
        pool_size=settings.db_workers + 2,
    )
    ledger = Ledger(
        policy=load_policy(settings.policy_file),
        store=SqlLedgerStore(make_session_factory(engine)),
        clock=lambda: datetime.now(UTC),
    )
    return ledger, engine


def build(settings: ScoreSettings) -> Service:
    ledger, engine = _ledger(settings)
    # One writer thread by default: SQLite has one writer at a time anyway, and a single
    # thread applies batches in arrival order without lock contention.
    executor = ThreadPoolExecutor(max_workers=settings.db_workers, thread_name_prefix="score-db")
    servicer = ScoreServicer(
        ledger, executor, max_batch_size=settings.max_batch_size, verify_page_size=settings.verify_page_size
    )
    return Service(
        name="score",
        service_names=[pb.DESCRIPTOR.services_by_name["ScoreService"].full_name],
        register=register(servicer),
        engines=[engine],
        executors=[executor],
    )


def verify(settings: ScoreSettings) -> int:
    """`python -m services.score verify`: exit status 1 when any stored score is wrong."""
    ledger, engine = _ledger(settings)
    try:
        result = ledger.verify(DEFAULT_MAX_MISMATCHES, settings.verify_page_size)
    finally:
        engine.dispose()
    print(f"subjects checked: {result.subjects_checked}, mismatches: {result.mismatch_count}")
    for m in result.mismatches:
        print(
            f"  {m.subject_key}: stored {m.stored_score} {m.stored_tier or '-'}, "
            f"recomputed {m.recomputed_score} {m.recomputed_tier}"
        )
    get_logger("services.score").info(
        "scores verified", subjects_checked=result.subjects_checked, mismatch_count=result.mismatch_count
    )
    return 1 if result.mismatch_count else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        name="score",
        load_settings=ScoreSettings.from_env,
        build=build,
        migrations_dir=MIGRATIONS,
        commands={"verify": ("recompute every score from the ledger; exit 1 on any mismatch", verify)},
        argv=argv,
    )
