"""Rules' settings, read from the environment and validated at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kit.env import Env
from kit.settings import CommonSettings, PeerSettings, PseudonymSettings, RelaySettings
from kit.sharding import UNSHARDED, Shard

DEFAULT_PORT = 50052
# The root generation alone, as before rotations: what the environment gives by default.
ROOT_GENERATION = PseudonymSettings(key=b"", key_id="k1")


@dataclass(frozen=True)
class RulesSettings:
    common: CommonSettings
    ruleset_file: Path
    max_batch_size: int
    score: PeerSettings
    relay: RelaySettings
    # Failed evaluations of one event before it is parked as a dead letter.
    dead_letter_after_attempts: int = 3
    # Which subjects this instance evaluates (EGRET_RULES_SHARD of EGRET_RULES_SHARDS).
    shard: Shard = UNSHARDED
    # Backtests split reports by the catalogue's cohort attributes, so rules reads the file
    # ingest does. (They score with score's active policy, asked from score: no file.)
    catalogue_file: Path = Path("config/catalogue.yaml")
    # Processes a backtest replays its shards of subjects in (1: on the engine thread).
    backtest_workers: int = 1
    # The purposes a read of subject data may state (backtests, dead letters; kit.reads).
    purposes_file: Path = Path("config/purposes.yaml")
    # The subject key's generations: rules never hashes raw ids, so it holds the rotation
    # secrets without the root key, to move keys of an earlier generation forward.
    pseudonym: PseudonymSettings = ROOT_GENERATION
    # The window cache (services/rules/window_cache.py): subjects whose history and prior
    # outcomes stay in memory between batches, and the memory they may take together
    # (estimated; about 1.2 KiB per event); 0 in either turns it off.
    window_cache_subjects: int = 100_000
    window_cache_mib: int = 384

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RulesSettings:
        env = Env(environ)
        settings = cls(
            common=CommonSettings.read(env, service="rules", default_port=DEFAULT_PORT),
            ruleset_file=env.file("EGRET_RULESET_FILE", Path("config/rulesets/sample.yaml")),
            max_batch_size=env.integer("EGRET_MAX_BATCH_SIZE", 10000, minimum=1, maximum=100000),
            score=PeerSettings.read(env, prefix="EGRET_SCORE", default_address="127.0.0.1:50053"),
            relay=RelaySettings.read(env, prefix="EGRET_RELAY"),
            dead_letter_after_attempts=env.integer(
                "EGRET_DEAD_LETTER_AFTER_ATTEMPTS", 3, minimum=1, maximum=100
            ),
            shard=Shard.read(env, prefix="EGRET_RULES"),
            catalogue_file=env.file("EGRET_CATALOGUE_FILE", Path("config/catalogue.yaml")),
            backtest_workers=env.integer("EGRET_BACKTEST_WORKERS", default_workers(), minimum=1, maximum=64),
            purposes_file=env.file("EGRET_PURPOSES_FILE", Path("config/purposes.yaml")),
            pseudonym=PseudonymSettings.read(env, root_required=False),
            window_cache_subjects=env.integer(
                "EGRET_RULES_WINDOW_CACHE_SUBJECTS", 100_000, minimum=0, maximum=10_000_000
            ),
            window_cache_mib=env.integer("EGRET_RULES_WINDOW_CACHE_MIB", 384, minimum=0, maximum=1_000_000),
        )
        if settings.pseudonym.rotations and settings.shard.count > 1:
            # Shards split subjects by their key (kit.sharding): a re-keyed subject would
            # belong to another shard, whose database does not hold its window state.
            env.problems.append(
                f"rotating subject keys with {settings.shard.count} rules shards needs resharding "
                "(docs/security.md)"
            )
        env.check()
        return settings


def default_workers() -> int:
    """The CPUs this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))
