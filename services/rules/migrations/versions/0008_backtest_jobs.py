"""backtest jobs: backtests run in the background (StartBacktest) and their reports

One row per job: its state, progress, who started it, the request, and once it
succeeded the report (a serialized BacktestRuleSetResponse).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-14 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "rules_backtests",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("backtest_id", sa.String(length=36), nullable=False),
        sa.Column("rule_set_id", _ID, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("events_replayed", sa.BigInteger(), nullable=False),
        sa.Column("events_total", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_by", sa.String(length=128), nullable=False),
        sa.Column("instance", sa.String(length=200), nullable=False),
        sa.Column("subject_key_id", sa.String(length=32), nullable=False),
        sa.Column("request", sa.LargeBinary(), nullable=False),
        sa.Column("report", sa.LargeBinary(), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules_backtests")),
        sa.UniqueConstraint("backtest_id", name=op.f("uq_rules_backtests_backtest_id")),
    )
    with op.batch_alter_table("rules_backtests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rules_backtests_rule_set_id"), ["rule_set_id"], unique=False)
        batch_op.create_index("ix_rules_backtests_state_heartbeat", ["state", "heartbeat_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("rules_backtests", schema=None) as batch_op:
        batch_op.drop_index("ix_rules_backtests_state_heartbeat")
        batch_op.drop_index(batch_op.f("ix_rules_backtests_rule_set_id"))
    op.drop_table("rules_backtests")
