"""fingerprint version: how each stored event's fingerprint was taken

Fingerprints were SHA-256 over a JSON rendering of the event; they are now SHA-256 over
the event's canonical protobuf bytes, the bytes stored and relayed (services.ingest.wire).
Events stored before keep their fingerprint and NULL here (services.ingest.domain:
FINGERPRINT_JSON), so that a resend of one is compared with the JSON fingerprint and
is still a duplicate, not a conflict. New events store 2 (FINGERPRINT_CANONICAL).
A downgrade keeps the fingerprints as they are: the code before this revision would take
those of events stored since for JSON ones, and a resend of such an event for a conflict.

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
    with op.batch_alter_table("ingest_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fingerprint_version", sa.SmallInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ingest_events", schema=None) as batch_op:
        batch_op.drop_column("fingerprint_version")
