"""Issue 18, storage: the indexes no query used are gone from ingest and rules, and
rules_outcome_events no longer copies its outcome's rule, over existing data on SQLite and
PostgreSQL; the migrations build exactly the models' schema; the reads that remain still go
through an index and still find each prior outcome's rule; a downgrade restores both."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from kit.db import make_session_factory
from kit.migrations import alembic_config, upgrade
from services.ingest.bootstrap import MIGRATIONS as INGEST_MIGRATIONS
from services.ingest.stores import events as ingest_schema
from services.rules.bootstrap import MIGRATIONS as RULES_MIGRATIONS
from services.rules.stores import schema as rules_schema
from services.rules.stores.evaluation import SqlEvaluationStore

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)
KEY = "a" * 64
# An outcome id as rules makes them (lowercase hex: stored as its bytes since rules 0016).
OUTCOME = "0c" * 16

INGEST = ("ingest_alembic_version", INGEST_MIGRATIONS, ingest_schema.Base.metadata)
RULES = ("rules_alembic_version", RULES_MIGRATIONS, rules_schema.Base.metadata)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(database_url)
    yield engine
    engine.dispose()


def indexes(engine: sa.Engine, table: str) -> set[str]:
    return {str(i["name"]) for i in sa.inspect(engine).get_indexes(table)}


def downgrade(engine: sa.Engine, migrations: Any, version_table: str, revision: str) -> None:
    config = alembic_config(migrations, version_table)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


@pytest.mark.parametrize("service", [INGEST, RULES], ids=["ingest", "rules"])
def test_the_migrations_build_exactly_the_models_schema(engine: sa.Engine, service: Any) -> None:
    version_table, migrations, metadata = service
    upgrade(engine, migrations, version_table)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "include_name": lambda name, kind, _parent: kind != "table" or name in metadata.tables,
            },
        )
        assert compare_metadata(context, metadata) == []


def test_ingest_drops_its_unused_event_indexes_and_keeps_the_events(engine: sa.Engine) -> None:
    version_table, migrations, _ = INGEST
    upgrade(engine, migrations, version_table, "0008")
    events = sa.table(
        "ingest_events",
        *(sa.column(c) for c in ("source", "event_id", "event_type", "subject_key", "subject_key_id")),
        *(sa.column(c) for c in ("fingerprint", "fingerprint_key_id", "fingerprint_version")),
        sa.column("occurred_at", sa.DateTime(timezone=True)),
        sa.column("recorded_at", sa.DateTime(timezone=True)),
        sa.column("record", sa.LargeBinary()),
    )
    rows = [
        {
            "source": "library",
            "event_id": f"e{i}",
            "event_type": "library.book_returned",
            "subject_key": KEY,
            "subject_key_id": "k1",
            "fingerprint": f"{i:064}",
            "fingerprint_key_id": "k1",
            "fingerprint_version": 2,
            "occurred_at": NOW,
            "recorded_at": NOW,
            "record": bytes([i]) * 10,
        }
        for i in range(3)
    ]
    with engine.begin() as connection:
        connection.execute(events.insert(), rows)
    before = {"ix_ingest_events_subject_key", "ix_ingest_events_occurred_at"}
    assert before <= indexes(engine, "ingest_events")

    upgrade(engine, migrations, version_table)
    assert not before & indexes(engine, "ingest_events")
    with engine.connect() as connection:
        kept = connection.execute(
            sa.text("SELECT event_id, record FROM ingest_events ORDER BY sequence")
        ).all()
    assert [(r[0], bytes(r[1])) for r in kept] == [(r["event_id"], r["record"]) for r in rows]

    downgrade(engine, migrations, version_table, "0008")
    assert before <= indexes(engine, "ingest_events")


def test_rules_drops_the_outcomes_subject_index_and_keeps_the_outcomes(engine: sa.Engine) -> None:
    version_table, migrations, _ = RULES
    upgrade(engine, migrations, version_table, "0011")
    outcomes = sa.table(
        "rules_outcomes",
        *(sa.column(c) for c in ("outcome_id", "subject_key", "rule_id", "rule_set", "rule_set_version")),
        sa.column("points"),
        sa.column("occurred_at", sa.DateTime(timezone=True)),
        sa.column("emitted_at", sa.DateTime(timezone=True)),
        sa.column("outcome", sa.LargeBinary()),
    )
    row = {
        "outcome_id": OUTCOME,
        "subject_key": KEY,
        "rule_id": "r",
        "rule_set": "s",
        "rule_set_version": 1,
        "points": -5,
        "occurred_at": NOW,
        "emitted_at": NOW,
        "outcome": b"stored once",
    }
    with engine.begin() as connection:
        connection.execute(outcomes.insert(), [row])
    assert "ix_rules_outcomes_subject_key" in indexes(engine, "rules_outcomes")

    upgrade(engine, migrations, version_table)
    assert "ix_rules_outcomes_subject_key" not in indexes(engine, "rules_outcomes")
    with engine.connect() as connection:
        table = rules_schema.table_of(rules_schema.EmittedOutcome)
        kept = connection.execute(sa.select(table.c.outcome_id, table.c.outcome)).one()
    assert (kept[0], bytes(kept[1])) == (OUTCOME, b"stored once")

    downgrade(engine, migrations, version_table, "0011")
    assert "ix_rules_outcomes_subject_key" in indexes(engine, "rules_outcomes")


def test_a_prior_outcome_keeps_its_rule_without_a_copy_on_its_events(engine: sa.Engine) -> None:
    version_table, migrations, _ = RULES
    upgrade(engine, migrations, version_table, "0012")
    outcomes = sa.table(
        "rules_outcomes",
        *(sa.column(c) for c in ("outcome_id", "subject_key", "rule_id", "rule_set", "rule_set_version")),
        sa.column("points"),
        sa.column("occurred_at", sa.DateTime(timezone=True)),
        sa.column("emitted_at", sa.DateTime(timezone=True)),
        sa.column("outcome", sa.LargeBinary()),
    )
    consumed = sa.table(
        "rules_outcome_events",
        *(sa.column(c) for c in ("outcome_id", "event_key", "rule_id", "subject_key", "subject_key_id")),
        sa.column("occurred_at", sa.DateTime(timezone=True)),
    )
    with engine.begin() as connection:
        connection.execute(
            outcomes.insert(),
            [
                {
                    "outcome_id": OUTCOME,
                    "subject_key": KEY,
                    "rule_id": "fare_evasion_3_in_90_days",
                    "rule_set": "s",
                    "rule_set_version": 1,
                    "points": -20,
                    "occurred_at": NOW,
                    "emitted_at": NOW,
                    "outcome": b"o1",
                }
            ],
        )
        connection.execute(
            consumed.insert(),
            [
                {
                    "outcome_id": OUTCOME,
                    "event_key": f"metro/e{i}",
                    "rule_id": "fare_evasion_3_in_90_days",
                    "subject_key": KEY,
                    "subject_key_id": "k1",
                    "occurred_at": NOW,
                }
                for i in range(3)
            ],
        )

    upgrade(engine, migrations, version_table)
    assert "rule_id" not in {c["name"] for c in sa.inspect(engine).get_columns("rules_outcome_events")}
    store = SqlEvaluationStore(make_session_factory(engine), key_id="k1")
    (prior,) = store.context({KEY: NOW}, frozenset()).prior[KEY]
    assert (prior.outcome_id, prior.rule_id, prior.points) == (OUTCOME, "fare_evasion_3_in_90_days", -20)
    assert prior.event_keys == ("metro/e0", "metro/e1", "metro/e2")

    downgrade(engine, migrations, version_table, "0012")
    with engine.connect() as connection:
        rules = connection.scalars(sa.text("SELECT DISTINCT rule_id FROM rules_outcome_events")).all()
    assert rules == ["fare_evasion_3_in_90_days"]


def plan(engine: sa.Engine, statement: sa.Select[Any]) -> str:
    """SQLite's query plan of a statement, one line per step."""
    with engine.connect() as connection:
        compiled = statement.compile(connection, compile_kwargs={"literal_binds": True})
        rows = connection.execute(sa.text(f"EXPLAIN QUERY PLAN {compiled}")).all()
    return "\n".join(str(r[-1]) for r in rows)


def test_the_reads_that_remain_go_through_an_index_on_sqlite(tmp_path: Any) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'plans.db'}")
    for version_table, migrations, _ in (INGEST, RULES):
        upgrade(engine, migrations, version_table)
    events = ingest_schema.Base.metadata.tables["ingest_events"]
    duplicate_check = sa.select(events.c.event_id, events.c.fingerprint).where(
        events.c.source == "library", events.c.event_id.in_(["e1", "e2"])
    )
    assert "USING INDEX sqlite_autoindex_ingest_events_1" in plan(engine, duplicate_check)
    outcomes = rules_schema.table_of(rules_schema.EmittedOutcome)
    by_id = sa.select(outcomes.c.outcome_id, outcomes.c.rule_id).where(
        outcomes.c.outcome_id.in_([OUTCOME]), outcomes.c.reversed_at.is_(None)
    )
    assert "USING INDEX sqlite_autoindex_rules_outcomes_1" in plan(engine, by_id)
    engine.dispose()
