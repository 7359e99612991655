"""Database engines and sessions: SQLite in WAL mode by default, PostgreSQL for scale.

Engines are built by the service's bootstrap, never at import time. SQLite gets WAL
(readers never block the writer), a busy timeout, foreign keys and the configured
`synchronous` level (FULL makes every acknowledged commit survive power loss), page cache
and checkpoint interval (`SqliteTuning`).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from kit.db_metrics import watch_pool
from kit.settings import SqliteTuning

T = TypeVar("T")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def make_metadata() -> sa.MetaData:
    """MetaData with the naming convention every service's schema uses."""
    return sa.MetaData(naming_convention=NAMING_CONVENTION)


def is_sqlite(url: str | sa.URL) -> bool:
    return sa.make_url(url).get_backend_name() == "sqlite"


_SQLITE_DEFAULTS = SqliteTuning()


def create_engine(
    url: str, *, sqlite: SqliteTuning = _SQLITE_DEFAULTS, read_only: bool = False, pool_size: int = 5
) -> Engine:
    """An engine for `url`; for SQLite, creates the parent directory and sets pragmas."""
    parsed = sa.make_url(url)
    if is_sqlite(parsed):
        on_disk = bool(parsed.database) and parsed.database != ":memory:"
        if on_disk and not read_only:
            Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": 30, "check_same_thread": False})
        if on_disk and read_only:
            # mode=ro fails (health reports NOT_SERVING) where a plain connect would
            # create an empty database file behind the owning service's back.
            uri = f"file:{quote(str(Path(str(parsed.database)).absolute()))}?mode=ro"

            @event.listens_for(engine, "do_connect")
            def _open_read_only(_: Any, __: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
                cargs[:] = [uri]
                cparams["uri"] = True

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            if not read_only:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={sqlite.synchronous}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            # Negative: in KiB rather than pages.
            cursor.execute(f"PRAGMA cache_size=-{sqlite.cache_mib * 1024}")
            if read_only:
                cursor.execute("PRAGMA query_only=ON")
            else:
                cursor.execute(f"PRAGMA wal_autocheckpoint={sqlite.checkpoint_pages}")
            cursor.close()

        watch_pool(engine)
        return engine
    engine = sa.create_engine(parsed, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)
    watch_pool(engine)
    if read_only:

        @event.listens_for(engine, "connect")
        def _pg_read_only(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            cursor.close()
            dbapi_connection.commit()

    return engine


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything is stored in UTC, so say so."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any exception."""
    with factory() as session, session.begin():
        yield session


def ping(engine: Engine) -> bool:
    """True when the database answers a trivial query."""
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError:
        return False
    return True


async def run_blocking(executor: Executor | None, fn: Callable[..., T], *args: Any) -> T:
    """Run blocking database work off the event loop, keeping the caller's contextvars
    (and so its trace context and log bindings). `executor=None` uses the default pool."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(executor, context.run, fn, *args)
