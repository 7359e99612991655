"""The score service's settings for tests."""

from __future__ import annotations

from pathlib import Path

from services.score.settings import ScoreSettings
from tests.support.servers import common_settings

POLICY_FILE = Path(__file__).parents[2] / "config" / "policy.yaml"


def score_settings(database_url: str, data_dir: Path) -> ScoreSettings:
    return ScoreSettings(
        common=common_settings("score", database_url, data_dir),
        policy_file=POLICY_FILE,
        max_batch_size=50,
        verify_page_size=2,
        db_workers=1,
    )
