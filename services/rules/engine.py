"""The durable-rules adapter: batches of events evaluated by a RuleSet compiled into
durable-rules, one session per subject per batch.

The only module that imports durable-rules. Conditions are compiled by
services/rules/conditions.py, and what the matches fire is settled by
services/rules/firings.py. durable-rules' quirks, and how this module works around each,
are recorded in docs/adr/0002-durable-rules-quirks-and-per-batch-sessions.md.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType, TracebackType
from typing import Any, Final, TypeAlias

import orjson
from durable import engine as durable_engine

from domain.ruleset.model import EngineEvent, EvaluationProblem, Firing, RuleSet, RuleSetError
from domain.ruleset.parsing import rule_set_from_yaml
from services.rules.conditions import engine_value, projections, rule_patterns, rule_set_patterns
from services.rules.evaluated import (
    Evaluated,
    EvaluationFailure,
    RuleEngineError,
    RuleEvaluationError,
    Supersession,
)
from services.rules.firings import firing_of, rule_candidates
from services.rules.windows import PriorOutcome

# The C extension durable.engine wraps, reached through it so that durable.engine
# stays the one entry point into durable-rules.
_binding: Any = durable_engine.durable_rules_engine

# Result codes of the binding's assert calls (durable-rules' rules.h).
_ALL_HANDLED: Final = 0
_SOME_NOT_HANDLED: Final = 1
_ERR_SID_NOT_FOUND: Final = "error code: 309"
# durable-rules offers an action again if it is not completed within 10 s (its rules.h).
_ACTION_LEASE_S: Final = 10.0

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

# History events whose matches an engine remembers by default (RuleEngine._remembered):
# about 200 bytes each, oldest forgotten first.
REMEMBERED_EVENTS: Final = 1 << 18

_NO_HISTORY: Final[Mapping[str, Sequence[EngineEvent]]] = MappingProxyType({})
_NO_PRIOR: Final[Mapping[str, Sequence[PriorOutcome]]] = MappingProxyType({})
_NO_SINCE: Final[Mapping[str, datetime]] = MappingProxyType({})

_Action: TypeAlias = Callable[[Any], None]


class RuleEngine:
    """A RuleSet compiled into its own durable-rules ruleset.

    evaluate() is serialised by a lock and holds the GIL throughout (durable-rules
    never releases it): call it from a worker thread, not from the event loop.
    close() frees the compiled ruleset once the engine is no longer needed (after a
    hot swap, for instance).
    """

    def __init__(self, rule_set: RuleSet, *, remember: int = REMEMBERED_EVENTS) -> None:
        self._rule_set = rule_set
        self._remember_at_most = remember
        self._lock = threading.Lock()
        self._projections = projections(rule_set)
        self._history_types = rule_set.history_event_types
        # Per history type: the longest reach of the window, sequence and capped rules that
        # read it (at most the rule set's lookback).
        self._reach_of_type: dict[str, timedelta] = {}
        for rule in rule_set.rules:
            if rule.reach > timedelta(0):
                for event_type in rule.event_types:
                    self._reach_of_type[event_type] = max(
                        rule.reach, self._reach_of_type.get(event_type, rule.reach)
                    )
        # Window, sequence and capped rules: settled in event time against prior outcomes.
        self._settled = frozenset(
            index
            for index, rule in enumerate(rule_set.rules)
            if rule.window is not None or rule.sequence is not None or rule.cap is not None
        )
        # Window and capped rules match one event at a time: whether an event matches them
        # depends on the event alone. Their indexes, and the event types of sequence rules,
        # whose matches pair events and are found again whenever a pair may form.
        self._single = frozenset(index for index in self._settled if rule_set.rules[index].sequence is None)
        self._paired_types = frozenset(
            event_type
            for rule in rule_set.rules
            if rule.sequence is not None
            for event_type in rule.event_types
        )
        # Per history event key: the window and capped rules it matched when it was last
        # asserted. Such an event is not asserted again while it is remembered, unless a
        # sequence rule reads its type: a subject's history would otherwise be matched again
        # by durable-rules at every batch (insertion order, oldest forgotten first).
        self._remembered: dict[str, tuple[int, ...]] = {}
        # History events answered from _remembered instead of being asserted, since compiled.
        self.recalled = 0
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
        settled in event time (services/rules/firings.py): from each subject's earliest
        new event (or ``since[subject]``, when earlier or when the subject has no new
        event, e.g. after a retraction) on, their canonical firings are formed from every
        event, new and in ``history``, and compared with ``prior`` (per subject, the
        active outcomes earlier evaluations emitted): what is missing fires, what is no
        longer canonical is superseded. ``history`` holds, per subject key, events
        evaluated before; those of window, sequence and capped rules' types are used from
        as far before that instant as the rules reading their type reach (at most the rule
        set's lookback). Firings are ordered by their latest new event (input order), then
        by rule (file order). The result is a function of the arguments alone, so evaluating
        the same inputs again (a retry, a restart) gives the same result, and the settled
        outcomes do not depend on arrival order.

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
                matched = self._match_subject(subject) if subject.facts else []
                matched.extend(subject.recalled)
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
            # Each type from as far back as the rules reading it reach.
            past = history.get(subject.key, ())
            earliest = {t: subject.since - reach for t, reach in self._reach_of_type.items()} if past else {}
            for old in past:
                start = earliest.get(old.event_type)
                if (
                    start is None
                    or old.key in positions
                    or old.key in subject.events
                    or old.subject_key != subject.key
                    or old.occurred_at < start
                ):
                    continue
                recalled = self._remembered.get(old.key)
                if recalled is not None and old.event_type not in self._paired_types:
                    subject.recall(old, recalled)
                    self.recalled += 1
                    continue
                try:
                    fact = _fact(old, self._projections[old.event_type])
                except EvaluationProblem:
                    # Evaluated before under other rules; the current ones cannot read it,
                    # so it never matched them and counts for nothing.
                    continue
                subject.add(old, fact)
        return list(subjects.values()), failures

    def _match_subject(self, subject: _Subject) -> list[tuple[tuple[str, ...], int]]:
        """(event keys, rule index) for every rule that fired on the subject's facts; what
        each history-type fact matched of the window and capped rules is remembered."""
        self._matched = []
        self._action_errors = []
        self._compiled.run_subject(subject.key, subject.facts)
        for failure in self._action_errors:
            if not isinstance(failure, Exception):
                raise failure  # KeyboardInterrupt and the like, which the action caught
            raise RuleEngineError(f"a rule action failed: {failure!r}") from failure
        matched = self._matched
        if self._single and self._history_types and self._remember_at_most > 0:
            singles: dict[str, list[int]] = {}
            for keys, rule_index in matched:
                if rule_index in self._single:
                    singles.setdefault(keys[0], []).append(rule_index)
            for fact in subject.facts:
                if fact["event_type"] in self._history_types:
                    key = fact["id"]
                    self._remember(key, tuple(sorted(set(singles.get(key, ())))))
        return matched

    def _remember(self, key: str, rule_indexes: tuple[int, ...]) -> None:
        remembered = self._remembered
        remembered[key] = rule_indexes
        if len(remembered) > self._remember_at_most:
            # Forget the oldest eighth in one go (a dict keeps insertion order).
            for old in list(itertools.islice(remembered, max(1, self._remember_at_most // 8))):
                del remembered[old]

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
            candidates, gone = rule_candidates(
                rule,
                matches,
                subject.events,
                since=subject.since,
                positions=positions,
                prior=prior_of.get(rule.id, ()),
                settled=rule_index in self._settled,
            )
            superseded.extend(Supersession(o, subject.cause) for o in gone)
            for events, points, variant in candidates:
                newest = max((positions[e.key] for e in events if e.key in positions), default=-1)
                try:
                    firing = firing_of(self._rule_set, rule, events, points, variant)
                except EvaluationProblem as problem:
                    failures.append(EvaluationFailure(events[-1].key, rule.id, str(problem)))
                    continue
                if firing is not None:
                    ranked.append(((newest, rule_index), firing))
        return ranked, superseded


def check_rule_set(source: str) -> RuleSet:
    """Parse and compile rule-set source; raises RuleSetError (every problem) if either fails."""
    rule_set = rule_set_from_yaml(source)
    RuleEngine(rule_set).close()
    return rule_set


@dataclass
class _Subject:
    """One subject's events in one evaluation: the new ones and the history they need.
    ``since`` is where its region of event time starts; ``cause`` the new event there."""

    key: str
    since: datetime
    cause: str
    events: dict[str, EngineEvent] = field(default_factory=dict)
    facts: list[dict[str, Any]] = field(default_factory=list)

    # Matches of history events not asserted again (RuleEngine._remembered).
    recalled: list[tuple[tuple[str, ...], int]] = field(default_factory=list)

    def add(self, event: EngineEvent, fact: dict[str, Any]) -> None:
        self.events[event.key] = event
        self.facts.append(fact)

    def recall(self, event: EngineEvent, rule_indexes: tuple[int, ...]) -> None:
        self.events[event.key] = event
        self.recalled.extend(((event.key,), index) for index in rule_indexes)


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
        patterns = rule_set_patterns(rule_set, reserved_branches=1)  # the seal rule
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
            for rule_name, patterns in orjson.loads(message).items():
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


def _dumps(value: object) -> str:
    # UTF-8 as durable.engine writes it (its C parser reads UTF-8, not \\u escapes), by
    # orjson: a tenth of json.dumps' time, about 12% of a backtest's replay. Values are
    # finite and fit in 64 bits by then (conditions.engine_value), where json.dumps would
    # refuse what orjson writes as null.
    return orjson.dumps(value).decode()


def _fact(event: EngineEvent, projection: Iterable[str]) -> dict[str, Any]:
    attributes = event.attributes
    fact: dict[str, Any] = {
        "sid": event.subject_key,
        "id": event.key,
        "event_type": event.event_type,
        "subject_kind": event.subject_kind,
        "occurred_at": engine_value(event.occurred_at, "occurred_at"),
    }
    attrs = {name: engine_value(attributes[name], name) for name in projection if name in attributes}
    if attrs:
        fact["attrs"] = attrs
    return fact


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
