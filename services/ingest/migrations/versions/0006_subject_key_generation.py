"""subject key generations: every stored subject key names its generation

The subject key rotates along a keyed chain (kit.pseudonym, docs/security.md, "Rotating
the subject key"). Retractions now store the generation of their key beside it, filled
from their event's (both keys were copied from the same stored event); the events already
did. An event's fingerprint, hashed with the subject key, moves along the chain with it
and names its generation too: NULL, as in rows from before generations, is the root's.
ingest_subject_key_generation holds the generation marker of kit.rekey (no row: every
stored key is of the root generation). The outbox and the audit log are not re-keyed:
the outbox's messages carry their generation, and the audit chain keeps what it signed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENTS = sa.table(
    "ingest_events",
    sa.column("source", sa.String()),
    sa.column("event_id", sa.String()),
    sa.column("subject_key_id", sa.String()),
)
_RETRACTIONS = sa.table(
    "ingest_retractions",
    sa.column("source", sa.String()),
    sa.column("event_id", sa.String()),
    sa.column("subject_key_id", sa.String()),
)


def upgrade() -> None:
    op.create_table(
        "ingest_subject_key_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_subject_key_generation")),
    )
    with op.batch_alter_table("ingest_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fingerprint_key_id", sa.String(length=32), nullable=True))
    with op.batch_alter_table("ingest_retractions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("subject_key_id", sa.String(length=32), nullable=True))
    event_generation = (
        sa.select(_EVENTS.c.subject_key_id)
        .where(_EVENTS.c.source == _RETRACTIONS.c.source, _EVENTS.c.event_id == _RETRACTIONS.c.event_id)
        .scalar_subquery()
    )
    op.execute(sa.update(_RETRACTIONS).values(subject_key_id=event_generation))


def downgrade() -> None:
    with op.batch_alter_table("ingest_retractions", schema=None) as batch_op:
        batch_op.drop_column("subject_key_id")
    with op.batch_alter_table("ingest_events", schema=None) as batch_op:
        batch_op.drop_column("fingerprint_key_id")
    op.drop_table("ingest_subject_key_generation")
