"""The config-apply command's settings: every problem at once, exit status 2 before any call."""

from __future__ import annotations

from pathlib import Path

import pytest

from kit.env import SettingsError
from services.configapply.bootstrap import main
from services.configapply.settings import ConfigApplySettings

ROOT = Path(__file__).parents[3]


def test_missing_files_and_credentials_are_all_reported() -> None:
    with pytest.raises(SettingsError) as error:
        ConfigApplySettings.from_env(
            {
                "EGRET_RULESET_FILE": "/nonexistent/rules.yaml",
                "EGRET_RULES_ADDRESSES": "rules-0:50052,nowhere",
            }
        )
    problems = error.value.problems
    assert any("EGRET_RULESET_FILE" in p for p in problems), problems
    assert any("EGRET_RULES_ADDRESSES: entry 1" in p for p in problems), problems
    # Secure by default: the deployer's token and the services' CA are required.
    assert any("EGRET_SERVICE_TOKEN_FILE" in p for p in problems), problems


def test_the_shipped_config_passes_and_every_shard_is_a_target() -> None:
    settings = ConfigApplySettings.from_env(
        {
            "EGRET_INSECURE": "true",
            "EGRET_RULESET_FILE": str(ROOT / "config/rulesets/sample.yaml"),
            "EGRET_POLICY_FILE": str(ROOT / "config/policy.yaml"),
            "EGRET_BENEFITS_FILE": str(ROOT / "config/benefits.yaml"),
            "EGRET_RULES_ADDRESSES": "rules-0:50052,rules-1:50052",
        }
    )
    assert settings.rules == ("rules-0:50052", "rules-1:50052")
    assert settings.activate_policy_deadline_s == 600.0


def test_bad_settings_exit_with_status_2_naming_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EGRET_POLICY_FILE", "/nonexistent/policy.yaml")
    assert main([]) == 2
    assert "EGRET_POLICY_FILE" in capsys.readouterr().err
