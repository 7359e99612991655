"""The firings a rule's matches make on one subject.

durable-rules says which events (or pairs of events) match a rule; this module says
what fires: a per-event rule fires on each new event, while window, sequence and
capped rules are settled in event time against the subject's prior outcomes
(services/rules/windows.py chooses the events), so that what fires does not depend on
arrival order. Pure: the engine (services/rules/engine.py) calls it after matching.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Final, TypeAlias

from domain.ruleset.model import (
    AttributeScalar,
    Cap,
    EngineEvent,
    EvaluationProblem,
    Firing,
    Rule,
    RuleSet,
    outcome_id,
)
from services.rules.windows import PriorOutcome, cap_region, pair_region, window_region

# Cap periods are laid from here when a rule has no effective_from.
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

# (events in event-time order, capped points or None to compute them, outcome id variant)
Candidate: TypeAlias = tuple[tuple[EngineEvent, ...], int | None, str]


def rule_candidates(
    rule: Rule,
    matches: set[tuple[str, ...]],
    events: Mapping[str, EngineEvent],
    *,
    since: datetime,
    positions: Mapping[str, int],
    prior: Sequence[PriorOutcome],
    settled: bool,
) -> tuple[list[Candidate], list[PriorOutcome]]:
    """The rule's firings among one subject's matches (event keys into ``events``, new
    ones those in ``positions``), and its prior outcomes they supersede; ``since`` is
    where the subject's region of event time starts."""
    if not settled:
        # A per-event rule fires on new events only: the old ones fired when they were new.
        return [((events[key],), None, "") for (key,) in matches if key in positions], []
    if rule.window is not None:
        window = rule.window
        group_by = window.group_by

        def group_of(event: EngineEvent) -> tuple[bool, object]:
            if group_by is None:
                return True, None
            # Events without the attribute belong to no group, so they count in none.
            return group_by in event.attributes, event.attributes.get(group_by)

        region = window_region(
            (events[key] for (key,) in matches),
            prior,
            since=since,
            count=window.count,
            within=window.within,
            group_of=group_of,
        )
        return [(chosen, None, "") for chosen in region.fire], region.superseded
    if rule.sequence is not None:
        sequence = rule.sequence
        pairs = [
            (events[first], events[second])
            for first, second in matches
            if sequence.correlate_by is None
            or _correlated(events[first], events[second], sequence.correlate_by)
        ]
        paired = pair_region(pairs, prior, since, sequence.within)
        return [(chosen, None, "") for chosen in paired.fire], paired.superseded
    assert rule.cap is not None
    return _capped(
        rule,
        rule.cap,
        [events[key] for (key,) in matches],
        positions=positions,
        prior=prior,
        since=since,
    )


def _correlated(first: EngineEvent, second: EngineEvent, attribute: str) -> bool:
    # durable-rules already joined on equality; an event without the attribute
    # correlates with nothing, whatever durable-rules makes of two absent values.
    return attribute in first.attributes and first.attributes[attribute] == second.attributes.get(attribute)


def _capped(
    rule: Rule,
    cap: Cap,
    matched: list[EngineEvent],
    *,
    positions: Mapping[str, int],
    prior: Sequence[PriorOutcome],
    since: datetime,
) -> tuple[list[Candidate], list[PriorOutcome]]:
    """Per-event firings, each limited by what its cap period has left in event-time order.
    A firing cut by the cap has its own outcome id (its share is part of it), so that a
    late event that changes the share reverses the old firing and emits a new one."""
    failing: list[Candidate] = []
    valued: list[tuple[EngineEvent, int]] = []
    full: dict[str, int] = {}
    for event in matched:
        try:
            points = rule.points_for(event.attributes)
        except EvaluationProblem:
            if event.key in positions:
                failing.append(((event,), None, ""))  # firing_of() computes the points again and reports it
            # Otherwise it could not fire when it was evaluated, so it gave nothing.
            continue
        if points != 0:
            valued.append((event, points))
            full[event.key] = points
    region = cap_region(
        valued, prior, since=since, anchor=rule.effective_from or _EPOCH, per=cap.per, cap=cap.points
    )
    chosen = failing + [
        ((event,), points, "" if points == full[event.key] else f"cap:{points}")
        for event, points in region.fire
    ]
    return chosen, region.superseded


def firing_of(
    rule_set: RuleSet, rule: Rule, events: tuple[EngineEvent, ...], points: int | None, variant: str = ""
) -> Firing | None:
    """The firing of a rule on events in event-time order, ``points`` already capped if given."""
    last = events[-1]
    variables: Mapping[str, AttributeScalar] = last.attributes
    if rule.window is not None or rule.sequence is not None:
        # The latest event completed the pattern: its attributes are quoted, with the
        # pattern's own figures (which shadow attributes of the same name).
        variables = {
            **last.attributes,
            "count": len(events),
            "first_at": events[0].occurred_at,
            "last_at": last.occurred_at,
        }
    if points is None:
        points = rule.points_for(variables)
    if points == 0:
        return None
    event_keys = tuple(e.key for e in events)
    return Firing(
        rule_id=rule.id,
        rule_set=rule_set.name,
        rule_set_version=rule_set.version,
        title=rule.title,
        description=rule.description.render(variables),
        legal_basis=rule.legal_basis,
        event_keys=event_keys,
        subject_key=last.subject_key,
        subject_kind=last.subject_kind,
        points=points,
        category=rule.category,
        severity=rule.severity,
        reason=rule.reason.render(variables),
        black_list=rule.black_list,
        occurred_at=last.occurred_at,
        outcome_id=outcome_id(rule_set.name, rule_set.version, rule.id, event_keys, variant),
        first_at=events[0].occurred_at,
    )
