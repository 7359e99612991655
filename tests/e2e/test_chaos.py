"""Random SIGKILLs of any service, or two at once, while a population streams in.

The schedule comes from a seed printed at the start; EGRET_CHAOS_SEED=<seed> replays a
failure (the population, the kill moments, the victims and their downtimes). The long
run is `make chaos` (bench/chaos.py); both use devtools/chaos.py.
"""

from __future__ import annotations

import pytest

from devtools.chaos import SEED_ENV, chaos_seed, check, kill_schedule, stream_with_kills
from devtools.cluster import Cluster
from devtools.population import Origin, Population, PopulationConfig, batch_requests

pytestmark = pytest.mark.e2e

KILLS = 3
# Small enough for make test (about a minute a run on 2 cores), paced so that the kills
# land while the stream runs rather than after it.
SUBJECTS = 400
EVENTS_PER_S = 100.0
BATCH_SIZE = 25


# Late arrivals: outcomes must not depend on arrival order (docs/rules.md, "Event time").
@pytest.mark.parametrize("late_fraction", [0.0, 0.05], ids=["in-order", "late-arrivals"])
async def test_random_kills_lose_nothing_and_leave_the_ledger_equal_to_one_evaluation_in_event_time(
    cluster: Cluster, late_fraction: float
) -> None:
    seed = chaos_seed()
    print(f"chaos seed {seed} (replay with {SEED_ENV}={seed})")
    population = Population(
        PopulationConfig(
            subjects=SUBJECTS,
            seed=seed,
            duplicate_fraction=0.05,
            late_fraction=late_fraction,
            invalid_events=5,
        )
    )
    originals = {
        f"{g.source}/{g.event.event_id}" for g in population.generate() if g.origin is Origin.ORIGINAL
    }
    requests = list(batch_requests(population.events(), batch_size=BATCH_SIZE))
    schedule = kill_schedule(seed, kills=KILLS, batches=len(requests), services=cluster.services)

    run = await stream_with_kills(cluster, requests, schedule, events_per_s=EVENTS_PER_S, log=True)
    cluster.stop()

    assert len(run.kills) == KILLS
    assert any(k.during_stream for k in run.kills), (seed, run.kills)
    assert run.totals.events == sum(len(r.events) for r in requests)
    assert run.totals.rejected == 5, (seed, run.totals.rejections)
    problems = check(cluster, run, originals=originals)
    assert not problems, f"replay with {SEED_ENV}={seed}:\n" + "\n".join(problems)
