"""reversal cause: a retraction, or a late event that regrouped the subject's events

Existing rows were all caused by retractions, so the column defaults to "retraction".

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 06:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("score_reversals") as batch:
        batch.add_column(
            sa.Column("cause", sa.String(length=16), nullable=False, server_default="retraction")
        )


def downgrade() -> None:
    with op.batch_alter_table("score_reversals") as batch:
        batch.drop_column("cause")
