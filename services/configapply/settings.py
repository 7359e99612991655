"""The config-apply command's settings, read from the environment and validated first."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kit.env import Env
from kit.settings import PeerSettings, SecuritySettings


@dataclass(frozen=True)
class ConfigApplySettings:
    """What should be live (the three files the chart mounts from values) and where to
    apply it: every rules shard (each holds its own rule sets) and score."""

    ruleset_file: Path
    policy_file: Path
    benefits_file: Path
    rules: tuple[str, ...]
    score: PeerSettings
    # ActivatePolicy recomputes every subject before it answers: its own, longer deadline.
    activate_policy_deadline_s: float
    # How long the first call to each service waits for it to be up (a fresh install
    # starts the Job and the services together).
    wait_s: float
    security: SecuritySettings
    log_format: str = "json"
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ConfigApplySettings:
        env = Env(environ)
        rules = env.address_list("EGRET_RULES_ADDRESSES") or [
            env.address("EGRET_RULES_ADDRESS", "127.0.0.1:50052")
        ]
        security = SecuritySettings.read(env)
        settings = cls(
            ruleset_file=env.file("EGRET_RULESET_FILE", Path("config/rulesets/sample.yaml")),
            policy_file=env.file("EGRET_POLICY_FILE", Path("config/policy.yaml")),
            benefits_file=env.file("EGRET_BENEFITS_FILE", Path("config/benefits.yaml")),
            rules=tuple(rules),
            score=PeerSettings.read(env, prefix="EGRET_SCORE", default_address="127.0.0.1:50053"),
            activate_policy_deadline_s=env.number(
                "EGRET_ACTIVATE_POLICY_DEADLINE_SECONDS", 600.0, minimum=1.0, maximum=86_400.0
            ),
            wait_s=env.number("EGRET_CONFIG_APPLY_WAIT_SECONDS", 300.0, minimum=0.0, maximum=3600.0),
            security=security,
            log_format=env.choice("EGRET_LOG_FORMAT", "json", ("json", "console")),
            log_level=env.choice("EGRET_LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        )
        if not security.insecure and (security.tls_ca_file is None or security.service_token_file is None):
            env.problems.append(
                "EGRET_TLS_CA_FILE and EGRET_SERVICE_TOKEN_FILE (the deployer's token, scope "
                "egret.config.apply) are required unless EGRET_INSECURE=true"
            )
        env.check()
        return settings
