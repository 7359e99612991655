"""outbox: one lease per slice instead of a claim on every row; autovacuum for the outbox

A relay used to claim each row it sent with an UPDATE (claimed_by, claim_generation,
available_at) before deleting it: on PostgreSQL every row left two dead tuples and an
index entry. Now a relay takes its slice's lease (rules_outbox_leases, one row per slice)
and rows are only inserted and deleted (kit.outbox_lease). Rows claimed under the old
scheme stay and are claimed again from the head of their slice. On PostgreSQL the outbox
is vacuumed whenever about a relay batch of rows was deleted. Steps in kit.outbox_migrations.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 18:30:00.000000
"""

from collections.abc import Sequence

from kit.outbox_migrations import from_slice_leases, to_slice_leases

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    to_slice_leases("rules_outbox")


def downgrade() -> None:
    from_slice_leases("rules_outbox")
