"""digests as bytes, instants as integers on SQLite: subject keys and outcome ids stored as their bytes

Every subject key, outcome id and rule-set source digest of rules is lowercase hex, now
stored as the bytes it spells (kit.columns.Hex: half the size), and every datetime of
rules' own tables is a kit.columns.Instant: on SQLite the count of microseconds since the
epoch instead of 26 characters of text; PostgreSQL's timestamptz was already that, so
there only the digests change (to bytea). Issue 18, docs/benchmarks.md.

On SQLite the values are rewritten first and the declared types changed after
(batch_alter_table rebuilds each table with its indexes): the rebuild casts a column whose
type changes affinity, which is harmless on values already rewritten. The downgrade keeps
the same care in the other direction: digests back to text before the rebuild (a blob cast
to text is not its hex), instants back to text after it (text cast to DATETIME's NUMERIC
affinity keeps only the year).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 22:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kit.columns import store_as_bytes, store_as_hex, store_as_integers, store_as_text

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every column converted: table -> ((digest columns, nullable), (instant columns, nullable)).
# Each digest column was VARCHAR(64); each instant column DateTime(timezone=True).
_DIGEST_LENGTH = 64
_TABLES: dict[str, tuple[dict[str, bool], dict[str, bool]]] = {
    "rules_evaluated_events": (
        {"subject_key": False},
        {"occurred_at": False, "evaluated_at": False, "retracted_at": True},
    ),
    "rules_outcomes": (
        {"outcome_id": False, "subject_key": False},
        {"occurred_at": False, "emitted_at": False, "reversed_at": True},
    ),
    "rules_outcome_events": ({"outcome_id": False, "subject_key": False}, {"occurred_at": False}),
    "rules_retractions": ({"subject_key": False}, {"applied_at": False}),
    "rules_dead_letters": (
        {"subject_key": False},
        {"occurred_at": False, "first_failed_at": False, "last_failed_at": False, "parked_at": True},
    ),
    "rules_rule_sets": (
        {"source_sha256": False},
        {"created_at": False, "published_at": True, "activated_at": True, "retired_at": True},
    ),
    "rules_active_rule_set": ({}, {"activated_at": False}),
    "rules_rule_set_changes": ({}, {"changed_at": False}),
    "rules_backtests": ({}, {"started_at": False, "heartbeat_at": False, "finished_at": True}),
    "rules_shard_layout": ({}, {"recorded_at": False}),
    # Refers to rules_outcomes.outcome_id (the relay joins them), so stored alike.
    "rules_outbox": ({"outcome_id": True}, {}),
}


# The tables whose foreign keys refer to rules_rule_sets: SQLite refuses to drop a table
# (the rebuild does) while rows refer to it, and PRAGMA foreign_keys cannot be turned off
# inside the migration's transaction, so their rows are set aside while it is rebuilt.
_REFERRING: dict[str, tuple[str, ...]] = {
    "rules_rule_sets": ("rules_active_rule_set", "rules_rule_set_changes"),
}


def _declare(table: str, digest: sa.types.TypeEngine[object], instant: sa.types.TypeEngine[object]) -> None:
    """SQLite: rebuild `table` with its converted columns declared as `digest` and `instant`."""
    connection = op.get_bind()
    referring = _REFERRING.get(table, ())
    for child in referring:
        connection.exec_driver_sql(f'CREATE TEMP TABLE "aside_{child}" AS SELECT * FROM "{child}"')
        connection.exec_driver_sql(f'DELETE FROM "{child}"')
    digests, instants = _TABLES[table]
    with op.batch_alter_table(table, schema=None) as batch_op:
        for column, nullable in digests.items():
            batch_op.alter_column(column, type_=digest, existing_nullable=nullable)
        for column, nullable in instants.items():
            batch_op.alter_column(column, type_=instant, existing_nullable=nullable)
    for child in referring:
        connection.exec_driver_sql(f'INSERT INTO "{child}" SELECT * FROM "aside_{child}"')
        connection.exec_driver_sql(f'DROP TABLE "aside_{child}"')


def upgrade() -> None:
    connection = op.get_bind()
    sqlite = connection.dialect.name == "sqlite"
    for table, (digests, instants) in _TABLES.items():
        if digests:
            store_as_bytes(connection, table, tuple(digests))
        if instants:
            store_as_integers(connection, table, tuple(instants))
        if sqlite:
            _declare(table, sa.LargeBinary(), sa.BigInteger())


def downgrade() -> None:
    connection = op.get_bind()
    sqlite = connection.dialect.name == "sqlite"
    for table, (digests, instants) in _TABLES.items():
        if digests:
            store_as_hex(connection, table, dict.fromkeys(digests, _DIGEST_LENGTH))
        if sqlite:
            _declare(table, sa.String(_DIGEST_LENGTH), sa.DateTime(timezone=True))
        if instants:
            store_as_text(connection, table, tuple(instants))
