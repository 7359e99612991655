"""granted points and recorded-through: what a batch needs to read only the live part of a ledger

score_ledger.granted holds the points a capped positive adds after its category's cap, as
of the last rescore; score_subjects.recorded_through the latest recorded_at of the ledger a
score row was computed from (services/score/live.py). Both start NULL: a subject's next
rescore reads its whole ledger and writes them. Subject keys are untouched.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("score_ledger") as batch:
        batch.add_column(sa.Column("granted", sa.Integer(), nullable=True))
    with op.batch_alter_table("score_subjects") as batch:
        batch.add_column(sa.Column("recorded_through", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("score_subjects") as batch:
        batch.drop_column("recorded_through")
    with op.batch_alter_table("score_ledger") as batch:
        batch.drop_column("granted")
