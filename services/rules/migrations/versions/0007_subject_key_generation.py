"""subject key generation: each stored subject key names its generation; the marker

Every table that stores a subject key gets `subject_key_id` next to it. Rows already
stored keep NULL, which means the root generation (EGRET_SUBJECT_KEY_ID): generations were
not recorded before. rules_subject_key_generation holds one row, the generation the stored
keys are in and whether the move to it is complete (kit.rekey); no row means the root
generation. The hash-chained rules_audit_log keeps the keys it was written with.

The downgrade refuses once keys have been rotated (the marker has a row): the previous
revision would read every stored key as of the root generation.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYED_TABLES = (
    "rules_evaluated_events",
    "rules_outcomes",
    "rules_outcome_events",
    "rules_retractions",
    "rules_dead_letters",
)


def upgrade() -> None:
    op.create_table(
        "rules_subject_key_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules_subject_key_generation")),
    )
    for table in _KEYED_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("subject_key_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    marker = sa.table("rules_subject_key_generation", sa.column("key_id", sa.String()))
    rotated = op.get_bind().execute(sa.select(marker.c.key_id)).scalar()
    if rotated is not None:
        raise RuntimeError(
            f"rules' stored subject keys are of generation {rotated!r}: the previous revision "
            "cannot tell them from the root generation's, so it is not downgraded to"
        )
    for table in reversed(_KEYED_TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("subject_key_id")
    op.drop_table("rules_subject_key_generation")
