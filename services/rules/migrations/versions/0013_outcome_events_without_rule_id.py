"""outcome events without rule_id: the rule of a consumed event is its outcome's

rules_outcome_events.rule_id copied rules_outcomes.rule_id onto each event an outcome
consumed; the one read of it (a subject's prior outcomes, services.rules.stores.evaluation)
already joins rules_outcomes and now takes the rule from there. About 16 bytes per
accepted event on SQLite (issue 18, docs/benchmarks.md, "where the bytes go"). The
downgrade adds the column back and fills it from rules_outcomes.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENTS = sa.table(
    "rules_outcome_events", sa.column("outcome_id", sa.String()), sa.column("rule_id", sa.String())
)
_OUTCOMES = sa.table(
    "rules_outcomes", sa.column("outcome_id", sa.String()), sa.column("rule_id", sa.String())
)


def upgrade() -> None:
    with op.batch_alter_table("rules_outcome_events", schema=None) as batch_op:
        batch_op.drop_column("rule_id")


def downgrade() -> None:
    with op.batch_alter_table("rules_outcome_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rule_id", sa.String(length=128), nullable=False, server_default=""))
    op.execute(
        sa.update(_EVENTS).values(
            rule_id=sa.func.coalesce(
                sa.select(_OUTCOMES.c.rule_id)
                .where(_OUTCOMES.c.outcome_id == _EVENTS.c.outcome_id)
                .scalar_subquery(),
                "",
            )
        )
    )
    # As revision 0012 had it: no default.
    with op.batch_alter_table("rules_outcome_events", schema=None) as batch_op:
        batch_op.alter_column("rule_id", existing_type=sa.String(length=128), server_default=None)
