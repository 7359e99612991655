"""dispute assignee: the reviewer holding a dispute (AssignDispute) and since when

Existing disputes are held by no one (assignee ""). Subject keys are untouched.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 21:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("score_disputes") as batch:
        batch.add_column(sa.Column("assignee", sa.String(length=256), nullable=False, server_default=""))
        batch.add_column(sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_score_disputes_assignee_deadline", ["assignee", "deadline"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("score_disputes") as batch:
        batch.drop_index("ix_score_disputes_assignee_deadline")
        batch.drop_column("assigned_at")
        batch.drop_column("assignee")
