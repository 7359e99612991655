"""The score policy (pure domain): base, bounds, tiers, visibility, caps, lists and consent,
per subject kind.

A city configures the policy in a YAML file; it is versioned because every stored
score records the version it was computed under, so a recompute under a new version
is told apart from a corrupted score. Loading checks the whole file and reports every
problem with its path, so an operator fixes the file in one go.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from kit.safeyaml import YamlError, load_yaml
from kit.vocabulary import SEVERITIES, SUBJECT_KINDS


class PolicyError(Exception):
    """The policy file is invalid; `problems` lists every problem with its path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid score policy:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Tier:
    name: str
    min: int


@dataclass(frozen=True)
class Caps:
    """Positive points one category may add within any rolling window of event time.

    `None` means uncapped; `by_category` overrides the default for named categories.
    """

    window_days: int = 365
    positive_per_category: int | None = None
    by_category: Mapping[str, int] = field(default_factory=dict)

    @property
    def window(self) -> timedelta:
        return timedelta(days=self.window_days)

    def limit(self, category: str) -> int | None:
        return self.by_category.get(category, self.positive_per_category)


@dataclass(frozen=True)
class ListCriteria:
    """Red list: a tier in `red_tiers` and, when `red_requires_no_negative`, no counting
    negative entry. Black list: a tier in `black_tiers`, or, when `black_on_flag`, any
    counting entry whose rule carries the black-list flag."""

    red_tiers: frozenset[str] = frozenset()
    red_requires_no_negative: bool = True
    black_tiers: frozenset[str] = frozenset()
    black_on_flag: bool = True


@dataclass(frozen=True)
class SubjectPolicy:
    """How subjects of one kind are scored. `tiers` run highest first."""

    version: str
    base: int
    min_score: int
    max_score: int
    tiers: tuple[Tier, ...]
    visibility_days: Mapping[str, int]
    caps: Caps = field(default_factory=Caps)
    lists: ListCriteria = field(default_factory=ListCriteria)
    consent_required: bool = False

    def clamp(self, score: int) -> int:
        return max(self.min_score, min(self.max_score, score))

    def tier_of(self, score: int) -> str:
        for tier in self.tiers:
            if score >= tier.min:
                return tier.name
        # Unreachable for a loaded policy: parsing requires the lowest tier to cover min_score.
        return self.tiers[-1].name

    def visibility(self, severity: str) -> timedelta:
        return timedelta(days=self.visibility_days[severity])

    def rank(self, tier: str) -> int | None:
        """0 for the highest tier, larger is lower; None for a tier this policy lacks."""
        for i, t in enumerate(self.tiers):
            if t.name == tier:
                return i
        return None


@dataclass(frozen=True)
class DueProcessPolicy:
    """Deadlines of disputes and credit repair (DOMAIN.md defaults).

    `dispute_deadline_days`: a reviewer decides a dispute within this many days of its
    filing; undecided past it, the entry stops counting until decided.
    `repair_min_period_days`: per severity, the days after occurred_at before a repair may
    be applied for (a severity absent here, e.g. positive, is never repaired).
    `repair_decision_working_days`: a repair decision is due this many working days
    (Monday to Friday, UTC, no holiday calendar) after the application.
    """

    dispute_deadline_days: int = 20
    repair_min_period_days: Mapping[str, int] = field(
        default_factory=lambda: {"minor": 0, "general": 90, "serious": 365}
    )
    repair_decision_working_days: int = 3

    @property
    def dispute_deadline(self) -> timedelta:
        return timedelta(days=self.dispute_deadline_days)

    def repair_min_period(self, severity: str) -> timedelta | None:
        days = self.repair_min_period_days.get(severity)
        return None if days is None else timedelta(days=days)


REPAIRABLE_SEVERITIES = ("minor", "general", "serious")


@dataclass(frozen=True)
class ScorePolicy:
    version: str
    kinds: Mapping[str, SubjectPolicy]
    due_process: DueProcessPolicy = field(default_factory=DueProcessPolicy)

    def for_kind(self, kind: str) -> SubjectPolicy:
        return self.kinds[kind]


def load_policy(path: Path) -> ScorePolicy:
    """Load and check a policy file; raises PolicyError listing every problem."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError([f"{path}: {exc}"]) from exc
    return policy_from_text(text, source=str(path))


# Scores and points are int32 on the wire; day counts feed date arithmetic, so a hundred
# years bounds them; versions are stored in 64-character columns.
_MAX_INT32 = 2**31 - 1
_MAX_DAYS = 36_600
_MAX_VERSION_LENGTH = 64


def policy_from_text(text: str, *, source: str = "policy") -> ScorePolicy:
    """Parse and check a policy document given as YAML text (a file or an RPC's payload)."""
    try:
        document, _ = load_yaml(text)
    except YamlError as exc:
        raise PolicyError([f"{source}: {exc}"]) from None
    return parse_policy(document)


def parse_policy(document: Any) -> ScorePolicy:
    if not isinstance(document, dict):
        raise PolicyError(["the policy must be a mapping"])
    problems: list[str] = []
    _unknown_keys("", document, {"version", "policies", "disputes", "repair"}, problems)
    version = document.get("version")
    # YAML reads `version: 3` as a number; a version is a label, so both are accepted.
    if isinstance(version, bool) or not isinstance(version, str | int) or str(version).strip() == "":
        problems.append("version: must be a non-empty string")
        version = ""
    elif isinstance(version, int) and not 0 <= version <= _MAX_INT32:
        problems.append(
            f"version: a number must lie between 0 and {_MAX_INT32} (quote it to use it as a label)"
        )
        version = ""
    elif len(str(version).strip()) > _MAX_VERSION_LENGTH:
        problems.append(f"version: must be at most {_MAX_VERSION_LENGTH} characters")
        version = ""
    version = str(version).strip()
    raw_kinds = document.get("policies")
    kinds: dict[str, SubjectPolicy] = {}
    if not isinstance(raw_kinds, dict):
        problems.append(f"policies: must be a mapping with an entry for each of {', '.join(SUBJECT_KINDS)}")
        raw_kinds = {}
    for kind in raw_kinds:
        if kind not in SUBJECT_KINDS:
            problems.append(
                f"policies.{kind}: unknown subject kind (expected one of {', '.join(SUBJECT_KINDS)})"
            )
    for kind in SUBJECT_KINDS:
        if kind not in raw_kinds:
            problems.append(f"policies.{kind}: is required")
            continue
        parsed = _parse_subject_policy(f"policies.{kind}", raw_kinds[kind], version, problems)
        if parsed is not None:
            kinds[kind] = parsed
    due_process = _parse_due_process(document, problems)
    if problems:
        raise PolicyError(problems)
    return ScorePolicy(version=version, kinds=kinds, due_process=due_process)


def _parse_due_process(document: dict[Any, Any], problems: list[str]) -> DueProcessPolicy:
    """`disputes` and `repair` are optional (policies activated before they existed have
    neither); when present they are checked like the rest."""
    default = DueProcessPolicy()
    deadline = default.dispute_deadline_days
    disputes = document.get("disputes")
    if disputes is not None:
        if not isinstance(disputes, dict):
            problems.append("disputes: must be a mapping with deadline_days")
        else:
            _unknown_keys("disputes", disputes, {"deadline_days"}, problems)
            value = _whole("disputes.deadline_days", disputes.get("deadline_days"), problems, _MAX_DAYS)
            if value is not None and value < 1:
                problems.append("disputes.deadline_days: must be at least 1 day")
            elif value is not None:
                deadline = value
    periods = dict(default.repair_min_period_days)
    working = default.repair_decision_working_days
    repair = document.get("repair")
    if repair is not None:
        if not isinstance(repair, dict):
            problems.append("repair: must be a mapping with min_period_days and decision_working_days")
        else:
            _unknown_keys("repair", repair, {"min_period_days", "decision_working_days"}, problems)
            raw_periods = repair.get("min_period_days")
            if not isinstance(raw_periods, dict):
                problems.append(
                    f"repair.min_period_days: must be a mapping with days for each of "
                    f"{', '.join(REPAIRABLE_SEVERITIES)}"
                )
            else:
                _unknown_keys("repair.min_period_days", raw_periods, set(REPAIRABLE_SEVERITIES), problems)
                for severity in REPAIRABLE_SEVERITIES:
                    days = _whole(
                        f"repair.min_period_days.{severity}", raw_periods.get(severity), problems, _MAX_DAYS
                    )
                    if days is not None and days < 0:
                        problems.append(f"repair.min_period_days.{severity}: must not be negative")
                    elif days is not None:
                        periods[severity] = days
            value = _whole(
                "repair.decision_working_days", repair.get("decision_working_days"), problems, _MAX_DAYS
            )
            if value is not None and value < 1:
                problems.append("repair.decision_working_days: must be at least 1 working day")
            elif value is not None:
                working = value
    return DueProcessPolicy(
        dispute_deadline_days=deadline,
        repair_min_period_days=periods,
        repair_decision_working_days=working,
    )


def _parse_subject_policy(path: str, raw: Any, version: str, problems: list[str]) -> SubjectPolicy | None:
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a mapping")
        return None
    _unknown_keys(
        path,
        raw,
        {"base", "bounds", "tiers", "visibility_days", "caps", "lists", "consent_required"},
        problems,
    )
    before = len(problems)
    base = _whole(f"{path}.base", raw.get("base"), problems)
    bounds = raw.get("bounds")
    low = high = None
    if isinstance(bounds, dict):
        _unknown_keys(f"{path}.bounds", bounds, {"min", "max"}, problems)
        low = _whole(f"{path}.bounds.min", bounds.get("min"), problems)
        high = _whole(f"{path}.bounds.max", bounds.get("max"), problems)
        if low is not None and high is not None and low >= high:
            problems.append(f"{path}.bounds: min must be below max")
        elif base is not None and low is not None and high is not None and not low <= base <= high:
            problems.append(f"{path}.base: must lie within bounds {low}..{high}")
    else:
        problems.append(f"{path}.bounds: must be a mapping with min and max")
    tiers = _parse_tiers(f"{path}.tiers", raw.get("tiers"), low, problems)
    visibility = _parse_visibility(f"{path}.visibility_days", raw.get("visibility_days"), problems)
    caps = _parse_caps(f"{path}.caps", raw.get("caps"), problems)
    lists = _parse_lists(f"{path}.lists", raw.get("lists"), {t.name for t in tiers}, problems)
    consent = raw.get("consent_required")
    if not isinstance(consent, bool):
        problems.append(f"{path}.consent_required: must be true or false")
    if len(problems) > before or base is None or low is None or high is None:
        return None
    return SubjectPolicy(
        version=version,
        base=base,
        min_score=low,
        max_score=high,
        tiers=tiers,
        visibility_days=visibility,
        caps=caps,
        lists=lists,
        consent_required=bool(consent),
    )


def _parse_caps(path: str, raw: Any, problems: list[str]) -> Caps:
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a mapping with window_days and positive_per_category")
        return Caps()
    _unknown_keys(path, raw, {"window_days", "positive_per_category", "by_category"}, problems)
    window = _whole(f"{path}.window_days", raw.get("window_days"), problems, _MAX_DAYS)
    if window is not None and window < 1:
        problems.append(f"{path}.window_days: must be at least 1 day")
    # null is allowed on purpose: a city may choose to leave positive points uncapped.
    default = raw.get("positive_per_category")
    if default is not None:
        default = _whole(f"{path}.positive_per_category", default, problems)
        if default is not None and default < 0:
            problems.append(f"{path}.positive_per_category: must not be negative")
    by_category: dict[str, int] = {}
    raw_by = raw.get("by_category", {})
    if not isinstance(raw_by, dict):
        problems.append(f"{path}.by_category: must be a mapping of category to points")
        raw_by = {}
    for category, value in raw_by.items():
        limit = _whole(f"{path}.by_category.{category}", value, problems)
        if limit is not None and limit < 0:
            problems.append(f"{path}.by_category.{category}: must not be negative")
        elif limit is not None:
            by_category[str(category)] = limit
    return Caps(window_days=window or 365, positive_per_category=default, by_category=by_category)


def _parse_lists(path: str, raw: Any, tier_names: set[str], problems: list[str]) -> ListCriteria:
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a mapping with red and black")
        return ListCriteria()
    _unknown_keys(path, raw, {"red", "black"}, problems)
    found: dict[str, tuple[frozenset[str], bool]] = {}
    for name, flag in (("red", "no_active_negative"), ("black", "flagged_entries")):
        item = raw.get(name)
        item_path = f"{path}.{name}"
        if not isinstance(item, dict):
            problems.append(f"{item_path}: must be a mapping with tiers and {flag}")
            found[name] = (frozenset(), False)
            continue
        _unknown_keys(item_path, item, {"tiers", flag}, problems)
        tiers = item.get("tiers")
        if not isinstance(tiers, list) or not all(isinstance(t, str) for t in tiers):
            problems.append(f"{item_path}.tiers: must be a list of tier names")
            tiers = []
        for i, tier in enumerate(tiers):
            if tier_names and tier not in tier_names:
                problems.append(f"{item_path}.tiers[{i}]: unknown tier {tier!r}")
        value = item.get(flag)
        if not isinstance(value, bool):
            problems.append(f"{item_path}.{flag}: must be true or false")
        found[name] = (frozenset(tiers), bool(value))
    return ListCriteria(
        red_tiers=found["red"][0],
        red_requires_no_negative=found["red"][1],
        black_tiers=found["black"][0],
        black_on_flag=found["black"][1],
    )


def _parse_tiers(path: str, raw: Any, low: int | None, problems: list[str]) -> tuple[Tier, ...]:
    if not isinstance(raw, list) or not raw:
        problems.append(f"{path}: must be a non-empty list, highest tier first")
        return ()
    tiers: list[Tier] = []
    for i, item in enumerate(raw):
        item_path = f"{path}[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{item_path}: must be a mapping with name and min")
            continue
        _unknown_keys(item_path, item, {"name", "min"}, problems)
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{item_path}.name: must be a non-empty string")
            name = ""
        minimum = _whole(f"{item_path}.min", item.get("min"), problems)
        if name and any(t.name == name for t in tiers):
            problems.append(f"{item_path}.name: duplicate tier {name!r}")
        if minimum is not None and tiers and minimum >= tiers[-1].min:
            problems.append(f"{item_path}.min: must be below the previous tier's min {tiers[-1].min}")
        if minimum is not None:
            tiers.append(Tier(name=name, min=minimum))
    # Every score within bounds must land in some tier.
    if tiers and low is not None and tiers[-1].min > low:
        problems.append(f"{path}: the lowest tier's min {tiers[-1].min} must not exceed bounds.min {low}")
    return tuple(tiers)


def _parse_visibility(path: str, raw: Any, problems: list[str]) -> dict[str, int]:
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a mapping with days for each of {', '.join(SEVERITIES)}")
        return {}
    _unknown_keys(path, raw, set(SEVERITIES), problems)
    days: dict[str, int] = {}
    for severity in SEVERITIES:
        value = _whole(f"{path}.{severity}", raw.get(severity), problems, _MAX_DAYS)
        if value is not None and value < 1:
            problems.append(f"{path}.{severity}: must be at least 1 day")
        elif value is not None:
            days[severity] = value
    return days


def _whole(path: str, value: Any, problems: list[str], high: int = _MAX_INT32) -> int | None:
    """A whole number no larger than `high` (and above -2**31): every number of a policy ends
    up in an int32 field (scores, points) or in date arithmetic (days)."""
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{path}: must be a whole number")
        return None
    if not -_MAX_INT32 - 1 <= value <= high:
        problems.append(f"{path}: must lie between {-_MAX_INT32 - 1} and {high}")
        return None
    return value


def _unknown_keys(path: str, raw: dict[Any, Any], known: set[str], problems: list[str]) -> None:
    unknown = sorted(str(k) for k in set(raw) - known)
    if unknown:
        problems.append(f"{path or 'policy'}: unknown keys {', '.join(unknown)}")


@dataclass(frozen=True)
class ActivatedPolicy:
    """A policy as activated: when, by whom, and its document (kept for audit and replay)."""

    policy: ScorePolicy
    activated_at: datetime
    activated_by: str
    document: str


@dataclass(frozen=True)
class PolicyBook:
    """Every policy ever activated, oldest first, so a past instant is scored under the
    policy that was in force then (OpenFisca-style dated parameters)."""

    activations: tuple[ActivatedPolicy, ...]

    def __post_init__(self) -> None:
        if not self.activations:
            raise ValueError("a policy book needs at least one policy")

    @property
    def active(self) -> ScorePolicy:
        return self.activations[-1].policy

    def at(self, when: datetime) -> ScorePolicy:
        """The policy in force at `when`; before the first activation, the first policy
        (scores before Egret held any policy are computed under the earliest one)."""
        chosen = self.activations[0].policy
        for activation in self.activations:
            if activation.activated_at <= when:
                chosen = activation.policy
            else:
                break
        return chosen

    def versions(self) -> set[str]:
        return {a.policy.version for a in self.activations}
