"""backtest cancelled by: who stopped a background backtest (CancelBacktest)

A cancelled job is stored with state "cancelled", its finished_at and who cancelled it;
jobs stored before keep an empty value.

Revision ID: 0009
Revises: 0008
Create Date: 2027-01-10 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rules_backtests", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cancelled_by", sa.String(length=128), server_default="", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("rules_backtests", schema=None) as batch_op:
        batch_op.drop_column("cancelled_by")
