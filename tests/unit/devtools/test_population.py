"""The synthetic population: deterministic, valid per the catalogue, and streamed."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import timedelta

import pytest

from devtools.population import (
    DEFAULT_CATALOGUE,
    ORGANIZATION,
    PERSON,
    GeneratedEvent,
    Origin,
    Population,
    PopulationConfig,
    batch_requests,
    subjects_for_events,
)
from domain.catalogue import Catalogue, load_catalogue
from egret.common.v1 import subject_pb2
from kit.protoconv import to_datetime
from kit.pseudonym import canonical_value, subject_violations
from services.ingest.servicer import incoming

SMALL = PopulationConfig(subjects=1500, seed=7, chunk_subjects=400)


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return load_catalogue(DEFAULT_CATALOGUE)


@pytest.fixture(scope="module")
def generated(catalogue: Catalogue) -> tuple[Population, list[GeneratedEvent]]:
    population = Population(SMALL, catalogue)
    return population, list(population.generate())


@pytest.fixture(scope="module")
def stream(generated: tuple[Population, list[GeneratedEvent]]) -> list[GeneratedEvent]:
    return generated[1]


def _violations(item: GeneratedEvent, catalogue: Catalogue, config: PopulationConfig) -> list[str]:
    """What ingest would object to, plus whether the event lies in the population's two years."""
    problems = [
        f"{v.field}: {v.description}"
        for v in catalogue.validate(
            item.source,
            incoming(item.event),
            now=config.now,
            max_skew=timedelta(0),
            max_age=timedelta(days=config.span_days + config.late_max_days),
        )
    ]
    if item.event.HasField("occurred_at") and to_datetime(item.event.occurred_at) < config.now - timedelta(
        days=config.span_days
    ):
        problems.append("occurred_at before the two years of the population")
    return problems


def test_the_same_seed_yields_the_same_stream(catalogue: Catalogue, stream: list[GeneratedEvent]) -> None:
    again = list(Population(SMALL, catalogue).generate())
    assert [(i.source, i.event.SerializeToString(deterministic=True)) for i in again] == [
        (i.source, i.event.SerializeToString(deterministic=True)) for i in stream
    ]


def test_another_seed_yields_another_stream(catalogue: Catalogue, stream: list[GeneratedEvent]) -> None:
    other = Population(PopulationConfig(subjects=1500, seed=8, chunk_subjects=400), catalogue)
    first = [i.event.subject.id_value for i in itertools.islice(other.generate(), 50)]
    assert first != [i.event.subject.id_value for i in stream[:50]]


def test_every_generated_event_is_valid_per_the_catalogue(
    catalogue: Catalogue, stream: list[GeneratedEvent]
) -> None:
    problems = [(i.event.event_id, p) for i in stream for p in _violations(i, catalogue, SMALL)]
    assert problems == []


def test_persons_and_organizations_get_only_their_allowed_types(
    catalogue: Catalogue, stream: list[GeneratedEvent]
) -> None:
    by_kind: dict[int, set[str]] = {}
    for item in stream:
        by_kind.setdefault(item.event.subject.kind, set()).add(item.event.event_type)
    person_only = {t.name for t in catalogue.event_types.values() if t.subject_kinds == {PERSON}}
    organization_only = {t.name for t in catalogue.event_types.values() if t.subject_kinds == {ORGANIZATION}}
    assert by_kind[subject_pb2.SUBJECT_KIND_PERSON].isdisjoint(organization_only)
    assert by_kind[subject_pb2.SUBJECT_KIND_ORGANIZATION].isdisjoint(person_only)


def test_subjects_are_mostly_persons_with_well_formed_ids(catalogue: Catalogue) -> None:
    population = Population(PopulationConfig(subjects=5000, seed=3), catalogue)
    subjects = [population.subject(i) for i in range(5000)]
    persons = [s for s in subjects if s.kind == PERSON]
    organizations = [s for s in subjects if s.kind == ORGANIZATION]
    assert 0.87 < len(persons) / len(subjects) < 0.93
    assert {s.id_scheme for s in persons} == {"resident-id"}
    assert {s.id_scheme for s in organizations} == {"uscc"}
    # Valid check characters, written canonically: ingest accepts every one as it is.
    assert all(subject_violations(s.kind, s.id_scheme, s.id_value) == [] for s in subjects)
    assert all(canonical_value(s.id_scheme, s.id_value) == s.id_value for s in subjects)
    assert any(s.id_value.endswith("X") for s in persons)
    assert len({s.id_value for s in subjects}) == len(subjects)


def test_events_per_subject_are_heavy_tailed(stream: list[GeneratedEvent]) -> None:
    per_subject = Counter(i.subject_index for i in stream if i.origin is Origin.ORIGINAL)
    counts = sorted(per_subject.values())
    median = counts[len(counts) // 2]
    assert median <= 3
    assert counts[-1] >= 10 * median


def test_negative_serious_events_are_rare_and_positive_ones_common(stream: list[GeneratedEvent]) -> None:
    types = Counter(i.event.event_type for i in stream)
    serious = sum(
        types[t]
        for t in (
            "traffic.drunk_driving",
            "legal.judgment_defaulter",
            "utility.theft",
            "civic.public_property_damage",
        )
    )
    assert serious / len(stream) < 0.05
    assert (
        types["transport.bike.parked_in_fence"] > types["traffic.red_light"] > types["traffic.drunk_driving"]
    )


def test_attributes_fall_on_both_sides_of_the_sample_thresholds(stream: list[GeneratedEvent]) -> None:
    days_late = [
        i.event.attributes["days_late"].int_value
        for i in stream
        if i.event.event_type == "library.book_returned_late"
    ]
    assert any(d <= 30 for d in days_late)
    assert any(d > 30 for d in days_late)


def test_duplicates_are_exact_resends_at_about_the_configured_fraction(stream: list[GeneratedEvent]) -> None:
    originals = {(i.source, i.event.event_id): i.event for i in stream if i.origin is Origin.ORIGINAL}
    duplicates = [i for i in stream if i.origin is Origin.DUPLICATE]
    assert 0.01 < len(duplicates) / len(stream) < 0.03
    for item in duplicates:
        assert originals[(item.source, item.event.event_id)] == item.event
    assert len(originals) == sum(1 for i in stream if i.origin is Origin.ORIGINAL)


def test_event_ids_are_unique_per_source(stream: list[GeneratedEvent]) -> None:
    keys = [(i.source, i.event.event_id) for i in stream if i.origin is Origin.ORIGINAL]
    assert len(keys) == len(set(keys))


def test_late_arrivals_break_event_time_order(stream: list[GeneratedEvent]) -> None:
    late = [i for i in stream if i.late]
    assert 0.01 < len(late) / len(stream) < 0.06
    inversions = 0
    last_seen: dict[int, float] = {}
    for item in stream:
        if item.origin is not Origin.ORIGINAL:
            continue
        at = item.event.occurred_at.seconds
        if at < last_seen.get(item.subject_index, at):
            inversions += 1
        last_seen[item.subject_index] = max(at, last_seen.get(item.subject_index, at))
    assert inversions > 0


def test_deliberately_invalid_events_are_marked_and_break_the_catalogue(catalogue: Catalogue) -> None:
    config = PopulationConfig(subjects=1000, seed=2, invalid_events=7)
    stream = list(Population(config, catalogue).generate())
    invalid = [i for i in stream if i.origin is Origin.INVALID]
    assert len(invalid) == 7
    assert all(_violations(i, catalogue, config) for i in invalid)


def test_max_events_stops_the_stream_exactly(catalogue: Catalogue) -> None:
    config = PopulationConfig(subjects=subjects_for_events(3000), seed=4, max_events=3000)
    assert sum(1 for _ in Population(config, catalogue).generate()) == 3000


def test_busiest_subjects_are_known_after_a_run(generated: tuple[Population, list[GeneratedEvent]]) -> None:
    population, stream = generated
    busiest = population.busiest_subjects(3)
    per_subject = Counter(i.event.subject.id_value for i in stream if i.origin is Origin.ORIGINAL)
    assert per_subject[busiest[0].id_value] == max(per_subject.values())


def test_batches_hold_one_source_and_keep_every_event(stream: list[GeneratedEvent]) -> None:
    requests = list(batch_requests(((i.source, i.event) for i in stream), batch_size=50))
    assert all(0 < len(r.events) <= 50 for r in requests)
    assert len({r.batch_id for r in requests}) == len(requests)
    sent = Counter((r.source, e.event_id) for r in requests for e in r.events)
    assert sent == Counter((i.source, i.event.event_id) for i in stream)
