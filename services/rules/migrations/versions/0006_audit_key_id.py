"""audit key id: each audit record names the key of its MAC

Records are chained with HMAC-SHA256 under a key kept outside the database (kit.audit);
the key id lets keys rotate. Records already stored keep their plain SHA-256 and an empty
key id, and stay verifiable.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rules_audit_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_id", sa.String(length=32), server_default="", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("rules_audit_log", schema=None) as batch_op:
        batch_op.drop_column("key_id")
