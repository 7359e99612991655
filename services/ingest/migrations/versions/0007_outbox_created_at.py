"""outbox created_at: when each row was written, so the pipeline's lag can be measured

egret_outbox_oldest_age_seconds (kit.outbox) is the age of the oldest row not yet
delivered. Rows written before this column exist count from their available_at.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 02:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ingest_outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("created_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ingest_outbox", schema=None) as batch_op:
        batch_op.drop_column("created_at")
