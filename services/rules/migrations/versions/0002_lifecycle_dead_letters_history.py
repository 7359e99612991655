"""event time history, dead letters, rule-set lifecycle

Adds the events each outcome consumed (windows never reuse one), the dead letters,
the stored rule sets with the active pointer and the audit trail, and indexes the
inbox by (subject, occurred_at) for history reads. An existing database has no
active rule set after this revision: the service imports EGRET_RULESET_FILE at its
next start, as on a fresh one.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 16:50:38.653050
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rules_dead_letters",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.Column("subject_key", sa.String(length=64), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("rule_set", sa.String(length=128), nullable=False),
        sa.Column("rule_set_version", sa.Integer(), nullable=False),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("record", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules_dead_letters")),
        sa.UniqueConstraint("source", "event_id", name=op.f("uq_rules_dead_letters_source_event_id")),
    )
    with op.batch_alter_table("rules_dead_letters", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rules_dead_letters_parked_at"), ["parked_at"], unique=False)

    op.create_table(
        "rules_outcome_events",
        sa.Column("outcome_id", sa.String(length=64), nullable=False),
        sa.Column("event_key", sa.String(length=193), nullable=False),
        sa.Column("rule_id", sa.String(length=128), nullable=False),
        sa.Column("subject_key", sa.String(length=64), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("outcome_id", "event_key", name=op.f("pk_rules_outcome_events")),
    )
    with op.batch_alter_table("rules_outcome_events", schema=None) as batch_op:
        batch_op.create_index(
            "ix_rules_outcome_events_subject_time", ["subject_key", "occurred_at"], unique=False
        )

    op.create_table(
        "rules_rule_sets",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("published_version", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("source_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("published_by", sa.String(length=128), nullable=True),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("activated_by", sa.String(length=128), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_by", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules_rule_sets")),
        sa.UniqueConstraint(
            "name", "published_version", name=op.f("uq_rules_rule_sets_name_published_version")
        ),
    )
    op.create_table(
        "rules_active_rule_set",
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("rule_set_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_by", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["rule_set_id"],
            ["rules_rule_sets.id"],
            name=op.f("fk_rules_active_rule_set_rule_set_id_rules_rule_sets"),
        ),
        sa.PrimaryKeyConstraint("slot", name=op.f("pk_rules_active_rule_set")),
    )
    op.create_table(
        "rules_rule_set_changes",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("rule_set_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rule_set_id"],
            ["rules_rule_sets.id"],
            name=op.f("fk_rules_rule_set_changes_rule_set_id_rules_rule_sets"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules_rule_set_changes")),
    )
    with op.batch_alter_table("rules_rule_set_changes", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_rules_rule_set_changes_rule_set_id"), ["rule_set_id"], unique=False
        )

    with op.batch_alter_table("rules_evaluated_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rules_evaluated_events_subject_key"))
        batch_op.create_index(
            "ix_rules_evaluated_events_subject_time", ["subject_key", "occurred_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("rules_evaluated_events", schema=None) as batch_op:
        batch_op.drop_index("ix_rules_evaluated_events_subject_time")
        batch_op.create_index(
            batch_op.f("ix_rules_evaluated_events_subject_key"), ["subject_key"], unique=False
        )

    with op.batch_alter_table("rules_rule_set_changes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rules_rule_set_changes_rule_set_id"))

    op.drop_table("rules_rule_set_changes")
    op.drop_table("rules_active_rule_set")
    op.drop_table("rules_rule_sets")
    with op.batch_alter_table("rules_outcome_events", schema=None) as batch_op:
        batch_op.drop_index("ix_rules_outcome_events_subject_time")

    op.drop_table("rules_outcome_events")
    with op.batch_alter_table("rules_dead_letters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rules_dead_letters_parked_at"))

    op.drop_table("rules_dead_letters")
