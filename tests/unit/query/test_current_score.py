"""The read the event loop may serve at once: the stored row, only while it is the score
now (nothing expired since it was computed, computed under the active policy)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from domain.entries import EntryStatus, ScoredEntry
from domain.policy import ActivatedPolicy, load_policy
from kit.page_tokens import PageTokens
from kit.pseudonym import Pseudonymiser
from services.query.domain import Reader
from services.query.read_models import SubjectScore
from services.query.subjects import SubjectRef

POLICY = load_policy(Path(__file__).parents[3] / "config" / "policy.yaml")
NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
KEY = "a" * 64
ACTIVATED = ActivatedPolicy(POLICY, NOW - timedelta(days=400), "admin", "")


class FakeStore:
    def __init__(self, row: SubjectScore) -> None:
        self.row = row
        self.entries_read = 0
        self.activations_read = 0
        self.marks = [(POLICY.version, ACTIVATED.activated_at)]

    def score(self, subject_key: str) -> SubjectScore | None:
        return self.row if subject_key == self.row.subject_key else None

    def scorable_entries(self, subject_key: str) -> Sequence[ScoredEntry]:
        self.entries_read += 1
        occurred = NOW - timedelta(days=200)
        return [ScoredEntry("e1", 5, "civic", "positive", EntryStatus.ACTIVE, occurred, occurred)]

    def activations(self) -> Sequence[ActivatedPolicy]:
        self.activations_read += 1
        return [ACTIVATED]

    def activation_marks(self) -> Sequence[tuple[str, datetime]]:
        return self.marks


def row(next_change_at: datetime | None) -> SubjectScore:
    return SubjectScore(
        subject_key=KEY,
        subject_kind="person",
        score=POLICY.for_kind("person").base + 5,
        tier="stored",
        categories=(),
        as_of=NOW - timedelta(hours=1),
        policy_version=POLICY.version,
        entry_count=1,
        next_change_at=next_change_at,
    )


def reader(store: FakeStore) -> Reader:
    return Reader(
        store=store,  # type: ignore[arg-type]
        pseudonymiser=Pseudonymiser(b"k" * 32, "k1"),
        policy=POLICY,
        clock=lambda: NOW,
        tokens=PageTokens.development(),
    )


def test_a_current_row_is_served_as_stored_without_a_recompute() -> None:
    store = FakeStore(row(NOW + timedelta(days=1)))
    r = reader(store)
    r.score(SubjectRef(subject_key=KEY))  # loads the policies
    view = r.current_score(SubjectRef(subject_key=KEY))
    assert view is not None
    assert view.score.tier == "stored"
    assert store.entries_read == 0


def test_a_row_whose_next_change_has_passed_is_left_to_the_full_read_which_recomputes() -> None:
    store = FakeStore(row(NOW - timedelta(seconds=1)))
    r = reader(store)
    r.score(SubjectRef(subject_key=KEY))
    assert r.current_score(SubjectRef(subject_key=KEY)) is None
    recomputed = r.score(SubjectRef(subject_key=KEY))
    assert recomputed.score.tier != "stored"
    assert store.entries_read == 2


def test_nothing_is_served_inline_before_the_policies_are_loaded() -> None:
    store = FakeStore(row(None))
    assert reader(store).current_score(SubjectRef(subject_key=KEY)) is None


def test_policies_are_parsed_again_only_when_the_activations_changed() -> None:
    store = FakeStore(row(None))
    r = reader(store)
    r.score(SubjectRef(subject_key=KEY))
    r._book_checked = 0.0  # the cache is due a look at the store
    r.score(SubjectRef(subject_key=KEY))
    assert store.activations_read == 1
    store.marks = [*store.marks, ("v-next", NOW)]
    r._book_checked = 0.0
    r.score(SubjectRef(subject_key=KEY))
    assert store.activations_read == 2
