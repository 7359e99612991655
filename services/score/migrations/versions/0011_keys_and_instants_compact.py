"""keys and instants compact: subject keys and entry ids as bytes, instants as Instant

Every subject key (64 hex digits) and every entry id (an outcome id, 32 hex digits) in
score's tables is stored as the bytes its hex spells (kit.columns.Hex), half the length,
and every instant as kit.columns.Instant: PostgreSQL's timestamptz as before, on SQLite
the microseconds since the epoch instead of 26 characters of text. The growing tables
(score_ledger and its index, score_history, score_subjects, score_categories) carry most of
it: issue 18, docs/benchmarks.md. The audit log keeps its text key (kit.audit, shared by
every service) and its instants.

On PostgreSQL the key columns become bytea (ALTER COLUMN ... USING decode, which rebuilds
their indexes) and the instants stay. On SQLite the values are rewritten in place, then
each table is rebuilt with the new declared types (batch_alter_table keeps its indexes),
so the schema matches contracts.score_store. Order matters there: the rebuild CASTs every
altered column, which would read hex text as its characters and datetime text as a number,
so values are rewritten into their new form before a rebuild and out of it after one.

The upgrade stops on a stored value that is not lowercase hex (kit.columns.NotHex), which
score never wrote: rules' outcome ids and HMAC subject keys are lowercase hex.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 22:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kit.columns import store_as_bytes, store_as_hex, store_as_integers, store_as_text

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = 64  # the VARCHAR length of a subject key before, domain.intake.MAX_SUBJECT_KEY_LENGTH
_ID = 128  # of an entry or outcome id, domain.intake.MAX_ID_LENGTH

# table: ({key or id column: its VARCHAR length before}, instant columns)
_TABLES: dict[str, tuple[dict[str, int], tuple[str, ...]]] = {
    "score_ledger": ({"entry_id": _ID, "subject_key": _KEY}, ("occurred_at", "recorded_at", "visible_until")),
    "score_subjects": ({"subject_key": _KEY}, ("updated_at", "next_change_at", "recorded_through")),
    "score_history": ({"subject_key": _KEY}, ("changed_at", "recorded_at")),
    "score_categories": ({"subject_key": _KEY}, ()),
    "score_disputes": (
        {"entry_id": _ID, "subject_key": _KEY},
        ("filed_at", "deadline", "resolved_at", "assigned_at"),
    ),
    "score_repairs": ({"entry_id": _ID, "subject_key": _KEY}, ("applied_at", "decision_due", "decided_at")),
    "score_reversals": ({"outcome_id": _ID, "subject_key": _KEY}, ("retracted_at", "reversed_at")),
    "score_consents": ({"subject_key": _KEY}, ("effective_at", "recorded_at")),
    "score_policies": ({}, ("activated_at",)),
}


def _rebuild(table: str, keys: dict[str, int], instants: tuple[str, ...], *, compact: bool) -> None:
    """SQLite only: `table` rebuilt with its columns declared as the models declare them
    (`compact`: BLOB and BIGINT, as Hex and Instant; else as before this revision)."""
    with op.batch_alter_table(table) as batch:
        for name, length in keys.items():
            before, after = sa.String(length), sa.LargeBinary()
            batch.alter_column(
                name, existing_type=before if compact else after, type_=after if compact else before
            )
        for name in instants:
            before_, after_ = sa.DateTime(timezone=True), sa.BigInteger()
            batch.alter_column(
                name, existing_type=before_ if compact else after_, type_=after_ if compact else before_
            )


def upgrade() -> None:
    connection = op.get_bind()
    sqlite = connection.dialect.name == "sqlite"
    for table, (keys, instants) in _TABLES.items():
        if keys:
            store_as_bytes(connection, table, tuple(keys))
        if instants:
            store_as_integers(connection, table, instants)
        if sqlite:
            _rebuild(table, keys, instants, compact=True)


def downgrade() -> None:
    connection = op.get_bind()
    sqlite = connection.dialect.name == "sqlite"
    for table, (keys, instants) in _TABLES.items():
        if keys:
            store_as_hex(connection, table, keys)
        if sqlite:
            _rebuild(table, keys, instants, compact=False)
        if instants:
            store_as_text(connection, table, instants)
