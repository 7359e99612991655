"""A deterministic synthetic population for the demo, the benchmark and end to end tests.

DOMAIN.md's last paragraph: subjects (90% persons), a Zipf-like spread of events per
subject, mostly positive and minor events, rare serious ones, two years of event time,
with duplicates and late arrivals. Everything is derived from the seed, so the same
configuration always yields the same stream, event for event.

The stream is generated a chunk of subjects at a time, so memory stays bounded however
many subjects are asked for. Within a chunk, events come out in event-time order, the
way a department's feed would send them; a late arrival keeps its place in the stream
but carries an event time up to `late_max_days` earlier, so it lands behind events that
happened after it. A duplicate is the same (source, event) sent again a few thousand
events later, as a department's retry would.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from domain.catalogue import AttributeSpec, Catalogue, EventType, load_catalogue
from egret.common.v1 import event_pb2, subject_pb2
from egret.ingest.v1 import ingest_service_pb2
from kit.pseudonym import USCC_ALPHABET, resident_id_check_character, uscc_check_character

PERSON = "person"
ORGANIZATION = "organization"
_KIND_VALUES = {PERSON: subject_pb2.SUBJECT_KIND_PERSON, ORGANIZATION: subject_pb2.SUBJECT_KIND_ORGANIZATION}

DEFAULT_CATALOGUE = Path(__file__).resolve().parents[1] / "config" / "catalogue.yaml"
# A fixed "now" keeps tests reproducible; the demo and the benchmark pass today instead,
# so that their entries are still visible under the policy's periods.
DEFAULT_NOW = datetime(2026, 11, 1, tzinfo=UTC)

# Relative frequency of each event type: mostly positive and minor, serious ones rare.
# A catalogue type missing here still appears, at DEFAULT_TYPE_WEIGHT.
TYPE_WEIGHTS: Mapping[str, float] = {
    "transport.bike.parked_in_fence": 30.0,
    "library.book_returned": 18.0,
    "transport.bike.parked_outside_fence": 12.0,
    "commerce.inspection_passed": 12.0,
    "traffic.red_light": 8.0,
    "library.book_returned_late": 7.0,
    "civic.volunteer_hours": 6.0,
    "finance.tax_paid_on_time": 5.0,
    "utility.bill_arrears": 3.0,
    "transport.metro.fare_evasion": 3.0,
    "civic.blood_donation": 2.0,
    "finance.tax_arrears": 1.5,
    "commerce.food_safety_violation": 1.5,
    "finance.loan_default": 1.0,
    "traffic.drunk_driving": 0.3,
    "legal.judgment_defaulter": 0.2,
    "utility.theft": 0.2,
    "civic.public_property_damage": 0.2,
}
DEFAULT_TYPE_WEIGHT = 1.0

_PERSON_REGIONS = ("350203", "350206", "350211", "350102", "310101", "110105", "440305", "330106")
_STATIONS = (
    "Lianban",
    "Wenzao",
    "Lucuo",
    "Zhenhai Road",
    "Gaoqi Airport",
    "Xiamen North",
    "Jimei",
    "Haicang",
)
# Xiamen's districts, for the optional cohort attribute `district`.
_DISTRICTS = ("Siming", "Huli", "Jimei", "Haicang", "Tong'an", "Xiang'an")
_BIRTH_START = datetime(1940, 1, 1, tzinfo=UTC)
_BIRTH_DAYS = 24_837  # up to 2007-12-31: every synthetic person is an adult


@dataclass(frozen=True)
class SyntheticSubject:
    """One synthetic subject. Its raw id is made up, but treat it like a real one: don't log it."""

    index: int
    kind: str
    id_scheme: str
    id_value: str

    def proto(self) -> subject_pb2.Subject:
        return subject_pb2.Subject(
            kind=_KIND_VALUES[self.kind], id_scheme=self.id_scheme, id_value=self.id_value
        )


class Origin(Enum):
    """Why an event is in the stream; lets tests and tools tell resends and garbage apart."""

    ORIGINAL = "original"
    DUPLICATE = "duplicate"
    INVALID = "invalid"


@dataclass(frozen=True)
class GeneratedEvent:
    source: str
    event: ingest_service_pb2.Event
    origin: Origin
    subject_index: int
    late: bool = False


@dataclass(frozen=True)
class PopulationConfig:
    subjects: int = 10_000
    seed: int = 1
    person_fraction: float = 0.9
    now: datetime = DEFAULT_NOW
    span_days: int = 730
    # Tail exponent of the events-per-subject distribution: ~1.3 gives a mean near 4
    # events, most subjects with 1 or 2 and a few with hundreds.
    zipf_alpha: float = 1.3
    max_events_per_subject: int = 300
    # Chance that an event lands close to one of the subject's earlier events, so that
    # window rules ("3 times in 30 days") have something to find.
    clustering: float = 0.35
    duplicate_fraction: float = 0.02
    late_fraction: float = 0.03
    late_max_days: int = 60
    evidence_fraction: float = 0.5
    invalid_events: int = 0
    chunk_subjects: int = 1000
    # Stop after this many events in all (originals, duplicates and invalid ones).
    max_events: int | None = None

    def __post_init__(self) -> None:
        if self.subjects < 1:
            raise ValueError("subjects must be at least 1")
        for name in (
            "person_fraction",
            "clustering",
            "duplicate_fraction",
            "late_fraction",
            "evidence_fraction",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]")
        if self.now.tzinfo is None:
            raise ValueError("now must be timezone-aware")


@dataclass
class _Skeleton:
    """An event before it gets its id: enough to sort a chunk by event time."""

    occurred_at: datetime
    subject: SyntheticSubject
    type_spec: EventType
    source: str
    attributes: dict[str, event_pb2.AttributeValue]
    with_evidence: bool


@dataclass(order=True)
class _Scheduled:
    due: int
    seq: int
    item: GeneratedEvent = field(compare=False)


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def _person_id(index: int, seed: int) -> str:
    # A bijection from the index, so ids never collide however many subjects there are:
    # the last three digits and the region split the index, the birth date takes the rest
    # (shifted by the last digits, which stay injective for each, so dates spread out).
    sequence = index % 1000
    rest = index // 1000
    region = _PERSON_REGIONS[rest % len(_PERSON_REGIONS)]
    day = (rest // len(_PERSON_REGIONS) * 7919 + sequence * 131 + seed * 104_729) % _BIRTH_DAYS
    birth = (_BIRTH_START + timedelta(days=day)).strftime("%Y%m%d")
    body = f"{region}{birth}{sequence:03d}"
    # The national check character (one id in eleven ends in "X"): ingest refuses any other.
    return body + resident_id_check_character(body)


def _uscc(index: int, seed: int) -> str:
    region = _PERSON_REGIONS[index % len(_PERSON_REGIONS)]
    base = len(USCC_ALPHABET)
    # 1_000_003 is coprime to 31**9, so the index maps to distinct organization codes.
    code_number = (index * 1_000_003 + seed * 7919) % base**9
    code = ""
    for _ in range(9):
        code_number, digit = divmod(code_number, base)
        code = USCC_ALPHABET[digit] + code
    body = f"91{region}{code}"
    return body + uscc_check_character(body)


def _clamp(value: float, spec: AttributeSpec) -> float:
    if spec.minimum is not None:
        value = max(value, spec.minimum)
    if spec.maximum is not None:
        value = min(value, spec.maximum)
    return value


def _int_value(spec: AttributeSpec, rng: random.Random) -> int:
    # Named attributes get shapes that straddle the sample rules' thresholds
    # (days_late > 30, days_overdue > 90, months >= 3, score >= 90, per 10 hours).
    shapes: dict[str, tuple[float, int, int, int, int]] = {
        "days_late": (0.7, 1, 30, 31, 120),
        "days_overdue": (0.6, 1, 90, 91, 365),
        "months": (0.6, 1, 2, 3, 12),
        "score": (0.3, 60, 89, 90, 100),
        "hours": (0.5, 1, 9, 10, 40),
        "minutes": (0.8, 5, 120, 121, 1440),
    }
    if spec.name in shapes:
        low_share, a, b, c, d = shapes[spec.name]
        value = rng.randint(a, b) if rng.random() < low_share else rng.randint(c, d)
    elif spec.name == "ml":
        value = rng.choice((200, 300, 400))
    else:
        lo = int(spec.minimum) if spec.minimum is not None else 0
        hi = int(spec.maximum) if spec.maximum is not None else lo + 1000
        value = rng.randint(lo, min(hi, lo + 1000))
    return int(_clamp(value, spec))


def _double_value(spec: AttributeSpec, rng: random.Random) -> float:
    if spec.name == "amount":
        value = round(rng.lognormvariate(4.0, 1.3), 2)
    elif spec.name == "bac":
        value = round(rng.uniform(20.0, 160.0), 1)
    else:
        lo = spec.minimum if spec.minimum is not None else 0.0
        hi = spec.maximum if spec.maximum is not None else lo + 1000.0
        value = round(rng.uniform(lo, min(hi, lo + 1000.0)), 3)
    return _clamp(value, spec)


def _string_value(spec: AttributeSpec, rng: random.Random, occurred_at: datetime) -> str:
    if spec.enum:
        # "major" food-safety findings are the rare, serious case.
        weights = [0.2 if v == "major" else 1.0 for v in spec.enum]
        return rng.choices(spec.enum, weights)[0]
    if spec.name == "fence_id":
        value = f"fence-{rng.randrange(2000):04d}"
    elif spec.name == "station":
        value = rng.choice(_STATIONS)
    elif spec.name == "district":
        value = rng.choice(_DISTRICTS)
    elif spec.name == "camera_id":
        value = f"cam-{rng.randrange(500):03d}"
    elif spec.name == "case_id":
        value = f"({occurred_at.year})-exec-{rng.randrange(100_000):05d}"
    else:
        value = f"{spec.name}-{rng.randrange(10_000)}"
    return value[: spec.max_length]


def attribute_value(
    spec: AttributeSpec, rng: random.Random, occurred_at: datetime
) -> event_pb2.AttributeValue:
    """A valid value for `spec`: the catalogue's type, inside its range or enum."""
    if spec.type == "int":
        return event_pb2.AttributeValue(int_value=_int_value(spec, rng))
    if spec.type == "double":
        return event_pb2.AttributeValue(double_value=_double_value(spec, rng))
    if spec.type == "bool":
        # Mostly on time: the late returns are the interesting minority.
        return event_pb2.AttributeValue(bool_value=rng.random() < (0.85 if spec.name == "on_time" else 0.5))
    if spec.type == "timestamp":
        return event_pb2.AttributeValue(
            timestamp_value=_timestamp(occurred_at - timedelta(days=rng.uniform(0, 30)))
        )
    if spec.type == "string":
        return event_pb2.AttributeValue(string_value=_string_value(spec, rng, occurred_at))
    raise ValueError(f"attribute {spec.name}: unknown type {spec.type!r}")


class Population:
    """A seeded synthetic population and its event stream.

    `generate()` can be called repeatedly and yields the same stream each time. While it
    runs it remembers the busiest subjects, so a demo can look one up afterwards.
    """

    def __init__(self, config: PopulationConfig | None = None, catalogue: Catalogue | None = None) -> None:
        self.config = config or PopulationConfig()
        self.catalogue = catalogue or load_catalogue(DEFAULT_CATALOGUE)
        self._types_by_kind = {
            kind: [t for t in self.catalogue.event_types.values() if kind in t.subject_kinds]
            for kind in (PERSON, ORGANIZATION)
        }
        self._weights_by_kind = {
            kind: [TYPE_WEIGHTS.get(t.name, DEFAULT_TYPE_WEIGHT) for t in types]
            for kind, types in self._types_by_kind.items()
        }
        self._busiest: list[tuple[int, int]] = []

    def subject(self, index: int) -> SyntheticSubject:
        if not 0 <= index < self.config.subjects:
            raise IndexError(index)
        rng = self._subject_rng(index)
        if rng.random() < self.config.person_fraction:
            return SyntheticSubject(index, PERSON, "resident-id", _person_id(index, self.config.seed))
        return SyntheticSubject(index, ORGANIZATION, "uscc", _uscc(index, self.config.seed))

    def busiest_subjects(self, count: int = 5) -> list[SyntheticSubject]:
        """The subjects with the most events in the last full run of `generate()`, most first."""
        ranked = sorted(self._busiest, reverse=True)[:count]
        return [self.subject(index) for _, index in ranked]

    def events(self) -> Iterator[tuple[str, ingest_service_pb2.Event]]:
        for item in self.generate():
            yield item.source, item.event

    def generate(self) -> Iterator[GeneratedEvent]:
        config = self.config
        stream_rng = random.Random(f"egret-population/{config.seed}/stream")
        pending: list[_Scheduled] = []
        busiest: list[tuple[int, int]] = []
        invalid = self._invalid_events()
        invalid_left = config.invalid_events
        emitted = 0
        serial = 0

        def limit_reached() -> bool:
            return config.max_events is not None and emitted >= config.max_events

        for first in range(0, config.subjects, config.chunk_subjects):
            chunk: list[_Skeleton] = []
            for index in range(first, min(first + config.chunk_subjects, config.subjects)):
                skeletons = self._subject_events(index)
                chunk.extend(skeletons)
                heapq.heappush(busiest, (len(skeletons), -index))
                if len(busiest) > 20:
                    heapq.heappop(busiest)
            self._busiest = [(count, -negative) for count, negative in busiest]
            chunk.sort(key=lambda s: s.occurred_at)
            for skeleton in chunk:
                while pending and pending[0].due <= emitted:
                    if limit_reached():
                        return
                    yield heapq.heappop(pending).item
                    emitted += 1
                # Garbage is spread through the stream rather than bunched in one batch.
                if invalid_left and emitted > 0 and emitted % 997 == 0:
                    if limit_reached():
                        return
                    yield next(invalid)
                    emitted += 1
                    invalid_left -= 1
                if limit_reached():
                    return
                late = stream_rng.random() < config.late_fraction
                if late:
                    skeleton.occurred_at = max(
                        config.now - timedelta(days=config.span_days),
                        skeleton.occurred_at - timedelta(days=stream_rng.uniform(1, config.late_max_days)),
                    )
                serial += 1
                item = self._materialise(skeleton, serial, late)
                yield item
                emitted += 1
                if stream_rng.random() < config.duplicate_fraction:
                    resend = GeneratedEvent(item.source, item.event, Origin.DUPLICATE, item.subject_index)
                    heapq.heappush(
                        pending, _Scheduled(emitted + stream_rng.randint(200, 5000), serial, resend)
                    )
        for leftover in itertools.chain((heapq.heappop(pending).item for _ in range(len(pending))), invalid):
            if limit_reached():
                return
            yield leftover
            emitted += 1

    def _subject_rng(self, index: int) -> random.Random:
        # String seeds hash with SHA-512, so streams are stable across processes and
        # Python versions, unlike hash()-based seeding.
        return random.Random(f"egret-population/{self.config.seed}/subject/{index}")

    def _subject_events(self, index: int) -> list[_Skeleton]:
        config = self.config
        subject = self.subject(index)
        rng = self._subject_rng(index)
        rng.random()  # the draw subject() used for the kind
        count = min(config.max_events_per_subject, int(rng.paretovariate(config.zipf_alpha)))
        types = self._types_by_kind[subject.kind]
        weights = self._weights_by_kind[subject.kind]
        # A subject's habits: a favourite type or two recur far more than the city average.
        favourites = rng.choices(types, weights, k=rng.randint(1, 2))
        span = config.span_days * 86_400
        start = config.now - timedelta(seconds=span)
        offsets: list[float] = []
        skeletons = []
        for _ in range(count):
            if offsets and rng.random() < config.clustering:
                anchor = rng.choice(offsets)
                offset = min(span - 1.0, max(0.0, anchor + rng.uniform(-20, 20) * 86_400))
            else:
                offset = rng.uniform(0, span - 1.0)
            offsets.append(offset)
            occurred_at = (start + timedelta(seconds=offset)).replace(microsecond=0)
            type_spec = rng.choice(favourites) if rng.random() < 0.4 else rng.choices(types, weights)[0]
            attributes = {
                spec.name: attribute_value(spec, rng, occurred_at)
                for spec in type_spec.attributes.values()
                if spec.required or rng.random() < 0.7
            }
            skeletons.append(
                _Skeleton(
                    occurred_at=occurred_at,
                    subject=subject,
                    type_spec=type_spec,
                    source=rng.choice(sorted(type_spec.departments)),
                    attributes=attributes,
                    with_evidence=rng.random() < config.evidence_fraction,
                )
            )
        return skeletons

    def _event_id(self, serial: int) -> str:
        # The seed is part of the id so that streams of different seeds can share a database.
        return f"ev-{self.config.seed}-{serial:010d}"

    def _materialise(self, skeleton: _Skeleton, serial: int, late: bool) -> GeneratedEvent:
        event_id = self._event_id(serial)
        event = ingest_service_pb2.Event(
            event_id=event_id,
            event_type=skeleton.type_spec.name,
            subject=skeleton.subject.proto(),
            occurred_at=_timestamp(skeleton.occurred_at),
            attributes=skeleton.attributes,
            evidence_uri=(
                f"https://records.{skeleton.source}.example.invalid/events/{event_id}"
                if skeleton.with_evidence
                else ""
            ),
        )
        return GeneratedEvent(skeleton.source, event, Origin.ORIGINAL, skeleton.subject.index, late)

    def _invalid_events(self) -> Iterator[GeneratedEvent]:
        """Deliberate garbage, one of each kind in turn: what a sloppy department sends."""
        config = self.config
        person = next(
            (self.subject(i) for i in range(config.subjects) if self.subject(i).kind == PERSON),
            self.subject(0),
        )
        organization = next(
            (self.subject(i) for i in range(config.subjects) if self.subject(i).kind == ORGANIZATION), person
        )
        occurred_at = _timestamp(config.now - timedelta(days=3))

        def value(**kwargs: Any) -> event_pb2.AttributeValue:
            return event_pb2.AttributeValue(**kwargs)

        templates: list[tuple[str, str, SyntheticSubject, dict[str, event_pb2.AttributeValue], bool]] = [
            ("library", "library.book_returned_late", person, {"days_late": value(int_value=0)}, True),
            (
                "market-regulator",
                "commerce.food_safety_violation",
                organization,
                {"level": value(string_value="catastrophic")},
                True,
            ),
            (
                "transport-bureau",
                "transport.bike.teleported",
                person,
                {"fence_id": value(string_value="f-1")},
                True,
            ),
            ("market-regulator", "commerce.inspection_passed", person, {"score": value(int_value=95)}, True),
            ("traffic-police", "traffic.red_light", person, {}, True),
            ("library", "library.book_returned", person, {"on_time": value(bool_value=True)}, False),
            ("library", "traffic.red_light", person, {"camera_id": value(string_value="cam-001")}, True),
        ]
        for number in range(config.invalid_events):
            source, event_type, subject, attributes, with_time = templates[number % len(templates)]
            event = ingest_service_pb2.Event(
                event_id=f"bad-{config.seed}-{number:06d}",
                event_type=event_type,
                subject=subject.proto(),
                attributes=attributes,
            )
            if with_time:
                event.occurred_at.CopyFrom(occurred_at)
            yield GeneratedEvent(source, event, Origin.INVALID, subject.index)


def expected_mean_events(config: PopulationConfig) -> float:
    """Mean events per subject in the stream, for sizing a population to a target event count."""
    # E[min(cap, floor(X))] for X ~ Pareto(alpha) is the tail sum of P(X >= k) = k**-alpha.
    tail = math.fsum(math.pow(k, -config.zipf_alpha) for k in range(1, config.max_events_per_subject + 1))
    return tail * (1 + config.duplicate_fraction)


def subjects_for_events(events: int, config: PopulationConfig | None = None) -> int:
    """How many subjects yield at least `events` events, with a margin, for --events options."""
    return max(1, math.ceil(events / expected_mean_events(config or PopulationConfig()) * 1.15))


def batch_requests(
    events: Iterable[tuple[str, ingest_service_pb2.Event]],
    *,
    batch_size: int = 500,
    max_linger: int | None = None,
    batch_prefix: str = "b",
) -> Iterator[ingest_service_pb2.StreamEventsRequest]:
    """Group a stream of (source, event) into one-source StreamEventsRequest batches.

    A source's batch goes out when full, or once `max_linger` events of other sources have
    passed since its first event (default 20 batches' worth), so a quiet department's
    events are not held back until the end of the stream.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    linger = max_linger if max_linger is not None else 20 * batch_size
    buffers: dict[str, list[ingest_service_pb2.Event]] = {}
    opened_at: dict[str, int] = {}
    counter = 0

    def flush(source: str) -> ingest_service_pb2.StreamEventsRequest:
        nonlocal counter
        counter += 1
        opened_at.pop(source, None)
        return ingest_service_pb2.StreamEventsRequest(
            source=source, batch_id=f"{batch_prefix}{counter:08d}", events=buffers.pop(source)
        )

    for position, (source, event) in enumerate(events, start=1):
        buffer = buffers.setdefault(source, [])
        if not buffer:
            opened_at[source] = position
        buffer.append(event)
        if len(buffer) >= batch_size:
            yield flush(source)
        for stale in [s for s, opened in opened_at.items() if position - opened >= linger]:
            yield flush(stale)
    for source in list(buffers):
        if buffers[source]:
            yield flush(source)
