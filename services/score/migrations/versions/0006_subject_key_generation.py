"""subject key generation: the key id next to every stored subject key, and the marker

Every stored subject key gets its generation (`subject_key_id`); rows stored before are
NULL, which means the root generation. The audit log keeps the keys it was written with
(its records are hash-chained). `score_subject_key_generation` holds kit.rekey's marker:
absent, every stored key is of the root generation.

score_categories loses its foreign key to score_subjects: the re-keying job updates each
table's keys in place, one table at a time, which the key would refuse (score_subjects'
key is its primary key). Categories are rewritten whole with their subject's row.

The downgrade refuses once keys have been rotated (the marker has a row): the previous
revision would read every stored key as of the root generation.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYED_TABLES = (
    "score_ledger",
    "score_subjects",
    "score_categories",
    "score_history",
    "score_disputes",
    "score_repairs",
    "score_reversals",
    "score_consents",
)
CATEGORIES_FK = "fk_score_categories_subject_key_score_subjects"


def upgrade() -> None:
    with op.batch_alter_table("score_categories", schema=None) as batch_op:
        batch_op.drop_constraint(CATEGORIES_FK, type_="foreignkey")
    for table in KEYED_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("subject_key_id", sa.String(length=32), nullable=True))
    op.create_table(
        "score_subject_key_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_score_subject_key_generation")),
    )


def downgrade() -> None:
    marker = sa.table("score_subject_key_generation", sa.column("key_id", sa.String()))
    rotated = op.get_bind().execute(sa.select(marker.c.key_id)).scalar()
    if rotated is not None:
        raise RuntimeError(
            f"score's stored subject keys are of generation {rotated!r}: the previous revision "
            "cannot tell them from the root generation's, so it is not downgraded to"
        )
    op.drop_table("score_subject_key_generation")
    for table in reversed(KEYED_TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("subject_key_id")
    with op.batch_alter_table("score_categories", schema=None) as batch_op:
        batch_op.create_foreign_key(
            CATEGORIES_FK, "score_subjects", ["subject_key"], ["subject_key"], ondelete="CASCADE"
        )
