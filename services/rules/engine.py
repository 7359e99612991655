"""The rule engine: a RuleSet compiled into durable-rules, and batches of events evaluated by it.

This is the only module that imports durable-rules. Conditions are compiled into
durable-rules' JSON condition language and matched by its Rete network; points,
reasons and outcome ids are computed here in Python, outside durable-rules' actions.

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
  and timers on a ruleset that is not thread-safe. The host used here never starts
  them, and is private to each RuleEngine, so engines (two rule-set versions during a
  hot swap, tests) coexist without durable.lang's module-level host.
- An exception inside an action is stored in the session state and never reaches the
  caller (jruizgit/rules#58, #305). Actions here only record (event, rule) pairs and
  catch everything; whatever goes wrong surfaces as an exception from evaluate().
- A ruleset holds at most 1024 live sessions: the next new one fails with MemoryError
  (engine error 101) whatever the machine's memory. A session costs about 100 KB plus
  11 KB per rule and is created even for a message that matches nothing. Each
  subject's session is deleted once its events are evaluated, which keeps memory flat
  and the engine usable past 1024 subjects. (Windows, a later rule form, will need
  another way to keep per-subject history.)
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Final, TypeAlias

from durable import engine as durable_engine

from services.rules.ruleset import (
    AllOf,
    AnyOf,
    AttributeScalar,
    Comparison,
    Condition,
    EngineEvent,
    EvaluationProblem,
    Firing,
    Not,
    Rule,
    RuleSet,
    RuleSetError,
    condition_attributes,
    outcome_id,
)

# The C extension durable.engine wraps, reached through it so that durable.engine
# stays the one entry point into durable-rules.
_binding: Any = durable_engine.durable_rules_engine

# Result codes of the binding's assert calls (durable-rules' rules.h).
_ALL_HANDLED: Final = 0
_SOME_NOT_HANDLED: Final = 1
_ERR_SID_NOT_FOUND: Final = "error code: 309"
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

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
        # Written by the actions while one subject's facts are evaluated, read right after.
        self._matched: list[tuple[str, int]] = []
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

    def evaluate(self, events: Sequence[EngineEvent]) -> list[Firing]:
        """The firings of the batch, ordered by event (input order), then by rule (file order).

        Raises RuleEvaluationError if an event cannot be evaluated, and RuleEngineError
        if durable-rules fails; either way no firing of the batch is returned.
        """
        with self._lock:
            if self._closed:
                raise RuleEngineError("the rule engine is closed")
            positions = _positions(events)
            facts, failures = self._facts_by_subject(events)
            if failures:
                raise RuleEvaluationError(failures)
            matched: set[tuple[str, int]] = set()
            for subject_key, subject_facts in facts.items():
                # A set: durable-rules fires a rule once per branch of an "or" that holds.
                matched.update(self._match_subject(subject_key, subject_facts))
            ordered = sorted(matched, key=lambda pair: (positions[pair[0]], pair[1]))
            return self._firings(ordered, events, positions)

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
                self._matched.append((c.m["id"], rule_index))
            except BaseException as error:  # durable-rules would swallow it into the session state
                self._action_errors.append(error)

        return record

    def _facts_by_subject(
        self, events: Sequence[EngineEvent]
    ) -> tuple[dict[str, list[dict[str, Any]]], list[EvaluationFailure]]:
        by_subject: dict[str, list[dict[str, Any]]] = {}
        failures: list[EvaluationFailure] = []
        for event in events:
            projection = self._projections.get(event.event_type)
            if projection is None:
                continue  # no rule listens to this type: durable-rules would match nothing
            try:
                fact = _fact(event, projection)
            except EvaluationProblem as problem:
                failures.append(EvaluationFailure(event.key, None, str(problem)))
                continue
            by_subject.setdefault(event.subject_key, []).append(fact)
        return by_subject, failures

    def _match_subject(self, subject_key: str, facts: list[dict[str, Any]]) -> list[tuple[str, int]]:
        """(event key, rule index) for every rule that fired on the subject's facts."""
        self._matched = []
        self._action_errors = []
        self._compiled.run_subject(subject_key, facts)
        for failure in self._action_errors:
            if not isinstance(failure, Exception):
                raise failure  # KeyboardInterrupt and the like, which the action caught
            raise RuleEngineError(f"a rule action failed: {failure!r}") from failure
        return self._matched

    def _firings(
        self, matched: list[tuple[str, int]], events: Sequence[EngineEvent], positions: Mapping[str, int]
    ) -> list[Firing]:
        rule_set = self._rule_set
        firings: list[Firing] = []
        failures: list[EvaluationFailure] = []
        for event_key, rule_index in matched:
            event = events[positions[event_key]]
            rule = rule_set.rules[rule_index]
            try:
                firing = _firing(rule_set, rule, event)
            except EvaluationProblem as problem:
                failures.append(EvaluationFailure(event.key, rule.id, str(problem)))
                continue
            if firing is not None:
                firings.append(firing)
        if failures:
            raise RuleEvaluationError(failures)
        return firings


def run_raw(rule_set: RuleSet, events: Sequence[EngineEvent]) -> int:
    """How many times the rules fire on the events in plain durable-rules, for benchmarks.

    The same compiled conditions, every attribute asserted, counting actions, and only
    what durable-rules needs to run at all (one assert per subject, its actions run,
    its session sealed and deleted): evaluate()'s overhead is the difference.
    Zero-point firings count, and a rule counts once per "or" branch that holds.
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
        conditions = [rule_condition(rule) for rule in rule_set.rules]
        branches = sum(_branch_count(c) for c in conditions) + 1  # and the seal rule
        if branches > MAX_CONDITION_BRANCHES:
            raise RuleSetError(
                [
                    f"the rules' conditions make {branches} branches (each event type, 'in' value and "
                    f"'any' alternative is one); durable-rules hangs beyond {MAX_CONDITION_BRANCHES}"
                ]
            )
        # durable.engine deletes "run" from the definition it is given: build it fresh.
        definition: dict[str, Any] = {
            f"r{index}": {"all": [{"m": condition}], "run": self._counted(action)}
            for index, (condition, action) in enumerate(zip(conditions, actions, strict=True))
        }
        definition[_SEAL_RULE] = {"all": [{"m": {"event_type": _SEAL_TYPE}}], "run": self._counted(None)}
        host = _PrivateHost()
        try:
            host.register_rulesets({name: definition})
        except (_binding.error, MemoryError) as error:
            raise RuleSetError(_rejected_rules(rule_set, error)) from error
        self._ruleset = host.get_ruleset(name)

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
            self._ruleset.get_state(subject_key)
        except _binding.error as error:
            if _ERR_SID_NOT_FOUND in str(error):
                return False
            raise
        return True

    def delete(self) -> None:
        _binding.delete_ruleset(self._ruleset._handle)

    def _counted(self, action: _Action | None) -> _Action:
        def run(c: Any) -> None:
            self._started += 1
            if action is not None:
                action(c)

        return run

    def _assert_and_act(self, facts: list[dict[str, Any]]) -> None:
        result, state = _binding.assert_facts(self._ruleset._handle, _dumps(facts))
        if result not in (_ALL_HANDLED, _SOME_NOT_HANDLED):
            raise RuleEngineError(f"durable-rules refused the facts of a subject (result {result})")
        completions: list[object] = []
        self._ruleset.do_actions(state, lambda error, _state: completions.append(error))
        if completions != [None]:
            # An error while completing an action, or durable-rules' 10-second action
            # lease lapsing (its clock is local wall time), which leaves it unfinished.
            raise RuleEngineError(f"durable-rules did not complete the actions of a subject: {completions!r}")

    def _delete_session(self, subject_key: str) -> None:
        if not self._started:
            seal = {"sid": subject_key, "id": _SEAL_ID, "event_type": _SEAL_TYPE}
            self._assert_and_act([seal])
            if not self._started:
                raise RuleEngineError("the seal rule did not fire; the subject's session is left in place")
        try:
            self._ruleset.delete_state(subject_key)
        except _binding.error as error:
            if _ERR_SID_NOT_FOUND not in str(error):
                raise


class _PrivateHost(durable_engine.Host):  # type: ignore[misc]
    """A durable-rules host without the background threads that Host._run starts."""

    def _run(self) -> None:
        pass


def _positions(events: Sequence[EngineEvent]) -> dict[str, int]:
    positions: dict[str, int] = {}
    for index, event in enumerate(events):
        if event.key in positions:
            # durable-rules would ignore the second fact with the same id (result 2).
            raise ValueError(f"event key {event.key!r} appears twice in the batch")
        positions[event.key] = index
    return positions


def _firing(rule_set: RuleSet, rule: Rule, event: EngineEvent) -> Firing | None:
    points = rule.points_for(event.attributes)
    if points == 0:
        return None
    event_keys = (event.key,)
    return Firing(
        rule_id=rule.id,
        rule_set=rule_set.name,
        rule_set_version=rule_set.version,
        title=rule.title,
        description=rule.description.render(event.attributes),
        legal_basis=rule.legal_basis,
        event_keys=event_keys,
        subject_key=event.subject_key,
        subject_kind=event.subject_kind,
        points=points,
        category=rule.category,
        severity=rule.severity,
        reason=rule.reason.render(event.attributes),
        black_list=rule.black_list,
        occurred_at=event.occurred_at,
        outcome_id=outcome_id(rule_set.name, rule_set.version, rule.id, event_keys),
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
        for event_type in rule.event_types:
            read.setdefault(event_type, set()).update(condition_attributes(rule.when))
    too_many = [
        f"event type {event_type!r}: conditions read {len(names)} attributes, "
        f"more than the {MAX_ATTRIBUTES_PER_EVENT_TYPE} durable-rules can safely be given"
        for event_type, names in read.items()
        if len(names) > MAX_ATTRIBUTES_PER_EVENT_TYPE
    ]
    if too_many:
        raise RuleSetError(too_many)
    return {event_type: tuple(sorted(names)) for event_type, names in read.items()}


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
        probe = _dumps({"r": {"all": [{"m": rule_condition(rule)}]}})
        try:
            handle = _binding.create_ruleset(f"probe-{index}", probe)
        except (_binding.error, MemoryError) as rule_error:
            problems.append(
                f"rules[{index}] ({rule.id}).when: durable-rules refused it: {_refusal(rule_error)}"
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


def rule_condition(rule: Rule) -> JsonCondition:
    """The durable-rules condition on a fact (the "m" of a rule) for a Rule.

    It always begins with an equality on the event type: durable-rules hangs on a
    rule whose only test is that an attribute is absent.
    """
    tests = [_one_of("event_type", rule.event_types)]
    if rule.subject_kinds:
        tests.append(_one_of("subject_kind", rule.subject_kinds))
    if rule.when is not None:
        tests.append(compile_condition(rule.when))
    return {"$and": tests}


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
