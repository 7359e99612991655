"""Fresh PostgreSQL databases for tests, on the server named by EGRET_TEST_POSTGRES_URL."""

from __future__ import annotations

import os
import uuid

import sqlalchemy as sa

POSTGRES_ADMIN_URL = os.environ.get(
    "EGRET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def create_postgres_database() -> str:
    """Create a fresh, uniquely named database and return its URL."""
    admin = sa.make_url(POSTGRES_ADMIN_URL)
    name = f"egret_test_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin.set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    admin = sa.make_url(POSTGRES_ADMIN_URL)
    name = sa.make_url(url).database
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def stored_text(value: object) -> str:
    """A value read by raw SQL, as text: bytes (a key or id a kit.columns.Hex column stores
    as the bytes its hex spells) as that hex, anything else as str()."""
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    return str(value)
