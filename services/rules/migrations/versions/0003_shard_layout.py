"""shard layout: the rules shard this database belongs to

One row, written at the first start after this revision with the configured
EGRET_RULES_SHARD / EGRET_RULES_SHARDS; later starts must match it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 17:05:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rules_shard_layout",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("shards", sa.Integer(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules_shard_layout")),
    )


def downgrade() -> None:
    op.drop_table("rules_shard_layout")
