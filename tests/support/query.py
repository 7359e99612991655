"""The query service's settings for tests, and score's beside it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kit.db import is_sqlite
from kit.settings import PseudonymSettings
from services.query.settings import QuerySettings
from services.score.settings import ScoreSettings
from tests.support.events import TEST_SUBJECT_KEY
from tests.support.score import POLICY_FILE, score_settings
from tests.support.servers import common_settings


def score_beside_query_settings(database_url: str, data_dir: Path) -> ScoreSettings:
    return replace(score_settings(database_url, data_dir), max_batch_size=100, verify_page_size=100)


def query_settings(score_database_url: str, data_dir: Path) -> QuerySettings:
    # Query's own database (the access log): a file of its own on SQLite, so score's store
    # is never created by query; on PostgreSQL the test database, beside score's tables.
    own = f"sqlite:///{data_dir / 'query.db'}" if is_sqlite(score_database_url) else score_database_url
    return QuerySettings(
        common=common_settings("query", own, data_dir),
        pseudonym=PseudonymSettings(key=TEST_SUBJECT_KEY, key_id="k1"),
        score_database_url=score_database_url,
        policy_file=POLICY_FILE,
        db_workers=2,
    )
