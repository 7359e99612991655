"""stored messages packed: score_ledger.outcome is stored packed from this revision on

New values of the serialized messages this service keeps are packed with zstandard and
a shipped dictionary (kit/packing.py; issue 18, docs/benchmarks.md, "stored messages
packed"). The schema does not change: the columns stay binary, and values stored before
read as they are, so the upgrade rewrites nothing. The downgrade unpacks every packed
value, so the revisions before this one read the bytes they wrote.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 19:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

from kit.packing import unpack_columns

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, primary key, packed column)
_PACKED = (("score_ledger", ("entry_id",), "outcome"),)


def upgrade() -> None:
    """Nothing to rewrite: values stored before read as they are (kit.packing.unpack), and
    new ones are packed as they are written."""


def downgrade() -> None:
    unpack_columns(op.get_bind(), _PACKED)
