"""ScoreService over gRPC: translates protobuf ⇄ domain and results ⇄ statuses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import grpc
from opentelemetry import trace
from sqlalchemy.exc import SQLAlchemyError

from contracts.due_process_wire import consent_message, dispute_message, repair_message
from domain.entries import OVERTURN, REGROUPED, RuleRef
from domain.intake import IncomingOutcome, IncomingReversal
from domain.policy import PolicyError, ScorePolicy, policy_from_text
from egret.common.v1 import due_process_pb2 as dp
from egret.common.v1 import outcome_pb2
from egret.score.v1 import score_service_pb2 as pb
from egret.score.v1 import score_service_pb2_grpc as pb_grpc
from kit.db import run_blocking
from kit.errors import InvalidArgument, Unavailable, Violation
from kit.logging import get_logger
from kit.principal import acting_principal, current_principal
from kit.protoconv import SEVERITY_NAMES, SUBJECT_KIND_NAMES, SUBJECT_KIND_VALUES, to_datetime, to_timestamp
from kit.pseudonym import Pseudonymiser
from kit.reads import ReadLog
from services.score import metrics
from services.score.due_process import APPROVE, REJECT, UPHOLD, DueProcess
from services.score.ledger import ApplyResult, Ledger, PolicyReport, VerifyResult

log = get_logger(__name__)
T = TypeVar("T")

DEFAULT_MAX_MISMATCHES = 100
MAX_MISMATCHES = 1000
# Enough to tell an operator what was wrong without letting one bad batch flood the log.
LOGGED_REJECTIONS = 20


class _Keyed(Protocol):
    """A message carrying a subject key and its generation."""

    subject_key: str
    subject_key_id: str


def _move_key(message: _Keyed, pseudonymiser: Pseudonymiser, key_id: str = "") -> None:
    """Moves `message`'s subject key, of its generation (or `key_id`'s when it names none), to
    the current generation (`Pseudonymiser.forward`). UnknownKeyGeneration for a generation
    not configured here."""
    if message.subject_key:
        message.subject_key = pseudonymiser.forward(message.subject_key, message.subject_key_id or key_id)
        message.subject_key_id = pseudonymiser.current_key_id


def _all_current(pseudonymiser: Pseudonymiser, *key_ids: str) -> bool:
    return set(key_ids) <= {"", pseudonymiser.current_key_id}


def forwarded_outcome(outcome: outcome_pb2.Outcome, pseudonymiser: Pseudonymiser) -> outcome_pb2.Outcome:
    """`outcome` with its subject key, and its events', in the current generation (an event
    naming no generation is of its outcome's), so the entry and its evidence snapshot are
    stored under the current key; the outcome itself, verbatim, when nothing moves."""
    if _all_current(pseudonymiser, outcome.subject_key_id, *(e.subject_key_id for e in outcome.events)):
        return outcome
    moved = outcome_pb2.Outcome()
    moved.CopyFrom(outcome)
    for event in moved.events:
        _move_key(event, pseudonymiser, outcome.subject_key_id)
    _move_key(moved, pseudonymiser)
    return moved


def forwarded_reversal(reversal: pb.Reversal, pseudonymiser: Pseudonymiser) -> pb.Reversal:
    """`reversal` with the subject keys it names (its own, its retraction's) in the current
    generation; itself when nothing moves."""
    if _all_current(pseudonymiser, reversal.subject_key_id, reversal.retraction.subject_key_id):
        return reversal
    moved = pb.Reversal()
    moved.CopyFrom(reversal)
    _move_key(moved, pseudonymiser)
    if moved.HasField("retraction"):
        _move_key(moved.retraction, pseudonymiser)
    return moved


def incoming(outcome: outcome_pb2.Outcome) -> IncomingOutcome:
    rule = outcome.rule
    return IncomingOutcome(
        outcome_id=outcome.outcome_id,
        subject_key=outcome.subject_key,
        subject_kind=SUBJECT_KIND_NAMES.get(outcome.subject_kind),
        rule=RuleRef(
            rule_id=rule.rule_id,
            rule_set=rule.rule_set,
            rule_set_version=rule.rule_set_version,
            title=rule.title,
            description=rule.description,
            legal_basis=rule.legal_basis,
        ),
        points=outcome.points,
        category=outcome.category,
        severity=SEVERITY_NAMES.get(outcome.severity),
        occurred_at=to_datetime(outcome.occurred_at) if outcome.HasField("occurred_at") else None,
        reason=outcome.reason,
        black_list=outcome.black_list,
        snapshot=outcome.SerializeToString(),
    )


def incoming_reversal(reversal: pb.Reversal) -> IncomingReversal:
    if reversal.cause == pb.REVERSAL_CAUSE_REGROUPED:
        return IncomingReversal(
            outcome_id=reversal.outcome_id,
            subject_key=reversal.subject_key,
            source=reversal.late_event.source,
            event_id=reversal.late_event.event_id,
            reason="",
            retracted_at=None,
            retracted_by="",
            cause=REGROUPED,
        )
    retraction = reversal.retraction
    return IncomingReversal(
        outcome_id=reversal.outcome_id,
        subject_key=retraction.subject_key,
        source=retraction.ref.source,
        event_id=retraction.ref.event_id,
        reason=retraction.reason,
        retracted_at=to_datetime(retraction.retracted_at) if retraction.HasField("retracted_at") else None,
        retracted_by=retraction.retracted_by,
    )


DISPUTE_DECISIONS = {dp.DISPUTE_DECISION_UPHOLD: UPHOLD, dp.DISPUTE_DECISION_OVERTURN: OVERTURN}
REPAIR_DECISIONS = {dp.REPAIR_DECISION_APPROVE: APPROVE, dp.REPAIR_DECISION_REJECT: REJECT}


def verify_response(result: VerifyResult, *, with_subjects: bool) -> pb.VerifyScoresResponse:
    """The counts; the mismatched subjects (key, scores, tiers, lists) only `with_subjects`."""
    return pb.VerifyScoresResponse(
        subjects_checked=result.subjects_checked,
        mismatch_count=result.mismatch_count,
        mismatches=[]
        if not with_subjects
        else [
            pb.ScoreMismatch(
                subject_key=m.subject_key,
                stored_score=m.stored_score,
                recomputed_score=m.recomputed_score,
                stored_tier=m.stored_tier,
                recomputed_tier=m.recomputed_tier,
                stored_lists=m.stored_lists,
                recomputed_lists=m.recomputed_lists,
            )
            for m in result.mismatches
        ],
    )


def report_message(report: PolicyReport) -> pb.PolicyReport:
    return pb.PolicyReport(
        current_version=report.current_version,
        proposed_version=report.proposed_version,
        as_of=to_timestamp(report.as_of),
        subjects=report.subjects,
        score_changed=report.score_changed,
        tier_changed=report.tier_changed,
        migrations=[
            pb.TierMigration(
                subject_kind=SUBJECT_KIND_VALUES[m.subject_kind],
                from_tier=m.from_tier,
                to_tier=m.to_tier,
                subjects=m.subjects,
            )
            for m in report.migrations
        ],
        list_moves=[
            pb.ListMove(
                subject_kind=SUBJECT_KIND_VALUES[m.subject_kind],
                list_name=m.list_name,
                entering=m.entering,
                leaving=m.leaving,
            )
            for m in report.list_moves
        ],
    )


def parse_proposed(text: str) -> ScorePolicy:
    """The proposed policy, or InvalidArgument with one violation per problem and its path."""
    if not text.strip():
        raise InvalidArgument("invalid policy", [Violation("policy_yaml", "is required", "REQUIRED")])
    try:
        return policy_from_text(text, source="policy_yaml")
    except PolicyError as exc:
        violations = []
        for problem in exc.problems:
            path, _, description = problem.partition(": ")
            violations.append(Violation(f"policy_yaml.{path}", description or problem, "INVALID_POLICY"))
        raise InvalidArgument("invalid policy", violations) from exc


class ScoreServicer(pb_grpc.ScoreServiceServicer):
    def __init__(
        self,
        ledger: Ledger,
        executor: Executor,
        *,
        max_batch_size: int,
        verify_page_size: int,
        reads: ReadLog,
        pseudonymiser: Pseudonymiser,
        due_process: DueProcess | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._ledger = ledger
        self._pseudonymiser = pseudonymiser
        self._reads = reads
        self._due_process = due_process
        self._clock = clock or (lambda: datetime.now(UTC))
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._verify_page_size = verify_page_size
        self._tracer = trace.get_tracer("egret.score")

    async def _apply(
        self, outcomes: Sequence[outcome_pb2.Outcome], reversals: Sequence[pb.Reversal] = ()
    ) -> ApplyResult:
        """Run one batch through the ledger off the event loop, in its own span. Keys of an
        earlier generation are moved forward first; a generation not configured here refuses
        the whole batch (UNAVAILABLE), which the sender retries."""
        with self._tracer.start_as_current_span(
            "score apply", attributes={"egret.batch.size": len(outcomes)}
        ) as span:
            arrived = [incoming(forwarded_outcome(o, self._pseudonymiser)) for o in outcomes]
            arrived_reversals = [
                incoming_reversal(forwarded_reversal(r, self._pseudonymiser)) for r in reversals
            ]
            result = await run_blocking(self._executor, self._ledger.apply, arrived, arrived_reversals)
            metrics.batch_applied(result)
            span.set_attributes(
                {
                    "egret.applied": result.applied,
                    "egret.duplicate": result.duplicate,
                    "egret.rejected": len(result.rejected),
                    "egret.subjects_updated": result.subjects_updated,
                    "egret.reversed": result.reversed,
                }
            )
            fields = {
                "size": len(outcomes),
                "applied": result.applied,
                "duplicate": result.duplicate,
                "rejected": len(result.rejected),
                "subjects_updated": result.subjects_updated,
                "reversed": result.reversed,
            }
            if result.rejected:
                # Rejected outcomes are dropped for good (a resend would fail the same way),
                # so the log is where an operator finds them.
                rejections = [
                    {"outcome_id": r.outcome_id, "problems": [f"{v.field}: {v.reason}" for v in r.violations]}
                    for r in result.rejected[:LOGGED_REJECTIONS]
                ]
                log.warning("batch applied with rejected outcomes", **fields, rejections=rejections)
            else:
                log.info("batch applied", **fields)
            return result

    async def ApplyOutcomes(self, request: pb.ApplyOutcomesRequest, context: Any) -> pb.ApplyOutcomesResponse:
        size = len(request.outcomes) + len(request.reversals)
        if size > self._max_batch_size:
            raise InvalidArgument(
                "invalid batch",
                [
                    Violation(
                        "outcomes",
                        f"holds {size} outcomes and reversals; the maximum is {self._max_batch_size}",
                        "BATCH_TOO_LARGE",
                    )
                ],
            )
        result = await self._apply(request.outcomes, request.reversals)
        return pb.ApplyOutcomesResponse(
            applied=result.applied,
            duplicate=result.duplicate,
            subjects_updated=result.subjects_updated,
            reversed=result.reversed,
        )

    async def VerifyScores(self, request: pb.VerifyScoresRequest, context: Any) -> pb.VerifyScoresResponse:
        limit = request.max_mismatches or DEFAULT_MAX_MISMATCHES
        if not 1 <= limit <= MAX_MISMATCHES:
            raise InvalidArgument(
                "invalid request",
                [
                    Violation(
                        "max_mismatches",
                        f"must be 0 (default {DEFAULT_MAX_MISMATCHES}) or 1 to {MAX_MISMATCHES}",
                        "OUT_OF_RANGE",
                    )
                ],
            )
        purpose = self._reads.purpose(request)
        # The sweep writes, so it runs on the writer thread; the full read that follows runs
        # off it, so it does not hold up batches.
        swept = await run_blocking(self._executor, self._ledger.sweep_now)
        result = await run_blocking(None, self._ledger.verify, limit, self._verify_page_size, swept)
        log.info(
            "scores verified", subjects_checked=result.subjects_checked, mismatch_count=result.mismatch_count
        )
        if purpose is not None:
            await self._reads.record(
                "VerifyScores",
                [m.subject_key for m in result.mismatches],
                purpose,
                target="scores",
                detail={"subjects_checked": result.subjects_checked, "mismatch_count": result.mismatch_count},
            )
        return verify_response(result, with_subjects=purpose is not None)

    async def PreviewPolicy(self, request: pb.PreviewPolicyRequest, context: Any) -> pb.PreviewPolicyResponse:
        proposed = parse_proposed(request.policy_yaml)
        # Read-only and possibly long: off the writer thread, like VerifyScores.
        report = await run_blocking(None, self._ledger.preview, proposed)
        return pb.PreviewPolicyResponse(report=report_message(report))

    async def ActivatePolicy(
        self, request: pb.ActivatePolicyRequest, context: Any
    ) -> pb.ActivatePolicyResponse:
        proposed = parse_proposed(request.policy_yaml)
        # On the writer thread: batches wait while every subject is recomputed, so no batch
        # is scored under a policy half switched.
        report, recomputed = await run_blocking(
            self._executor,
            self._ledger.activate,
            proposed,
            request.policy_yaml,
            acting_principal(request.activated_by) or "",
            request.expected_current_version,
        )
        log.info(
            "policy activated",
            version=proposed.version,
            activated_by=acting_principal(request.activated_by) or "",
            subjects_recomputed=recomputed,
            tier_changed=report.tier_changed,
        )
        return pb.ActivatePolicyResponse(
            report=report_message(report),
            subjects_recomputed=recomputed,
            activated_at=to_timestamp(report.as_of),
        )

    async def ListPolicies(self, request: pb.ListPoliciesRequest, context: Any) -> pb.ListPoliciesResponse:
        return pb.ListPoliciesResponse(
            activations=[
                pb.PolicyActivation(
                    version=a.policy.version,
                    activated_at=to_timestamp(a.activated_at),
                    activated_by=a.activated_by,
                    policy_yaml=a.document,
                )
                for a in self._ledger.policies.activations
            ]
        )

    async def GetActivePolicy(
        self, request: pb.GetActivePolicyRequest, context: Any
    ) -> pb.GetActivePolicyResponse:
        # Who activated it is left out: the published policy is the document and its date.
        active = self._ledger.policies.activations[-1]
        return pb.GetActivePolicyResponse(
            version=active.policy.version,
            activated_at=to_timestamp(active.activated_at),
            policy_yaml=active.document,
        )

    def _due(self) -> DueProcess:
        assert self._due_process is not None, "the servicer was built without due process"
        return self._due_process

    async def _act(self, act: Callable[..., T], *args: Any) -> T:
        """A due-process act on the writer thread, by the calling principal."""
        return await run_blocking(self._executor, act, current_principal(), *args)

    async def FileDispute(self, request: pb.FileDisputeRequest, context: Any) -> pb.FileDisputeResponse:
        dispute = await self._act(self._due().file_dispute, request.entry_id, request.statement)
        log.info("dispute filed", dispute_id=dispute.dispute_id, entry_id=dispute.entry_id)
        return pb.FileDisputeResponse(dispute=dispute_message(dispute, self._clock()))

    async def AssignDispute(self, request: pb.AssignDisputeRequest, context: Any) -> pb.AssignDisputeResponse:
        dispute = await self._act(
            self._due().assign_dispute,
            request.dispute_id,
            request.assignee,
            request.release,
        )
        log.info("dispute assigned", dispute_id=dispute.dispute_id, assignee=dispute.assignee)
        return pb.AssignDisputeResponse(dispute=dispute_message(dispute, self._clock()))

    async def ResolveDispute(
        self, request: pb.ResolveDisputeRequest, context: Any
    ) -> pb.ResolveDisputeResponse:
        dispute = await self._act(
            self._due().resolve_dispute,
            request.dispute_id,
            DISPUTE_DECISIONS.get(request.decision),
            request.reason,
        )
        log.info("dispute resolved", dispute_id=dispute.dispute_id, status=dispute.status)
        return pb.ResolveDisputeResponse(dispute=dispute_message(dispute, self._clock()))

    async def ApplyForRepair(
        self, request: pb.ApplyForRepairRequest, context: Any
    ) -> pb.ApplyForRepairResponse:
        repair = await self._act(
            self._due().apply_for_repair,
            request.entry_id,
            request.evidence,
            request.evidence_uri,
        )
        log.info("repair applied for", application_id=repair.application_id, entry_id=repair.entry_id)
        return pb.ApplyForRepairResponse(application=repair_message(repair, self._clock()))

    async def DecideRepair(self, request: pb.DecideRepairRequest, context: Any) -> pb.DecideRepairResponse:
        repair = await self._act(
            self._due().decide_repair,
            request.application_id,
            REPAIR_DECISIONS.get(request.decision),
            request.reason,
        )
        log.info("repair decided", application_id=repair.application_id, status=repair.status)
        return pb.DecideRepairResponse(application=repair_message(repair, self._clock()))

    async def SetConsent(self, request: pb.SetConsentRequest, context: Any) -> pb.SetConsentResponse:
        consent = await self._act(
            self._due().set_consent,
            request.subject_key,
            request.granted,
            to_datetime(request.effective_at) if request.HasField("effective_at") else None,
        )
        log.info("consent recorded", granted=consent.granted)
        return pb.SetConsentResponse(consent=consent_message(consent))

    async def sweep_loop(self, interval_s: float, stopping: asyncio.Event) -> None:
        """Background loop: recompute subjects whose entries expired or whose disputes
        passed their deadline, on the writer thread; warn of overdue repair decisions."""
        while not stopping.is_set():
            try:
                swept = await run_blocking(self._executor, self._ledger.sweep)
                if swept:
                    log.info("expiry swept", subjects_recomputed=swept)
                if self._due_process is not None:
                    overdue = await run_blocking(None, self._due_process.overdue_repairs)
                    if overdue:
                        log.warning(
                            "repair decisions overdue",
                            count=len(overdue),
                            application_ids=[r.application_id for r in overdue[:LOGGED_REJECTIONS]],
                        )
            except (SQLAlchemyError, Unavailable) as exc:
                # The database is away (health reports it), or its subject keys are being
                # moved to another generation (kit.rekey); the next round retries.
                log.warning("expiry sweep failed; will retry", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval_s)


def register(servicer: ScoreServicer) -> Callable[[grpc.aio.Server], None]:
    return lambda server: pb_grpc.add_ScoreServiceServicer_to_server(servicer, server)
