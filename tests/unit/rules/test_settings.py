"""Rules' settings: the subject key chain without the root key, and the one combination
refused at start-up (issue 12, point 7; docs/security.md, "Rotating the subject key")."""

from __future__ import annotations

import pytest

from kit.env import SettingsError
from services.rules.settings import RulesSettings

BASE = {"EGRET_INSECURE": "true", "EGRET_DATA_DIR": "/tmp/egret"}
ROTATIONS = "k2:" + "s" * 32


def test_rules_reads_the_rotations_without_the_root_key() -> None:
    settings = RulesSettings.from_env(BASE | {"EGRET_SUBJECT_KEY_ROTATIONS": ROTATIONS})
    assert settings.pseudonym.key == b""
    assert settings.pseudonym.key_id == "k1"
    assert settings.pseudonym.rotations == (("k2", b"s" * 32),)


def test_rotating_subject_keys_with_several_shards_is_refused_as_resharding() -> None:
    with pytest.raises(SettingsError) as raised:
        RulesSettings.from_env(
            BASE
            | {"EGRET_SUBJECT_KEY_ROTATIONS": ROTATIONS, "EGRET_RULES_SHARD": "0", "EGRET_RULES_SHARDS": "3"}
        )
    assert raised.value.problems == [
        "rotating subject keys with 3 rules shards needs resharding (docs/security.md)"
    ]


def test_several_shards_without_rotations_and_one_shard_with_them_start() -> None:
    sharded = RulesSettings.from_env(BASE | {"EGRET_RULES_SHARD": "1", "EGRET_RULES_SHARDS": "3"})
    assert (sharded.shard.count, sharded.pseudonym.rotations) == (3, ())
    single = RulesSettings.from_env(
        BASE | {"EGRET_SUBJECT_KEY_ROTATIONS": ROTATIONS, "EGRET_RULES_SHARDS": "1"}
    )
    assert single.shard.count == 1


def test_the_window_cache_is_sized_from_the_environment_and_zero_turns_it_off() -> None:
    default = RulesSettings.from_env(BASE)
    assert (default.window_cache_subjects, default.window_cache_mib) == (100_000, 384)
    off = RulesSettings.from_env(BASE | {"EGRET_RULES_WINDOW_CACHE_SUBJECTS": "0"})
    assert off.window_cache_subjects == 0
    with pytest.raises(SettingsError):
        RulesSettings.from_env(BASE | {"EGRET_RULES_WINDOW_CACHE_MIB": "-1"})
