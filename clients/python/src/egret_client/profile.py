"""Profiles: where each service listens and how to prove who is calling.

A config file holds named profiles, in the manner of kubectl's kubeconfig:

    current-profile: reviewer
    profiles:
      reviewer:
        endpoints: {ingest: 127.0.0.1:50051, rules: 127.0.0.1:50052,
                    score: 127.0.0.1:50053, query: 127.0.0.1:50054}
        tls: {ca: pki/ca.pem, cert: pki/operator.pem, key: pki/operator-key.pem}
        token-file: tokens/reviewer.token      # or: oidc: {token-url, client-id, client-secret-file, scope}
        purpose: subject-request               # the default purpose of reads that need one
        local: true                            # a local development cluster
    dev: {signing-key: pki/jwt-private.pem, issuer: https://idp.egret.local, audience: egret}

Relative paths are read from the config file's directory. The file is found at
`--config`, else $EGRET_CONFIG, else $XDG_CONFIG_HOME/egret/config.yaml
(~/.config/egret/config.yaml); the profile is `--profile`, else $EGRET_PROFILE, else
`current-profile`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SERVICES = ("ingest", "rules", "score", "query")

_PATH = {"type": "string", "minLength": 1}
_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["profiles"],
    "properties": {
        "current-profile": {"type": "string"},
        "profiles": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["endpoints"],
                "properties": {
                    "endpoints": {
                        "type": "object",
                        "additionalProperties": False,
                        "minProperties": 1,
                        "properties": {
                            name: {"type": "string", "pattern": r"^\S+:\d+$"} for name in SERVICES
                        },
                    },
                    "tls": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "ca": _PATH,
                            "cert": _PATH,
                            "key": _PATH,
                            "insecure": {"type": "boolean"},
                        },
                        "dependentRequired": {"cert": ["key"], "key": ["cert"]},
                    },
                    "token-file": _PATH,
                    "oidc": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["token-url", "client-id", "client-secret-file"],
                        "properties": {
                            "token-url": {"type": "string", "pattern": "^https?://"},
                            "client-id": {"type": "string", "minLength": 1},
                            "client-secret-file": _PATH,
                            "scope": {"type": "string"},
                        },
                    },
                    "purpose": {"type": "string"},
                    "local": {"type": "boolean"},
                },
                "not": {"required": ["token-file", "oidc"]},
            },
        },
        "dev": {
            "type": "object",
            "additionalProperties": False,
            "required": ["signing-key", "issuer", "audience"],
            "properties": {
                "signing-key": _PATH,
                "issuer": {"type": "string"},
                "audience": {"type": "string"},
            },
        },
    },
}


class ProfileError(Exception):
    """The config file is missing, unreadable, invalid, or lacks the profile asked for."""


@dataclass(frozen=True)
class Oidc:
    """OAuth 2.0 client credentials at the identity provider's token endpoint."""

    token_url: str
    client_id: str
    client_secret_file: Path
    scope: str = ""


@dataclass(frozen=True)
class DevSigner:
    """The local cluster's token-signing key (`egret dev token`); never in a real profile."""

    signing_key: Path
    issuer: str
    audience: str


@dataclass(frozen=True)
class Profile:
    """Everything a connection needs: endpoints, TLS files, where the token comes from."""

    name: str
    endpoints: Mapping[str, str]
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Plaintext, for a service behind a local TLS-terminating proxy only.
    insecure: bool = False
    token_file: Path | None = None
    oidc: Oidc | None = None
    purpose: str = ""
    local: bool = False
    dev: DevSigner | None = None

    def endpoint(self, service: str) -> str:
        try:
            return self.endpoints[service]
        except KeyError:
            raise ProfileError(f"profile {self.name!r} names no endpoint for {service}") from None


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the config file is: the argument, $EGRET_CONFIG, or the XDG config directory."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get("EGRET_CONFIG"):
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "egret" / "config.yaml"


def read_config(path: Path) -> dict[str, Any]:
    """The config file, checked against its schema."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(
            f"no config file at {path} (set --config or EGRET_CONFIG; `make run` writes var/demo/egret.yaml)"
        ) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"cannot read {path}: {exc}") from None
    # Imported here: with rfc3987-syntax installed, importing jsonschema builds a grammar (~0.9 s),
    # which commands that never read a profile should not pay.
    import jsonschema  # noqa: PLC0415

    try:
        jsonschema.validate(document, _SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(part) for part in exc.absolute_path) or "(top level)"
        raise ProfileError(f"{path}: {where}: {exc.message}") from None
    assert isinstance(document, dict)
    return document


def load_profile(name: str | None = None, config: str | os.PathLike[str] | None = None) -> Profile:
    """The named profile (or $EGRET_PROFILE, or the file's current-profile)."""
    path = config_path(config)
    document = read_config(path)
    chosen = name or os.environ.get("EGRET_PROFILE") or document.get("current-profile")
    profiles = document["profiles"]
    if not chosen:
        if len(profiles) != 1:
            raise ProfileError(f"{path} holds {len(profiles)} profiles and no current-profile; name one")
        chosen = next(iter(profiles))
    if chosen not in profiles:
        raise ProfileError(f"{path} has no profile {chosen!r}; it has {', '.join(sorted(profiles))}")
    return _profile(chosen, profiles[chosen], document.get("dev"), path.parent.resolve())


def profile_names(config: str | os.PathLike[str] | None = None) -> tuple[list[str], str | None]:
    """The profiles of the config file and its current one."""
    document = read_config(config_path(config))
    return sorted(document["profiles"]), document.get("current-profile")


def _profile(name: str, raw: Mapping[str, Any], dev: Mapping[str, Any] | None, base: Path) -> Profile:
    def path(value: str | None) -> Path | None:
        return None if value is None else base / Path(value).expanduser()

    tls = raw.get("tls", {})
    oidc = raw.get("oidc")
    return Profile(
        name=name,
        endpoints=dict(raw["endpoints"]),
        ca_file=path(tls.get("ca")),
        cert_file=path(tls.get("cert")),
        key_file=path(tls.get("key")),
        insecure=bool(tls.get("insecure", False)),
        token_file=path(raw.get("token-file")),
        oidc=None
        if oidc is None
        else Oidc(
            token_url=oidc["token-url"],
            client_id=oidc["client-id"],
            client_secret_file=base / oidc["client-secret-file"],
            scope=oidc.get("scope", ""),
        ),
        purpose=raw.get("purpose", ""),
        local=bool(raw.get("local", False)),
        dev=None
        if dev is None or not raw.get("local", False)
        else DevSigner(base / dev["signing-key"], dev["issuer"], dev["audience"]),
    )
