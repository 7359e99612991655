"""Settings: every bad or missing value is reported at once, before start-up."""

from __future__ import annotations

import gc

import pytest

from kit.env import SettingsError
from kit.server import tune_collector
from services.ingest.settings import IngestSettings


def test_missing_and_bad_values_are_all_reported() -> None:
    with pytest.raises(SettingsError) as raised:
        IngestSettings.from_env(
            {
                "EGRET_LISTEN_ADDRESS": "nowhere",
                "EGRET_MAX_BATCH_SIZE": "lots",
                "EGRET_LOG_FORMAT": "xml",
                "EGRET_CATALOGUE_FILE": "/does/not/exist.yaml",
                "EGRET_MIGRATE_ON_START": "perhaps",
            }
        )
    problems = raised.value.problems
    assert "EGRET_LISTEN_ADDRESS='nowhere' is not a host:port address" in problems
    assert "EGRET_MAX_BATCH_SIZE='lots' is not a whole number" in problems
    assert "EGRET_LOG_FORMAT='xml' is not one of json, console" in problems
    assert "EGRET_CATALOGUE_FILE='/does/not/exist.yaml': no such file" in problems
    assert "EGRET_MIGRATE_ON_START='perhaps' is not a boolean (true/false)" in problems
    assert "EGRET_SUBJECT_KEY is required but not set" in problems


def test_a_short_subject_key_is_refused() -> None:
    with pytest.raises(SettingsError) as raised:
        IngestSettings.from_env({"EGRET_SUBJECT_KEY": "short", "EGRET_INSECURE": "true"})
    assert raised.value.problems == ["the subject HMAC key must be at least 32 bytes long"]


def test_defaults_give_a_local_sqlite_service() -> None:
    settings = IngestSettings.from_env(
        {"EGRET_SUBJECT_KEY": "x" * 32, "EGRET_DATA_DIR": "/tmp/egret", "EGRET_INSECURE": "true"}
    )
    assert settings.common.database_url == "sqlite:////tmp/egret/ingest.db"
    assert settings.common.listen_address == "127.0.0.1:50051"
    assert [peer.address for peer in settings.rules] == ["127.0.0.1:50052"]
    assert settings.max_batch_size == 1000


def test_production_refuses_to_serve_without_tls_and_token_keys() -> None:
    settings = IngestSettings.from_env({"EGRET_SUBJECT_KEY": "x" * 32})
    assert settings.common.security.missing() == [
        "EGRET_TLS_CERT_FILE is required unless EGRET_INSECURE=true (never in production)",
        "EGRET_TLS_KEY_FILE is required unless EGRET_INSECURE=true (never in production)",
        "EGRET_JWT_ISSUER is required unless EGRET_INSECURE=true (never in production)",
        "EGRET_JWT_PUBLIC_KEY_FILE, EGRET_JWT_JWKS_FILE or EGRET_JWT_JWKS_URL is required unless"
        " EGRET_INSECURE=true (never in production)",
    ]


def test_the_relay_identity_defaults_to_host_and_port_and_can_be_set() -> None:
    base = {"EGRET_SUBJECT_KEY": "x" * 32, "EGRET_INSECURE": "true", "HOSTNAME": "egret-ingest-7d9f-x2k"}
    pod = IngestSettings.from_env(base | {"EGRET_LISTEN_ADDRESS": "0.0.0.0:50051"})
    assert pod.common.instance == "egret-ingest-7d9f-x2k:50051"
    named = IngestSettings.from_env(base | {"EGRET_INSTANCE": "ingest-a"})
    assert named.common.instance == "ingest-a"
    with pytest.raises(SettingsError) as raised:
        IngestSettings.from_env(base | {"EGRET_INSTANCE": "i" * 201})
    assert raised.value.problems == ["EGRET_INSTANCE is longer than 200 characters"]


def test_the_collector_threshold_defaults_high_and_is_bounded() -> None:
    base = {"EGRET_SUBJECT_KEY": "x" * 32, "EGRET_INSECURE": "true"}
    assert IngestSettings.from_env(base).common.gc_threshold == 50_000
    assert IngestSettings.from_env(base | {"EGRET_GC_THRESHOLD": "700"}).common.gc_threshold == 700
    with pytest.raises(SettingsError) as raised:
        IngestSettings.from_env(base | {"EGRET_GC_THRESHOLD": "10"})
    assert raised.value.problems == ["EGRET_GC_THRESHOLD=10 is below the minimum 700"]


def test_tuning_the_collector_freezes_what_was_built_and_sets_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        tune_collector(12_345)
        assert gc.get_threshold() == (12_345, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
