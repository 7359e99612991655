"""digests as bytes, instants as integers on SQLite: events' and retractions' keys and times

Subject keys and fingerprints are SHA-256 hex digests: stored as the 32 bytes they spell
instead of 64 characters (kit.columns.Hex). Instants are timestamptz on PostgreSQL as before,
and on SQLite microseconds since the epoch instead of 26 characters of text
(kit.columns.Instant). Issue 18, docs/benchmarks.md.

SQLite's batch copy casts a column whose type affinity changes (CAST(text AS BIGINT) would
keep only the year, CAST(blob AS VARCHAR) would read raw bytes as text), so each rewrite
runs while the value already has the affinity it is cast to: before the copy for the
digests and for the instants going up, after it for the instants coming down.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 22:00:00.000000
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from kit.columns import store_as_bytes, store_as_hex, store_as_integers, store_as_text

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# table: (its digests, its instants)
_COLUMNS = {
    "ingest_events": (("subject_key", "fingerprint"), ("occurred_at", "recorded_at")),
    "ingest_retractions": (("subject_key",), ("retracted_at",)),
}
_DIGEST_LENGTH = 64


def upgrade() -> None:
    connection = op.get_bind()
    for table, (digests, instants) in _COLUMNS.items():
        store_as_bytes(connection, table, digests)
        store_as_integers(connection, table, instants)
        if connection.dialect.name == "sqlite":
            _declare(table, digests, sa.LargeBinary(), instants, sa.BigInteger())


def downgrade() -> None:
    connection = op.get_bind()
    for table, (digests, instants) in _COLUMNS.items():
        store_as_hex(connection, table, dict.fromkeys(digests, _DIGEST_LENGTH))
        if connection.dialect.name == "sqlite":
            _declare(table, digests, sa.String(_DIGEST_LENGTH), instants, sa.DateTime(timezone=True))
        store_as_text(connection, table, instants)


def _declare(
    table: str,
    digests: Sequence[str],
    digest_type: sa.types.TypeEngine[Any],
    instants: Sequence[str],
    instant_type: sa.types.TypeEngine[Any],
) -> None:
    """SQLite: the declared types of a table's digests and instants, in one copy of the
    table that keeps its indexes and constraints."""
    with op.batch_alter_table(table, schema=None) as batch_op:
        for column in digests:
            batch_op.alter_column(column, type_=digest_type)
        for column in instants:
            batch_op.alter_column(column, type_=instant_type)
