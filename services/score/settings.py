"""Score's settings, read from the environment and validated at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kit.env import Env
from kit.settings import CommonSettings, PseudonymSettings

DEFAULT_PORT = 50053


@dataclass(frozen=True)
class ScoreSettings:
    common: CommonSettings
    policy_file: Path
    max_batch_size: int
    verify_page_size: int
    db_workers: int
    sweep_interval_s: float = 60.0
    # The subject key chain: its id and rotations (EGRET_SUBJECT_KEY_ID,
    # EGRET_SUBJECT_KEY_ROTATIONS), always read, since score moves the keys it receives and
    # stores to the current generation; and the root key (EGRET_SUBJECT_KEY_FILE or
    # EGRET_SUBJECT_KEY) when set, so that a subject's token names its subject key: needed
    # for subjects to file disputes, apply for repair and set consent. Without the root key
    # (`key` empty) subjects are known by role only and those calls find nothing of theirs.
    pseudonym: PseudonymSettings = field(default_factory=lambda: PseudonymSettings(key=b"", key_id="k1"))
    # The purposes a read of subject data may state (VerifyScores; kit.reads).
    purposes_file: Path = Path("config/purposes.yaml")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ScoreSettings:
        env = Env(environ)
        common = CommonSettings.read(env, service="score", default_port=DEFAULT_PORT)
        settings = cls(
            common=common,
            policy_file=env.file("EGRET_POLICY_FILE", Path("config/policy.yaml")),
            # Rules' relay sends up to its batch size (at most 10000) in one call; a
            # smaller limit here would reject its batches forever.
            max_batch_size=env.integer("EGRET_MAX_BATCH_SIZE", 10000, minimum=1, maximum=100000),
            verify_page_size=env.integer("EGRET_VERIFY_PAGE_SIZE", 1000, minimum=1, maximum=10000),
            db_workers=env.integer("EGRET_DB_WORKERS", 1, minimum=1, maximum=64),
            # Reads are exact without the sweep (query recomputes a row past its next
            # change), so the interval only bounds how stale history and distributions get.
            sweep_interval_s=env.number("EGRET_SWEEP_INTERVAL_SECONDS", 60.0, minimum=0.05, maximum=86400.0),
            pseudonym=PseudonymSettings.read(
                env,
                root_required=env.optional("EGRET_SUBJECT_KEY_FILE") is not None
                or env.optional("EGRET_SUBJECT_KEY") is not None,
            ),
            purposes_file=env.file("EGRET_PURPOSES_FILE", Path("config/purposes.yaml")),
        )
        env.check()
        return settings
