"""access records name the generation of their subject key

The subject key rotates along a keyed chain (kit.pseudonym, docs/security.md, "Rotating
the subject key"). The access log is hash-chained and anchored, so its records keep the
key they were written with; new records store the key's generation beside it, and their
MAC covers it (kit.audit). NULL, in records from before generations, is the root's.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("query_audit_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("subject_key_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    # Records written with a generation no longer verify without it: their MAC covers it.
    with op.batch_alter_table("query_audit_log", schema=None) as batch_op:
        batch_op.drop_column("subject_key_id")
