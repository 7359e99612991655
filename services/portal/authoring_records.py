"""What the staff console's rule-set and policy pages read and write (rules' lifecycle and
backtest RPCs, score's policy RPCs), as plain dataclasses: no protobuf past
services.portal.staffcalls.authoring."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.portal.backend import Violation

# RuleSetStatus, as the pages name it.
STATES = ("draft", "published", "active", "retired")


@dataclass(frozen=True)
class RuleSetInfo:
    rule_set_id: int
    name: str
    version: int
    state: str  # one of STATES
    source: str  # empty in a listing (ListRuleSets leaves it out)
    source_sha256: str
    rule_ids: tuple[str, ...]
    created_at: datetime | None
    created_by: str
    published_at: datetime | None = None
    published_by: str = ""
    activated_at: datetime | None = None
    activated_by: str = ""
    retired_at: datetime | None = None
    retired_by: str = ""


@dataclass(frozen=True)
class RuleSetChange:
    change_id: int
    rule_set_id: int
    action: str
    actor: str
    changed_at: datetime | None
    detail_json: str


@dataclass(frozen=True)
class Validation:
    valid: bool
    problems: tuple[Violation, ...]
    name: str = ""
    version: int = 0
    rule_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Migration:
    """Subjects whose tier is `from_tier` on one side and `to_tier` on the other; `kind` only
    where a report splits them by subject kind (a policy preview)."""

    from_tier: str
    to_tier: str
    subjects: int
    kind: str = ""


@dataclass(frozen=True)
class Bucket:
    label: str
    subjects: int


@dataclass(frozen=True)
class RuleImpact:
    rule_id: str
    baseline_firings: int
    candidate_firings: int
    baseline_points: int
    candidate_points: int
    points_moved: int


@dataclass(frozen=True)
class Breakdown:
    subjects: int
    subjects_changed: int
    migrations: tuple[Migration, ...]
    score_changes: tuple[Bucket, ...]
    rules: tuple[RuleImpact, ...]


@dataclass(frozen=True)
class Cohort:
    dimension: str
    value: str
    breakdown: Breakdown


@dataclass(frozen=True)
class BacktestReport:
    baseline: str  # "name v3"
    candidate: str
    candidate_id: int
    policy_version: str
    events_replayed: int
    overall: Breakdown
    cohorts: tuple[Cohort, ...]
    elapsed_seconds: float
    baseline_failed_events: int
    candidate_failed_events: int
    as_of: datetime | None
    subjects: tuple[BacktestSubject, ...] = ()


@dataclass(frozen=True)
class PolicyActivation:
    version: str
    activated_at: datetime | None
    activated_by: str
    policy_yaml: str


@dataclass(frozen=True)
class ListMove:
    kind: str
    list_name: str
    entering: int
    leaving: int


@dataclass(frozen=True)
class PolicyReport:
    current_version: str
    proposed_version: str
    as_of: datetime | None
    subjects: int
    score_changed: int
    tier_changed: int
    migrations: tuple[Migration, ...]
    list_moves: tuple[ListMove, ...]


# BacktestState, as the pages name it.
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class BacktestJob:
    """A background backtest (StartBacktest): where it is and, once it succeeded and was read
    with GetBacktest, its report."""

    backtest_id: str
    rule_set_id: int
    state: str  # one of JOB_STATES
    progress: float  # 0 to 1
    events_replayed: int
    events_total: int
    started_at: datetime | None
    finished_at: datetime | None
    started_by: str
    purpose: str  # the purpose the start stated; "" for none (no subjects listed)
    report: BacktestReport | None
    error: str
    cancelled_by: str = ""  # who cancelled it (CancelBacktest); "" unless cancelled


@dataclass(frozen=True)
class BacktestSubject:
    subject_key: str  # pseudonymous, never a raw id
    kind: str
    baseline_score: int
    baseline_tier: str
    candidate_score: int
    candidate_tier: str
