"""A stand-in score service that records the outcomes and reversals rules sends it."""

from __future__ import annotations

from typing import Any

from egret.common.v1 import outcome_pb2
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc

# ---------------------------------------------------------------------------------------
# Rules

_ScoreServicer: Any = score_grpc.ScoreServiceServicer


class RecordingScore(_ScoreServicer):  # type: ignore[misc]
    """A stand-in score service that keeps every outcome and reversal it is sent."""

    def __init__(self) -> None:
        self.outcomes: list[outcome_pb2.Outcome] = []
        self.reversals: list[score_pb.Reversal] = []

    async def ApplyOutcomes(self, request: score_pb.ApplyOutcomesRequest, context: Any) -> Any:
        self.outcomes.extend(request.outcomes)
        self.reversals.extend(request.reversals)
        return score_pb.ApplyOutcomesResponse()

    def ids(self, rule_id: str) -> list[str]:
        return [o.outcome_id for o in self.outcomes if o.rule.rule_id == rule_id]

    def keys(self, outcome_id: str) -> list[str]:
        (outcome,) = [o for o in self.outcomes if o.outcome_id == outcome_id]
        return [f"{e.ref.source}/{e.ref.event_id}" for e in outcome.events]
