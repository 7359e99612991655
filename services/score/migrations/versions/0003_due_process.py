"""due process: disputes, repairs, reversals, consent, audit log, history notes

Existing rows stay valid: the new tables start empty and the new history columns
default to "[]" and "" (no entry ended, resumed or noted).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 18:23:19.971483
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "score_audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_score_audit_head")),
    )
    op.create_table(
        "score_audit_log",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False, nullable=False
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject_key", sa.String(length=64), nullable=True),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("target", sa.String(length=512), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_score_audit_log")),
    )
    op.create_table(
        "score_consents",
        sa.Column(
            "consent_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("subject_key", sa.String(length=64), nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        sa.Column("effective_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_by", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("consent_id", name=op.f("pk_score_consents")),
    )
    with op.batch_alter_table("score_consents", schema=None) as batch_op:
        batch_op.create_index(
            "ix_score_consents_subject_key", ["subject_key", "effective_at", "consent_id"], unique=False
        )

    op.create_table(
        "score_disputes",
        sa.Column(
            "dispute_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("entry_id", sa.String(length=128), nullable=False),
        sa.Column("subject_key", sa.String(length=64), nullable=False),
        sa.Column("statement", sa.Text(), nullable=False),
        sa.Column("filed_by", sa.String(length=256), nullable=False),
        sa.Column("filed_by_role", sa.String(length=32), nullable=False),
        sa.Column("filed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("resolution_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("resolved_by", sa.String(length=256), server_default="", nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("dispute_id", name=op.f("pk_score_disputes")),
    )
    with op.batch_alter_table("score_disputes", schema=None) as batch_op:
        batch_op.create_index("ix_score_disputes_entry_id", ["entry_id"], unique=False)
        batch_op.create_index("ix_score_disputes_status_deadline", ["status", "deadline"], unique=False)
        batch_op.create_index("ix_score_disputes_subject_key", ["subject_key"], unique=False)

    op.create_table(
        "score_repairs",
        sa.Column(
            "application_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("entry_id", sa.String(length=128), nullable=False),
        sa.Column("subject_key", sa.String(length=64), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("evidence_uri", sa.Text(), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decision_due", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decision_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("decided_by", sa.String(length=256), server_default="", nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("application_id", name=op.f("pk_score_repairs")),
    )
    with op.batch_alter_table("score_repairs", schema=None) as batch_op:
        batch_op.create_index("ix_score_repairs_entry_id", ["entry_id"], unique=False)
        batch_op.create_index(
            "ix_score_repairs_status_decision_due", ["status", "decision_due"], unique=False
        )
        batch_op.create_index("ix_score_repairs_subject_key", ["subject_key"], unique=False)

    op.create_table(
        "score_reversals",
        sa.Column("outcome_id", sa.String(length=128), nullable=False),
        sa.Column("subject_key", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("retracted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retracted_by", sa.String(length=256), nullable=False),
        sa.Column("reversed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("outcome_id", name=op.f("pk_score_reversals")),
    )
    with op.batch_alter_table("score_reversals", schema=None) as batch_op:
        batch_op.create_index("ix_score_reversals_subject_key", ["subject_key"], unique=False)

    with op.batch_alter_table("score_history", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ended_entry_ids", sa.Text(), server_default="[]", nullable=False))
        batch_op.add_column(sa.Column("resumed_entry_ids", sa.Text(), server_default="[]", nullable=False))
        batch_op.add_column(sa.Column("note", sa.Text(), server_default="", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("score_history", schema=None) as batch_op:
        batch_op.drop_column("note")
        batch_op.drop_column("resumed_entry_ids")
        batch_op.drop_column("ended_entry_ids")

    with op.batch_alter_table("score_reversals", schema=None) as batch_op:
        batch_op.drop_index("ix_score_reversals_subject_key")

    op.drop_table("score_reversals")
    with op.batch_alter_table("score_repairs", schema=None) as batch_op:
        batch_op.drop_index("ix_score_repairs_subject_key")
        batch_op.drop_index("ix_score_repairs_status_decision_due")
        batch_op.drop_index("ix_score_repairs_entry_id")

    op.drop_table("score_repairs")
    with op.batch_alter_table("score_disputes", schema=None) as batch_op:
        batch_op.drop_index("ix_score_disputes_subject_key")
        batch_op.drop_index("ix_score_disputes_status_deadline")
        batch_op.drop_index("ix_score_disputes_entry_id")

    op.drop_table("score_disputes")
    with op.batch_alter_table("score_consents", schema=None) as batch_op:
        batch_op.drop_index("ix_score_consents_subject_key")

    op.drop_table("score_consents")
    op.drop_table("score_audit_log")
    op.drop_table("score_audit_head")
