"""The benefit catalogue and eligibility (pure domain).

A benefit names its purpose, its provider, the subject kinds it is for, the categories
it may consider and a condition in a small declarative language:

    all: [<condition>, ...]             every one holds
    any: [<condition>, ...]             at least one holds
    not: <condition>                    it does not hold
    tier_at_least: <tier>               the purpose-bound tier is this tier or higher
    on_list: red | black                the purpose-bound score puts the subject on the list
    not_on_list: red | black            ... does not
    no_active_negative: <category>      no counting negative entry in the category
    category_points_at_least: {category: <category>, points: <n>}

Purpose binding: a benefit sees only the ledger of the categories it declares. Its
tier and lists are computed from a purpose-bound score, base + the declared categories'
points (after caps), so a tier or list condition cannot smuggle in a category the
benefit may not weigh; `considers: all` uses the whole score. A condition naming a
category outside `considers` is rejected when the catalogue loads, with every problem
and its path at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domain.documents import Problems, child, is_text, item
from domain.policy import ScorePolicy, SubjectPolicy
from domain.scoring import BLACK, RED, ScoreResult
from kit.safeyaml import YamlError, load_yaml
from kit.vocabulary import SUBJECT_KINDS

LISTS = (RED, BLACK)
_LEAVES = {"tier_at_least", "on_list", "not_on_list", "no_active_negative", "category_points_at_least"}
_COMBINATORS = {"all", "any", "not"}
_BENEFIT_FIELDS = ("id", "purpose", "provider", "provider_id", "subject_kinds", "considers", "condition")


class BenefitCatalogueError(Exception):
    """The benefit catalogue is invalid; `problems` lists every problem with its path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid benefit catalogue:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Condition:
    """One node of a condition tree: a combinator with children or a leaf with an argument."""

    op: str
    children: tuple[Condition, ...] = ()
    argument: str = ""
    points: int = 0

    def describe(self) -> str:
        if self.op in ("all", "any"):
            joined = f" {'and' if self.op == 'all' else 'or'} ".join(c.describe() for c in self.children)
            return f"({joined})"
        if self.op == "not":
            return f"not {self.children[0].describe()}"
        if self.op == "category_points_at_least":
            return f"{self.argument} points at least {self.points}"
        return f"{self.op.replace('_', ' ')} {self.argument}"


@dataclass(frozen=True)
class Benefit:
    benefit_id: str
    purpose: str
    provider: str
    # The principal id of the provider's system: only it may check this benefit.
    provider_id: str
    subject_kinds: tuple[str, ...]
    # None: every category (`considers: all`).
    considers: frozenset[str] | None
    condition: Condition


@dataclass(frozen=True)
class BenefitCatalogue:
    benefits: Mapping[str, Benefit]

    def ordered(self) -> list[Benefit]:
        return [self.benefits[k] for k in sorted(self.benefits)]


@dataclass(frozen=True)
class Reason:
    path: str
    condition: str
    met: bool
    explanation: str
    entry_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    reasons: tuple[Reason, ...]
    score: ScoreResult


def load_benefits(path: Path, policy: ScorePolicy) -> BenefitCatalogue:
    try:
        document, _ = load_yaml(path.read_bytes())
    except (OSError, YamlError) as exc:
        raise BenefitCatalogueError([f"{path}: {exc}"]) from exc
    return parse_benefits(document, policy)


def parse_benefits(document: Any, policy: ScorePolicy) -> BenefitCatalogue:
    """Check the whole catalogue against `policy` (tier names) and purpose binding."""
    if not isinstance(document, dict) or not isinstance(document.get("benefits"), list):
        raise BenefitCatalogueError(["benefits: must be a list of benefits"])
    problems = Problems()
    problems.unknown_keys(document, {"benefits"}, "catalogue")
    benefits: dict[str, Benefit] = {}
    for i, raw in enumerate(document["benefits"]):
        benefit = _parse_benefit(item("benefits", i), raw, policy, problems)
        if benefit is None:
            continue
        if benefit.benefit_id in benefits:
            problems.add(child(item("benefits", i), "id"), f"duplicate benefit {benefit.benefit_id!r}")
        benefits[benefit.benefit_id] = benefit
    if problems:
        raise BenefitCatalogueError(problems.messages)
    return BenefitCatalogue(benefits)


def _parse_benefit(path: str, raw: Any, policy: ScorePolicy, problems: Problems) -> Benefit | None:
    before = len(problems)
    node = problems.mapping(raw, path, _BENEFIT_FIELDS, unknown="together")
    if node is None:
        return None
    benefit_id, purpose, provider, provider_id = (
        (problems.text(node.get(key), child(path, key)) or "").strip()
        for key in ("id", "purpose", "provider", "provider_id")
    )
    kinds = node.get("subject_kinds")
    if not isinstance(kinds, list) or not kinds or not all(k in SUBJECT_KINDS for k in kinds):
        problems.add(child(path, "subject_kinds"), f"must be a non-empty list of {', '.join(SUBJECT_KINDS)}")
        kinds = []
    considers_raw = node.get("considers")
    considers: frozenset[str] | None
    if considers_raw == "all":
        considers = None
    elif isinstance(considers_raw, list) and considers_raw and all(is_text(c) for c in considers_raw):
        considers = frozenset(considers_raw)
    else:
        problems.add(child(path, "considers"), "must be `all` or a non-empty list of categories")
        considers = frozenset()
    tiers = [{t.name for t in policy.for_kind(k).tiers} for k in kinds]
    condition = _parse_condition(child(path, "condition"), node.get("condition"), considers, tiers, problems)
    if len(problems) > before or condition is None:
        return None
    return Benefit(benefit_id, purpose, provider, provider_id, tuple(kinds), considers, condition)


def _parse_condition(
    path: str, raw: Any, considers: frozenset[str] | None, tiers: Sequence[set[str]], problems: Problems
) -> Condition | None:
    if not isinstance(raw, dict) or len(raw) != 1:
        problems.add(
            path, f"must be a mapping with exactly one of {', '.join(sorted(_LEAVES | _COMBINATORS))}"
        )
        return None
    ((op, value),) = raw.items()
    here = child(path, op)
    if op in ("all", "any"):
        if not isinstance(value, list) or not value:
            problems.add(here, "must be a non-empty list of conditions")
            return None
        children = [
            _parse_condition(item(here, i), c, considers, tiers, problems) for i, c in enumerate(value)
        ]
        if any(c is None for c in children):
            return None
        return Condition(op, tuple(c for c in children if c is not None))
    if op == "not":
        negated = _parse_condition(here, value, considers, tiers, problems)
        return None if negated is None else Condition(op, (negated,))
    if op == "tier_at_least":
        if not isinstance(value, str) or not all(value in names for names in tiers):
            problems.add(here, f"{value!r} is not a tier of the policy for every subject kind of the benefit")
            return None
        return Condition(op, argument=value)
    if op in ("on_list", "not_on_list"):
        if value not in LISTS:
            problems.add(here, f"must be one of {', '.join(LISTS)}")
            return None
        return Condition(op, argument=value)
    if op == "no_active_negative":
        category = _category(here, value, considers, problems)
        return None if category is None else Condition(op, argument=category)
    if op == "category_points_at_least":
        if not isinstance(value, dict) or set(value) != {"category", "points"}:
            problems.add(here, "must be a mapping with category and points")
            return None
        category = _category(child(here, "category"), value["category"], considers, problems)
        points = problems.integer(value["points"], child(here, "points"))
        if points is None or category is None:
            return None
        return Condition(op, argument=category, points=points)
    problems.add(path, f"unknown condition {op!r}")
    return None


def _category(path: str, value: Any, considers: frozenset[str] | None, problems: Problems) -> str | None:
    if not is_text(value):
        problems.add(path, "must be a category name")
        return None
    if considers is not None and value not in considers:
        # Purpose binding: a benefit may only read the categories its purpose declares.
        declared = ", ".join(sorted(considers)) or "none"
        problems.add(
            path, f"category {value!r} is not among the categories the benefit considers ({declared})"
        )
        return None
    return value


def check(benefit: Benefit, kind: str, policy: SubjectPolicy, score: ScoreResult) -> Eligibility:
    """Evaluate `benefit` on `score`, the purpose-bound score (only `benefit.considers`)."""
    if kind not in benefit.subject_kinds:
        reason = Reason(
            "subject_kinds",
            f"subject kind in {', '.join(benefit.subject_kinds)}",
            False,
            f"the benefit is not for a {kind}",
        )
        return Eligibility(False, (reason,), score)
    reasons: list[Reason] = []
    eligible = _evaluate(benefit.condition, "condition", policy, score, reasons)
    return Eligibility(eligible, tuple(reasons), score)


def _evaluate(
    node: Condition, path: str, policy: SubjectPolicy, score: ScoreResult, reasons: list[Reason]
) -> bool:
    # Every child is evaluated (no short circuit), so the answer explains every condition.
    if node.op in ("all", "any"):
        results = [
            _evaluate(child, f"{path}.{node.op}[{i}]", policy, score, reasons)
            for i, child in enumerate(node.children)
        ]
        return all(results) if node.op == "all" else any(results)
    if node.op == "not":
        return not _evaluate(node.children[0], f"{path}.not", policy, score, reasons)
    reason = _leaf(node, path, policy, score)
    reasons.append(reason)
    return reason.met


def _leaf(node: Condition, path: str, policy: SubjectPolicy, score: ScoreResult) -> Reason:
    contributing = tuple(c.entry_id for c in score.counted if c.points)
    if node.op == "tier_at_least":
        have, want = policy.rank(score.tier), policy.rank(node.argument)
        met = have is not None and want is not None and have <= want
        word = "is at least" if met else "is below"
        return Reason(
            path,
            node.describe(),
            met,
            f"purpose-bound tier {score.tier} (score {score.score}: base {policy.base}"
            f" {score.score - policy.base:+d} from {len(contributing)} counting entries)"
            f" {word} {node.argument}",
            contributing,
        )
    if node.op in ("on_list", "not_on_list"):
        membership = score.on_list(node.argument)
        on = membership is not None
        met = on if node.op == "on_list" else not on
        why = "; ".join(membership.reasons) if membership else "its criteria are not met"
        return Reason(
            path,
            node.describe(),
            met,
            f"{'on' if on else 'not on'} the {node.argument} list ({why})",
            membership.entry_ids if membership else (),
        )
    if node.op == "no_active_negative":
        negatives = tuple(c.entry_id for c in score.counted if c.category == node.argument and c.negative)
        return Reason(
            path,
            node.describe(),
            not negatives,
            f"{len(negatives)} counting negative entries in {node.argument}",
            negatives,
        )
    # category_points_at_least
    entries = tuple(c.entry_id for c in score.counted if c.category == node.argument)
    points = sum(c.points for c in score.counted if c.category == node.argument)
    return Reason(
        path,
        node.describe(),
        points >= node.points,
        f"{node.argument} has {points:+d} points from {len(entries)} counting entries (needs {node.points})",
        entries,
    )
