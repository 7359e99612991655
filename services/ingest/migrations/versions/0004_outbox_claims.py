"""outbox claims: each claimed row names the relay identity and generation holding it

A restarted relay takes over its own identity's claims at once instead of waiting for
their lease, and a relay changes only rows its own generation still claims (kit.outbox).
Rows waiting at the upgrade are unclaimed; a claim made by a relay of the old version is
only a lease in available_at, which the new relays respect until it ends.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 10:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ingest_outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("claim_generation", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ingest_outbox", schema=None) as batch_op:
        batch_op.drop_column("claim_generation")
        batch_op.drop_column("claimed_by")
