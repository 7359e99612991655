"""outbox shard: each outbox row names the rules shard that owns its subject

Rows already waiting were written for one rules instance, so they default to shard 0.
Changing the number of rules shards with rows waiting is resharding: drain first
(docs/architecture.md, "Scaling out rules").

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 16:47:47.228217
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ingest_outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shard", sa.Integer(), server_default="0", nullable=False))
        batch_op.create_index("ix_ingest_outbox_shard_id", ["shard", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ingest_outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_ingest_outbox_shard_id")
        batch_op.drop_column("shard")
