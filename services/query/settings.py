"""Query's settings, read from the environment and validated at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kit.db import is_sqlite
from kit.env import Env
from kit.settings import CommonSettings, PeerSettings, PseudonymSettings

DEFAULT_PORT = 50054
READ_PATHS = ("auto", "inline", "pool")


@dataclass(frozen=True)
class QuerySettings:
    """`score_database_url` is score's store, read-only; `common.database_url` is query's own
    database, which holds only the access log (who read which subject's data). `rules`, when
    EGRET_RULES_ADDRESS is set, is where Explain asks for the active rule set's positive
    behaviours (optional: without it, explanations list none)."""

    common: CommonSettings
    pseudonym: PseudonymSettings
    score_database_url: str
    policy_file: Path
    db_workers: int
    benefits_file: Path = Path("config/benefits.yaml")
    # The purposes a read may state (kit.purposes).
    purposes_file: Path = Path("config/purposes.yaml")
    # Where a current score is read: "inline" on the event loop, "pool" on a worker thread,
    # "auto" inline for a local SQLite store and on the pool for a networked database.
    read_path: str = "auto"
    rules: PeerSettings | None = None
    # Access-log commits start at most this often (services.query.stores.access_log):
    # records arriving meanwhile share one commit; 0 commits whenever the last one ended.
    access_log_commit_interval_ms: float = 0.0

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
            purposes_file=env.file("EGRET_PURPOSES_FILE", Path("config/purposes.yaml")),
            read_path=env.choice("EGRET_QUERY_READ_PATH", "auto", READ_PATHS),
            access_log_commit_interval_ms=env.number(
                "EGRET_QUERY_ACCESS_LOG_COMMIT_INTERVAL_MS", 0.0, minimum=0.0, maximum=100.0
            ),
            rules=(
                PeerSettings.read(env, prefix="EGRET_RULES", default_address="")
                if env.optional("EGRET_RULES_ADDRESS")
                else None
            ),
        )
        env.check()
        return settings

    @property
    def inline_reads(self) -> bool:
        return self.read_path == "inline" or (self.read_path == "auto" and is_sqlite(self.score_database_url))
