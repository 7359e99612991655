"""The outcomes a synthetic population must leave in the pipeline, computed in process by the same engine."""

from __future__ import annotations

from pathlib import Path

from devtools.cluster import Cluster
from devtools.population import Origin, Population
from domain.ruleset.model import EngineEvent
from domain.ruleset.parsing import load_rule_set
from kit.protoconv import SUBJECT_KIND_NAMES, attributes_dict, to_datetime
from kit.pseudonym import Pseudonymiser
from services.rules.engine import RuleEngine


def expected_outcome_ids(cluster: Cluster, population: Population) -> set[str]:
    """Every outcome the sample rules give for the population's valid events, computed here
    with the same engine in-process: what the pipeline must hold exactly once."""
    pseudonyms = Pseudonymiser(cluster.subject_key.encode(), cluster.subject_key_id)
    events: dict[str, EngineEvent] = {}
    for generated in population.generate():
        if generated.origin is not Origin.ORIGINAL:
            continue
        e = generated.event
        kind = SUBJECT_KIND_NAMES[e.subject.kind]
        key = f"{generated.source}/{e.event_id}"
        events[key] = EngineEvent(
            key=key,
            subject_key=pseudonyms.subject_key(kind, e.subject.id_scheme, e.subject.id_value),
            subject_kind=kind,
            event_type=e.event_type,
            occurred_at=to_datetime(e.occurred_at),
            attributes=attributes_dict(e.attributes),
        )
    engine = RuleEngine(load_rule_set(Path("config/rulesets/sample.yaml")))
    ordered = sorted(events.values(), key=lambda e: (e.occurred_at, e.key))
    return {firing.outcome_id for firing in engine.evaluate(ordered).firings}
