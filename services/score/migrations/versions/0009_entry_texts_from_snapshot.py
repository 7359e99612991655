"""entry texts from the snapshot: score_ledger stores the rule's texts and the reason once

score_ledger.rule_title, rule_description, legal_basis and reason were copies of fields of
the entry's evidence snapshot (score_ledger.outcome, the egret.common.v1.Outcome rules
sent: rule.title, rule.description, rule.legal_basis, reason), written together from the
same message and never selected or filtered on; readers now take them from the snapshot
(contracts.score_store.ledger_entry). About 200 bytes per entry (issue 18,
docs/benchmarks.md, "where the bytes go").

The upgrade first checks, row by row, that each copy equals its snapshot's field, and
stops with the first differing entry ids rather than lose a text the snapshot lacks. The
downgrade adds the columns back and fills them from the snapshots. On PostgreSQL the
dropped columns' space in existing rows is reclaimed as rows are rewritten (VACUUM FULL
or pg_repack for at once); new rows are smaller at once.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 16:00:00.000000
"""

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from egret.common.v1 import outcome_pb2

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PAGE = 1000
_TEXTS = ("rule_title", "rule_description", "legal_basis", "reason")
_LEDGER = sa.table(
    "score_ledger",
    sa.column("entry_id", sa.String()),
    *(sa.column(name, sa.Text()) for name in _TEXTS),
    sa.column("outcome", sa.LargeBinary()),
)


def _texts(snapshot: bytes) -> tuple[str, str, str, str]:
    outcome = outcome_pb2.Outcome.FromString(snapshot)
    return outcome.rule.title, outcome.rule.description, outcome.rule.legal_basis, outcome.reason


def _pages(connection: sa.Connection, *columns: Any) -> Iterator[Sequence[Any]]:
    """score_ledger's rows in entry_id order, a page at a time (keyset: no offset scans)."""
    after: str | None = None
    while True:
        query = sa.select(_LEDGER.c.entry_id, *columns).order_by(_LEDGER.c.entry_id).limit(_PAGE)
        if after is not None:
            query = query.where(_LEDGER.c.entry_id > after)
        rows = connection.execute(query).all()
        if not rows:
            return
        yield rows
        after = rows[-1].entry_id


def upgrade() -> None:
    connection = op.get_bind()
    differing: list[str] = []
    columns = [_LEDGER.c[name] for name in _TEXTS]
    for rows in _pages(connection, *columns, _LEDGER.c.outcome):
        for row in rows:
            try:
                same = _texts(bytes(row.outcome)) == tuple(row[1:5])
            except Exception:  # a snapshot that does not parse cannot stand in for the texts
                same = False
            if not same:
                differing.append(row.entry_id)
    if differing:
        raise RuntimeError(
            f"score_ledger: {len(differing)} entries whose rule texts or reason differ from their "
            f"outcome snapshot (first: {', '.join(differing[:5])}); dropping the columns would lose "
            "them. Correct those rows or stay at revision 0008."
        )
    with op.batch_alter_table("score_ledger") as batch:
        for name in _TEXTS:
            batch.drop_column(name)


def downgrade() -> None:
    with op.batch_alter_table("score_ledger") as batch:
        for name in _TEXTS:
            batch.add_column(sa.Column(name, sa.Text(), nullable=False, server_default=""))
    connection = op.get_bind()
    update = (
        sa.update(_LEDGER)
        .where(_LEDGER.c.entry_id == sa.bindparam("b_id"))
        .values({name: sa.bindparam(f"b_{name}") for name in _TEXTS})
    )
    for rows in _pages(connection, _LEDGER.c.outcome):
        params = []
        for row in rows:
            try:
                texts = _texts(bytes(row.outcome))
            except Exception:  # as the code before read it: nothing to show
                texts = ("", "", "", "")
            params.append({"b_id": row.entry_id, **{f"b_{n}": t for n, t in zip(_TEXTS, texts, strict=True)}})
        connection.execute(update, params)
    # As revision 0008 had them: no default.
    with op.batch_alter_table("score_ledger") as batch:
        for name in _TEXTS:
            batch.alter_column(name, existing_type=sa.Text(), server_default=None)
