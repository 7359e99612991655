"""The window cache (services/rules/window_cache.py): what it answers from memory and what it
leaves to the store, its bounds, and every change that drops what it holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from domain.ruleset.model import EngineEvent, Firing
from services.rules.batch import EvaluationContext
from services.rules.evaluated import Evaluated, Supersession, prior_outcome
from services.rules.window_cache import WindowCache
from services.rules.windows import PriorOutcome
from tests.support.event_time import OTHER, PERSON, THREE_IN_30, day, ev, rule, rule_set

RULES = rule_set(THREE_IN_30, rule("each", event_types=["test.closed"]))
SUBJECT_3 = "d4" * 32


class FakeStore:
    """The store's context(): history from each subject's instant on, in the store's order,
    and the active outcomes whose last event is at or after it; counts its reads."""

    def __init__(self) -> None:
        self.events: list[EngineEvent] = []
        self.outcomes: dict[str, PriorOutcome] = {}
        self.reads: list[dict[str, datetime]] = []

    def context(self, since: Mapping[str, datetime]) -> EvaluationContext:
        self.reads.append(dict(since))
        history: dict[str, list[EngineEvent]] = {}
        for event in sorted(self.events, key=lambda e: (e.occurred_at, e.key)):
            if event.subject_key in since and event.occurred_at >= since[event.subject_key]:
                history.setdefault(event.subject_key, []).append(event)
        prior: dict[str, list[PriorOutcome]] = {}
        for outcome_id in sorted(self.outcomes):
            outcome = self.outcomes[outcome_id]
            if outcome.subject_key in since and outcome.last_at >= since[outcome.subject_key]:
                prior.setdefault(outcome.subject_key, []).append(outcome)
        records = {e.key: e.key.encode() for events in history.values() for e in events}
        return EvaluationContext(history, prior, records)

    def commit(self, cache: WindowCache, events: Sequence[EngineEvent], evaluated: Evaluated) -> None:
        """What commit_evaluation writes, then what the Evaluator tells the cache."""
        self.events.extend(events)
        for gone in evaluated.superseded:
            del self.outcomes[gone.outcome.outcome_id]
        for firing in evaluated.firings:
            self.outcomes[firing.outcome_id] = prior_outcome(firing)
        cache.committed(RULES, events, evaluated, {e.key: e.key.encode() for e in events})


def firing(outcome_id: str, *events: EngineEvent, rule_id: str = "three") -> Firing:
    return Firing(
        rule_id=rule_id,
        rule_set="test",
        rule_set_version=1,
        title="t",
        description="d",
        legal_basis="l",
        event_keys=tuple(e.key for e in events),
        subject_key=events[0].subject_key,
        subject_kind="person",
        points=-5,
        category="civic",
        severity="minor",
        reason="r",
        black_list=False,
        occurred_at=events[-1].occurred_at,
        outcome_id=outcome_id,
        first_at=events[0].occurred_at,
    )


def served(cache: WindowCache, store: FakeStore, since: Mapping[str, datetime]) -> EvaluationContext:
    return cache.context(RULES, since, store.context)


def test_a_later_instant_is_answered_from_memory_exactly_as_the_store_would() -> None:
    store = FakeStore()
    a, b, c = ev("s/a", day(1)), ev("s/b", day(5)), ev("s/c", day(9))
    store.events = [a, b, c]
    store.outcomes["o2"] = prior_outcome(firing("o2", a, b, c))
    store.outcomes["o1"] = prior_outcome(firing("o1", b, c))
    cache = WindowCache(max_subjects=10, max_bytes=10**6)

    assert served(cache, store, {PERSON: day(0)}) == store.context({PERSON: day(0)})
    reads = len(store.reads)
    for at in (day(0), day(2), day(9), day(20)):
        assert served(cache, store, {PERSON: at}) == store.context({PERSON: at})
    assert len(store.reads) == reads + 4  # only the comparisons read the store
    assert cache.stats().hits == 4


def test_an_instant_before_what_an_entry_holds_goes_to_the_store_and_refills_it() -> None:
    store = FakeStore()
    store.events = [ev("s/a", day(1)), ev("s/b", day(30))]
    cache = WindowCache(max_subjects=10, max_bytes=10**6)
    served(cache, store, {PERSON: day(10)})

    assert served(cache, store, {PERSON: day(0)}) == store.context({PERSON: day(0)})
    assert store.reads[-2] == {PERSON: day(0)}
    served(cache, store, {PERSON: day(0)})
    assert len(store.reads) == 3  # the refilled entry reaches back to day 0


def test_only_the_subjects_not_held_are_read_from_the_store() -> None:
    store = FakeStore()
    store.events = [ev("s/a", day(1)), ev("s/b", day(2), subject=OTHER)]
    cache = WindowCache(max_subjects=10, max_bytes=10**6)
    served(cache, store, {PERSON: day(0)})

    both = {PERSON: day(0), OTHER: day(0)}
    assert served(cache, store, both) == store.context(both)
    assert store.reads[1] == {OTHER: day(0)}


def test_a_committed_batch_is_followed_events_in_order_superseded_gone_settled_firings_added() -> None:
    store = FakeStore()
    a, b = ev("s/b", day(1)), ev("s/c", day(4))
    store.events = [a, b]
    old = firing("old", a, b)
    store.outcomes["old"] = prior_outcome(old)
    cache = WindowCache(max_subjects=10, max_bytes=10**6)
    served(cache, store, {PERSON: day(0)})

    # A late event at the same instant as another, ordered by key; a per-event firing too.
    late = ev("s/a", day(1))
    closed = ev("s/d", day(6), event_type="test.closed")
    new = firing("new", late, a, b)
    store.commit(
        cache,
        [late, closed],
        Evaluated(
            [new, firing("each", closed, rule_id="each")], [Supersession(prior_outcome(old), late.key)]
        ),
    )

    stored = store.context({PERSON: day(0)})
    answer = served(cache, store, {PERSON: day(0)})
    assert answer.history == {PERSON: [late, a, b]}  # test.closed is no history type
    assert answer.prior == {PERSON: [prior_outcome(new)]}  # per-event outcomes are not read
    assert [o.outcome_id for o in stored.prior[PERSON]] == ["each", "new"]
    assert answer.records == {e.key: e.key.encode() for e in (late, a, b)}


def test_an_outcome_stored_under_a_reissued_id_drops_its_subject() -> None:
    store = FakeStore()
    a = ev("s/a", day(1))
    store.events = [a]
    cache = WindowCache(max_subjects=10, max_bytes=10**6)
    served(cache, store, {PERSON: day(0), OTHER: day(0)})
    again = firing("again", a)

    assert cache.to_confirm(Evaluated([again, firing("x", ev("o/1", day(2), subject=SUBJECT_3))])) == [
        "again"
    ]
    cache.committed(RULES, [], Evaluated([again]), {}, reissued={"again"})
    served(cache, store, {PERSON: day(0), OTHER: day(0)})
    assert store.reads[-1] == {PERSON: day(0)}


def test_least_recently_used_subjects_leave_first_within_both_bounds() -> None:
    store = FakeStore()
    subjects = [f"{n:064x}" for n in range(4)]
    store.events = [ev(f"s/{n}-{i}", day(i), subject=s) for n, s in enumerate(subjects) for i in range(3)]
    cache = WindowCache(max_subjects=3, max_bytes=10**6)
    for subject in subjects[:3]:
        served(cache, store, {subject: day(0)})
    served(cache, store, {subjects[0]: day(0)})  # used again: subjects[1] is now the oldest
    served(cache, store, {subjects[3]: day(0)})
    assert cache.stats().subjects == 3

    reads = len(store.reads)
    served(cache, store, {subjects[0]: day(0), subjects[2]: day(0), subjects[3]: day(0)})
    assert len(store.reads) == reads
    served(cache, store, {subjects[1]: day(0)})
    assert len(store.reads) == reads + 1

    # An entry of three 5-byte records is estimated at 600 + 3 * (900 + 2 * 5) bytes.
    by_size = WindowCache(max_subjects=100, max_bytes=2 * 3330 + 100)
    for subject in subjects:
        served(by_size, store, {subject: day(0)})
    assert by_size.stats().subjects == 2
    assert by_size.stats().events == 6
    assert by_size.stats().bytes == 2 * 3330


def test_a_subject_larger_than_the_memory_bound_is_never_held() -> None:
    store = FakeStore()
    store.events = [ev(f"s/{i}", day(i)) for i in range(5)] + [ev("o/1", day(1), subject=OTHER)]
    cache = WindowCache(max_subjects=100, max_bytes=4000)  # the subject's five events take 5130
    served(cache, store, {OTHER: day(0)})
    served(cache, store, {PERSON: day(0)})
    assert cache.stats().subjects == 1  # the other subject stayed


def test_old_events_are_trimmed_behind_the_newest_and_then_read_from_the_store() -> None:
    store = FakeStore()
    first = ev("s/a", day(0))
    store.events = [first]
    cache = WindowCache(max_subjects=10, max_bytes=10**6)
    served(cache, store, {PERSON: day(0)})
    later = ev("s/b", day(100))  # the lookback is 30 days
    store.commit(cache, [later], Evaluated())

    assert cache.stats().events == 1
    reads = len(store.reads)
    assert served(cache, store, {PERSON: day(100 - 37.5)}) == store.context({PERSON: day(100 - 37.5)})
    assert len(store.reads) == reads + 1  # answered from memory, then compared
    assert served(cache, store, {PERSON: day(0)}) == store.context({PERSON: day(0)})
    assert len(store.reads) == reads + 3


def test_drop_clear_another_rule_set_and_size_zero_leave_everything_to_the_store() -> None:
    store = FakeStore()
    store.events = [ev("s/a", day(1)), ev("o/a", day(1), subject=OTHER)]
    cache = WindowCache(max_subjects=10, max_bytes=10**6)
    both = {PERSON: day(0), OTHER: day(0)}
    served(cache, store, both)
    cache.drop([PERSON])
    served(cache, store, both)
    assert store.reads[-1] == {PERSON: day(0)}

    cache.context(rule_set(THREE_IN_30), both, store.context)  # another rule set: nothing carries over
    assert store.reads[-1] == both
    cache.committed(RULES, [ev("s/b", day(2))], Evaluated(), {"s/b": b""})
    assert cache.stats().subjects == 0

    off = WindowCache(max_subjects=0, max_bytes=10**6)
    off.context(RULES, both, store.context)
    off.context(RULES, both, store.context)
    assert store.reads[-2:] == [both, both]
    assert off.stats().subjects == 0
