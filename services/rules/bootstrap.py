"""Wiring of the rules service: settings → rule set → store → domain → servicer → runtime."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from egret.rules.v1 import rules_service_pb2 as pb
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.app import run_cli
from kit.audit import audit_keys
from kit.db import create_engine, make_session_factory
from kit.logging import get_logger
from kit.metrics import refreshing
from kit.outbox import relay_to_peer
from kit.outbox_send import merged_sender
from kit.page_tokens import PageTokens
from kit.pseudonym import Pseudonymiser
from kit.purposes import load_purposes
from kit.reads import ReadLog
from kit.rekey import GenerationGuard
from kit.security import channel_credentials
from kit.server import Service
from services.rules.access import POLICY
from services.rules.domain import Evaluator
from services.rules.engine import RuleEngine, check_rule_set
from services.rules.handlers.backtest_jobs import BacktestJobs
from services.rules.handlers.backtests import build_backtests
from services.rules.handlers.evaluation import EvaluationHandler
from services.rules.handlers.lifecycle import LifecycleHandler
from services.rules.lifecycle import RuleSetLifecycle, source_sha256
from services.rules.metrics import RulesGauges
from services.rules.policy_source import ActivePolicy
from services.rules.servicer import RulesServicer, register
from services.rules.settings import RulesSettings
from services.rules.shard_layout import check_shard_layout
from services.rules.stores.backtest_jobs import SqlBacktestJobStore
from services.rules.stores.evaluation import SqlEvaluationStore
from services.rules.stores.outbox import stored_payloads
from services.rules.stores.rule_sets import SqlLifecycleStore
from services.rules.stores.schema import (
    KEYED,
    Outbox,
    OutboxLease,
    RulesAuditHead,
    RulesAuditLog,
    RulesSubjectKeyGeneration,
)
from services.rules.window_cache import WindowCache

MIGRATIONS = Path(__file__).parent / "migrations"

log = get_logger(__name__)


send_to_score = merged_sender(
    score_pb.ApplyOutcomesRequest,
    fields=("outcomes", "reversals"),
    method=lambda channel: score_grpc.ScoreServiceStub(channel).ApplyOutcomes,
)


def build(settings: RulesSettings) -> Service:
    engine = create_engine(settings.common.database_url, sqlite=settings.common.sqlite)
    pseudonymiser = Pseudonymiser.from_settings(settings.pseudonym)
    # The outbox's messages carry their key generation (score moves them forward), so the
    # relay keeps sending while a re-keying job holds the rest of the database.
    relay_sessions = make_session_factory(engine)
    sessions = make_session_factory(engine)
    # Once the stored keys move to another generation, this instance refuses (UNAVAILABLE)
    # rather than write or evaluate keys of its own.
    GenerationGuard(RulesSubjectKeyGeneration, pseudonymiser.current_key_id).install(sessions)
    check_shard_layout(sessions, settings.shard)
    keys = audit_keys(settings.common.audit)
    rule_sets = SqlLifecycleStore(sessions, audit_keys=keys)
    reads = ReadLog(
        load_purposes(settings.purposes_file),
        sessions,
        RulesAuditLog,
        RulesAuditHead,
        keys=keys,
        clock=lambda: datetime.now(UTC),
    )
    lifecycle = RuleSetLifecycle(
        rule_sets,
        validate=check_rule_set,
        clock=lambda: datetime.now(UTC),
        tokens=PageTokens.from_audit(settings.common.audit),
    )
    # The file seeds an empty database (so `make run` works); once a rule set is active the
    # database is the source of truth: a changed file is activated through the lifecycle RPCs
    # (the chart's config-apply Job does it, docs/deploy.md), and until then rules says so.
    seed = settings.ruleset_file.read_text(encoding="utf-8")
    active, imported = lifecycle.ensure_active(seed)
    log.info(
        "rule set imported from EGRET_RULESET_FILE and activated" if imported else "active rule set loaded",
        rule_set=active.name,
        version=active.version,
        rule_set_id=active.rule_set_id,
    )
    if source_sha256(seed) != active.source_sha256:
        log.warning(
            "EGRET_RULESET_FILE is not the active rule set; activate it through the lifecycle RPCs "
            "(egret rules, or the chart's config-apply Job) to apply it",
            ruleset_file=str(settings.ruleset_file),
            active_rule_set_id=active.rule_set_id,
        )
    evaluation_store = SqlEvaluationStore(sessions, key_id=pseudonymiser.current_key_id)
    evaluator = Evaluator(
        compile_rule_set=RuleEngine,
        rule_sets=rule_sets,
        store=evaluation_store,
        clock=lambda: datetime.now(UTC),
        dead_letter_after=settings.dead_letter_after_attempts,
        # This process is its shard's only evaluator (docs/architecture.md, "Scaling out
        # rules"), so what it committed is all there is to follow.
        window_cache=WindowCache(
            max_subjects=settings.window_cache_subjects, max_bytes=settings.window_cache_mib * 2**20
        ),
    )
    evaluator.load_active()  # compile now: a rule set the engine refuses stops start-up
    relay = relay_to_peer(
        name="rules→score",
        sessions=relay_sessions,
        table=Outbox,
        leases=OutboxLease,
        peer=settings.score,
        settings=settings.relay,
        make_send=send_to_score,
        instance=settings.common.instance,
        # An outcome's row refers to the outcome's stored bytes (its only copy).
        payloads_of=stored_payloads,
        credentials=channel_credentials(settings.common.security),
        max_call_bytes=settings.common.limits.max_message_bytes,
    )
    # One thread: durable-rules is not thread-safe and holds the GIL while it works.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rules-engine")
    # Backtests score with score's active policy, asked over the channel to score's API
    # with rules' own token (the outbox relay has a channel of its own).
    active_policy = ActivePolicy(settings.score, channel_credentials(settings.common.security))
    backtests = build_backtests(settings, sessions, lifecycle, executor, active_policy)
    jobs = BacktestJobs(
        SqlBacktestJobStore(sessions, audit_keys=keys),
        backtests,
        reads,
        clock=lambda: datetime.now(UTC),
        instance=settings.common.instance,
        key_id=pseudonymiser.current_key_id,
    )
    # A job this instance was running when it stopped can never finish now.
    jobs.recover()
    servicer = RulesServicer(
        evaluation=EvaluationHandler(
            evaluator,
            executor,
            relay.notify,
            lifecycle=lifecycle,
            max_batch_size=settings.max_batch_size,
        ),
        lifecycle=LifecycleHandler(lifecycle, executor),
        reads=reads,
        pseudonymiser=pseudonymiser,
        max_batch_size=settings.max_batch_size,
        shard=settings.shard,
        backtests=backtests,
        jobs=jobs,
    )

    return Service(
        name="rules",
        service_names=[pb.DESCRIPTOR.services_by_name["RulesService"].full_name],
        register=register(servicer),
        policy=POLICY,
        engines=[engine],
        background=[relay.run, refreshing(RulesGauges(evaluator, evaluation_store).refresh)],
        executors=[executor],
        # Before the engine thread and the database go: running backtests are stored as failed.
        closers=[jobs.close, active_policy.close],
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        name="rules",
        load_settings=RulesSettings.from_env,
        build=build,
        migrations_dir=MIGRATIONS,
        audit=(RulesAuditLog, RulesAuditHead),
        keyed=(KEYED, lambda settings: Pseudonymiser.from_settings(settings.pseudonym)),
        argv=argv,
    )
