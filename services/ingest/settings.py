"""Ingest's settings, read from the environment and validated at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kit.env import Env
from kit.settings import CommonSettings, PeerSettings, PseudonymSettings, RelaySettings
from kit.sharding import read_shard_peers

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class IngestSettings:
    common: CommonSettings
    pseudonym: PseudonymSettings
    catalogue_file: Path
    max_batch_size: int
    max_future_skew_s: float
    max_event_age_days: int
    db_workers: int
    # The rules instances in shard order (EGRET_RULES_ADDRESSES), or the one unsharded instance.
    rules: tuple[PeerSettings, ...]
    relay: RelaySettings

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> IngestSettings:
        env = Env(environ)
        common = CommonSettings.read(env, service="ingest", default_port=DEFAULT_PORT)
        settings = cls(
            common=common,
            pseudonym=PseudonymSettings.read(env),
            catalogue_file=env.file("EGRET_CATALOGUE_FILE", Path("config/catalogue.yaml")),
            max_batch_size=env.integer("EGRET_MAX_BATCH_SIZE", 1000, minimum=1, maximum=10000),
            max_future_skew_s=env.number("EGRET_MAX_FUTURE_SKEW_SECONDS", 300.0, minimum=0.0),
            max_event_age_days=env.integer("EGRET_MAX_EVENT_AGE_DAYS", 3650, minimum=1),
            db_workers=env.integer("EGRET_DB_WORKERS", 1, minimum=1, maximum=64),
            rules=read_shard_peers(env, prefix="EGRET_RULES", default_address="127.0.0.1:50052"),
            relay=RelaySettings.read(env, prefix="EGRET_RELAY"),
        )
        env.check()
        return settings
