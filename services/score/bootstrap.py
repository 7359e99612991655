"""Wiring of the score service: settings → store → domain → servicer → runtime."""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import Engine

from contracts.score_store import ScoreAuditHead, ScoreAuditLog, ScoreSubjectKeyGeneration
from domain.policy import ActivatedPolicy, PolicyBook, load_policy
from egret.score.v1 import score_service_pb2 as pb
from kit.app import run_cli
from kit.audit import audit_keys
from kit.db import create_engine, make_session_factory
from kit.logging import get_logger
from kit.metrics import refreshing
from kit.pseudonym import Pseudonymiser
from kit.purposes import load_purposes
from kit.reads import ReadLog
from kit.rekey import GenerationGuard
from kit.server import Service
from services.score.access import POLICY
from services.score.due_process import DueProcess
from services.score.ledger import Ledger
from services.score.metrics import ScoreGauges
from services.score.servicer import DEFAULT_MAX_MISMATCHES, ScoreServicer, register
from services.score.settings import ScoreSettings
from services.score.stores.due_process import SqlDueProcessStore
from services.score.stores.keyed import KEYED
from services.score.stores.ledger import SqlLedgerStore
from services.score.stores.policies import SqlPolicyStore

MIGRATIONS = Path(__file__).parent / "migrations"

log = get_logger("services.score")


Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def policy_book(store: SqlPolicyStore, policy_file: Path, clock: Clock) -> PolicyBook:
    """The activated policies; the policy file seeds an empty store.

    Once a store holds a policy, the file no longer decides: a change is previewed and
    activated through the API (with who and when recorded), never by editing a file and
    restarting, so every change is seen before it applies.
    """
    activations = store.activations()
    seed = load_policy(policy_file)
    if not activations:
        first = ActivatedPolicy(seed, clock(), f"policy file {policy_file.name}", policy_file.read_text())
        store.save_activation(first)
        return PolicyBook((first,))
    book = PolicyBook(tuple(activations))
    if seed.version != book.active.version:
        log.warning(
            "the policy file is not the active policy; activate it with ActivatePolicy to apply it",
            policy_file=str(policy_file),
            file_version=seed.version,
            active_version=book.active.version,
        )
    return book


def _pseudonymiser(settings: ScoreSettings) -> Pseudonymiser:
    return Pseudonymiser.from_settings(settings.pseudonym)


@dataclass(frozen=True)
class _Parts:
    ledger: Ledger
    due_process: DueProcess
    reads: ReadLog
    engine: Engine
    gauges: ScoreGauges


def _ledger(settings: ScoreSettings, pseudonymiser: Pseudonymiser, clock: Clock) -> _Parts:
    engine = create_engine(
        settings.common.database_url,
        sqlite=settings.common.sqlite,
        pool_size=settings.db_workers + 2,
    )
    sessions = make_session_factory(engine)
    # Refuses (UNAVAILABLE) while the stored keys are of, or moving to, another generation.
    GenerationGuard(ScoreSubjectKeyGeneration, pseudonymiser.current_key_id).install(sessions)
    keys = audit_keys(settings.common.audit)
    key_id = pseudonymiser.current_key_id
    store = SqlLedgerStore(sessions, audit_keys=keys, key_id=key_id)
    policy_store = SqlPolicyStore(sessions, audit_keys=keys)
    ledger = Ledger(
        policies=policy_book(policy_store, settings.policy_file, clock),
        store=store,
        policy_store=policy_store,
        clock=clock,
        page_size=settings.verify_page_size,
    )
    purposes = load_purposes(settings.purposes_file)
    # One clock for every instant: entries, deadlines, decisions, sweeps (tests move it).
    due_store = SqlDueProcessStore(sessions, audit_keys=keys, key_id=key_id)
    due_process = DueProcess(
        ledger=ledger, store=due_store, clock=clock, pseudonymiser=pseudonymiser, purposes=purposes
    )
    reads = ReadLog(purposes, sessions, ScoreAuditLog, ScoreAuditHead, keys=keys, clock=clock)
    return _Parts(ledger, due_process, reads, engine, ScoreGauges(store, due_store, clock))


def build(settings: ScoreSettings, clock: Clock = _utc_now) -> Service:
    pseudonymiser = _pseudonymiser(settings)
    parts = _ledger(settings, pseudonymiser, clock)
    ledger, due_process, reads, engine = parts.ledger, parts.due_process, parts.reads, parts.engine
    # A policy activation interrupted by a crash is finished before serving.
    caught_up = ledger.catch_up_policy()
    if caught_up:
        log.info("recomputed subjects under the active policy", subjects=caught_up)
    # One writer thread by default: SQLite has one writer at a time anyway, and a single
    # thread applies batches in arrival order without lock contention.
    executor = ThreadPoolExecutor(max_workers=settings.db_workers, thread_name_prefix="score-db")
    servicer = ScoreServicer(
        ledger,
        executor,
        max_batch_size=settings.max_batch_size,
        verify_page_size=settings.verify_page_size,
        due_process=due_process,
        reads=reads,
        pseudonymiser=pseudonymiser,
        clock=clock,
    )
    return Service(
        name="score",
        service_names=[pb.DESCRIPTOR.services_by_name["ScoreService"].full_name],
        register=register(servicer),
        policy=POLICY,
        # Subject tokens name their subject key only with the root key to hash their raw id.
        pseudonymiser=pseudonymiser if pseudonymiser.key else None,
        engines=[engine],
        background=[
            functools.partial(servicer.sweep_loop, settings.sweep_interval_s),
            refreshing(parts.gauges.refresh),
        ],
        executors=[executor],
    )


def verify(settings: ScoreSettings) -> int:
    """`python -m services.score verify`: exit status 1 when any stored score is wrong."""
    parts = _ledger(settings, _pseudonymiser(settings), _utc_now)
    ledger, engine = parts.ledger, parts.engine
    try:
        result = ledger.verify(DEFAULT_MAX_MISMATCHES, settings.verify_page_size)
    finally:
        engine.dispose()
    print(
        f"subjects checked: {result.subjects_checked}, mismatches: {result.mismatch_count}"
        f" (expiry swept first: {result.swept} subjects)"
    )
    for m in result.mismatches:
        print(
            f"  {m.subject_key}: stored {m.stored_score} {m.stored_tier or '-'}, "
            f"recomputed {m.recomputed_score} {m.recomputed_tier}"
        )
    log.info(
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
        audit=(ScoreAuditLog, ScoreAuditHead),
        keyed=(KEYED, _pseudonymiser),
        argv=argv,
    )
