"""The score policy (pure domain): base, bounds, tiers and visibility, per subject kind.

A city configures the policy in a YAML file; it is versioned because every stored
score records the version it was computed under, so a recompute under a new version
is told apart from a corrupted score. Loading checks the whole file and reports every
problem with its path, so an operator fixes the file in one go.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

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
class SubjectPolicy:
    """How subjects of one kind are scored. `tiers` run highest first."""

    version: str
    base: int
    min_score: int
    max_score: int
    tiers: tuple[Tier, ...]
    visibility_days: Mapping[str, int]

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


@dataclass(frozen=True)
class ScorePolicy:
    version: str
    kinds: Mapping[str, SubjectPolicy]

    def for_kind(self, kind: str) -> SubjectPolicy:
        return self.kinds[kind]


def load_policy(path: Path) -> ScorePolicy:
    """Load and check a policy file; raises PolicyError listing every problem."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError([f"{path}: {exc}"]) from exc
    return parse_policy(document)


def parse_policy(document: Any) -> ScorePolicy:
    if not isinstance(document, dict):
        raise PolicyError(["the policy must be a mapping"])
    problems: list[str] = []
    _unknown_keys("", document, {"version", "policies"}, problems)
    version = document.get("version")
    # YAML reads `version: 3` as a number; a version is a label, so both are accepted.
    if isinstance(version, bool) or not isinstance(version, str | int) or str(version).strip() == "":
        problems.append("version: must be a non-empty string")
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
    if problems:
        raise PolicyError(problems)
    return ScorePolicy(version=version, kinds=kinds)


def _parse_subject_policy(path: str, raw: Any, version: str, problems: list[str]) -> SubjectPolicy | None:
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a mapping")
        return None
    _unknown_keys(path, raw, {"base", "bounds", "tiers", "visibility_days"}, problems)
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
    if len(problems) > before or base is None or low is None or high is None:
        return None
    return SubjectPolicy(
        version=version, base=base, min_score=low, max_score=high, tiers=tiers, visibility_days=visibility
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
        value = _whole(f"{path}.{severity}", raw.get(severity), problems)
        if value is not None and value < 1:
            problems.append(f"{path}.{severity}: must be at least 1 day")
        elif value is not None:
            days[severity] = value
    return days


def _whole(path: str, value: Any, problems: list[str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{path}: must be a whole number")
        return None
    return value


def _unknown_keys(path: str, raw: dict[Any, Any], known: set[str], problems: list[str]) -> None:
    unknown = sorted(str(k) for k in set(raw) - known)
    if unknown:
        problems.append(f"{path or 'policy'}: unknown keys {', '.join(unknown)}")
