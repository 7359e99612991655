"""Score's migrations build exactly the tables its published read contract (contracts.score_store)
describes, so query, which reads through the contract, reads the schema score writes."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Engine

from contracts.score_store import Base
from kit.migrations import upgrade
from services.score.bootstrap import MIGRATIONS

VERSION_TABLE = "score_alembic_version"


@pytest.fixture
def migrated(database_url: str) -> Any:
    engine = sa.create_engine(database_url)
    upgrade(engine, MIGRATIONS, VERSION_TABLE)
    yield engine
    engine.dispose()


def _differences(engine: Engine) -> list[Any]:
    """What the contract's metadata says that the migrated schema does not (its tables only)."""
    contract = set(Base.metadata.tables)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "include_name": lambda name, kind, _parent: kind != "table" or name in contract,
            },
        )
        return list(compare_metadata(context, Base.metadata))


def test_score_migrations_build_the_contract_tables(migrated: Engine) -> None:
    assert _differences(migrated) == []


def test_a_renamed_column_query_reads_breaks_the_contract(migrated: Engine) -> None:
    with migrated.begin() as connection:
        connection.execute(sa.text("ALTER TABLE score_subjects RENAME COLUMN tier TO grade"))
    found = {
        (d[0], d[2], d[3].name) for d in _differences(migrated) if d[0] in ("add_column", "remove_column")
    }
    assert found == {("add_column", "score_subjects", "tier"), ("remove_column", "score_subjects", "grade")}


def test_a_column_the_contract_does_not_know_breaks_it(migrated: Engine) -> None:
    with migrated.begin() as connection:
        connection.execute(sa.text("ALTER TABLE score_ledger ADD COLUMN weight INTEGER NOT NULL DEFAULT 1"))
    assert [(d[0], d[2], d[3].name) for d in _differences(migrated)] == [
        ("remove_column", "score_ledger", "weight")
    ]
