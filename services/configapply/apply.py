"""Make the configured rule set and policy the active ones, through the services' RPCs.

Each piece is compared with what is active by the SHA-256 of its text: the same text
changes nothing, and says so. A changed one goes through the calls a person's change goes
through (rules: ValidateRuleSet, CreateDraft, PublishRuleSet, ActivateRuleSet; score:
ActivatePolicy), so the services validate it, and record it in their audit logs under
the caller's authenticated principal. Everything is planned, with read-only calls,
before anything is changed: an invalid piece, or a version already stored with other
content, refuses the whole apply and leaves every active version as it was.

The benefit catalogue has no store: query reads its file at start, and the chart rolls
query's pods when it changes. Here it is only checked against the configured policy, so
a catalogue query would refuse to start with is refused here too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

import grpc

from domain.benefits import BenefitCatalogueError, load_benefits
from domain.policy import PolicyError, ScorePolicy, policy_from_text
from egret.rules.v1 import rules_service_pb2 as rules_pb
from egret.rules.v1 import rules_service_pb2_grpc as rules_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc

Outcome: TypeAlias = Literal["unchanged", "activated", "would activate", "checked", "refused"]
RuleSetAction: TypeAlias = Literal["unchanged", "activate", "publish", "create", "refused"]

# Rule sets listed per page while looking for a stored version.
_PAGE = 500


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Step:
    """What the apply found or did for one piece of configuration on one service."""

    target: str  # "rule set on rules-0:50052", "policy on score:50053", "benefits"
    outcome: Outcome
    detail: str
    problems: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        return [f"{self.target}: {self.outcome}: {self.detail}", *(f"  - {p}" for p in self.problems)]


@dataclass(frozen=True)
class Calls:
    """Deadlines: `wait_s` for a service to come up (the first call to each waits for it),
    `deadline_s` for other calls, `activate_policy_s` for ActivatePolicy (it recomputes
    every subject before it answers)."""

    deadline_s: float = 10.0
    wait_s: float = 300.0
    activate_policy_s: float = 600.0


@dataclass(frozen=True)
class RuleSetPlan:
    address: str
    action: RuleSetAction
    detail: str
    rule_set_id: int = 0  # the stored rule set to publish or activate
    problems: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        return f"rule set on {self.address}"


@dataclass(frozen=True)
class PolicyPlan:
    address: str
    change: bool
    detail: str
    expected_version: str = ""
    problems: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        return f"policy on {self.address}"


@dataclass(frozen=True)
class Desired:
    """The configuration to make live: the texts of the three files."""

    rule_set: str
    policy: str
    benefits_file: Path


async def plan_rule_set(
    rules: rules_grpc.RulesServiceAsyncStub, address: str, source: str, calls: Calls
) -> RuleSetPlan:
    """What applying `source` to one rules instance (one shard's store) takes; reads only."""
    digest = sha256(source)
    active = await rules.GetActiveRuleSet(
        rules_pb.GetActiveRuleSetRequest(), timeout=calls.wait_s, wait_for_ready=True
    )
    if active.rule_set.source_sha256 == digest:
        summary = active.rule_set
        return RuleSetPlan(
            address, "unchanged", f"{summary.name} version {summary.version} is active (sha256 {digest[:12]})"
        )
    checked = await rules.ValidateRuleSet(
        rules_pb.ValidateRuleSetRequest(source=source), timeout=calls.deadline_s
    )
    if not checked.valid:
        return RuleSetPlan(
            address,
            "refused",
            "the rule set is invalid; the active one stays",
            problems=tuple(f"{p.field}: {p.description}" for p in checked.problems),
        )
    label = f"{checked.name} version {checked.version}"
    stored = [r for r in await _stored(rules, checked.name, calls) if r.version == checked.version]
    others = [r for r in stored if r.status != rules_pb.RULE_SET_STATUS_DRAFT and r.source_sha256 != digest]
    if others:
        return RuleSetPlan(
            address,
            "refused",
            f"{label} is already stored with other content (rule set {others[0].rule_set_id}): "
            "a published version never changes; raise the version in the source",
        )
    same = {r.status: r for r in stored if r.source_sha256 == digest}
    if rules_pb.RULE_SET_STATUS_RETIRED in same:
        retired = same[rules_pb.RULE_SET_STATUS_RETIRED]
        return RuleSetPlan(
            address,
            "refused",
            f"{label} (rule set {retired.rule_set_id}) was retired and cannot be activated again; "
            "raise the version in the source",
        )
    if rules_pb.RULE_SET_STATUS_PUBLISHED in same:
        found = same[rules_pb.RULE_SET_STATUS_PUBLISHED]
        return RuleSetPlan(
            address, "activate", f"{label} is published as rule set {found.rule_set_id}", found.rule_set_id
        )
    if rules_pb.RULE_SET_STATUS_DRAFT in same:
        # A draft of this very text: an earlier apply stopped after creating it.
        found = same[rules_pb.RULE_SET_STATUS_DRAFT]
        return RuleSetPlan(
            address, "publish", f"{label} is a draft as rule set {found.rule_set_id}", found.rule_set_id
        )
    was = f"{active.rule_set.name} version {active.rule_set.version}"
    return RuleSetPlan(address, "create", f"{label} replaces {was}")


async def _stored(rules: rules_grpc.RulesServiceAsyncStub, name: str, calls: Calls) -> list[rules_pb.RuleSet]:
    found: list[rules_pb.RuleSet] = []
    token = ""
    while True:
        page = await rules.ListRuleSets(
            rules_pb.ListRuleSetsRequest(name=name, page_size=_PAGE, page_token=token),
            timeout=calls.deadline_s,
        )
        found.extend(page.rule_sets)
        token = page.next_page_token
        if not token:
            return found


async def apply_rule_set(
    rules: rules_grpc.RulesServiceAsyncStub, plan: RuleSetPlan, source: str, calls: Calls
) -> Step:
    """Carry out a plan: draft, publish and activate, as far as the plan needs."""
    if plan.action == "unchanged":
        return Step(plan.target, "unchanged", plan.detail)
    rule_set_id = plan.rule_set_id
    if plan.action == "create":
        draft = await rules.CreateDraft(rules_pb.CreateDraftRequest(source=source), timeout=calls.deadline_s)
        rule_set_id = draft.rule_set.rule_set_id
    if plan.action in ("create", "publish"):
        await rules.PublishRuleSet(
            rules_pb.PublishRuleSetRequest(rule_set_id=rule_set_id), timeout=calls.deadline_s
        )
    done = await rules.ActivateRuleSet(
        rules_pb.ActivateRuleSetRequest(rule_set_id=rule_set_id), timeout=calls.deadline_s
    )
    active = done.rule_set
    return Step(
        plan.target,
        "activated",
        f"{active.name} version {active.version} (rule set {active.rule_set_id}, sha256 "
        f"{active.source_sha256[:12]}) is active, activated by {active.activated_by}; {plan.detail}",
    )


def parse_policy(text: str) -> ScorePolicy | Step:
    try:
        return policy_from_text(text, source="policy")
    except PolicyError as exc:
        return Step("policy", "refused", "the policy is invalid; the active one stays", tuple(exc.problems))


async def plan_policy(
    score: score_grpc.ScoreServiceAsyncStub, address: str, text: str, desired: ScorePolicy, calls: Calls
) -> PolicyPlan:
    """What applying the policy `text` to score takes; reads only."""
    active = await score.GetActivePolicy(
        score_pb.GetActivePolicyRequest(), timeout=calls.wait_s, wait_for_ready=True
    )
    digest = sha256(text)
    if sha256(active.policy_yaml) == digest:
        return PolicyPlan(address, False, f"version {active.version} is active (sha256 {digest[:12]})")
    if desired.version == active.version:
        return PolicyPlan(
            address,
            False,
            f"version {active.version} is active with other content",
            problems=("a policy version never changes: raise the version in the policy",),
        )
    return PolicyPlan(
        address, True, f"version {desired.version} replaces {active.version}", expected_version=active.version
    )


async def apply_policy(
    score: score_grpc.ScoreServiceAsyncStub, plan: PolicyPlan, text: str, calls: Calls
) -> Step:
    if not plan.change:
        return Step(plan.target, "unchanged", plan.detail)
    try:
        done = await score.ActivatePolicy(
            score_pb.ActivatePolicyRequest(policy_yaml=text, expected_current_version=plan.expected_version),
            timeout=calls.activate_policy_s,
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (
            grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.INVALID_ARGUMENT,
        ):
            # ALREADY_EXISTS: the version was active once (versions are immutable, a
            # return to earlier content needs a new version); FAILED_PRECONDITION:
            # someone activated another policy since the plan was made.
            return Step(
                plan.target, "refused", f"{exc.code().name}: {exc.details()}; the active policy stays"
            )
        raise
    report = done.report
    return Step(
        plan.target,
        "activated",
        f"{plan.detail}: {done.subjects_recomputed} subjects recomputed, {report.tier_changed} "
        f"changed tier, {report.score_changed} changed score",
    )


def check_benefits(path: Path, policy: ScorePolicy) -> Step:
    """The catalogue checked as query checks it at start, against the configured policy."""
    try:
        catalogue = load_benefits(path, policy)
    except BenefitCatalogueError as exc:
        return Step("benefits", "refused", "the benefit catalogue is invalid", tuple(exc.problems))
    digest = sha256(path.read_text(encoding="utf-8"))
    return Step(
        "benefits",
        "checked",
        f"{len(catalogue.benefits)} benefits (sha256 {digest[:12]}); query reads the file at start, "
        "so its pods restart when it changes",
    )


@dataclass(frozen=True)
class Targets:
    """Stubs of every rules instance (one per shard) and of score, by address."""

    rules: Sequence[tuple[str, rules_grpc.RulesServiceAsyncStub]]
    score: tuple[str, score_grpc.ScoreServiceAsyncStub]


async def apply(targets: Targets, desired: Desired, calls: Calls, *, dry_run: bool = False) -> list[Step]:
    """Plan every piece, then (unless one is refused, or `dry_run`) carry the plans out."""
    policy = parse_policy(desired.policy)
    if isinstance(policy, Step):
        return [policy]
    benefits = check_benefits(desired.benefits_file, policy)
    rule_plans = [
        await plan_rule_set(stub, address, desired.rule_set, calls) for address, stub in targets.rules
    ]
    score_address, score = targets.score
    policy_plan = await plan_policy(score, score_address, desired.policy, policy, calls)
    refused = [
        *(Step(p.target, "refused", p.detail, p.problems) for p in rule_plans if p.action == "refused"),
        *(
            [Step(policy_plan.target, "refused", policy_plan.detail, policy_plan.problems)]
            if policy_plan.problems
            else []
        ),
        *([benefits] if benefits.outcome == "refused" else []),
    ]
    if refused:
        return refused
    if dry_run:
        return [
            *(
                Step(p.target, "unchanged" if p.action == "unchanged" else "would activate", p.detail)
                for p in rule_plans
            ),
            Step(
                policy_plan.target,
                "would activate" if policy_plan.change else "unchanged",
                policy_plan.detail,
            ),
            benefits,
        ]
    steps = [
        await apply_rule_set(stub, plan, desired.rule_set, calls)
        for (_, stub), plan in zip(targets.rules, rule_plans, strict=True)
    ]
    steps.append(await apply_policy(score, policy_plan, desired.policy, calls))
    steps.append(benefits)
    return steps
