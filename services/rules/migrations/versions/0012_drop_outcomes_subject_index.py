"""drop rules_outcomes' index on subject_key: no query reads through it

Rules reads its outcomes by outcome_id only (the primary key: the relay's join, the
reversal of an outcome, the check for reissued and reversed ids); a subject's outcomes
are found through rules_outcome_events (its index on subject and time), and the
re-keying job (kit.rekey) scans the table by generation. The index held about 50 bytes
per accepted event on SQLite (issue 18, docs/benchmarks.md, "where the bytes go"). A
downgrade builds it again from the rows.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 16:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rules_outcomes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rules_outcomes_subject_key"))


def downgrade() -> None:
    with op.batch_alter_table("rules_outcomes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rules_outcomes_subject_key"), ["subject_key"], unique=False)
