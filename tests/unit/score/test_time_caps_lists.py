"""The score in time: caps over a rolling window, expiry at visible_until, scores as of a
past instant, red and black lists, history of every change, and policy activation."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from domain.entries import EntryStatus, RuleRef, ScoredEntry
from domain.history import ENTRIES, EXPIRY, POLICY, replay
from domain.intake import IncomingOutcome
from domain.policy import ActivatedPolicy, Caps, PolicyBook, ScorePolicy, load_policy, policy_from_text
from domain.scoring import BLACK, RED, ScoreState, compute_score
from kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from services.score.ledger import Ledger, Migration
from tests.support.score_store import FakeStore

POLICY_DOC = Path(__file__).parents[3] / "config" / "policy.yaml"
SHIPPED = load_policy(POLICY_DOC)
PERSON = SHIPPED.for_kind("person")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SECOND = timedelta(seconds=1)
DAY = timedelta(days=1)


def entry(
    entry_id: str,
    points: int,
    category: str = "civic",
    *,
    occurred: datetime = T0,
    recorded: datetime | None = None,
    severity: str | None = None,
    black_list: bool = False,
) -> ScoredEntry:
    severity = severity or ("positive" if points > 0 else "minor")
    return ScoredEntry(
        entry_id, points, category, severity, EntryStatus.ACTIVE, occurred, recorded or occurred, black_list
    )


# --- caps --------------------------------------------------------------------------------


def test_exactly_the_cap_counts_in_full_and_the_point_beyond_is_withheld() -> None:
    at_cap = [entry("a", 30), entry("b", 20, occurred=T0 + DAY)]
    result = compute_score(at_cap, PERSON, T0 + 2 * DAY)
    assert (result.score, result.categories[0].points, result.categories[0].capped) == (1050, 50, 0)
    beyond = [*at_cap, entry("c", 1, occurred=T0 + 2 * DAY)]
    result = compute_score(beyond, PERSON, T0 + 3 * DAY)
    assert (result.score, result.categories[0].points, result.categories[0].capped) == (1050, 50, 1)
    assert [(c.entry_id, c.points) for c in result.counted] == [("a", 30), ("b", 20), ("c", 0)]


def test_an_entry_straddling_the_cap_adds_only_what_is_left() -> None:
    result = compute_score([entry("a", 45), entry("b", 10, occurred=T0 + DAY)], PERSON, T0 + 2 * DAY)
    assert [(c.entry_id, c.points) for c in result.counted] == [("a", 45), ("b", 5)]


def test_the_cap_window_rolls_one_window_length_after_the_first_points() -> None:
    window = PERSON.caps.window  # 365 days
    first = entry("a", 50)
    just_inside = entry("b", 10, occurred=T0 + window - SECOND)
    at_edge = entry("c", 10, occurred=T0 + window)
    inside = compute_score([first, just_inside], PERSON, T0 + window)
    assert [(c.entry_id, c.points) for c in inside.counted] == [("a", 50), ("b", 0)]
    # (occurred_at - window, occurred_at]: the first entry has left the window exactly now.
    edge = compute_score([first, at_edge], PERSON, T0 + window)
    assert [(c.entry_id, c.points) for c in edge.counted] == [("a", 50), ("c", 10)]
    assert edge.score == 1060


def test_caps_are_per_category_and_never_touch_negative_points() -> None:
    entries = [entry("a", 50), entry("b", 50, "transport"), entry("c", 5), entry("d", -30, "civic")]
    result = compute_score(entries, PERSON, T0 + DAY)
    assert {c.category: c.points for c in result.categories} == {"civic": 20, "transport": 50}
    assert result.score == 1070


def test_the_allowance_follows_event_time_not_arrival_order() -> None:
    late = entry("late", 40, occurred=T0, recorded=T0 + 10 * DAY)
    early = entry("early", 40, occurred=T0 + DAY, recorded=T0 + DAY)
    before = compute_score([late, early], PERSON, T0 + 5 * DAY)
    assert [(c.entry_id, c.points) for c in before.counted] == [("early", 40)]
    # Once the older event is known it takes the allowance first; caps are evaluated as of then.
    after = compute_score([late, early], PERSON, T0 + 10 * DAY)
    assert [(c.entry_id, c.points) for c in after.counted] == [("late", 40), ("early", 10)]


def test_organizations_are_capped_lower_than_persons() -> None:
    entries = [entry("a", 40, "commerce")]
    assert compute_score(entries, SHIPPED.for_kind("organization"), T0 + DAY).score == 1030
    assert compute_score(entries, PERSON, T0 + DAY).score == 1040


# --- time --------------------------------------------------------------------------------


def test_an_entry_counts_until_the_instant_before_visible_until_and_not_at_it() -> None:
    minor = entry("m", -5)
    until = T0 + timedelta(days=90)
    assert compute_score([minor], PERSON, until - timedelta(microseconds=1)).score == 995
    at = compute_score([minor], PERSON, until)
    assert (at.score, at.entry_count) == (1000, 0)
    assert compute_score([minor], PERSON, until + SECOND).score == 1000


def test_as_of_ignores_entries_recorded_later_and_counts_those_recorded_by_then() -> None:
    late = entry("l", -10, occurred=T0, recorded=T0 + 5 * DAY, severity="general")
    assert compute_score([late], PERSON, T0 + 5 * DAY - SECOND).score == 1000
    assert compute_score([late], PERSON, T0 + 5 * DAY).score == 990


def test_next_change_is_the_earliest_visible_until_of_a_counting_entry() -> None:
    entries = [entry("m", -5), entry("g", -10, severity="general"), entry("p", 1)]
    result = compute_score(entries, PERSON, T0)
    assert result.next_change_at == T0 + timedelta(days=90)
    assert compute_score([], PERSON, T0).next_change_at is None


def test_a_past_instant_is_scored_under_the_policy_in_force_then() -> None:
    stricter = replace(
        SHIPPED, version="v2", kinds={k: replace(p, version="v2", base=900) for k, p in SHIPPED.kinds.items()}
    )
    book = PolicyBook(
        (ActivatedPolicy(SHIPPED, T0 - DAY, "a", ""), ActivatedPolicy(stricter, T0 + 10 * DAY, "b", ""))
    )
    assert book.at(T0).version == "2026.2"
    assert book.at(T0 + 10 * DAY).version == "v2"
    assert book.at(T0 - 100 * DAY).version == "2026.2"


# --- lists -------------------------------------------------------------------------------


def test_red_list_needs_the_top_tier_and_no_counting_negative_entry() -> None:
    good = [entry("a", 50), entry("b", 10, "transport")]
    result = compute_score(good, PERSON, T0 + DAY)
    assert result.tier == "AAA"
    assert result.on_list(RED) is not None
    assert result.on_list(BLACK) is None
    with_negative = compute_score([*good, entry("n", -5, "traffic")], PERSON, T0 + DAY)
    assert with_negative.tier == "AAA"
    assert with_negative.on_list(RED) is None


def test_black_list_by_tier_or_by_a_counting_flagged_entry_with_its_reasons() -> None:
    flagged = entry("f", -10, "transport", severity="general", black_list=True)
    result = compute_score([flagged], PERSON, T0 + DAY)
    membership = result.on_list(BLACK)
    assert membership is not None
    assert membership.entry_ids == ("f",)
    assert result.tier == "A"
    # The flag stops counting when the entry expires.
    expired = compute_score([flagged], PERSON, T0 + timedelta(days=365))
    assert expired.on_list(BLACK) is None
    sunk = compute_score([entry(f"s{i}", -100, "legal", severity="serious") for i in range(5)], PERSON, T0)
    assert sunk.tier == "D"
    black = sunk.on_list(BLACK)
    assert black is not None
    assert black.reasons == ("tier D",)
    assert black.entry_ids == ()


def test_a_purpose_bound_score_sees_only_its_categories() -> None:
    entries = [entry("t", 2, "transport"), entry("l", -100, "legal", severity="serious", black_list=True)]
    whole = compute_score(entries, PERSON, T0 + DAY)
    bound = compute_score(entries, PERSON, T0 + DAY, categories=frozenset({"transport"}))
    assert (whole.score, whole.on_list(BLACK) is not None) == (902, True)
    assert (bound.score, bound.tier, bound.lists) == (1002, "A", ())


# --- history -----------------------------------------------------------------------------


def test_replay_writes_each_expiry_at_its_own_instant_with_the_expired_entries() -> None:
    entries = [entry("m", -5), entry("g", -10, severity="general"), entry("p", 3)]
    start = compute_score(entries, PERSON, T0)
    assert start.score == 988
    changes, final = replay(entries, PERSON, before=start.state, since=T0, until=T0 + timedelta(days=400))
    assert [(c.changed_at, c.cause, c.expired_entry_ids, c.after.score) for c in changes] == [
        (T0 + timedelta(days=90), EXPIRY, ("m",), 993),
        (T0 + timedelta(days=365), EXPIRY, ("g",), 1003),
    ]
    assert final.score == 1003


def test_replay_of_a_new_subject_is_one_change_caused_by_its_entries() -> None:
    changes, _ = replay([entry("a", 5)], PERSON, before=None, since=None, until=T0, added=["a"])
    assert [(c.cause, c.before, c.after.score, c.added_entry_ids) for c in changes] == [
        (ENTRIES, None, 1005, ("a",))
    ]


def test_entering_and_leaving_a_list_is_a_change_even_when_the_score_stays() -> None:
    before = ScoreState(1060, "AAA", True, False)
    changes, _ = replay(
        [entry("a", 50), entry("b", 10, "transport"), entry("n", 0, "traffic", severity="minor")],
        PERSON,
        before=before,
        since=T0,
        until=T0,
    )
    assert changes == []  # a zero-point entry is not negative: nothing changes
    negative = entry("n", -1, "traffic")
    changes, _ = replay(
        [entry("a", 50), entry("b", 11, "transport"), negative],
        PERSON,
        before=before,
        since=T0,
        until=T0,
        added=["n"],
    )
    assert [(c.cause, c.before, c.after.state) for c in changes] == [
        (ENTRIES, before, ScoreState(1060, "AAA", False, False))
    ]
    changes, _ = replay(
        [entry("a", 50), entry("b", 11, "transport"), negative],
        PERSON,
        before=ScoreState(1060, "AAA", False, False),
        since=T0,
        until=T0 + timedelta(days=100),
    )
    assert [(c.changed_at, c.cause, c.expired_entry_ids, c.after.state.red) for c in changes] == [
        (T0 + timedelta(days=90), EXPIRY, ("n",), True)
    ]


# --- the Ledger: sweep, verify, preview, activate ----------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def outcome(
    outcome_id: str, points: int, severity: str, *, occurred: datetime = T0, flag: bool = False
) -> IncomingOutcome:
    return IncomingOutcome(
        # Hexadecimal, as rules' outcome ids are (domain.intake.outcome_violations).
        outcome_id=outcome_id.encode().hex(),
        subject_key="a" * 64,
        subject_kind="person",
        rule=RuleRef(rule_id="r", rule_set="s", rule_set_version=1),
        points=points,
        category="traffic" if points < 0 else "civic",
        severity=severity,
        occurred_at=occurred,
        reason="",
        black_list=flag,
        snapshot=b"",
    )


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def ledger(store: FakeStore, clock: Clock) -> Ledger:
    book = PolicyBook((ActivatedPolicy(SHIPPED, T0 - DAY, "test", ""),))
    return Ledger(policies=book, store=store, policy_store=store, clock=clock, page_size=2)


def test_the_sweep_recomputes_expired_subjects_with_no_event_and_verify_agrees(
    ledger: Ledger, store: FakeStore, clock: Clock
) -> None:
    ledger.apply([outcome("m", -5, "minor"), outcome("p", 4, "positive")])
    assert store.scores == {"a" * 64: (999, "A")}
    clock.now = T0 + timedelta(days=90) - SECOND
    assert ledger.sweep() == 0
    clock.now = T0 + timedelta(days=91)
    assert ledger.sweep() == 1
    assert store.scores == {"a" * 64: (1004, "A")}
    _, change = store.history[-1]
    assert (change.changed_at, change.cause, change.expired_entry_ids) == (
        T0 + timedelta(days=90),
        EXPIRY,
        (b"m".hex(),),
    )
    assert ledger.verify(10).mismatch_count == 0


def test_verify_sweeps_first_so_an_unswept_expiry_is_not_a_mismatch(
    ledger: Ledger, store: FakeStore, clock: Clock
) -> None:
    ledger.apply([outcome("m", -5, "minor")])
    clock.now = T0 + timedelta(days=200)
    result = ledger.verify(10)
    assert (result.swept, result.mismatch_count) == (1, 0)
    assert store.scores == {"a" * 64: (1000, "A")}


def test_a_batch_after_an_unswept_expiry_writes_the_expiry_first(
    ledger: Ledger, store: FakeStore, clock: Clock
) -> None:
    ledger.apply([outcome("m", -5, "minor")])
    clock.now = T0 + timedelta(days=100)
    ledger.apply([outcome("g", -10, "general", occurred=clock.now)])
    assert [(c.cause, c.after.score) for _, c in store.history] == [
        (ENTRIES, 995),
        (EXPIRY, 1000),
        (ENTRIES, 990),
    ]


def test_preview_reports_the_tier_migrations_and_writes_nothing(ledger: Ledger, store: FakeStore) -> None:
    ledger.apply([outcome("g", -45, "general")])
    stricter = replace(
        SHIPPED,
        version="v2",
        kinds={k: replace(p, version="v2", base=1100) for k, p in SHIPPED.kinds.items()},
    )
    report = ledger.preview(stricter)
    assert (report.subjects, report.tier_changed, report.score_changed) == (1, 1, 1)
    assert report.migrations == (Migration("person", "B", "AAA", 1),)
    # AAA now, but the counting negative entry keeps the subject off the red list.
    assert report.list_moves == ()
    assert store.saved == []
    assert store.scores == {"a" * 64: (955, "B")}


def test_activation_records_who_and_when_and_recomputes_with_a_policy_change(
    ledger: Ledger, store: FakeStore, clock: Clock
) -> None:
    ledger.apply([outcome("g", -45, "general")])
    clock.now = T0 + DAY
    doc = POLICY_DOC.read_text().replace('"2026.2"', '"2027.1"').replace("base: 1000", "base: 1100")
    proposed = policy_from_text(doc)
    report, recomputed = ledger.activate(proposed, doc, "reviewer 7")
    assert (report.tier_changed, recomputed) == (1, 1)
    assert [(a.policy.version, a.activated_at, a.activated_by) for a in store.saved] == [
        ("2027.1", T0 + DAY, "reviewer 7")
    ]
    assert store.scores == {"a" * 64: (1055, "AAA")}
    _, change = store.history[-1]
    assert (change.cause, change.changed_at, change.after.policy_version) == (POLICY, T0 + DAY, "2027.1")
    assert ledger.verify(10).mismatch_count == 0
    with pytest.raises(AlreadyExists):
        ledger.activate(proposed, doc, "reviewer 7")
    with pytest.raises(FailedPrecondition):
        ledger.activate(replace(proposed, version="2027.2"), doc, "reviewer 7", expected_current="2026.2")
    with pytest.raises(InvalidArgument):
        ledger.activate(replace(proposed, version="2027.3"), doc, " ")


def test_a_policy_that_shortens_visibility_rewrites_visible_until(
    ledger: Ledger, store: FakeStore, clock: Clock
) -> None:
    ledger.apply([outcome("g", -10, "general")])
    shorter = ScorePolicy(
        version="short",
        kinds={
            k: replace(p, version="short", visibility_days={**p.visibility_days, "general": 30}, caps=Caps())
            for k, p in SHIPPED.kinds.items()
        },
    )
    clock.now = T0 + timedelta(days=40)
    ledger.activate(shorter, "", "reviewer")
    assert store.entries[b"g".hex()].visible_until == T0 + timedelta(days=30)
    assert store.scores == {"a" * 64: (1000, "A")}
