"""Rules' settings, read from the environment and validated at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kit.settings import CommonSettings, Env, PeerSettings, RelaySettings

DEFAULT_PORT = 50052


@dataclass(frozen=True)
class RulesSettings:
    common: CommonSettings
    ruleset_file: Path
    max_batch_size: int
    score: PeerSettings
    relay: RelaySettings

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RulesSettings:
        env = Env(environ)
        settings = cls(
            common=CommonSettings.read(env, service="rules", default_port=DEFAULT_PORT),
            ruleset_file=env.file("EGRET_RULESET_FILE", Path("config/rulesets/sample.yaml")),
            max_batch_size=env.integer("EGRET_MAX_BATCH_SIZE", 10000, minimum=1, maximum=100000),
            score=PeerSettings.read(env, prefix="EGRET_SCORE", default_address="127.0.0.1:50053"),
            relay=RelaySettings.read(env, prefix="EGRET_RELAY"),
        )
        env.check()
        return settings
