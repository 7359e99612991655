"""The staff console's fake services: FakeBackend (tests.support.portal.fakes) with
`Backend.call` answered from a small in-memory case file in the services' own messages,
so each test runs the console's real requests and conversions."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import jwt
from google.protobuf.timestamp_pb2 import Timestamp

from egret.common.v1 import audit_chain_pb2, event_pb2, outcome_pb2
from egret.common.v1 import due_process_pb2 as dp
from egret.query.v1 import query_service_pb2 as query_pb
from egret.score.v1 import score_service_pb2 as score_pb
from kit import reasons
from services.portal.backend import ServiceError
from tests.support.portal.fakes import FakeBackend
from tests.support.portal.samples import NOW

SUBJECT_KEY = "a" * 64
OVERDUE_ENTRY = "f" * 64
FRESH_ENTRY = "e" * 64


def _ts(at: Any) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def ledger_entry(entry_id: str, *, source: str, category: str, title: str) -> query_pb.LedgerEntry:
    return query_pb.LedgerEntry(
        entry_id=entry_id,
        subject_key=SUBJECT_KEY,
        rule=outcome_pb2.RuleRef(
            rule_id=f"{category}.rule",
            rule_set="egret-sample",
            rule_set_version=2,
            title=title,
            description="A passenger passed a gate without a valid fare.",
            legal_basis="Urban Rail Transit Operation Management Provisions, art. 40",
        ),
        points=-10,
        category=category,
        severity=outcome_pb2.SEVERITY_GENERAL,
        status=query_pb.ENTRY_STATUS_DISPUTED,
        occurred_at=_ts(NOW - timedelta(days=30)),
        recorded_at=_ts(NOW - timedelta(days=29)),
        visible_until=_ts(NOW + timedelta(days=335)),
        reason=f"{title} at Lianban",
        event_refs=[event_pb2.EventRef(source=source, event_id="ev-1")],
        evidence=[
            event_pb2.RecordedEvent(
                ref=event_pb2.EventRef(source=source, event_id="ev-1"),
                event_type=f"{source}.fare_evaded",
                occurred_at=_ts(NOW - timedelta(days=30)),
                attributes={"station": event_pb2.AttributeValue(string_value="Lianban")},
            )
        ],
    )


class StaffBackend(FakeBackend):
    """FakeBackend plus the staff console's calls, answered from a case file."""

    def __init__(self) -> None:
        super().__init__()
        self.rpcs: list[tuple[str, str, Any, str]] = []
        self.cases: dict[str, query_pb.LedgerEntry] = {}
        self.handlers: dict[tuple[str, str], Callable[[Any], Any]] = {
            ("query", "ListDisputes"): self._list_disputes,
            ("query", "ListRepairApplications"): self._list_repairs,
            ("query", "GetEntry"): self._get_entry,
            ("query", "ListScoreHistory"): self._history,
            ("query", "GetScore"): self._score,
            ("score", "ResolveDispute"): self._resolve,
            ("score", "AssignDispute"): self._assign,
            ("score", "DecideRepair"): self._decide_repair,
            ("query", "ListAccessLog"): self._access_log,
        }
        for service in ("query", "score", "rules"):
            self.handlers[(f"{service}.audit", "VerifyAuditChain")] = self._chain(service)
        self.broken: set[str] = set()
        self.caller = ""
        self.add_dispute(OVERDUE_ENTRY, "metro", "transport", "Metro fare evasion", days_left=-2)
        self.add_dispute(FRESH_ENTRY, "library", "civic", "Late return", days_left=15)

    def add_dispute(self, entry_id: str, source: str, category: str, title: str, *, days_left: int) -> None:
        entry = ledger_entry(entry_id, source=source, category=category, title=title)
        entry.dispute.CopyFrom(
            dp.Dispute(
                dispute_id=str(len(self.cases) + 1),
                entry_id=entry_id,
                subject_key=SUBJECT_KEY,
                statement="I had a valid ticket; the gate was broken.",
                filed_by_role="subject",
                filed_at=_ts(NOW - timedelta(days=20 - days_left)),
                deadline=_ts(NOW + timedelta(days=days_left)),
                status=dp.DISPUTE_STATUS_OPEN,
                overdue=days_left < 0,
            )
        )
        self.cases[entry_id] = entry

    def add_repair(self, entry_id: str, *, days_left: int) -> None:
        entry = ledger_entry(entry_id, source="court", category="legal", title="Late payment")
        entry.status = query_pb.ENTRY_STATUS_ACTIVE
        entry.repair.CopyFrom(
            dp.RepairApplication(
                application_id=str(len(self.cases) + 10),
                entry_id=entry_id,
                subject_key=SUBJECT_KEY,
                evidence="I paid the whole debt on 2 May.",
                evidence_uri="https://example.org/receipt",
                applied_at=_ts(NOW - timedelta(days=1)),
                decision_due=_ts(NOW + timedelta(days=days_left)),
                status=dp.REPAIR_STATUS_PENDING,
                overdue=days_left < 0,
            )
        )
        self.cases[entry_id] = entry

    async def call(self, stub: str, method: str, request: Any, token: str) -> Any:
        self.rpcs.append((stub, method, request, token))
        # The services name the caller by its token's `sub` (a reviewer's principal id).
        self.caller = str(jwt.decode(token, options={"verify_signature": False}).get("sub", ""))
        self._record(f"{stub}.{method}", request)
        handler = self.handlers.get((stub, method))
        if handler is None:
            raise ServiceError("UNIMPLEMENTED", f"{stub}.{method}")
        return handler(request)

    def serves(self, stub: str) -> bool:
        return stub.split(".", maxsplit=1)[0] in ("query", "score", "rules")

    def asked(self, method: str) -> list[Any]:
        return [request for _, m, request, _ in self.rpcs if m == method]

    # -- answers ---------------------------------------------------------------------------

    def _list_disputes(self, request: query_pb.ListDisputesRequest) -> query_pb.ListDisputesResponse:
        # Every filter on the whole case file, as query does.
        holder = self.caller if request.assigned_to_caller else request.assignee
        found: list[dp.Dispute] = [
            e.dispute
            for e in self.cases.values()
            if e.HasField("dispute")
            and e.dispute.status == request.status
            and (e.dispute.overdue or not request.overdue_only)
            and (not request.department or request.department in {r.source for r in e.event_refs})
            and (not request.category or e.category == request.category)
            and (not holder or e.dispute.assignee == holder)
            and (not request.unassigned_only or not e.dispute.assignee)
        ]
        found.sort(key=lambda d: d.deadline.seconds)
        return query_pb.ListDisputesResponse(disputes=found)

    def _list_repairs(
        self, request: query_pb.ListRepairApplicationsRequest
    ) -> query_pb.ListRepairApplicationsResponse:
        found = [
            e.repair
            for e in self.cases.values()
            if e.HasField("repair")
            and e.repair.status == request.status
            and (e.repair.overdue or not request.overdue_only)
        ]
        found.sort(key=lambda a: a.decision_due.seconds)  # as query: earliest decision due first
        return query_pb.ListRepairApplicationsResponse(applications=found)

    def _get_entry(self, request: query_pb.GetEntryRequest) -> query_pb.GetEntryResponse:
        if request.entry_id not in self.cases:
            raise ServiceError("NOT_FOUND", "no ledger entry")
        return query_pb.GetEntryResponse(entry=self.cases[request.entry_id])

    def _history(self, request: query_pb.ListScoreHistoryRequest) -> query_pb.ListScoreHistoryResponse:
        return query_pb.ListScoreHistoryResponse(
            changes=[
                query_pb.ScoreChange(
                    changed_at=_ts(NOW - timedelta(days=29)),
                    cause=query_pb.CHANGE_CAUSE_ENTRIES,
                    score_before=1000,
                    score=990,
                    tier_before="A",
                    tier="A",
                    added_entry_ids=[OVERDUE_ENTRY],
                )
            ]
        )

    def _score(self, request: query_pb.GetScoreRequest) -> query_pb.GetScoreResponse:
        overturned = any(
            e.HasField("dispute") and e.dispute.status == dp.DISPUTE_STATUS_OVERTURNED
            for e in self.cases.values()
        )
        return query_pb.GetScoreResponse(
            score=query_pb.Score(
                score=1000 if overturned else 990, tier="A", policy_version="2026.2", as_of=_ts(NOW)
            )
        )

    def _resolve(self, request: score_pb.ResolveDisputeRequest) -> score_pb.ResolveDisputeResponse:
        entry = next(e for e in self.cases.values() if e.dispute.dispute_id == request.dispute_id)
        if entry.dispute.assignee and entry.dispute.assignee != self.caller:
            raise ServiceError(
                "FAILED_PRECONDITION",
                f"dispute {request.dispute_id} is assigned to {entry.dispute.assignee}",
                reason=reasons.ASSIGNED_TO_ANOTHER,
                metadata=(("assignee", entry.dispute.assignee),),
            )
        if entry.dispute.status != dp.DISPUTE_STATUS_OPEN:
            status = "upheld" if entry.dispute.status == dp.DISPUTE_STATUS_UPHELD else "overturned"
            raise ServiceError(
                "FAILED_PRECONDITION",
                f"dispute {request.dispute_id} was already decided",
                reason=reasons.ALREADY_DECIDED,
                metadata=(("status", status),),
            )
        overturn = request.decision == dp.DISPUTE_DECISION_OVERTURN
        entry.dispute.status = dp.DISPUTE_STATUS_OVERTURNED if overturn else dp.DISPUTE_STATUS_UPHELD
        entry.dispute.resolution_reason = request.reason
        entry.dispute.resolved_by = "reviewer-1"
        entry.dispute.resolved_at.CopyFrom(_ts(NOW))
        entry.dispute.overdue = False
        entry.status = query_pb.ENTRY_STATUS_REVERSED if overturn else query_pb.ENTRY_STATUS_ACTIVE
        return score_pb.ResolveDisputeResponse(dispute=entry.dispute)

    def _assign(self, request: score_pb.AssignDisputeRequest) -> score_pb.AssignDisputeResponse:
        entry = next(e for e in self.cases.values() if e.dispute.dispute_id == request.dispute_id)
        held = entry.dispute.assignee
        if held and held != self.caller:
            raise ServiceError(
                "FAILED_PRECONDITION",
                f"dispute {request.dispute_id} is assigned to {held}",
                reason=reasons.ASSIGNED_TO_ANOTHER,
                metadata=(("assignee", held),),
            )
        entry.dispute.assignee = "" if request.release else self.caller
        if request.release:
            entry.dispute.ClearField("assigned_at")
        else:
            entry.dispute.assigned_at.CopyFrom(_ts(NOW))
        return score_pb.AssignDisputeResponse(dispute=entry.dispute)

    def _decide_repair(self, request: score_pb.DecideRepairRequest) -> score_pb.DecideRepairResponse:
        entry = next(e for e in self.cases.values() if e.repair.application_id == request.application_id)
        if entry.repair.status != dp.REPAIR_STATUS_PENDING:
            status = "approved" if entry.repair.status == dp.REPAIR_STATUS_APPROVED else "rejected"
            raise ServiceError(
                "FAILED_PRECONDITION",
                "already decided",
                reason=reasons.ALREADY_DECIDED,
                metadata=(("status", status),),
            )
        approve = request.decision == dp.REPAIR_DECISION_APPROVE
        entry.repair.status = dp.REPAIR_STATUS_APPROVED if approve else dp.REPAIR_STATUS_REJECTED
        entry.repair.decision_reason = request.reason
        entry.repair.decided_by = "reviewer-1"
        entry.repair.decided_at.CopyFrom(_ts(NOW))
        entry.repair.overdue = False
        return score_pb.DecideRepairResponse(application=entry.repair)

    def _access_log(self, request: query_pb.ListAccessLogRequest) -> query_pb.ListAccessLogResponse:
        return query_pb.ListAccessLogResponse(
            records=[
                query_pb.AccessRecord(
                    at=_ts(NOW),
                    actor="reviewer-1",
                    role="reviewer",
                    purpose="dispute-review",
                    method="read:GetEntry",
                )
            ]
        )

    def _chain(self, service: str) -> Callable[[Any], Any]:
        def verify(request: Any) -> audit_chain_pb2.VerifyAuditChainResponse:
            broken = service in self.broken
            return audit_chain_pb2.VerifyAuditChainResponse(
                service=service,
                intact=not broken,
                records=12,
                last_seq=12,
                last_hash="b" * 64,
                problems=["seq 3: content does not match its hash (the record was altered)"]
                if broken
                else [],
                verified_at=_ts(NOW),
            )

        return verify
