"""The shard layout a rules database was built for, checked at every start.

A rules database holds the window state of one shard's subjects. Started with another
shard index or shard count, the instance would evaluate subjects whose history lives
elsewhere (and miss the ones it has), silently. So the first start records the layout
and every later start must match it; changing it is resharding (docs/architecture.md,
"Scaling out rules").
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from kit.columns import Instant
from kit.env import SettingsError
from kit.logging import get_logger
from kit.sharding import Shard
from services.rules.stores.schema import Base

log = get_logger(__name__)

_ONLY_ROW = 1


class ShardLayout(Base):
    """One row: the shard this database belongs to."""

    __tablename__ = "rules_shard_layout"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    shard: Mapped[int] = mapped_column(sa.Integer)
    shards: Mapped[int] = mapped_column(sa.Integer)
    recorded_at: Mapped[datetime] = mapped_column(Instant())


def check_shard_layout(sessions: sessionmaker[Session], shard: Shard) -> None:
    """Record `shard` on first start; raise SettingsError if the database was built for another.

    A database that cannot be read yet is left to the health check, as everywhere else.
    """
    try:
        with sessions() as session, session.begin():
            stored = session.get(ShardLayout, _ONLY_ROW)
            if stored is None:
                session.add(
                    ShardLayout(
                        id=_ONLY_ROW, shard=shard.index, shards=shard.count, recorded_at=datetime.now(UTC)
                    )
                )
                return
            recorded = Shard(stored.shard, stored.shards)
    except SQLAlchemyError as exc:
        log.warning("cannot check the shard layout of the database", error=type(exc).__name__)
        return
    if recorded != shard:
        raise SettingsError(
            [
                f"EGRET_RULES_SHARD={shard.index} of EGRET_RULES_SHARDS={shard.count} does not match "
                f"this database, which holds {recorded.describe()}: changing the layout is "
                "resharding (drain, move the state), see docs/architecture.md"
            ]
        )
