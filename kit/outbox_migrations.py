"""Schema steps that ingest's and rules' outbox migrations take alike, written once.

Each function is one revision's step and stays as it was when that revision shipped; a
later schema change is a new function (a migration must do tomorrow what it did today).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Vacuum an outbox at every autovacuum visit that finds about a relay batch of deleted rows,
# however many rows it held when last analysed: rows are only inserted and deleted, so the
# table's live size is its backlog, and the default (20% of the estimated rows) lets a drained
# outbox keep every dead row of a past backlog. Measured in docs/benchmarks.md (issue 18,
# "the outbox's write amplification"). PostgreSQL only; SQLite reuses freed pages itself.
OUTBOX_AUTOVACUUM = {"autovacuum_vacuum_scale_factor": "0", "autovacuum_vacuum_threshold": "1000"}


def to_slice_leases(outbox: str) -> None:
    """Per-slice leases instead of per-row claims (ingest 0010, rules 0014).

    Rows that a relay had claimed under per-row claims stay, unclaimed: the first relay of
    their slice claims them again from the head, in id order (at least once on the wire, as
    after any crash). A row's backoff is forgotten: it is retried at once.
    """
    op.create_table(
        f"{outbox}_leases",
        sa.Column("slice", sa.String(length=200), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=True),
        sa.Column("generation", sa.String(length=32), nullable=True),
        sa.Column("claimed_through", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("slice", name=op.f(f"pk_{outbox}_leases")),
    )
    with op.batch_alter_table(outbox, schema=None) as batch_op:
        batch_op.drop_index(batch_op.f(f"ix_{outbox}_available_at"))
        batch_op.drop_column("claim_generation")
        batch_op.drop_column("claimed_by")
        batch_op.drop_column("attempts")
    if op.get_bind().dialect.name == "postgresql":
        settings = ", ".join(f"{name} = {value}" for name, value in OUTBOX_AUTOVACUUM.items())
        op.execute(f"ALTER TABLE {outbox} SET ({settings})")


def from_slice_leases(outbox: str) -> None:
    """Back to per-row claims: every row unclaimed and due now, no failed attempt counted
    (a slice's lease and backoff are dropped with the lease table)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {outbox} RESET ({', '.join(OUTBOX_AUTOVACUUM)})")
    with op.batch_alter_table(outbox, schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("claim_generation", sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f(f"ix_{outbox}_available_at"), ["available_at"], unique=False)
    op.drop_table(f"{outbox}_leases")
