"""ScoreService over gRPC: translates protobuf ⇄ domain and results ⇄ statuses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import grpc
from opentelemetry import trace

from egret.common.v1 import outcome_pb2
from egret.score.v1 import score_service_pb2 as pb
from egret.score.v1 import score_service_pb2_grpc as pb_grpc
from kit.db import run_blocking
from kit.errors import InvalidArgument, Violation
from kit.logging import get_logger
from kit.protoconv import SEVERITY_NAMES, SUBJECT_KIND_NAMES, to_datetime
from services.score.domain import ApplyResult, IncomingOutcome, Ledger, RuleRef, VerifyResult

log = get_logger(__name__)

DEFAULT_MAX_MISMATCHES = 100
MAX_MISMATCHES = 1000
# Enough to tell an operator what was wrong without letting one bad batch flood the log.
LOGGED_REJECTIONS = 20


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


def verify_response(result: VerifyResult) -> pb.VerifyScoresResponse:
    return pb.VerifyScoresResponse(
        subjects_checked=result.subjects_checked,
        mismatch_count=result.mismatch_count,
        mismatches=[
            pb.ScoreMismatch(
                subject_key=m.subject_key,
                stored_score=m.stored_score,
                recomputed_score=m.recomputed_score,
                stored_tier=m.stored_tier,
                recomputed_tier=m.recomputed_tier,
            )
            for m in result.mismatches
        ],
    )


class ScoreServicer(pb_grpc.ScoreServiceServicer):
    def __init__(
        self, ledger: Ledger, executor: Executor, *, max_batch_size: int, verify_page_size: int
    ) -> None:
        self._ledger = ledger
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._verify_page_size = verify_page_size
        self._tracer = trace.get_tracer("egret.score")

    async def _apply(self, outcomes: Sequence[outcome_pb2.Outcome]) -> ApplyResult:
        """Run one batch through the ledger off the event loop, in its own span."""
        with self._tracer.start_as_current_span(
            "score apply", attributes={"egret.batch.size": len(outcomes)}
        ) as span:
            result = await run_blocking(self._executor, self._ledger.apply, [incoming(o) for o in outcomes])
            span.set_attributes(
                {
                    "egret.applied": result.applied,
                    "egret.duplicate": result.duplicate,
                    "egret.rejected": len(result.rejected),
                    "egret.subjects_updated": result.subjects_updated,
                }
            )
            fields = {
                "size": len(outcomes),
                "applied": result.applied,
                "duplicate": result.duplicate,
                "rejected": len(result.rejected),
                "subjects_updated": result.subjects_updated,
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
        if len(request.outcomes) > self._max_batch_size:
            raise InvalidArgument(
                "invalid batch",
                [
                    Violation(
                        "outcomes",
                        f"holds {len(request.outcomes)} outcomes; the maximum is {self._max_batch_size}",
                        "BATCH_TOO_LARGE",
                    )
                ],
            )
        result = await self._apply(request.outcomes)
        return pb.ApplyOutcomesResponse(
            applied=result.applied, duplicate=result.duplicate, subjects_updated=result.subjects_updated
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
        # Off the writer thread: a full verify reads every ledger and must not hold up batches.
        result = await run_blocking(None, self._ledger.verify, limit, self._verify_page_size)
        log.info(
            "scores verified", subjects_checked=result.subjects_checked, mismatch_count=result.mismatch_count
        )
        return verify_response(result)


def register(servicer: ScoreServicer) -> Callable[[grpc.aio.Server], None]:
    return lambda server: pb_grpc.add_ScoreServiceServicer_to_server(servicer, server)
