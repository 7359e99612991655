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

from domain.documents import Problems, child, item
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
_INT32 = (-_MAX_INT32 - 1, _MAX_INT32)
_MAX_DAYS = 36_600
_DAYS = (-_MAX_INT32 - 1, _MAX_DAYS)
_MAX_VERSION_LENGTH = 64
_NEGATIVE = "must not be negative"
_ONE_WORKING_DAY = "must be at least 1 working day"


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
    problems = Problems()
    problems.unknown_keys(document, {"version", "policies", "disputes", "repair"}, "policy")
    version = _version(document.get("version"), problems)
    raw_kinds = document.get("policies")
    kinds: dict[str, SubjectPolicy] = {}
    if not isinstance(raw_kinds, dict):
        problems.add("policies", f"must be a mapping with an entry for each of {', '.join(SUBJECT_KINDS)}")
        raw_kinds = {}
    for kind in raw_kinds:
        if kind not in SUBJECT_KINDS:
            problems.add(
                child("policies", kind), f"unknown subject kind (expected one of {', '.join(SUBJECT_KINDS)})"
            )
    for kind in SUBJECT_KINDS:
        if kind not in raw_kinds:
            problems.add(child("policies", kind), "is required")
            continue
        parsed = _parse_subject_policy(child("policies", kind), raw_kinds[kind], version, problems)
        if parsed is not None:
            kinds[kind] = parsed
    due_process = _parse_due_process(document, problems)
    if problems:
        raise PolicyError(problems.messages)
    return ScorePolicy(version=version, kinds=kinds, due_process=due_process)


def _version(value: object, problems: Problems) -> str:
    """YAML reads `version: 3` as a number; a version is a label, so both are accepted."""
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value).strip() == "":
        problems.add("version", "must be a non-empty string")
        return ""
    if isinstance(value, int) and not 0 <= value <= _MAX_INT32:
        problems.add(
            "version", f"a number must lie between 0 and {_MAX_INT32} (quote it to use it as a label)"
        )
        return ""
    if len(str(value).strip()) > _MAX_VERSION_LENGTH:
        problems.add("version", f"must be at most {_MAX_VERSION_LENGTH} characters")
        return ""
    return str(value).strip()


def _parse_due_process(document: dict[Any, Any], problems: Problems) -> DueProcessPolicy:
    """`disputes` and `repair` are optional (policies activated before they existed have
    neither); when present they are checked like the rest."""
    default = DueProcessPolicy()
    deadline = default.dispute_deadline_days
    disputes = _optional(document, "disputes", ("deadline_days",), problems)
    if disputes is not None:
        path = "disputes.deadline_days"
        deadline = _at_least(disputes.get("deadline_days"), path, problems) or deadline
    periods = dict(default.repair_min_period_days)
    working = default.repair_decision_working_days
    repair = _optional(document, "repair", ("min_period_days", "decision_working_days"), problems)
    if repair is not None:
        raw_periods = problems.mapping(
            repair.get("min_period_days"),
            "repair.min_period_days",
            REPAIRABLE_SEVERITIES,
            message=f"must be a mapping with days for each of {', '.join(REPAIRABLE_SEVERITIES)}",
            unknown="together",
        )
        if raw_periods is not None:
            for severity in REPAIRABLE_SEVERITIES:
                path = child("repair.min_period_days", severity)
                days = _at_least(raw_periods.get(severity), path, problems, least=0, message=_NEGATIVE)
                periods[severity] = periods[severity] if days is None else days
        working_days = repair.get("decision_working_days")
        working = (
            _at_least(working_days, "repair.decision_working_days", problems, message=_ONE_WORKING_DAY)
            or working
        )
    return DueProcessPolicy(
        dispute_deadline_days=deadline,
        repair_min_period_days=periods,
        repair_decision_working_days=working,
    )


def _optional(
    document: dict[Any, Any], key: str, known: tuple[str, ...], problems: Problems
) -> dict[Any, Any] | None:
    """The section ``key`` if the document has one and it is a mapping."""
    if document.get(key) is None:
        return None
    must = f"must be a mapping with {' and '.join(known)}"
    return problems.mapping(document[key], key, known, message=must, unknown="together")


def _at_least(
    value: object,
    path: str,
    problems: Problems,
    *,
    least: int = 1,
    message: str = "must be at least 1 day",
    bounds: tuple[int, int] = _DAYS,
) -> int | None:
    """A whole number within ``bounds`` (a hundred years of days unless told) and not below
    ``least`` (``message`` if it is); None if it is no such number."""
    number = problems.integer(value, path, bounds)
    if number is not None and number < least:
        problems.add(path, message)
        return None
    return number


def _parse_subject_policy(path: str, raw: Any, version: str, problems: Problems) -> SubjectPolicy | None:
    known = {"base", "bounds", "tiers", "visibility_days", "caps", "lists", "consent_required"}
    node = problems.mapping(raw, path, known, unknown="together")
    if node is None:
        return None
    before = len(problems)
    base = problems.integer(node.get("base"), child(path, "base"), _INT32)
    low = high = None
    bounds = problems.mapping(
        node.get("bounds"),
        child(path, "bounds"),
        {"min", "max"},
        message="must be a mapping with min and max",
        unknown="together",
    )
    if bounds is not None:
        low = problems.integer(bounds.get("min"), child(path, "bounds.min"), _INT32)
        high = problems.integer(bounds.get("max"), child(path, "bounds.max"), _INT32)
        if low is not None and high is not None and low >= high:
            problems.add(child(path, "bounds"), "min must be below max")
        elif base is not None and low is not None and high is not None and not low <= base <= high:
            problems.add(child(path, "base"), f"must lie within bounds {low}..{high}")
    tiers = _parse_tiers(child(path, "tiers"), node.get("tiers"), low, problems)
    visibility = _parse_visibility(child(path, "visibility_days"), node.get("visibility_days"), problems)
    caps = _parse_caps(child(path, "caps"), node.get("caps"), problems)
    lists = _parse_lists(child(path, "lists"), node.get("lists"), {t.name for t in tiers}, problems)
    consent = problems.flag(node.get("consent_required"), child(path, "consent_required"))
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


def _parse_caps(path: str, raw: Any, problems: Problems) -> Caps:
    node = problems.mapping(
        raw,
        path,
        {"window_days", "positive_per_category", "by_category"},
        message="must be a mapping with window_days and positive_per_category",
        unknown="together",
    )
    if node is None:
        return Caps()
    window = _at_least(node.get("window_days"), child(path, "window_days"), problems)
    # null is allowed on purpose: a city may choose to leave positive points uncapped.
    default = node.get("positive_per_category")
    if default is not None:
        default = _at_least(
            default, child(path, "positive_per_category"), problems, least=0, message=_NEGATIVE, bounds=_INT32
        )
    by_category: dict[str, int] = {}
    raw_by = node.get("by_category", {})
    if not isinstance(raw_by, dict):
        problems.add(child(path, "by_category"), "must be a mapping of category to points")
        raw_by = {}
    for category, value in raw_by.items():
        limit = _at_least(
            value, child(path, f"by_category.{category}"), problems, least=0, message=_NEGATIVE, bounds=_INT32
        )
        if limit is not None:
            by_category[str(category)] = limit
    return Caps(window_days=window or 365, positive_per_category=default, by_category=by_category)


def _parse_lists(path: str, raw: Any, tier_names: set[str], problems: Problems) -> ListCriteria:
    node = problems.mapping(
        raw, path, {"red", "black"}, message="must be a mapping with red and black", unknown="together"
    )
    if node is None:
        return ListCriteria()
    found: dict[str, tuple[frozenset[str], bool]] = {}
    for name, flag in (("red", "no_active_negative"), ("black", "flagged_entries")):
        where = child(path, name)
        criteria = problems.mapping(
            node.get(name),
            where,
            {"tiers", flag},
            message=f"must be a mapping with tiers and {flag}",
            unknown="together",
        )
        if criteria is None:
            found[name] = (frozenset(), False)
            continue
        tiers = criteria.get("tiers")
        if not isinstance(tiers, list) or not all(isinstance(t, str) for t in tiers):
            problems.add(child(where, "tiers"), "must be a list of tier names")
            tiers = []
        for i, tier in enumerate(tiers):
            if tier_names and tier not in tier_names:
                problems.add(item(child(where, "tiers"), i), f"unknown tier {tier!r}")
        found[name] = (frozenset(tiers), bool(problems.flag(criteria.get(flag), child(where, flag))))
    return ListCriteria(
        red_tiers=found["red"][0],
        red_requires_no_negative=found["red"][1],
        black_tiers=found["black"][0],
        black_on_flag=found["black"][1],
    )


def _parse_tiers(path: str, raw: Any, low: int | None, problems: Problems) -> tuple[Tier, ...]:
    if not isinstance(raw, list) or not raw:
        problems.add(path, "must be a non-empty list, highest tier first")
        return ()
    tiers: list[Tier] = []
    for i, entry in enumerate(raw):
        where = item(path, i)
        node = problems.mapping(
            entry, where, {"name", "min"}, message="must be a mapping with name and min", unknown="together"
        )
        if node is None:
            continue
        name = problems.text(node.get("name"), child(where, "name")) or ""
        minimum = problems.integer(node.get("min"), child(where, "min"), _INT32)
        if name and any(t.name == name for t in tiers):
            problems.add(child(where, "name"), f"duplicate tier {name!r}")
        if minimum is not None and tiers and minimum >= tiers[-1].min:
            problems.add(child(where, "min"), f"must be below the previous tier's min {tiers[-1].min}")
        if minimum is not None:
            tiers.append(Tier(name=name, min=minimum))
    # Every score within bounds must land in some tier.
    if tiers and low is not None and tiers[-1].min > low:
        problems.add(path, f"the lowest tier's min {tiers[-1].min} must not exceed bounds.min {low}")
    return tuple(tiers)


def _parse_visibility(path: str, raw: Any, problems: Problems) -> dict[str, int]:
    node = problems.mapping(
        raw,
        path,
        SEVERITIES,
        message=f"must be a mapping with days for each of {', '.join(SEVERITIES)}",
        unknown="together",
    )
    if node is None:
        return {}
    days: dict[str, int] = {}
    for severity in SEVERITIES:
        value = _at_least(node.get(severity), child(path, severity), problems)
        if value is not None:
            days[severity] = value
    return days


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
