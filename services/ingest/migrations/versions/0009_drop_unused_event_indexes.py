"""drop ingest_events' indexes on subject_key and occurred_at: no query reads through them

Ingest reads its events by (source, event_id) only (the unique constraint's index: the
duplicate check, the sequences after an insert, a retraction's subject); the re-keying
job (kit.rekey) scans the table by generation, which neither index serves. The two
indexes held about 120 bytes per event on SQLite (issue 18, docs/benchmarks.md, "where
the bytes go"). A downgrade builds them again from the rows.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 16:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ingest_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ingest_events_subject_key"))
        batch_op.drop_index(batch_op.f("ix_ingest_events_occurred_at"))


def downgrade() -> None:
    with op.batch_alter_table("ingest_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ingest_events_occurred_at"), ["occurred_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_ingest_events_subject_key"), ["subject_key"], unique=False)
