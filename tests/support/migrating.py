"""Migration tests' common steps: rows written as an earlier revision's schema takes them,
the stored values and declared schema to compare before and after, and a downgrade."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command

from kit.migrations import alembic_config

# A test's value for row `n` of a column (reflected at the earlier revision).
Value = Callable[[sa.Column[Any], int], Any]


def write_rows(
    engine: sa.Engine, tables: Sequence[str], value: Value, numbers: Sequence[int]
) -> dict[str, list[dict[str, Any]]]:
    """One row per number in every table, through the tables as the database declares them
    now (reflected), so values are bound as the earlier revision's code bound them."""
    metadata = sa.MetaData()
    metadata.reflect(engine, only=list(tables))
    written: dict[str, list[dict[str, Any]]] = {}
    with engine.begin() as connection:
        for name in tables:
            table = metadata.tables[name]
            rows = [{c.name: value(c, n) for c in table.columns} for n in numbers]
            connection.execute(table.insert(), rows)
            written[name] = rows
    return written


def stored_rows(
    engine: sa.Engine, tables: Sequence[str], order_by: str = "1"
) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows as the driver returns them: the stored values themselves."""
    with engine.connect() as connection:
        return {
            name: [tuple(r) for r in connection.exec_driver_sql(f"SELECT * FROM {name} ORDER BY {order_by}")]
            for name in tables
        }


def declared_schema(engine: sa.Engine, tables: Sequence[str]) -> dict[str, Any]:
    """Each table's declared columns (name, type, nullable), indexes, primary key and unique
    constraints."""
    inspector = sa.inspect(engine)
    return {
        name: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name)],
            sorted((str(i["name"]), tuple(i["column_names"])) for i in inspector.get_indexes(name)),
            inspector.get_pk_constraint(name)["constrained_columns"],
            sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(name)),
        )
        for name in tables
    }


def downgrade(engine: sa.Engine, migrations: Path, version_table: str, revision: str) -> None:
    config = alembic_config(migrations, version_table)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
