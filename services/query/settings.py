"""Query's settings, read from the environment and validated at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kit.settings import CommonSettings, Env, PseudonymSettings

DEFAULT_PORT = 50054


@dataclass(frozen=True)
class QuerySettings:
    """Query keeps no database of its own; `score_database_url` is score's store, read-only."""

    common: CommonSettings
    pseudonym: PseudonymSettings
    score_database_url: str
    policy_file: Path
    db_workers: int
    benefits_file: Path = Path("config/benefits.yaml")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> QuerySettings:
        env = Env(environ)
        common = CommonSettings.read(env, service="query", default_port=DEFAULT_PORT)
        settings = cls(
            common=common,
            pseudonym=PseudonymSettings.read(env),
            score_database_url=env.text(
                "EGRET_SCORE_DATABASE_URL", f"sqlite:///{common.data_dir / 'score'}.db"
            ),
            policy_file=env.file("EGRET_POLICY_FILE", Path("config/policy.yaml")),
            db_workers=env.integer("EGRET_DB_WORKERS", 4, minimum=1, maximum=64),
            benefits_file=env.file("EGRET_BENEFITS_FILE", Path("config/benefits.yaml")),
        )
        env.check()
        return settings
