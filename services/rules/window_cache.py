"""Each subject's window state kept warm between batches (pure): its history and its active
window, sequence and capped outcomes within the active rule set's lookback, so that a batch
reads from the store only the subjects it has not seen lately.

An entry is complete from its ``floor`` on: it holds every evaluated, unretracted event of
the rule set's history types that occurred at or after the floor, and every active outcome
of a settled (window, sequence, capped) rule whose last event is at or after it. That is
exactly what the store's context() returns for an instant at or after the floor, so a
request at such an instant is answered from the entry, in the store's order, and any
earlier one goes to the store and refills the entry. Outcomes of per-event rules are left
out: the engine never reads them (services/rules/firings.py), as in a backtest.

Entries change only with what a committed transaction wrote (``committed``, called after
the commit succeeded); whatever cannot be followed exactly (a failed or yielded commit, a
retraction, a redrive, an outcome stored under a reissued id, another rule set) drops the
entries concerned, so the next read goes to the store. Bounded by subjects and by the
memory its entries are estimated to take, least recently used first; an entry's events
older than the lookback behind its newest event are trimmed. The Evaluator
(services/rules/domain.py) is its only caller, under its lock. docs/architecture.md,
"Rules' window cache", says why a shard's cache stays coherent.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from domain.ruleset.model import EngineEvent, RuleSet
from services.rules.batch import EvaluationContext, history_order
from services.rules.evaluated import Evaluated, prior_outcome
from services.rules.windows import PriorOutcome

Load = Callable[[Mapping[str, datetime]], EvaluationContext]

# Estimated bytes an entry takes (measured with tracemalloc on the sample catalogue's events):
# an event decoded (about 900 bytes with a few attributes, which its record holds again)
# plus its record, and an entry's own containers.
_EVENT_BYTES = 900
_ENTRY_BYTES = 600


def _weight(record: bytes) -> int:
    return _EVENT_BYTES + 2 * len(record)


def _occurred(event: EngineEvent) -> datetime:
    return event.occurred_at


@dataclass
class _Entry:
    floor: datetime
    events: list[EngineEvent] = field(default_factory=list)
    records: dict[str, bytes] = field(default_factory=dict)
    outcomes: dict[str, PriorOutcome] = field(default_factory=dict)
    bytes: int = _ENTRY_BYTES


@dataclass(frozen=True)
class CacheStats:
    subjects: int
    events: int
    # Estimated (see _weight).
    bytes: int
    hits: int
    misses: int


class WindowCache:
    """LRU by subject: at most ``max_subjects`` subjects in an estimated ``max_bytes`` (0: off)."""

    def __init__(self, *, max_subjects: int, max_bytes: int) -> None:
        self._max_subjects = max_subjects
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._events = 0
        self._bytes = 0
        self._rule_set: RuleSet | None = None
        self._types: frozenset[str] = frozenset()
        self._settled: frozenset[str] = frozenset()
        self._lookback = timedelta(0)
        self._hits = 0
        self._misses = 0

    @property
    def enabled(self) -> bool:
        return self._max_subjects > 0 and self._max_bytes > 0

    def stats(self) -> CacheStats:
        return CacheStats(len(self._entries), self._events, self._bytes, self._hits, self._misses)

    def context(self, rule_set: RuleSet, since: Mapping[str, datetime], load: Load) -> EvaluationContext:
        """What ``load`` (the store's context() for the rule set's history types) would
        return for ``since``, from the entries that reach back that far and from ``load``
        for the other subjects, whose entries it refills."""
        if not self.enabled:
            return load(since)
        self._follow(rule_set)
        history: dict[str, Sequence[EngineEvent]] = {}
        prior: dict[str, Sequence[PriorOutcome]] = {}
        records: dict[str, bytes] = {}
        missing: dict[str, datetime] = {}
        for subject, at in since.items():
            entry = self._entries.get(subject)
            if entry is None or at < entry.floor:
                missing[subject] = at
                continue
            self._entries.move_to_end(subject)
            events = entry.events[bisect_left(entry.events, at, key=_occurred) :]
            if events:
                history[subject] = events
                records.update((e.key, entry.records[e.key]) for e in events)
            outcomes = sorted((o for o in entry.outcomes.values() if o.last_at >= at), key=_outcome_id)
            if outcomes:
                prior[subject] = outcomes
        self._hits += len(since) - len(missing)
        self._misses += len(missing)
        if not missing:
            return EvaluationContext(history=history, prior=prior, records=records)
        stored = load(missing)
        for subject, at in missing.items():
            self._fill(subject, at, stored)
        history.update(stored.history)
        prior.update(stored.prior)
        records.update(stored.records)
        return EvaluationContext(history=history, prior=prior, records=records)

    def to_confirm(self, evaluated: Evaluated) -> list[str]:
        """The outcome ids whose entries ``committed`` would add: the store may have stored
        one under a reissued id (the same events formed it again after its reversal), which
        the caller finds out (the ids now reversed) and passes to ``committed``."""
        return [
            f.outcome_id
            for f in evaluated.firings
            if f.rule_id in self._settled and f.subject_key in self._entries
        ]

    def committed(
        self,
        rule_set: RuleSet,
        events: Sequence[EngineEvent],
        evaluated: Evaluated,
        records: Mapping[str, bytes],
        *,
        reissued: Collection[str] = (),
    ) -> None:
        """Follow a committed evaluation: ``events`` recorded as evaluated, ``evaluated``'s
        superseded outcomes reversed and its firings emitted (those in ``reissued`` under
        another id: their subjects are dropped)."""
        if not self.enabled or not self._entries:
            return
        if rule_set is not self._rule_set:
            self.clear()
            return
        touched: set[str] = set()
        for event in events:
            entry = self._entries.get(event.subject_key)
            if entry is None or event.event_type not in self._types or event.occurred_at < entry.floor:
                continue
            insort(entry.events, event, key=history_order)
            record = entry.records[event.key] = records[event.key]
            self._events += 1
            entry.bytes += _weight(record)
            self._bytes += _weight(record)
            touched.add(event.subject_key)
        for gone in evaluated.superseded:
            entry = self._entries.get(gone.outcome.subject_key)
            if entry is not None:
                entry.outcomes.pop(gone.outcome.outcome_id, None)
        drop: set[str] = set()
        for firing in evaluated.firings:
            entry = self._entries.get(firing.subject_key)
            if entry is None or firing.rule_id not in self._settled:
                continue
            if firing.outcome_id in reissued:
                drop.add(firing.subject_key)
            elif firing.occurred_at >= entry.floor:
                entry.outcomes[firing.outcome_id] = prior_outcome(firing)
        self.drop(drop)
        for subject in touched - drop:
            self._trim(subject)
        self._bound()

    def drop(self, subjects: Iterable[str]) -> None:
        for subject in subjects:
            entry = self._entries.pop(subject, None)
            if entry is not None:
                self._forget(entry)

    def clear(self) -> None:
        self._entries.clear()
        self._events = 0
        self._bytes = 0

    def _follow(self, rule_set: RuleSet) -> None:
        """Entries belong to one rule set (its lookback, history types and settled rules)."""
        if rule_set is self._rule_set:
            return
        self.clear()
        self._rule_set = rule_set
        self._types = rule_set.history_event_types
        self._lookback = rule_set.lookback
        self._settled = frozenset(
            rule.id
            for rule in rule_set.rules
            if rule.window is not None or rule.sequence is not None or rule.cap is not None
        )

    def _fill(self, subject: str, at: datetime, stored: EvaluationContext) -> None:
        self.drop((subject,))
        events = list(stored.history.get(subject, ()))
        records = {e.key: stored.records[e.key] for e in events}
        weight = _ENTRY_BYTES + sum(_weight(record) for record in records.values())
        if weight > self._max_bytes:
            return  # it would push every other subject out
        entry = _Entry(
            floor=at,
            events=events,
            records=records,
            outcomes={o.outcome_id: o for o in stored.prior.get(subject, ()) if o.rule_id in self._settled},
            bytes=weight,
        )
        self._entries[subject] = entry
        self._events += len(events)
        self._bytes += weight
        self._trim(subject)
        self._bound()

    def _trim(self, subject: str) -> None:
        """Raise a floor that lags its newest event by half a lookback more than a lookback
        (then to a quarter more: late events up to that much still find their history)."""
        entry = self._entries[subject]
        if not entry.events or self._lookback <= timedelta(0):
            return
        newest = entry.events[-1].occurred_at
        if entry.floor >= newest - self._lookback * 3 / 2:
            return
        entry.floor = newest - self._lookback * 5 / 4
        cut = bisect_left(entry.events, entry.floor, key=_occurred)
        for event in entry.events[:cut]:
            weight = _weight(entry.records.pop(event.key))
            entry.bytes -= weight
            self._bytes -= weight
        del entry.events[:cut]
        self._events -= cut
        entry.outcomes = {i: o for i, o in entry.outcomes.items() if o.last_at >= entry.floor}

    def _bound(self) -> None:
        while self._entries and (len(self._entries) > self._max_subjects or self._bytes > self._max_bytes):
            _, entry = self._entries.popitem(last=False)
            self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        self._events -= len(entry.events)
        self._bytes -= entry.bytes


def _outcome_id(outcome: PriorOutcome) -> str:
    return outcome.outcome_id
