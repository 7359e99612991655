"""A fake backend for the console's rule-set and policy pages: the rules and score RPCs they
call (Backend.call), answering protobuf messages as the services would, so the portal's
conversions are exercised too; a role check as services/rules/access.py and
services/score/access.py make it, from the token's role."""

from __future__ import annotations

import hashlib
from typing import Any

import jwt
from google.protobuf.timestamp_pb2 import Timestamp

from egret.common.v1 import errors_pb2, subject_pb2
from egret.rules.v1 import backtest_pb2 as bt
from egret.rules.v1 import rules_service_pb2 as rules_pb
from egret.score.v1 import score_service_pb2 as score_pb
from kit.principal import Role
from kit.safeyaml import YamlError, load_yaml
from services.portal.backend import ServiceError
from services.rules.access import POLICY as RULES_ACCESS
from services.score.access import POLICY as SCORE_ACCESS
from tests.support.portal.fakes import FakeBackend
from tests.support.portal.samples import NOW

V1 = """name: egret-sample
version: 1
rules:
  - id: traffic.red_light
    title: Red light run
    description: A vehicle ran a red light.
    event_types: [traffic.red_light]
    points: -5
    category: traffic
    severity: minor
    legal_basis: Road Traffic Safety Law
  - id: transport.metro_fare_evasion
    title: Metro fare evasion
    description: Fare evasion.
    event_types: [transport.metro.fare_evasion]
    points: -10
    category: transport
    severity: general
    legal_basis: Metro provisions
"""
V2 = V1.replace("version: 1", "version: 2").replace("points: -5", "points: -8") + (
    "  - id: civic.volunteer\n    title: Volunteering\n    description: Volunteered.\n"
    "    event_types: [civic.volunteer]\n    points: 3\n    category: civic\n    severity: positive\n"
    "    legal_basis: Volunteer regulation\n"
)

# Who may call what (the services' tables, abridged to what the pages call).
# Who the fake services admit: the services' own access tables (staff roles only).
_METHODS = (
    "ListRuleSets", "GetRuleSet", "ListRuleSetChanges", "ValidateRuleSet", "CreateDraft", "PublishRuleSet",
    "ActivateRuleSet", "RetireRuleSet", "StartBacktest", "CancelBacktest", "GetBacktest", "ListBacktests",
    "ListPolicies", "PreviewPolicy", "ActivatePolicy",
)  # fmt: skip
ALLOWED = {
    method: {role.value for role in policy.roles if role is not Role.SERVICE}
    for table in (RULES_ACCESS, SCORE_ACCESS)
    for path, policy in table.items()
    if (method := path.rsplit("/", 1)[1]) in _METHODS
}
STATUS = {
    "draft": rules_pb.RULE_SET_STATUS_DRAFT,
    "published": rules_pb.RULE_SET_STATUS_PUBLISHED,
    "active": rules_pb.RULE_SET_STATUS_ACTIVE,
    "retired": rules_pb.RULE_SET_STATUS_RETIRED,
}


def _stamp() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(NOW)
    return stamp


def breakdown(scale: int = 1) -> bt.BacktestBreakdown:
    return bt.BacktestBreakdown(
        subjects=100 * scale,
        subjects_changed=12 * scale,
        migrations=[
            bt.TierMigration(from_tier="A", to_tier="A", subjects=50 * scale),
            bt.TierMigration(from_tier="A", to_tier="B", subjects=7 * scale),
            bt.TierMigration(from_tier="B", to_tier="B", subjects=40 * scale),
            bt.TierMigration(from_tier="B", to_tier="A", subjects=3 * scale),
        ],
        score_changes=[
            bt.ScoreChangeBucket(label="<= -10", subjects=7 * scale),
            bt.ScoreChangeBucket(label="0", subjects=88 * scale),
            bt.ScoreChangeBucket(label="+1..+9", subjects=5 * scale),
        ],
        rules=[
            bt.RuleImpact(
                rule_id="traffic.red_light",
                baseline_firings=20,
                candidate_firings=20,
                baseline_points=-100,
                candidate_points=-160,
                points_moved=-60,
            ),
            bt.RuleImpact(
                rule_id="civic.volunteer", candidate_firings=5, candidate_points=15, points_moved=15
            ),
        ],
    )


class AuthoringBackend(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.rule_sets: dict[int, dict[str, Any]] = {}
        self.rule_set_changes: list[rules_pb.RuleSetChange] = []
        self.policy_versions = ["2026.1"]
        # backtest id → the job's start and how often it was read (it finishes on the second read).
        self.jobs: dict[str, dict[str, Any]] = {}
        self._store(V1, "active")
        self._store(V2, "draft")

    def _store(self, source: str, state: str) -> int:
        document, _ = load_yaml(source)
        rule_set_id = len(self.rule_sets) + 1
        self.rule_sets[rule_set_id] = {
            "source": source,
            "state": state,
            "name": document["name"],
            "version": document["version"],
            "rule_ids": [r["id"] for r in document["rules"]],
        }
        return rule_set_id

    def _message(self, rule_set_id: int, *, source: bool = True) -> rules_pb.RuleSet:
        s = self.rule_sets[rule_set_id]
        return rules_pb.RuleSet(
            rule_set_id=rule_set_id,
            name=s["name"],
            version=s["version"],
            status=STATUS[s["state"]],
            source=s["source"] if source else "",
            source_sha256=hashlib.sha256(s["source"].encode()).hexdigest(),
            # ListRuleSets leaves the source out, and with it the rule ids read from it.
            rule_ids=s["rule_ids"] if source else [],
            created_at=_stamp(),
            created_by="rev-1",
        )

    def _get(self, rule_set_id: int) -> dict[str, Any]:
        if rule_set_id not in self.rule_sets:
            raise ServiceError("NOT_FOUND", f"no rule set {rule_set_id}")
        return self.rule_sets[rule_set_id]

    def _change(self, rule_set_id: int, action: str, actor: str) -> None:
        self.rule_set_changes.append(
            rules_pb.RuleSetChange(
                change_id=len(self.rule_set_changes) + 1,
                rule_set_id=rule_set_id,
                action=action,
                actor=actor,
                changed_at=_stamp(),
                detail_json="{}",
            )
        )

    fail_next_backtest = False

    def _job(self, backtest_id: str, purpose: str, *, report: bool = True) -> bt.BacktestJob:
        """Queued before any read, running at the first, done from the second on; once
        cancelled, as it was then."""
        job = self.jobs[backtest_id]
        start: bt.BacktestRuleSetRequest = job["request"]
        cancelled_by, reads = job.get("cancelled", ("", job["reads"]))
        state = (
            bt.BACKTEST_STATE_CANCELLED
            if cancelled_by
            else bt.BACKTEST_STATE_QUEUED
            if reads == 0
            else bt.BACKTEST_STATE_RUNNING
            if reads == 1
            else bt.BACKTEST_STATE_FAILED
            if job["fail"]
            else bt.BACKTEST_STATE_SUCCEEDED
        )
        message = bt.BacktestJob(
            backtest_id=backtest_id,
            rule_set_id=start.rule_set_id,
            state=state,
            progress={0: 0.0, 1: 0.25}.get(reads, 1.0),
            events_replayed={0: 0, 1: 300}.get(reads, 1200),
            events_total=1200,
            started_at=_stamp(),
            started_by="reviewer-1",
            request=start,
            error="the candidate failed: division by zero" if state == bt.BACKTEST_STATE_FAILED else "",
            cancelled_by=cancelled_by,
        )
        if cancelled_by:
            message.finished_at.CopyFrom(_stamp())
        if state == bt.BACKTEST_STATE_SUCCEEDED and report:
            message.report.CopyFrom(self._report(start.rule_set_id, start.purpose != "" and purpose != ""))
        return message

    def _report(self, rule_set_id: int, with_subjects: bool) -> bt.BacktestRuleSetResponse:
        s = self.rule_sets[rule_set_id]
        return bt.BacktestRuleSetResponse(
            baseline=bt.BacktestedRuleSet(rule_set_id=1, name="egret-sample", version=1),
            candidate=bt.BacktestedRuleSet(rule_set_id=rule_set_id, name=s["name"], version=s["version"]),
            policy_version="2026.1",
            events_replayed=1234,
            overall=breakdown(),
            cohorts=[
                bt.BacktestCohort(dimension="subject_kind", value="person", breakdown=breakdown()),
                bt.BacktestCohort(dimension="district", value="Siming", breakdown=breakdown()),
            ],
            subjects=[
                bt.BacktestSubject(
                    subject_key="k" * 64,
                    subject_kind="person",
                    baseline_score=1000,
                    baseline_tier="A",
                    candidate_score=940,
                    candidate_tier="B",
                )
            ]
            if with_subjects
            else [],
            as_of=_stamp(),
        )

    @staticmethod
    def problems(source: str) -> list[errors_pb2.FieldViolation]:
        try:
            document, _ = load_yaml(source)
        except YamlError as error:
            return [errors_pb2.FieldViolation(field="source", description=str(error), reason="INVALID_YAML")]
        found = []
        for i, rule in enumerate((document or {}).get("rules") or ()):
            if not isinstance(rule.get("points"), int):
                found.append(
                    errors_pb2.FieldViolation(
                        field=f"source.rules[{i}] ({rule.get('id')}).points",
                        description="points must be an integer",
                        reason="INVALID",
                    )
                )
            if not rule.get("legal_basis"):
                found.append(
                    errors_pb2.FieldViolation(
                        field=f"source.rules[{i}] ({rule.get('id')}).legal_basis",
                        description="legal_basis is required",
                        reason="REQUIRED",
                    )
                )
        return found

    async def call(self, stub: str, method: str, request: Any, token: str) -> Any:
        role = jwt.decode(token, options={"verify_signature": False})["role"]
        actor = f"{role}-1"
        self._record(method, request)
        if role not in ALLOWED.get(method, set()):
            raise ServiceError("PERMISSION_DENIED", f"role {role} may not call {method}")
        if method == "ListRuleSets":
            return rules_pb.ListRuleSetsResponse(
                rule_sets=[self._message(i, source=False) for i in self.rule_sets]
            )
        if method == "GetRuleSet":
            self._get(request.rule_set_id)
            return rules_pb.GetRuleSetResponse(rule_set=self._message(request.rule_set_id))
        if method == "ListRuleSetChanges":
            return rules_pb.ListRuleSetChangesResponse(
                changes=[c for c in self.rule_set_changes if c.rule_set_id == request.rule_set_id]
            )
        if method == "ValidateRuleSet":
            found = self.problems(request.source)
            if found:
                return rules_pb.ValidateRuleSetResponse(valid=False, problems=found)
            document, _ = load_yaml(request.source)
            return rules_pb.ValidateRuleSetResponse(
                valid=True,
                name=document["name"],
                version=document["version"],
                rule_ids=[r["id"] for r in document["rules"]],
            )
        if method == "CreateDraft":
            if self.problems(request.source):
                raise ServiceError("INVALID_ARGUMENT", "invalid rule set")
            rule_set_id = self._store(request.source, "draft")
            self._change(rule_set_id, "create_draft", actor)
            return rules_pb.CreateDraftResponse(rule_set=self._message(rule_set_id))
        if method in ("PublishRuleSet", "ActivateRuleSet", "RetireRuleSet"):
            s = self._get(request.rule_set_id)
            wanted = {"PublishRuleSet": ("draft",), "ActivateRuleSet": ("published",)}.get(
                method, ("draft", "published")
            )
            if s["state"] not in wanted:
                raise ServiceError("FAILED_PRECONDITION", f"rule set is {s['state']}")
            if method == "ActivateRuleSet":
                for other in self.rule_sets.values():
                    if other["state"] == "active":
                        other["state"] = "published"
            s["state"] = {"PublishRuleSet": "published", "ActivateRuleSet": "active"}.get(method, "retired")
            action = {"PublishRuleSet": "publish", "ActivateRuleSet": "activate"}.get(method, "retire")
            self._change(request.rule_set_id, action, actor)
            response = {
                "PublishRuleSet": rules_pb.PublishRuleSetResponse,
                "ActivateRuleSet": rules_pb.ActivateRuleSetResponse,
                "RetireRuleSet": rules_pb.RetireRuleSetResponse,
            }[method]
            return response(rule_set=self._message(request.rule_set_id))
        if method == "StartBacktest":
            self._get(request.backtest.rule_set_id)
            backtest_id = f"bt-{len(self.jobs) + 1}"
            self.jobs[backtest_id] = {
                "request": request.backtest,
                "reads": 0,
                "fail": self.fail_next_backtest,
            }
            return bt.StartBacktestResponse(backtest=self._job(backtest_id, purpose=""))
        if method == "GetBacktest":
            if request.backtest_id not in self.jobs:
                raise ServiceError("NOT_FOUND", "no such backtest")
            self.jobs[request.backtest_id]["reads"] += 1
            return bt.GetBacktestResponse(backtest=self._job(request.backtest_id, request.purpose))
        if method == "CancelBacktest":
            if request.backtest_id not in self.jobs:
                raise ServiceError("NOT_FOUND", "no such backtest")
            job = self.jobs[request.backtest_id]
            if role != "admin" and actor != "reviewer-1":  # who started every job here
                raise ServiceError("PERMISSION_DENIED", "not your backtest")
            if "cancelled" not in job:
                if job["reads"] >= 2:
                    raise ServiceError("FAILED_PRECONDITION", "the backtest finished already")
                job["cancelled"] = (actor, job["reads"])
            return bt.CancelBacktestResponse(backtest=self._job(request.backtest_id, purpose=""))
        if method == "ListBacktests":
            ids = [i for i, j in self.jobs.items() if j["request"].rule_set_id == request.rule_set_id]
            return bt.ListBacktestsResponse(
                backtests=[self._job(i, purpose="", report=False) for i in reversed(ids)]
            )
        if method == "ListPolicies":
            return score_pb.ListPoliciesResponse(
                activations=[
                    score_pb.PolicyActivation(
                        version=v,
                        activated_at=_stamp(),
                        activated_by="admin-1",
                        policy_yaml=f"version: '{v}'\n",
                    )
                    for v in self.policy_versions
                ]
            )
        if method in ("PreviewPolicy", "ActivatePolicy"):
            document, _ = load_yaml(request.policy_yaml)
            version = str((document or {}).get("version", ""))
            if not version:
                raise ServiceError("INVALID_ARGUMENT", "invalid policy")
            if method == "ActivatePolicy":
                if request.expected_current_version not in ("", self.policy_versions[-1]):
                    raise ServiceError("FAILED_PRECONDITION", "another policy was activated")
                self.policy_versions.append(version)
            report = score_pb.PolicyReport(
                current_version=self.policy_versions[-1],
                proposed_version=version,
                as_of=_stamp(),
                subjects=100,
                score_changed=30,
                tier_changed=9,
                migrations=[
                    score_pb.TierMigration(
                        subject_kind=subject_pb2.SUBJECT_KIND_PERSON, from_tier="A", to_tier="A", subjects=60
                    ),
                    score_pb.TierMigration(
                        subject_kind=subject_pb2.SUBJECT_KIND_PERSON, from_tier="A", to_tier="B", subjects=9
                    ),
                    score_pb.TierMigration(
                        subject_kind=subject_pb2.SUBJECT_KIND_PERSON, from_tier="B", to_tier="B", subjects=31
                    ),
                ],
                list_moves=[
                    score_pb.ListMove(
                        subject_kind=subject_pb2.SUBJECT_KIND_PERSON, list_name="red", entering=2, leaving=1
                    )
                ],
            )
            if method == "PreviewPolicy":
                return score_pb.PreviewPolicyResponse(report=report)
            return score_pb.ActivatePolicyResponse(report=report, subjects_recomputed=100)
        raise AssertionError(f"unexpected call {stub}.{method}")
