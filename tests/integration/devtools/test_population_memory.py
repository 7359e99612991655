"""The synthetic population streams a million subjects in bounded memory (tracemalloc over 5000 events)."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest

from devtools.population import DEFAULT_CATALOGUE, Population, PopulationConfig
from domain.catalogue import Catalogue, load_catalogue


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return load_catalogue(DEFAULT_CATALOGUE)


def test_the_stream_is_generated_lazily_in_bounded_memory(catalogue: Catalogue) -> None:
    population = Population(PopulationConfig(subjects=1_000_000, seed=5, chunk_subjects=200), catalogue)
    tracemalloc.start()
    try:
        for _ in itertools.islice(population.events(), 5000):
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024
