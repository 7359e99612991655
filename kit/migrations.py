"""Alembic migrations for every service, driven by one piece of code.

Each service keeps its revisions under services/<name>/migrations/versions and a
three-line env.py that calls `run_env`. Each service has its own version table, so
the four schemas can share one PostgreSQL database when an operator wants that.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command, context
from alembic.config import Config
from sqlalchemy.engine import Engine

from kit.db import is_sqlite


def alembic_config(migrations_dir: Path, version_table: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.attributes["version_table"] = version_table
    return config


def upgrade(engine: Engine, migrations_dir: Path, version_table: str, revision: str = "head") -> None:
    """Bring the database behind `engine` to `revision`."""
    config = alembic_config(migrations_dir, version_table)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def run_env(target_metadata: sa.MetaData) -> None:
    """The body of every service's migrations/env.py (online mode, given a connection)."""
    connection = context.config.attributes.get("connection")
    version_table = context.config.attributes.get("version_table", "alembic_version")
    if connection is None:
        url = context.config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("migrations need a connection or sqlalchemy.url")
        context.configure(
            url=url,
            target_metadata=target_metadata,
            version_table=version_table,
            render_as_batch=is_sqlite(url),
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=version_table,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
