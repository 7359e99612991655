"""The portal's settings are validated at start-up, every problem listed at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.portal.settings import PortalSettings, SettingsError


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    secret = tmp_path / "session.key"
    secret.write_text("s" * 40 + "\n" + "o" * 40 + "\n")
    client = tmp_path / "client.secret"
    client.write_text("client-secret\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    return {
        "EGRET_PORTAL_SESSION_SECRET_FILE": str(secret),
        "EGRET_PORTAL_OIDC_CLIENT_SECRET_FILE": str(client),
        "EGRET_PORTAL_OIDC_ISSUER": "https://id.city.example/",
        "EGRET_PORTAL_PUBLIC_URL": "https://credit.city.example",
        "EGRET_TLS_CA_FILE": str(ca),
    }


def test_a_complete_environment(files: dict[str, str]) -> None:
    settings = PortalSettings.from_env(files)
    assert settings.oidc.issuer == "https://id.city.example"
    assert settings.oidc.client_secret == "client-secret"
    assert settings.redirect_uri == "https://credit.city.example/auth/callback"
    assert settings.session_secrets == (b"s" * 40, b"o" * 40)
    assert settings.default_language == "zh_Hans"
    assert settings.secure_cookies


def test_every_problem_is_listed(files: dict[str, str]) -> None:
    env = {
        **files,
        "EGRET_PORTAL_PUBLIC_URL": "http://credit.city.example",
        "EGRET_PORTAL_OIDC_ISSUER": "http://id.city.example",
        "EGRET_PORTAL_SESSION_IDLE_SECONDS": "7200",
        "EGRET_PORTAL_SESSION_ABSOLUTE_SECONDS": "3600",
        "EGRET_PORTAL_DEFAULT_LANGUAGE": "fr",
        "EGRET_PORTAL_TIMEZONE": "Mars/Olympus",
    }
    del env["EGRET_TLS_CA_FILE"]
    with pytest.raises(SettingsError) as failed:
        PortalSettings.from_env(env)
    text = str(failed.value)
    for expected in (
        "EGRET_PORTAL_PUBLIC_URL is plain http",
        "EGRET_PORTAL_OIDC_ISSUER must be an https:// URL",
        "EGRET_PORTAL_SESSION_ABSOLUTE_SECONDS must be at least",
        "EGRET_PORTAL_DEFAULT_LANGUAGE='fr'",
        "EGRET_PORTAL_TIMEZONE='Mars/Olympus'",
        "EGRET_TLS_CA_FILE is required",
    ):
        assert expected in text


def test_plain_http_only_on_loopback(files: dict[str, str]) -> None:
    loopback = {
        **files,
        "EGRET_PORTAL_PUBLIC_URL": "http://127.0.0.1:8080",
        "EGRET_PORTAL_INSECURE_HTTP": "true",
    }
    assert not PortalSettings.from_env(loopback).secure_cookies
    remote = {**loopback, "EGRET_PORTAL_PUBLIC_URL": "http://credit.city.example"}
    with pytest.raises(SettingsError, match="loopback URL only"):
        PortalSettings.from_env(remote)


def test_a_short_session_secret_is_refused(files: dict[str, str], tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_text("too short")
    with pytest.raises(SettingsError, match="at least 32 bytes"):
        PortalSettings.from_env({**files, "EGRET_PORTAL_SESSION_SECRET_FILE": str(short)})


def test_forwarded_headers_are_trusted_from_the_named_proxies_only(files: dict[str, str]) -> None:
    assert PortalSettings.from_env(files).trusted_proxies == ("127.0.0.1",)
    behind = PortalSettings.from_env({**files, "EGRET_PORTAL_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7"})
    assert behind.trusted_proxies == ("10.0.0.0/8", "192.0.2.7")
    with pytest.raises(SettingsError, match=r"EGRET_PORTAL_TRUSTED_PROXIES: 'ingress' is not an IP"):
        PortalSettings.from_env({**files, "EGRET_PORTAL_TRUSTED_PROXIES": "10.0.0.0/8,ingress"})
