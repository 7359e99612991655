"""The rule engine: a RuleSet compiled into durable-rules, and batches of events evaluated by it.

This is the only module that imports durable-rules. Conditions are compiled into
durable-rules' JSON condition language and matched by its Rete network, a sequence as
a join of two patterns (correlation attribute and event-time order); points, reasons
and outcome ids are computed here in Python, outside durable-rules' actions. Which
matched events form a window or a sequence, in event time and with late data, is
decided by services/rules/windows.py (durable-rules' own count operators work on
arrival order within a session, which cannot outlive a batch); docs/rules.md states
the semantics.

durable-rules 2.0.28 has quirks this module works around deliberately (each was
reproduced against the installed package; tests/unit/rules/test_engine.py keeps the
ones that can be reproduced safely):

- An event ("post") is consumed by the first rule that fires on it, so an event that
  two rules match fires only one (jruizgit/rules#24, #400). Each event is asserted as
  a *fact*, which every matching rule sees, and its session is deleted afterwards.
- durable-rules splits an "or" into one rule per branch and fires every branch that
  holds, so one fact can fire one rule several times. Matches are de-duplicated.
- Asserting a batch in which any message matches no rule raises
  MessageNotHandledException from durable.engine *after* asserting the rest, and the
  actions of the matching ones are left pending, to run later on whichever thread
  next touches that session. The batch is asserted through the binding that
  durable.engine wraps, which returns the state handle even then (result code 1), and
  the session's actions are run at once. Unmatched events are normal, not errors.
- durable.engine.Host starts two timer threads that, every 0.2 s, run pending actions
  and timers on a ruleset that is not thread-safe. No host is used here: each
  RuleEngine creates its ruleset on the binding and runs a subject's actions itself,
  right after asserting its facts (start an action, record it, write the session state
  back, complete it and start the next: durable.engine's own loop, without its
  per-action Closure, Content wrappers and clock readings, which cost more than the
  matching). Engines (two rule-set versions during a hot swap, tests) coexist without
  durable.lang's module-level host.
- An exception inside an action is stored in the session state and never reaches the
  caller (jruizgit/rules#58, #305). Actions here only record (event, rule) pairs and
  catch everything; whatever goes wrong surfaces as an exception from evaluate().
  durable-rules offers an action again once its 10-second lease lapses; an action that
  takes that long fails the evaluation instead.
- A ruleset holds at most 1024 live sessions: the next new one fails with MemoryError
  (engine error 101) whatever the machine's memory. A session costs about 100 KB plus
  11 KB per rule and is created even for a message that matches nothing. Each
  subject's session is deleted once its events are evaluated, which keeps memory flat
  and the engine usable past 1024 subjects. Windows and sequences therefore keep no
  state in durable-rules: each evaluation asserts the subject's new events together
  with the history the store passes in (within the rule set's lookback), and which
  events already fired comes from the store too ("consumed").
- Deleting a session in which no action ever started frees uninitialised pointers and
  crashes the process (segmentation fault or abort, depending on the heap). Before
  deleting such a session, a "seal" fact is asserted that a rule of our own fires on.
- A message with about 250 properties or more crashes the process. Only the
  attributes that some condition on the event's type reads are asserted, and a rule
  set needing more than a few dozen per type is refused.
- A regular expression with non-ASCII characters aborts the process; ruleset.py
  admits only the subset of patterns durable-rules handles.
- A rule whose only test is "attribute absent" ($nex) hangs the process, and so does
  building a network in which a node has more than 512 children (513 event types, an
  "in" of 513 values). Every compiled condition starts with an equality on the event
  type, and a rule set with more than 512 condition branches is refused.
- The C code never releases the GIL, and a ruleset must not be used from two threads
  at once: evaluate() takes a lock, and callers run it off the event loop (in a
  worker thread), knowing that it occupies the GIL while it runs.

Measured on 2 shared cores (Python 3.11, the sample rule set, synthetic events over
20,000 subjects, best of three runs): evaluate() ran at 21,000-28,000 events/s in
batches of 500 (run_raw() the same) and at 27,000-37,000 events/s in single calls of
100,000-200,000 events (run_raw() 41,000-47,000). Over four rounds of 200,000 events,
RSS stayed at about 175 MB, most of it the events and firings themselves, and no
session was left in durable-rules after any round.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType, TracebackType
from typing import Any, Final, TypeAlias

from durable import engine as durable_engine

from domain.ruleset.model import (
    AllOf,
    AnyOf,
    AttributeScalar,
    Cap,
    Comparison,
    Condition,
    EngineEvent,
    EvaluationProblem,
    Firing,
    Not,
    Rule,
    RuleSet,
    RuleSetError,
    Step,
    condition_attributes,
    outcome_id,
)
from services.rules.windows import PriorOutcome, cap_region, pair_region, window_region

# The C extension durable.engine wraps, reached through it so that durable.engine
# stays the one entry point into durable-rules.
_binding: Any = durable_engine.durable_rules_engine

# Result codes of the binding's assert calls (durable-rules' rules.h).
_ALL_HANDLED: Final = 0
_SOME_NOT_HANDLED: Final = 1
_ERR_SID_NOT_FOUND: Final = "error code: 309"
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
# durable-rules offers an action again if it is not completed within 10 s (its rules.h).
_ACTION_LEASE_S: Final = 10.0

# Far below the ~250 properties that crash durable-rules; a fact also carries sid,
# id, event_type, subject_kind, occurred_at and attrs.
MAX_ATTRIBUTES_PER_EVENT_TYPE: Final = 64

# durable-rules hangs, holding the GIL, while building a network in which one node
# has more than 512 children. The number of condition branches bounds them all.
MAX_CONDITION_BRANCHES: Final = 512

# Why durable-rules refuses a ruleset, by error code (durable-rules' rules.h).
_REFUSALS: Final = {
    106: "too many rules",
    107: "too many rules",
    108: "too many rules share one condition path",
    113: "a condition is too complex (expression limit)",
    501: "a pattern cannot be parsed",
    508: "a pattern cannot be parsed",
}

# The fact that gets an action started in an otherwise idle session. Rule-set event
# types cannot start with "$" and event keys contain "/", so neither collides.
_SEAL_TYPE: Final = "$egret.seal"
_SEAL_ID: Final = "$seal"
_SEAL_RULE: Final = "$seal"

# Cap periods are laid from here when a rule has no effective_from.
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_NO_HISTORY: Final[Mapping[str, Sequence[EngineEvent]]] = MappingProxyType({})
_NO_PRIOR: Final[Mapping[str, Sequence[PriorOutcome]]] = MappingProxyType({})
_NO_SINCE: Final[Mapping[str, datetime]] = MappingProxyType({})

JsonCondition: TypeAlias = dict[str, Any]
_Action: TypeAlias = Callable[[Any], None]


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


class RuleEngine:
    """A RuleSet compiled into its own durable-rules ruleset.

    evaluate() is serialised by a lock and holds the GIL throughout (durable-rules
    never releases it): call it from a worker thread, not from the event loop.
    close() frees the compiled ruleset once the engine is no longer needed (after a
    hot swap, for instance).
    """

    def __init__(self, rule_set: RuleSet) -> None:
        self._rule_set = rule_set
        self._lock = threading.Lock()
        self._projections = _projections(rule_set)
        self._history_types = rule_set.history_event_types
        self._lookback = rule_set.lookback
        # Window, sequence and capped rules: settled in event time against prior outcomes.
        self._settled = frozenset(
            index
            for index, rule in enumerate(rule_set.rules)
            if rule.window is not None or rule.sequence is not None or rule.cap is not None
        )
        # Written by the actions while one subject's facts are evaluated, read right after:
        # (event keys, rule index), one key per pattern of the rule.
        self._matched: list[tuple[tuple[str, ...], int]] = []
        self._action_errors: list[BaseException] = []
        self._compiled = _CompiledRuleSet(
            rule_set,
            [self._recorder(index) for index in range(len(rule_set.rules))],
            name=f"{rule_set.name}@{rule_set.version}",
        )
        self._closed = False

    @property
    def rule_set(self) -> RuleSet:
        return self._rule_set

    def evaluate(
        self,
        events: Sequence[EngineEvent],
        history: Mapping[str, Sequence[EngineEvent]] = _NO_HISTORY,
        prior: Mapping[str, Sequence[PriorOutcome]] = _NO_PRIOR,
        since: Mapping[str, datetime] = _NO_SINCE,
    ) -> Evaluated:
        """The firings and reversals that ``events`` (the new events) bring about.

        Per-event rules fire on the new events. Window, sequence and capped rules are
        settled in event time (services/rules/windows.py): from each subject's earliest
        new event (or ``since[subject]``, when earlier or when the subject has no new
        event, e.g. after a retraction) on, their canonical firings are formed from every
        event, new and in ``history``, and compared with ``prior`` (per subject, the
        active outcomes earlier evaluations emitted): what is missing fires, what is no
        longer canonical is superseded. ``history`` holds, per subject key, events
        evaluated before; those of window, sequence and capped rules' types from the rule
        set's lookback before that instant on are used. Firings are ordered by their latest
        new event (input order), then by rule (file order). The result is a function of
        the arguments alone, so evaluating the same inputs again (a retry, a restart) gives
        the same result, and the settled outcomes do not depend on arrival order.

        Raises RuleEvaluationError if an event cannot be evaluated, and RuleEngineError
        if durable-rules fails; either way nothing of the batch is returned.
        """
        with self._lock:
            if self._closed:
                raise RuleEngineError("the rule engine is closed")
            positions = _positions(events)
            subjects, failures = self._subjects(events, history, positions, since)
            if failures:
                raise RuleEvaluationError(failures)
            ranked: list[tuple[tuple[int, int], Firing]] = []
            superseded: list[Supersession] = []
            for subject in subjects:
                matched = self._match_subject(subject.key, subject.facts) if subject.facts else []
                found, gone = self._subject_firings(
                    subject, matched, positions, prior.get(subject.key, ()), failures
                )
                ranked.extend(found)
                superseded.extend(gone)
            if failures:
                raise RuleEvaluationError(failures)
            ranked.sort(key=lambda pair: pair[0])
            return Evaluated([firing for _, firing in ranked], superseded)

    def holds_session(self, subject_key: str) -> bool:
        """Whether durable-rules keeps state for the subject (after evaluate(), it never does)."""
        with self._lock:
            return self._compiled.holds_session(subject_key)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._compiled.delete()

    def __enter__(self) -> RuleEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _recorder(self, rule_index: int) -> _Action:
        # durable-rules requires a one-argument function (it inspects co_argcount).
        def record(c: Any) -> None:
            try:
                self._matched.append(((c.m["id"],), rule_index))
            except BaseException as error:  # durable-rules would swallow it into the session state
                self._action_errors.append(error)

        def record_pair(c: Any) -> None:
            try:
                self._matched.append(((c.first["id"], c.second["id"]), rule_index))
            except BaseException as error:
                self._action_errors.append(error)

        return record if self._rule_set.rules[rule_index].sequence is None else record_pair

    def _subjects(
        self,
        events: Sequence[EngineEvent],
        history: Mapping[str, Sequence[EngineEvent]],
        positions: Mapping[str, int],
        since: Mapping[str, datetime],
    ) -> tuple[list[_Subject], list[EvaluationFailure]]:
        subjects: dict[str, _Subject] = {}
        failures: list[EvaluationFailure] = []
        for event in events:
            subject = subjects.get(event.subject_key)
            if subject is None:
                subject = _Subject(event.subject_key, event.occurred_at, event.key)
                subjects[event.subject_key] = subject
            elif event.occurred_at < subject.since:
                subject.since, subject.cause = event.occurred_at, event.key
            projection = self._projections.get(event.event_type)
            if projection is None:
                continue  # no rule listens to this type: durable-rules would match nothing
            try:
                fact = _fact(event, projection)
            except EvaluationProblem as problem:
                failures.append(EvaluationFailure(event.key, None, str(problem)))
                continue
            subject.add(event, fact)
        if not self._history_types:
            return [s for s in subjects.values() if s.facts], failures
        for key, at in since.items():
            subject = subjects.get(key)
            if subject is None:
                subjects[key] = _Subject(key, at, "")
            elif at < subject.since:
                subject.since, subject.cause = at, ""
        for subject in subjects.values():
            # The subject's own instant, not the batch's: what a subject's firings are
            # must not depend on which other subjects share its batch. Everything later
            # is read: a late event can change how the later events group.
            earliest = subject.since - self._lookback
            for old in history.get(subject.key, ()):
                if (
                    old.event_type not in self._history_types
                    or old.key in positions
                    or old.key in subject.events
                    or old.subject_key != subject.key
                    or old.occurred_at < earliest
                ):
                    continue
                try:
                    fact = _fact(old, self._projections[old.event_type])
                except EvaluationProblem:
                    # Evaluated before under other rules; the current ones cannot read it,
                    # so it never matched them and counts for nothing.
                    continue
                subject.add(old, fact)
        return list(subjects.values()), failures

    def _match_subject(
        self, subject_key: str, facts: list[dict[str, Any]]
    ) -> list[tuple[tuple[str, ...], int]]:
        """(event keys, rule index) for every rule that fired on the subject's facts."""
        self._matched = []
        self._action_errors = []
        self._compiled.run_subject(subject_key, facts)
        for failure in self._action_errors:
            if not isinstance(failure, Exception):
                raise failure  # KeyboardInterrupt and the like, which the action caught
            raise RuleEngineError(f"a rule action failed: {failure!r}") from failure
        return self._matched

    def _subject_firings(
        self,
        subject: _Subject,
        matched: list[tuple[tuple[str, ...], int]],
        positions: Mapping[str, int],
        prior: Sequence[PriorOutcome],
        failures: list[EvaluationFailure],
    ) -> tuple[list[tuple[tuple[int, int], Firing]], list[Supersession]]:
        # A set per rule: durable-rules fires a rule once per branch of an "or" that holds.
        # Every settled rule is visited, even without matches: its prior outcomes may go.
        by_rule: dict[int, set[tuple[str, ...]]] = {index: set() for index in self._settled}
        for keys, rule_index in matched:
            by_rule.setdefault(rule_index, set()).add(keys)
        prior_of: dict[str, list[PriorOutcome]] = {}
        for outcome in prior:
            prior_of.setdefault(outcome.rule_id, []).append(outcome)
        ranked: list[tuple[tuple[int, int], Firing]] = []
        superseded: list[Supersession] = []
        for rule_index, matches in by_rule.items():
            rule = self._rule_set.rules[rule_index]
            if not matches and rule.id not in prior_of:
                continue
            patterns, gone = _patterns(
                rule,
                matches,
                subject,
                positions=positions,
                prior=prior_of.get(rule.id, ()),
                settled=rule_index in self._settled,
            )
            superseded.extend(Supersession(o, subject.cause) for o in gone)
            for events, points, variant in patterns:
                newest = max((positions[e.key] for e in events if e.key in positions), default=-1)
                try:
                    firing = _firing(self._rule_set, rule, events, points, variant)
                except EvaluationProblem as problem:
                    failures.append(EvaluationFailure(events[-1].key, rule.id, str(problem)))
                    continue
                if firing is not None:
                    ranked.append(((newest, rule_index), firing))
        return ranked, superseded


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


@dataclass
class _Subject:
    """One subject's events in one evaluation: the new ones and the history they need.
    ``since`` is where its region of event time starts; ``cause`` the new event there."""

    key: str
    since: datetime
    cause: str
    events: dict[str, EngineEvent] = field(default_factory=dict)
    facts: list[dict[str, Any]] = field(default_factory=list)

    def add(self, event: EngineEvent, fact: dict[str, Any]) -> None:
        self.events[event.key] = event
        self.facts.append(fact)


# (events in event-time order, capped points or None to compute them, outcome id variant)
_Pattern: TypeAlias = tuple[tuple[EngineEvent, ...], int | None, str]


def _patterns(
    rule: Rule,
    matches: set[tuple[str, ...]],
    subject: _Subject,
    *,
    positions: Mapping[str, int],
    prior: Sequence[PriorOutcome],
    settled: bool,
) -> tuple[list[_Pattern], list[PriorOutcome]]:
    """The rule's firings among one subject's matches, and its prior outcomes they supersede."""
    events = subject.events
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
            since=subject.since,
            count=window.count,
            within=window.within,
            group_of=group_of,
        )
        return [(chosen, None, "") for chosen in region.fire], region.superseded
    if rule.sequence is not None:
        sequence = rule.sequence
        candidates = [
            (events[first], events[second])
            for first, second in matches
            if sequence.correlate_by is None
            or _correlated(events[first], events[second], sequence.correlate_by)
        ]
        pairs = pair_region(candidates, prior, subject.since, sequence.within)
        return [(chosen, None, "") for chosen in pairs.fire], pairs.superseded
    assert rule.cap is not None
    return _capped(
        rule,
        rule.cap,
        [events[key] for (key,) in matches],
        positions=positions,
        prior=prior,
        since=subject.since,
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
) -> tuple[list[_Pattern], list[PriorOutcome]]:
    """Per-event firings, each limited by what its cap period has left in event-time order.
    A firing cut by the cap has its own outcome id (its share is part of it), so that a
    late event that changes the share reverses the old firing and emits a new one."""
    failing: list[_Pattern] = []
    valued: list[tuple[EngineEvent, int]] = []
    full: dict[str, int] = {}
    for event in matched:
        try:
            points = rule.points_for(event.attributes)
        except EvaluationProblem:
            if event.key in positions:
                failing.append(((event,), None, ""))  # _firing computes the points again and reports it
            # Otherwise it could not fire when it was evaluated, so it gave nothing.
            continue
        if points != 0:
            valued.append((event, points))
            full[event.key] = points
    region = cap_region(
        valued, prior, since=since, anchor=rule.effective_from or _EPOCH, per=cap.per, cap=cap.points
    )
    patterns = failing + [
        ((event,), points, "" if points == full[event.key] else f"cap:{points}")
        for event, points in region.fire
    ]
    return patterns, region.superseded


def run_raw(rule_set: RuleSet, events: Sequence[EngineEvent]) -> int:
    """How many times the rules fire on the events in plain durable-rules, for benchmarks.

    The same compiled conditions, every attribute asserted, counting actions, and only
    what durable-rules needs to run at all (one assert per subject, its actions run,
    its session sealed and deleted): evaluate()'s overhead is the difference. A window
    rule counts each matching event (its counting is evaluate()'s work in Python), a
    sequence rule each joined pair within its duration. Zero-point firings count, and
    a rule counts once per "or" branch that holds.
    """
    fired = [0]

    def count(_c: Any) -> None:
        fired[0] += 1

    compiled = _CompiledRuleSet(rule_set, [count] * len(rule_set.rules), name=f"raw:{rule_set.name}")
    try:
        by_subject: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            by_subject.setdefault(event.subject_key, []).append(_fact(event, tuple(event.attributes)))
        for subject_key, facts in by_subject.items():
            compiled.run_subject(subject_key, facts)
    finally:
        compiled.delete()
    return fired[0]


class _CompiledRuleSet:
    """One durable-rules ruleset on a private host, and the one safe way to run a subject through it."""

    def __init__(self, rule_set: RuleSet, actions: Sequence[_Action], *, name: str) -> None:
        # Actions started in the current session; deleting a session needs one.
        self._started = 0
        patterns = [rule_patterns(rule) for rule in rule_set.rules]
        branches = sum(_pattern_branches(p) for p in patterns) + 1  # and the seal rule
        if branches > MAX_CONDITION_BRANCHES:
            raise RuleSetError(
                [
                    f"the rules' conditions make {branches} branches (each event type, 'in' value and "
                    f"'any' alternative is one); durable-rules hangs beyond {MAX_CONDITION_BRANCHES}"
                ]
            )
        # Actions by rule name; the seal rule's only job is to start.
        self._actions: dict[str, _Action | None] = {
            f"r{index}": action for index, action in enumerate(actions)
        }
        self._actions[_SEAL_RULE] = None
        definition: dict[str, Any] = {f"r{index}": {"all": pattern} for index, pattern in enumerate(patterns)}
        definition[_SEAL_RULE] = {"all": [{"m": {"event_type": _SEAL_TYPE}}]}
        try:
            self._handle: Any = _binding.create_ruleset(name, _dumps(definition))
        except (_binding.error, MemoryError) as error:
            raise RuleSetError(_rejected_rules(rule_set, error)) from error

    def run_subject(self, subject_key: str, facts: list[dict[str, Any]]) -> None:
        """Assert one subject's facts, run every action they start, and delete the session."""
        self._started = 0
        try:
            try:
                self._assert_and_act(facts)
            finally:
                self._delete_session(subject_key)
        except (_binding.error, MemoryError) as error:
            raise RuleEngineError(f"durable-rules failed: {error}") from error

    def holds_session(self, subject_key: str) -> bool:
        try:
            _binding.get_state(self._handle, subject_key)
        except _binding.error as error:
            if _ERR_SID_NOT_FOUND in str(error):
                return False
            raise
        return True

    def delete(self) -> None:
        _binding.delete_ruleset(self._handle)

    def _assert_and_act(self, facts: list[dict[str, Any]]) -> None:
        """Assert facts into their session and run the actions they start, one by one.

        The loop durable.engine's Ruleset.do_actions runs (start an action, run it,
        write the session state back, complete it and start the next), on the binding
        directly: durable.engine wraps each action in a Closure, a Content per message
        and two clock readings, which cost more than the matching itself.
        """
        handle = self._handle
        result, state = _binding.assert_facts(handle, _dumps(facts))
        if result not in (_ALL_HANDLED, _SOME_NOT_HANDLED):
            raise RuleEngineError(f"durable-rules refused the facts of a subject (result {result})")
        started = _binding.start_action_for_state(handle, state)
        if not started:
            return
        session_state, message = started[0], started[1]
        while message:
            leased_at = time.monotonic()
            # {rule name: {pattern name: fact}}, one rule per action.
            for rule_name, patterns in json.loads(message).items():
                self._started += 1
                action = self._actions[rule_name]
                if action is not None:
                    action(_Match(patterns))
                break
            if time.monotonic() - leased_at > _ACTION_LEASE_S:
                # durable-rules would have offered the action again once its lease lapsed.
                raise RuleEngineError("durable-rules' action lease lapsed while an action ran")
            _binding.update_state(handle, session_state)
            # The next action's message, or None once the session has none left.
            message = _binding.complete_and_start_action(handle, state)

    def _delete_session(self, subject_key: str) -> None:
        if not self._started:
            seal = {"sid": subject_key, "id": _SEAL_ID, "event_type": _SEAL_TYPE}
            self._assert_and_act([seal])
            if not self._started:
                raise RuleEngineError("the seal rule did not fire; the subject's session is left in place")
        try:
            _binding.delete_state(self._handle, subject_key)
        except _binding.error as error:
            if _ERR_SID_NOT_FOUND not in str(error):
                raise


class _Match:
    """What an action is given: the matched facts by pattern name, as durable.engine's
    Closure exposes them (``c.m``, or ``c.first`` and ``c.second`` for a sequence)."""

    __slots__ = ("_patterns",)

    def __init__(self, patterns: Mapping[str, Any]) -> None:
        self._patterns = patterns

    def __getattr__(self, name: str) -> Any:
        return self._patterns.get(name)


def _positions(events: Sequence[EngineEvent]) -> dict[str, int]:
    positions: dict[str, int] = {}
    for index, event in enumerate(events):
        if event.key in positions:
            # durable-rules would ignore the second fact with the same id (result 2).
            raise ValueError(f"event key {event.key!r} appears twice in the batch")
        positions[event.key] = index
    return positions


def _firing(
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


def _dumps(value: object) -> str:
    # As durable.engine does: its C parser reads UTF-8, not \\u escapes.
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _fact(event: EngineEvent, projection: Iterable[str]) -> dict[str, Any]:
    attributes = event.attributes
    fact: dict[str, Any] = {
        "sid": event.subject_key,
        "id": event.key,
        "event_type": event.event_type,
        "subject_kind": event.subject_kind,
        "occurred_at": _engine_value(event.occurred_at, "occurred_at"),
    }
    attrs = {name: _engine_value(attributes[name], name) for name in projection if name in attributes}
    if attrs:
        fact["attrs"] = attrs
    return fact


def _engine_value(value: AttributeScalar, name: str) -> str | int | float | bool:
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise EvaluationProblem(f"attribute {name!r} is a timestamp without a timezone")
        return value.timestamp()
    if isinstance(value, float) and not math.isfinite(value):
        raise EvaluationProblem(f"attribute {name!r} is not a finite number")
    if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
        # durable-rules parses integers into 64 bits; a larger one would compare wrongly.
        raise EvaluationProblem(f"attribute {name!r} does not fit in 64 bits")
    if not isinstance(value, str | int | float):  # bool is an int
        raise EvaluationProblem(f"attribute {name!r} has an unsupported type {type(value).__name__}")
    return value


def _projections(rule_set: RuleSet) -> dict[str, tuple[str, ...]]:
    """For each event type some rule listens to, the attributes its conditions read."""
    read: dict[str, set[str]] = {}
    for rule in rule_set.rules:
        keyed = {
            a
            for a in (rule.window and rule.window.group_by, rule.sequence and rule.sequence.correlate_by)
            if a
        }
        steps = rule.sequence.steps if rule.sequence is not None else (Step(rule.event_types, rule.when),)
        for step in steps:
            for event_type in step.event_types:
                read.setdefault(event_type, set()).update(condition_attributes(step.when), keyed)
    too_many = [
        f"event type {event_type!r}: conditions read {len(names)} attributes, "
        f"more than the {MAX_ATTRIBUTES_PER_EVENT_TYPE} durable-rules can safely be given"
        for event_type, names in read.items()
        if len(names) > MAX_ATTRIBUTES_PER_EVENT_TYPE
    ]
    if too_many:
        raise RuleSetError(too_many)
    return {event_type: tuple(sorted(names)) for event_type, names in read.items()}


def _pattern_branches(pattern: list[JsonCondition]) -> int:
    """A rule's branches: durable-rules expands each pattern's "or"s, and a join's combinations."""
    return math.prod(_branch_count(condition) for named in pattern for condition in named.values())


def _branch_count(condition: JsonCondition) -> int:
    """Into how many conjunctions durable-rules splits a condition (it expands "or")."""
    if "$and" in condition:
        return math.prod(_branch_count(c) for c in condition["$and"])
    if "$or" in condition:
        return sum(_branch_count(c) for c in condition["$or"])
    return 1


def _rejected_rules(rule_set: RuleSet, error: BaseException) -> list[str]:
    """Which rules durable-rules refuses, found by compiling each alone."""
    problems: list[str] = []
    for index, rule in enumerate(rule_set.rules):
        probe = _dumps({"r": {"all": rule_patterns(rule)}})
        try:
            handle = _binding.create_ruleset(f"probe-{index}", probe)
        except (_binding.error, MemoryError) as rule_error:
            field_name = "sequence" if rule.sequence is not None else "when"
            problems.append(
                f"rules[{index}] ({rule.id}).{field_name}: durable-rules refused it: {_refusal(rule_error)}"
            )
        else:
            _binding.delete_ruleset(handle)
    return problems or [f"durable-rules refused the rule set: {_refusal(error)}"]


def _refusal(error: BaseException) -> str:
    code = str(error).rpartition("error code: ")[2]
    reason = _REFUSALS.get(int(code)) if code.isdigit() else None
    return f"{reason} ({error})" if reason else str(error)


# Negating a comparison flips its operator; an absent attribute is handled apart.
_DURABLE_OPERATORS: Final = {"ne": "$neq", "gt": "$gt", "gte": "$gte", "lt": "$lt", "lte": "$lte"}
_NEGATED: Final = {"eq": "ne", "ne": "eq", "gt": "lte", "gte": "lt", "lt": "gte", "lte": "gt"}


def rule_patterns(rule: Rule) -> list[JsonCondition]:
    """The named patterns of a rule (durable-rules' "all"): one fact, or a sequence's join of two.

    A sequence's second step joins the first on the correlation attribute and on event
    time (strictly later, at most the duration after it). The duration is given a
    second's slack because durable-rules adds floating-point seconds; select_pairs()
    applies it exactly on the datetimes.
    """
    if rule.sequence is None:
        return [{"m": rule_condition(rule)}]
    first, second = rule.sequence.steps
    join = [
        _step_condition(rule, second.event_types, second.when),
        {"$gt": {"occurred_at": {"first": "occurred_at"}}},
        {
            "$lte": {
                "occurred_at": {
                    "$add": {"$l": {"first": "occurred_at"}, "$r": _seconds(rule.sequence.within) + 1}
                }
            }
        },
    ]
    if rule.sequence.correlate_by is not None:
        path = f"attrs.{rule.sequence.correlate_by}"
        join.append({path: {"first": path}})
    return [
        {"first": _step_condition(rule, first.event_types, first.when)},
        {"second": {"$and": join}},
    ]


def rule_condition(rule: Rule) -> JsonCondition:
    """The durable-rules condition on a fact (the "m" of a rule) for a per-event or window Rule.

    It always begins with an equality on the event type: durable-rules hangs on a
    rule whose only test is that an attribute is absent.
    """
    return _step_condition(rule, rule.event_types, rule.when)


def _step_condition(rule: Rule, event_types: Sequence[str], when: Condition | None) -> JsonCondition:
    tests = [_one_of("event_type", event_types)]
    if rule.subject_kinds:
        tests.append(_one_of("subject_kind", rule.subject_kinds))
    # Effective dating is a condition on occurred_at, so an event outside the period
    # matches nothing, counts in no window and joins no sequence.
    if rule.effective_from is not None:
        tests.append({"$gte": {"occurred_at": _engine_value(rule.effective_from, "effective_from")}})
    if rule.effective_to is not None:
        tests.append({"$lt": {"occurred_at": _engine_value(rule.effective_to, "effective_to")}})
    if when is not None:
        tests.append(compile_condition(when))
    return {"$and": tests}


def _seconds(duration: timedelta) -> int:
    return int(duration.total_seconds())


def compile_condition(condition: Condition, *, negated: bool = False) -> JsonCondition:
    """A condition tree in durable-rules' JSON condition language.

    durable-rules has no "not", so negation is pushed down to the comparisons (De
    Morgan). A comparison on an absent attribute is false in durable-rules, so a
    negated one is widened with "or absent" to stay the boolean negation.
    """
    if isinstance(condition, Not):
        return compile_condition(condition.condition, negated=not negated)
    if isinstance(condition, AllOf | AnyOf):
        parts = [compile_condition(c, negated=negated) for c in condition.conditions]
        conjunction = isinstance(condition, AllOf) != negated
        return _and(parts) if conjunction else _or(parts)
    return _comparison(condition, negated=negated)


def _comparison(comparison: Comparison, *, negated: bool) -> JsonCondition:
    path = f"attrs.{comparison.attr}"
    value = comparison.value
    if comparison.op == "matches":
        if negated:
            raise RuleSetError([f"'matches' on {comparison.attr!r} cannot be negated in durable-rules"])
        return {"$mt": {path: value}}
    if comparison.op == "in":
        assert isinstance(value, tuple)
        candidates = [_engine_value(v, comparison.attr) for v in value]
        if negated:
            return _or_absent(path, _and([{"$neq": {path: v}} for v in candidates]))
        return _or([{path: v} for v in candidates])
    if comparison.op == "between":
        assert isinstance(value, tuple)
        low, high = (_engine_value(v, comparison.attr) for v in value)
        if negated:
            return _or_absent(path, _or([{"$lt": {path: low}}, {"$gt": {path: high}}]))
        return _and([{"$gte": {path: low}}, {"$lte": {path: high}}])
    assert not isinstance(value, tuple)
    operand = _engine_value(value, comparison.attr)
    op = _NEGATED[comparison.op] if negated else comparison.op
    test = {path: operand} if op == "eq" else {_DURABLE_OPERATORS[op]: {path: operand}}
    return _or_absent(path, test) if negated else test


def _one_of(field: str, values: Sequence[str]) -> JsonCondition:
    return _or([{field: v} for v in values])


def _or_absent(path: str, test: JsonCondition) -> JsonCondition:
    return {"$or": [test, {"$nex": {path: 1}}]}


def _and(parts: list[JsonCondition]) -> JsonCondition:
    return parts[0] if len(parts) == 1 else {"$and": parts}


def _or(parts: list[JsonCondition]) -> JsonCondition:
    return parts[0] if len(parts) == 1 else {"$or": parts}
