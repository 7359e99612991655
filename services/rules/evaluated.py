"""What evaluating a batch brings about (Evaluated) and how it fails.

Pure data shared by the engine that produces it (services/rules/engine.py), the domain
and stores that commit it, and the backtests that replay it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from domain.ruleset.model import Firing
from services.rules.windows import PriorOutcome


class RuleEngineError(RuntimeError):
    """durable-rules failed while evaluating a batch; no firing of the batch is returned."""


@dataclass(frozen=True)
class EvaluationFailure:
    event_key: str
    rule_id: str | None
    message: str


class RuleEvaluationError(RuleEngineError):
    """Some events could not be evaluated (bad attribute values, points or reasons that fail).

    The engine holds no state from the batch; the caller can set ``event_keys`` aside
    and evaluate the rest again.
    """

    def __init__(self, failures: Sequence[EvaluationFailure]) -> None:
        self.failures = tuple(failures)
        lines = [
            f"{f.event_key}" + (f" [{f.rule_id}]" if f.rule_id else "") + f": {f.message}" for f in failures
        ]
        super().__init__(f"{len(self.failures)} evaluation failure(s):\n  " + "\n  ".join(lines))

    @property
    def event_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.event_key for f in self.failures))


@dataclass(frozen=True)
class Supersession:
    """A prior outcome that is no longer canonical, and the new event whose arrival made
    it so (the subject's earliest new event; empty when a retraction did)."""

    outcome: PriorOutcome
    by: str


@dataclass(frozen=True)
class Evaluated:
    """What an evaluation brings about: outcomes to emit and prior outcomes to reverse."""

    firings: list[Firing] = field(default_factory=list)
    superseded: list[Supersession] = field(default_factory=list)


def prior_outcome(firing: Firing) -> PriorOutcome:
    """A firing as the prior outcome a later evaluation settles against."""
    return PriorOutcome(
        outcome_id=firing.outcome_id,
        rule_id=firing.rule_id,
        subject_key=firing.subject_key,
        event_keys=firing.event_keys,
        first_at=firing.first_at,
        last_at=firing.occurred_at,
        points=firing.points,
    )
