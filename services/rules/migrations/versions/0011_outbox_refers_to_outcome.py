"""outbox refers to outcome: an outcome's bytes are stored once, in rules_outcomes

An outcome's outbox row used to hold a second copy of the outcome (inside its
ApplyOutcomesRequest); from this revision it holds rules_outcomes.outcome_id and an
empty payload, and the relay reads the bytes from rules_outcomes when it claims the row
(issue 18). Rows written before keep their payload and are sent as they are. The
downgrade writes the payload back into every row that refers to an outcome.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OUTBOX = sa.table(
    "rules_outbox",
    sa.column("id", sa.BigInteger()),
    sa.column("payload", sa.LargeBinary()),
    sa.column("outcome_id", sa.String(64)),
)
_OUTCOMES = sa.table(
    "rules_outcomes", sa.column("outcome_id", sa.String(64)), sa.column("outcome", sa.LargeBinary())
)


def upgrade() -> None:
    with op.batch_alter_table("rules_outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("outcome_id", sa.String(64), nullable=True))


def downgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(_OUTBOX.c.id, _OUTCOMES.c.outcome)
        .join(_OUTCOMES, _OUTCOMES.c.outcome_id == _OUTBOX.c.outcome_id)
        .where(_OUTBOX.c.outcome_id.is_not(None))
    ).all()
    if rows:
        connection.execute(
            sa.update(_OUTBOX)
            .where(_OUTBOX.c.id == sa.bindparam("b_id"))
            .values(payload=sa.bindparam("b_payload")),
            [{"b_id": row_id, "b_payload": _outcome_request(bytes(outcome))} for row_id, outcome in rows],
        )
    with op.batch_alter_table("rules_outbox", schema=None) as batch_op:
        batch_op.drop_column("outcome_id")


def _outcome_request(outcome: bytes) -> bytes:
    """ApplyOutcomesRequest(outcomes=[outcome]) serialized: a revision keeps its own copy of
    what it needs, so later changes to the service's code cannot change what it does."""
    length, prefix = len(outcome), bytearray(b"\x0a")
    while length > 0x7F:
        prefix.append((length & 0x7F) | 0x80)
        length >>= 7
    prefix.append(length)
    return bytes(prefix) + outcome
