"""Reads of scores, ledger entries, history and eligibility (pure domain).

A subject is named either by its raw identifier, hashed exactly as ingest hashes it
(the raw value goes no further than the hash), or by its subject key. During a key
rotation score's store may still hold a subject under the previous generation's key;
`Reader.subject_key` then reads with that one (docs/security.md, "Rotating the subject
key"). Entries are listed newest event time first with keyset pages (services.query.paging):
the page token carries the last (occurred_at, entry_id) seen, so pages stay stable while new
entries arrive.

Scores are exact at any instant without waiting for score's expiry sweep: the stored
row is served while the instant asked about lies before its `next_change_at` (nothing
has expired since it was computed) and under the active policy; otherwise the score is
recomputed from the ledger with the same pure function score uses, as of that instant
and under the policy in force then.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from domain.benefits import BenefitCatalogue, check
from domain.consent import Consent, may_serve
from domain.entries import LedgerEntry, ScoredEntry, View
from domain.intake import is_hex
from domain.policy import ActivatedPolicy, PolicyBook, ScorePolicy, SubjectPolicy
from domain.scoring import ScoreResult, compute_score
from kit import reasons
from kit.errors import FailedPrecondition, InvalidArgument, NotFound, Violation
from kit.page_tokens import PageTokens
from kit.pseudonym import CanonicalId, Pseudonymiser, check_subject
from services.query.paging import Cursor, decode_cursor, decode_token, encode_cursor, page_size
from services.query.read_models import (
    BenefitPage,
    ConsentView,
    Distribution,
    EligibilityView,
    EntryPage,
    HistoryPage,
    HistoryRow,
    RawDistribution,
    ScoreView,
    SubjectScore,
)
from services.query.subjects import SubjectKey, SubjectRef, current_key

_SUBJECT_KEY = re.compile(r"^[0-9a-f]{64}$")


class ScoreReadStore(Protocol):
    def score(self, subject_key: str) -> SubjectScore | None: ...

    def entries(self, subject_key: str, after: Cursor | None, limit: int) -> Sequence[LedgerEntry]:
        """Up to `limit` entries, newest occurred_at first then entry_id descending,
        strictly after `after` in that order."""
        ...

    def entry(self, entry_id: str) -> LedgerEntry | None: ...

    def scorable_entries(self, subject_key: str) -> Sequence[ScoredEntry]: ...

    def history(self, subject_key: str, before_id: int | None, limit: int) -> Sequence[HistoryRow]:
        """Up to `limit` history rows, newest first, with ids below `before_id`."""
        ...

    def distribution(self, kind: str | None) -> RawDistribution: ...

    def activations(self) -> Sequence[ActivatedPolicy]: ...

    def consent_at(self, subject_key: str, at: datetime) -> Consent | None:
        """The consent in force for the subject at `at` (one indexed lookup)."""
        ...

    def key_generation(self) -> tuple[str, bool] | None:
        """Score's generation marker (kit.rekey): the generation of the keys it stores and
        whether the move to it is complete; None when it has none (root generation keys)."""
        ...

    def holds(self, subject_key: str) -> bool:
        """Whether score holds a score for the subject (one primary-key probe)."""
        ...

    def activation_marks(self) -> Sequence[tuple[str, datetime]]:
        """(version, activated_at) of every activation: what tells, cheaply, whether the
        activations changed (policies are append-only, one row per version)."""
        ...


MAX_BATCH = 100
# How long a read trusts its cached copy of the activated policies before looking again;
# a stored row under an unknown version triggers a reload at once.
POLICY_CACHE_SECONDS = 5.0
# How long a read trusts its last look at score's key generation marker.
GENERATION_CACHE_SECONDS = 1.0


class Reader:
    """Answers reads of the score store on behalf of QueryService."""

    def __init__(
        self,
        *,
        store: ScoreReadStore,
        pseudonymiser: Pseudonymiser,
        policy: ScorePolicy,
        catalogue: BenefitCatalogue | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        tokens: PageTokens,
    ) -> None:
        self._store = store
        # Signs this service's page tokens (kit.page_tokens); the due-process reads use it too.
        self.tokens = tokens
        self._pseudonymiser = pseudonymiser
        # The policy file stands in until score has recorded its first activation.
        self._fallback = policy
        self._catalogue = catalogue or BenefitCatalogue({})
        self._clock = clock
        self._book: PolicyBook | None = None
        self._book_marks: tuple[tuple[str, datetime], ...] | None = None
        self._book_checked = 0.0
        self._lock = threading.Lock()
        # (when looked at, score's generation marker); replaced whole, so reads need no lock.
        self._generation: tuple[float, tuple[str, bool] | None] = (float("-inf"), None)

    def now(self) -> datetime:
        return self._clock()

    def _policies(self, version: str | None = None) -> PolicyBook:
        book = self._fresh_policies(version)
        if book is None:
            with self._lock:
                # Documents are parsed again only when the activations changed: parsing
                # every policy every few seconds stalled reads for milliseconds.
                marks = tuple(self._store.activation_marks())
                book = self._book
                if book is None or marks != self._book_marks:
                    activations = tuple(self._store.activations())
                    book = PolicyBook(activations) if activations else self._book_of_fallback()
                    self._book, self._book_marks = book, marks
                self._book_checked = time.monotonic()
        return book

    def _fresh_policies(self, version: str | None = None) -> PolicyBook | None:
        """The cached policies while they need no look at the store, else None."""
        book = self._book
        if book is None or time.monotonic() - self._book_checked > POLICY_CACHE_SECONDS:
            return None
        if version is not None and version not in book.versions():
            return None
        return book

    def _book_of_fallback(self) -> PolicyBook:
        return PolicyBook((ActivatedPolicy(self._fallback, datetime.min.replace(tzinfo=UTC), "", ""),))

    def _instant(self, as_of: datetime | None, field: str = "as_of") -> tuple[datetime, bool]:
        """The instant asked about and whether it is "now"."""
        now = self._clock()
        if as_of is None:
            return now, True
        if as_of > now:
            raise InvalidArgument(
                "invalid instant", [Violation(field, "must not be in the future", "OUT_OF_RANGE")]
            )
        return as_of, False

    def benefit_provider(self, benefit_id: str) -> str | None:
        """The provider id of a catalogued benefit, None when there is no such benefit."""
        benefit = self._catalogue.benefits.get(benefit_id)
        return None if benefit is None else benefit.provider_id

    @property
    def current_key_id(self) -> str:
        """The generation of the keys this instance hashes raw ids to."""
        return self._pseudonymiser.current_key_id

    def subject_key(self, ref: SubjectRef, field: str = "subject") -> str:
        """The key to read `ref`'s subject with; InvalidArgument listing every problem otherwise.

        A raw id is hashed to the current generation, unless score's store is not (or not
        yet wholly) of that generation and holds the subject only under the previous one's
        key: then to that key (a SubjectKey either way). Every read by raw id turns it into
        a key here; a subject_key is returned as given.
        """
        named = self._named(ref, field)
        if isinstance(named, str):
            return named
        # The current key, then the previous generation's (during a rotation).
        keys = tuple(key for _, key in reversed(self._generations(named)[-2:]))
        current = keys[0]
        if len(keys) == 1 or self._score_keys_current():
            return SubjectKey(current, current)
        previous = keys[1]
        if self._store.holds(current) or not self._store.holds(previous):
            return SubjectKey(current, current)
        return SubjectKey(previous, current)

    def recorded_keys(self, ref: SubjectRef, field: str = "subject") -> tuple[str, ...]:
        """The keys access records may name `ref`'s subject with: records keep the key they
        were written with, so a raw id's keys of every generation, or the key given."""
        named = self._named(ref, field)
        if isinstance(named, str):
            return (named,)
        return tuple(key for _, key in self._generations(named))

    def _generations(self, named: CanonicalId | tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """(key id, key) of every generation of a raw id's or a subject token's key."""
        if isinstance(named, tuple):
            return named
        return self._pseudonymiser.canonical_generation_keys(named)

    def same_subject(self, stored_key: str, current: str | None) -> bool:
        """Whether a key read from score's rows is of the subject whose current key is
        `current` (a subject's token): the same key or, while score still holds the subject
        under the previous generation, that generation's key of it."""
        chain = self._pseudonymiser
        return stored_key == current or (
            chain.previous_key_id is not None and chain.rekey(stored_key, chain.previous_key_id) == current
        )

    def _named(self, ref: SubjectRef, field: str) -> CanonicalId | str | tuple[tuple[str, str], ...]:
        """The raw id (checked and canonicalised once, as ingest does), subject key or token's
        keys `ref` names; InvalidArgument listing every problem."""
        if ref.subject_key is not None:
            if not _SUBJECT_KEY.match(ref.subject_key):
                raise InvalidArgument(
                    "invalid subject",
                    [Violation(f"{field}.subject_key", "must be 64 lower-case hex digits", "INVALID")],
                )
            return ref.subject_key
        if ref.own:
            return ref.own
        raw = ref.subject
        if raw is None:
            raise InvalidArgument(
                "invalid subject", [Violation(field, "needs a subject or a subject_key", "REQUIRED")]
            )
        problems, canonical = check_subject(raw.kind, raw.id_scheme, raw.id_value)
        if canonical is None:
            raise InvalidArgument("invalid subject", [v.prefixed(field) for v in problems])
        return canonical

    def _score_keys_current(self) -> bool:
        """Whether score's marker says every key it stores is of this instance's current
        generation (looked at once per GENERATION_CACHE_SECONDS at most)."""
        checked_at, marker = self._generation
        now = time.monotonic()
        if now - checked_at > GENERATION_CACHE_SECONDS:
            marker = self._store.key_generation()
            self._generation = (now, marker)
        return marker == (self._pseudonymiser.current_key_id, True)

    def score(self, ref: SubjectRef, as_of: datetime | None = None, view: View = View.AS_KNOWN) -> ScoreView:
        key = self.subject_key(ref)
        when, now = self._instant(as_of)
        found = self._score_of(key, when, now, view)
        if found is None:
            raise NotFound("no score is held for this subject" + ("" if now else " at as_of"))
        return found

    def batch(
        self, refs: Sequence[SubjectRef], as_of: datetime | None = None, view: View = View.AS_KNOWN
    ) -> list[ScoreView | None]:
        """Scores in request order. A subject without the consent a policy requires fails
        the whole batch (FAILED_PRECONDITION naming its positions): found = false would
        read as "no entries", and leaving it out would still tell the caller it exists."""
        if not 1 <= len(refs) <= MAX_BATCH:
            raise InvalidArgument(
                "invalid batch",
                [Violation("subjects", f"must hold 1 to {MAX_BATCH} subjects", "OUT_OF_RANGE")],
            )
        keys: list[str] = []
        problems: list[Violation] = []
        for i, ref in enumerate(refs):
            try:
                keys.append(self.subject_key(ref, f"subjects[{i}]"))
            except InvalidArgument as exc:
                problems += exc.violations
        if problems:
            raise InvalidArgument("invalid subjects", problems)
        when, now = self._instant(as_of)
        views: list[ScoreView | None] = []
        refused: list[int] = []
        for i, key in enumerate(keys):
            try:
                views.append(self._score_of(key, when, now, view))
            except FailedPrecondition:
                refused.append(i)
        if refused:
            raise FailedPrecondition(
                f"{len(refused)} of the {len(keys)} subjects (at positions "
                f"{', '.join(map(str, refused))}) have not given the consent the score policy "
                "requires; no score is served for them",
                reasons.CONSENT_REQUIRED,
                {"as_of": when.isoformat(), "positions": ",".join(map(str, refused))},
            )
        return views

    def current_score(self, ref: SubjectRef) -> ScoreView | None:
        """The score now when its stored row answers at once: one point read of the store,
        no policy reload, no recompute. None when the answer needs more (an expiry passed,
        a policy changed, no row, the cached policies are due a look): `score` gives it.

        Cheap enough to run on the event loop when the store is local (SQLite)."""
        key = self.subject_key(ref)
        book = self._fresh_policies()
        if book is None:
            return None
        stored = self._store.score(key)
        if stored is None or stored.policy_version not in book.versions():
            return None
        return self._as_stored(stored, book, self._clock())

    def _score_of(
        self, key: str, when: datetime, now: bool, timeline: View = View.AS_KNOWN
    ) -> ScoreView | None:
        stored = self._store.score(key)
        if stored is None:
            return None
        book = self._policies(stored.policy_version)
        if now:
            view = self._as_stored(stored, book, when)
            if view is not None:
                return view
        policy = book.at(when).for_kind(stored.subject_kind)
        self.require_consent(policy, key, when)
        # Past instant, or something expired since the row was computed: score it exactly.
        entries = self._store.scorable_entries(key)
        if timeline is View.AS_CORRECTED:
            # Now, both timelines agree (every reversal so far has taken effect); at a past
            # instant, void entries never counted and entries count from their event time.
            if not any(e.occurred_at <= when and not e.void for e in entries):
                return None
        elif not any(e.recorded_at <= when for e in entries):
            return None
        result = compute_score(entries, policy, when, view=timeline)
        return ScoreView(score=_subject_score(key, stored.subject_kind, result), base_score=policy.base)

    def _as_stored(self, stored: SubjectScore, book: PolicyBook, now: datetime) -> ScoreView | None:
        """The stored row as the score at `now`, or None when it is not that score: computed
        under another policy than the active one, or something expired since (the row's
        `next_change_at` has passed)."""
        policy = book.at(now).for_kind(stored.subject_kind)
        self.require_consent(policy, stored.subject_key, now)
        fresh = stored.next_change_at is None or now < stored.next_change_at
        if fresh and stored.policy_version == book.active.version and stored.as_of <= now:
            return ScoreView(score=stored, base_score=policy.base)
        return None

    def require_consent(self, policy: SubjectPolicy, key: str, when: datetime) -> None:
        """FAILED_PRECONDITION when `policy` requires consent and the subject's consent in
        force at `when` is not granted. Free when the policy does not require it; else one
        indexed lookup."""
        if policy.consent_required and not may_serve(True, self._store.consent_at(key, when)):
            raise FailedPrecondition(
                "the score policy requires the subject's consent to serve a score, and the subject "
                f"has not given it (as of {when.isoformat()}); their events are still recorded",
                reasons.CONSENT_REQUIRED,
                {"as_of": when.isoformat()},
            )

    def consent(self, ref: SubjectRef, as_of: datetime | None = None) -> ConsentView:
        """The consent in force for `ref`'s subject at `as_of` (now by default). Never
        refused for want of consent: this read is how a subject learns it has none."""
        key = self.subject_key(ref)
        when, _ = self._instant(as_of)
        named = self._named(ref, "subject")
        stored = self._store.score(key)
        kind = stored.subject_kind if stored is not None else getattr(named, "kind", None)
        policy = self._policies().at(when)
        required = kind is not None and policy.for_kind(kind).consent_required
        return ConsentView(self._store.consent_at(key, when), required, when, policy.version)

    def policies(self) -> PolicyBook:
        """Every activated policy (cached), for reads that score themselves."""
        return self._policies()

    def history(self, ref: SubjectRef, requested_page_size: int, page_token: str) -> HistoryPage:
        key = self.subject_key(ref)
        size = page_size(requested_page_size)
        binding = {"method": "ListScoreHistory", "subject_key": current_key(key), "as_corrected": False}
        before = decode_token(self.tokens, page_token, int, bound_to=binding)
        stored = self._store.score(key)
        if stored is None:
            raise NotFound("no score is held for this subject")
        now = self._clock()
        self.require_consent(self._policies().at(now).for_kind(stored.subject_kind), key, now)
        rows = self._store.history(key, before, size + 1)
        page = tuple(rows[:size])
        token = self.tokens.encode(page[-1].history_id, bound_to=binding) if len(rows) > size else ""
        return HistoryPage(page, token)

    def distribution(self, kind: str | None) -> Distribution:
        raw = self._store.distribution(kind)
        policy = self._policies().active
        by_category: dict[tuple[str, str, str], int] = {}
        for k, category, points, count in raw.category_points:
            p = policy.for_kind(k)
            key = (category, k, p.tier_of(p.clamp(p.base + points)))
            by_category[key] = by_category.get(key, 0) + count
        return Distribution(
            by_kind={(k, t): n for k, t, n in raw.tiers},
            by_category=dict(sorted(by_category.items())),
            lists={(k, name): n for k, name, n in raw.lists},
        )

    def eligibility(self, ref: SubjectRef, benefit_id: str, as_of: datetime | None = None) -> EligibilityView:
        problems = []
        if not benefit_id:
            problems.append(Violation("benefit_id", "is required", "REQUIRED"))
        try:
            key = self.subject_key(ref)
        except InvalidArgument as exc:
            problems = list(exc.violations) + problems
        if problems:
            raise InvalidArgument("invalid request", problems)
        when, _ = self._instant(as_of)
        benefit = self._catalogue.benefits.get(benefit_id)
        if benefit is None:
            raise NotFound(f"no benefit {benefit_id!r}")
        stored = self._store.score(key)
        entries = self._store.scorable_entries(key) if stored is not None else []
        if stored is None or not any(e.recorded_at <= when for e in entries):
            raise NotFound("no score is held for this subject" + ("" if as_of is None else " at as_of"))
        book = self._policies(stored.policy_version)
        policy = book.at(when).for_kind(stored.subject_kind)
        self.require_consent(policy, key, when)
        bound = compute_score(entries, policy, when, categories=benefit.considers)
        result = check(benefit, stored.subject_kind, policy, bound)
        return EligibilityView(benefit, result, when, policy.version)

    def benefits(self, requested_page_size: int, page_token: str) -> BenefitPage:
        size = page_size(requested_page_size)
        binding = {"method": "ListBenefits"}
        after = decode_token(self.tokens, page_token, str, bound_to=binding) or ""
        rest = [b for b in self._catalogue.ordered() if b.benefit_id > after]
        page = tuple(rest[:size])
        more = len(rest) > size
        return BenefitPage(page, self.tokens.encode(page[-1].benefit_id, bound_to=binding) if more else "")

    def entries(self, ref: SubjectRef, requested_page_size: int, page_token: str) -> EntryPage:
        key = self.subject_key(ref)
        size = page_size(requested_page_size)
        binding = {"method": "ListEntries", "subject_key": current_key(key)}
        after = decode_cursor(self.tokens, page_token, bound_to=binding)
        # One extra row tells whether another page follows without a count query.
        rows = self._store.entries(key, after, size + 1)
        page = tuple(rows[:size])
        token = ""
        if len(rows) > size:
            last = Cursor(page[-1].occurred_at, page[-1].entry_id)
            token = encode_cursor(self.tokens, last, bound_to=binding)
        return EntryPage(entries=page, next_page_token=token)

    def entry(self, entry_id: str) -> LedgerEntry:
        if not entry_id:
            raise InvalidArgument("invalid request", [Violation("entry_id", "is required", "REQUIRED")])
        # An id no outcome has (not hex) is unknown without asking the store, which keeps
        # entry ids as bytes (contracts.score_store).
        found = self._store.entry(entry_id) if is_hex(entry_id) else None
        if found is None:
            raise NotFound(f"no ledger entry {entry_id!r}")
        return found


def _subject_score(key: str, kind: str, result: ScoreResult) -> SubjectScore:
    assert result.as_of is not None
    return SubjectScore(
        subject_key=key,
        subject_kind=kind,
        score=result.score,
        tier=result.tier,
        categories=result.categories,
        as_of=result.as_of,
        policy_version=result.policy_version,
        entry_count=result.entry_count,
        lists=result.lists,
        next_change_at=result.next_change_at,
    )
