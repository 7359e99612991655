"""The staff console's calls for rule sets and the score policy: rules' lifecycle and
backtest RPCs and score's policy RPCs, each with the staff member's own token (the services
decide who may; their audit logs name the staff member), and their answers as
services.portal.authoring_records."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from egret.common.v1 import subject_pb2
from egret.rules.v1 import backtest_pb2 as backtest_pb
from egret.rules.v1 import rules_service_pb2 as rules_pb
from egret.score.v1 import score_service_pb2 as score_pb
from services.portal import authoring_records as a
from services.portal.backend import Backend, Violation
from services.portal.convert import when

_STATE = {
    rules_pb.RULE_SET_STATUS_DRAFT: "draft",
    rules_pb.RULE_SET_STATUS_PUBLISHED: "published",
    rules_pb.RULE_SET_STATUS_ACTIVE: "active",
    rules_pb.RULE_SET_STATUS_RETIRED: "retired",
}
_JOB_STATE = {
    backtest_pb.BACKTEST_STATE_QUEUED: "queued",
    backtest_pb.BACKTEST_STATE_RUNNING: "running",
    backtest_pb.BACKTEST_STATE_SUCCEEDED: "succeeded",
    backtest_pb.BACKTEST_STATE_FAILED: "failed",
    backtest_pb.BACKTEST_STATE_CANCELLED: "cancelled",
}
_KIND = {subject_pb2.SUBJECT_KIND_PERSON: "person", subject_pb2.SUBJECT_KIND_ORGANIZATION: "organization"}
# The lifecycle acts the console offers, with their RPC and request.
LIFECYCLE: dict[str, tuple[str, type[Any]]] = {
    "publish": ("PublishRuleSet", rules_pb.PublishRuleSetRequest),
    "activate": ("ActivateRuleSet", rules_pb.ActivateRuleSetRequest),
    "retire": ("RetireRuleSet", rules_pb.RetireRuleSetRequest),
}
PAGE = 500
# Subjects a backtest with a purpose lists; backtests a rule set's page lists.
SUBJECTS = 50
JOBS = 10
MAX_PAGES = 20


class AuthoringCalls:
    """Over the portal's channels (Backend.call): no channel of its own."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    # -- rule sets ---------------------------------------------------------------------------

    async def rule_sets(self, token: str) -> tuple[a.RuleSetInfo, ...]:
        """Every stored rule set, oldest first."""
        found: list[a.RuleSetInfo] = []
        page_token = ""
        for _ in range(MAX_PAGES):
            response = await self._backend.call(
                "rules",
                "ListRuleSets",
                rules_pb.ListRuleSetsRequest(page_size=PAGE, page_token=page_token),
                token,
            )
            found += (rule_set(s) for s in response.rule_sets)
            page_token = response.next_page_token
            if not page_token:
                break
        return tuple(found)

    async def rule_set(self, token: str, rule_set_id: int) -> a.RuleSetInfo:
        response = await self._backend.call(
            "rules", "GetRuleSet", rules_pb.GetRuleSetRequest(rule_set_id=rule_set_id), token
        )
        return rule_set(response.rule_set)

    async def changes(self, token: str, rule_set_id: int) -> tuple[a.RuleSetChange, ...]:
        response = await self._backend.call(
            "rules",
            "ListRuleSetChanges",
            rules_pb.ListRuleSetChangesRequest(rule_set_id=rule_set_id, page_size=PAGE),
            token,
        )
        return tuple(
            a.RuleSetChange(c.change_id, c.rule_set_id, c.action, c.actor, when(c.changed_at), c.detail_json)
            for c in response.changes
        )

    async def validate(self, token: str, source: str) -> a.Validation:
        response = await self._backend.call(
            "rules", "ValidateRuleSet", rules_pb.ValidateRuleSetRequest(source=source), token
        )
        return a.Validation(
            response.valid,
            violations(response.problems),
            response.name,
            response.version,
            tuple(response.rule_ids),
        )

    async def create_draft(self, token: str, source: str) -> a.RuleSetInfo:
        response = await self._backend.call(
            "rules", "CreateDraft", rules_pb.CreateDraftRequest(source=source), token
        )
        return rule_set(response.rule_set)

    async def change(self, token: str, act: str, rule_set_id: int) -> a.RuleSetInfo:
        """Publish, activate or retire (`act`, one of LIFECYCLE) a stored rule set."""
        method, request = LIFECYCLE[act]
        response = await self._backend.call("rules", method, request(rule_set_id=rule_set_id), token)
        return rule_set(response.rule_set)

    async def start_backtest(self, token: str, rule_set_id: int, purpose: str) -> a.BacktestJob:
        """A background backtest of a stored rule set over all stored history. With a purpose
        (`rule-backtest`), the report lists the most affected subjects (pseudonymous keys),
        a read the rules service records in its audit log."""
        request = backtest_pb.BacktestRuleSetRequest(
            rule_set_id=rule_set_id, purpose=purpose, subject_limit=SUBJECTS if purpose else 0
        )
        response = await self._backend.call(
            "rules", "StartBacktest", backtest_pb.StartBacktestRequest(backtest=request), token
        )
        return backtest_job(response.backtest)

    async def backtest(self, token: str, backtest_id: str, *, subjects: bool = False) -> a.BacktestJob:
        """The job with its report once it succeeded; with `subjects`, the report's subjects
        too, read with the purpose the start stated (if it stated none, none are listed)."""
        first = await self._backend.call(
            "rules", "GetBacktest", backtest_pb.GetBacktestRequest(backtest_id=backtest_id), token
        )
        purpose = first.backtest.request.purpose
        if not (subjects and purpose) or first.backtest.state != backtest_pb.BACKTEST_STATE_SUCCEEDED:
            return backtest_job(first.backtest)
        again = await self._backend.call(
            "rules",
            "GetBacktest",
            backtest_pb.GetBacktestRequest(backtest_id=backtest_id, purpose=purpose),
            token,
        )
        return backtest_job(again.backtest)

    async def cancel_backtest(self, token: str, backtest_id: str) -> a.BacktestJob:
        """Stops a queued or running backtest (its starter's, or any for an admin: the rules
        service decides, and records the act in its audit log)."""
        response = await self._backend.call(
            "rules", "CancelBacktest", backtest_pb.CancelBacktestRequest(backtest_id=backtest_id), token
        )
        return backtest_job(response.backtest)

    async def backtests(self, token: str, rule_set_id: int) -> tuple[a.BacktestJob, ...]:
        """A rule set's backtests, newest first, without their reports."""
        response = await self._backend.call(
            "rules",
            "ListBacktests",
            backtest_pb.ListBacktestsRequest(rule_set_id=rule_set_id, page_size=JOBS),
            token,
        )
        return tuple(backtest_job(job) for job in response.backtests)

    # -- the score policy --------------------------------------------------------------------

    async def policies(self, token: str) -> tuple[a.PolicyActivation, ...]:
        """Every activation, oldest first; the last is active."""
        response = await self._backend.call("score", "ListPolicies", score_pb.ListPoliciesRequest(), token)
        return tuple(
            a.PolicyActivation(p.version, when(p.activated_at), p.activated_by, p.policy_yaml)
            for p in response.activations
        )

    async def preview_policy(self, token: str, policy_yaml: str) -> a.PolicyReport:
        response = await self._backend.call(
            "score",
            "PreviewPolicy",
            score_pb.PreviewPolicyRequest(policy_yaml=policy_yaml),
            token,
        )
        return policy_report(response.report)

    async def activate_policy(self, token: str, policy_yaml: str, expected_current: str) -> a.PolicyReport:
        # activated_by left empty: score records the principal of the token.
        response = await self._backend.call(
            "score",
            "ActivatePolicy",
            score_pb.ActivatePolicyRequest(
                policy_yaml=policy_yaml, expected_current_version=expected_current
            ),
            token,
        )
        return policy_report(response.report)


def violations(problems: Iterable[object]) -> tuple[Violation, ...]:
    return tuple(
        Violation(
            str(getattr(p, "field", "")), str(getattr(p, "reason", "")), str(getattr(p, "description", ""))
        )
        for p in problems
    )


def rule_set(s: rules_pb.RuleSet) -> a.RuleSetInfo:
    return a.RuleSetInfo(
        rule_set_id=s.rule_set_id,
        name=s.name,
        version=s.version,
        state=_STATE.get(s.status, "draft"),
        source=s.source,
        source_sha256=s.source_sha256,
        rule_ids=tuple(s.rule_ids),
        created_at=when(s.created_at),
        created_by=s.created_by,
        published_at=when(s.published_at),
        published_by=s.published_by,
        activated_at=when(s.activated_at),
        activated_by=s.activated_by,
        retired_at=when(s.retired_at),
        retired_by=s.retired_by,
    )


def _side(side: backtest_pb.BacktestedRuleSet) -> str:
    return f"{side.name} v{side.version}" if side.name else ""


def breakdown(b: backtest_pb.BacktestBreakdown) -> a.Breakdown:
    return a.Breakdown(
        subjects=b.subjects,
        subjects_changed=b.subjects_changed,
        migrations=tuple(a.Migration(m.from_tier, m.to_tier, m.subjects) for m in b.migrations),
        score_changes=tuple(a.Bucket(c.label, c.subjects) for c in b.score_changes),
        rules=tuple(
            a.RuleImpact(
                r.rule_id,
                r.baseline_firings,
                r.candidate_firings,
                r.baseline_points,
                r.candidate_points,
                r.points_moved,
            )
            for r in b.rules
        ),
    )


def backtest_report(response: backtest_pb.BacktestRuleSetResponse) -> a.BacktestReport:
    return a.BacktestReport(
        baseline=_side(response.baseline),
        candidate=_side(response.candidate),
        candidate_id=response.candidate.rule_set_id,
        policy_version=response.policy_version,
        events_replayed=response.events_replayed,
        overall=breakdown(response.overall),
        cohorts=tuple(a.Cohort(c.dimension, c.value, breakdown(c.breakdown)) for c in response.cohorts),
        elapsed_seconds=response.elapsed_seconds,
        baseline_failed_events=response.baseline_failed_events,
        candidate_failed_events=response.candidate_failed_events,
        as_of=when(response.as_of),
        subjects=tuple(
            a.BacktestSubject(
                s.subject_key,
                s.subject_kind,
                s.baseline_score,
                s.baseline_tier,
                s.candidate_score,
                s.candidate_tier,
            )
            for s in response.subjects
        ),
    )


def backtest_job(job: backtest_pb.BacktestJob) -> a.BacktestJob:
    succeeded = job.state == backtest_pb.BACKTEST_STATE_SUCCEEDED and job.HasField("report")
    return a.BacktestJob(
        backtest_id=job.backtest_id,
        rule_set_id=job.rule_set_id,
        state=_JOB_STATE.get(job.state, "queued"),
        progress=min(max(job.progress, 0.0), 1.0),
        events_replayed=job.events_replayed,
        events_total=job.events_total,
        started_at=when(job.started_at),
        finished_at=when(job.finished_at),
        started_by=job.started_by,
        purpose=job.request.purpose,
        report=backtest_report(job.report) if succeeded else None,
        error=job.error,
        cancelled_by=job.cancelled_by,
    )


def policy_report(report: score_pb.PolicyReport) -> a.PolicyReport:
    return a.PolicyReport(
        current_version=report.current_version,
        proposed_version=report.proposed_version,
        as_of=when(report.as_of),
        subjects=report.subjects,
        score_changed=report.score_changed,
        tier_changed=report.tier_changed,
        migrations=tuple(
            a.Migration(m.from_tier, m.to_tier, m.subjects, _KIND.get(m.subject_kind, ""))
            for m in report.migrations
        ),
        list_moves=tuple(
            a.ListMove(_KIND.get(m.subject_kind, ""), m.list_name, m.entering, m.leaving)
            for m in report.list_moves
        ),
    )
