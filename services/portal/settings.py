"""The portal's settings, read from the environment and validated at start-up
(docs/portal.md, "Settings")."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kit.env import Env, SettingsError

DEFAULT_PORT = 8080
LANGUAGES = ("zh_Hans", "en")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# A session secret shorter than this is a guessable key for every cookie.
MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class OidcSettings:
    """The identity provider the portal signs people in with (OpenID Connect, authorization
    code with PKCE). Discovery is `issuer` + /.well-known/openid-configuration."""

    issuer: str
    client_id: str
    client_secret: str
    # The path of the callback on the portal's public URL, registered at the provider.
    redirect_path: str = "/auth/callback"
    scope: str = "openid profile"
    # CA that verifies the provider's TLS certificate; None: the system's roots.
    ca_file: Path | None = None
    # The access-token claims that name the caller's role and subject, as the services read them.
    role_claim: str = "role"
    subject_claim: str = "sub"


@dataclass(frozen=True)
class PortalSettings:
    listen_address: str
    # The URL people reach the portal at (behind any proxy), e.g. https://credit.city.gov.cn.
    public_base_url: str
    query_address: str
    score_address: str
    # Optional: the published rules page reads the active rule set from rules.
    rules_address: str | None
    # Optional: the auditors' audit chain page reads ingest's chain (nothing else of ingest).
    ingest_address: str | None
    oidc: OidcSettings
    # MultiFernet keys, one a line, the first the current: rotate by adding a line on top.
    session_secrets: tuple[bytes, ...]
    session_idle_s: float
    session_absolute_s: float
    default_language: str
    # TLS to the services: their CA, and the portal's client certificate (score requires one).
    tls_ca_file: Path | None
    tls_cert_file: Path | None
    tls_key_file: Path | None
    # The portal's own token, for the public pages' reads only (rules, policy, benefits).
    service_token_file: Path | None
    deadline_s: float
    # Sign-in attempts per client address: a token bucket (kit.rate_limit.RateLimiter).
    signin_rate_per_minute: float
    signin_burst: float
    # The proxies (addresses or networks) whose X-Forwarded-For names the client: behind an
    # ingress, the client address the sign-in limit counts is the person's, not the proxy's.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1",)
    # The city's time zone: every date and time the portal shows is in it.
    timezone: str = "Asia/Shanghai"
    log_format: str = "json"
    log_level: str = "info"
    # Plain HTTP on loopback only (make run, tests); cookies are then not marked Secure.
    insecure_http: bool = False

    @property
    def redirect_uri(self) -> str:
        return self.public_base_url.rstrip("/") + self.oidc.redirect_path

    @property
    def secure_cookies(self) -> bool:
        return not self.insecure_http

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PortalSettings:
        env = Env(environ)
        listen = env.address("EGRET_LISTEN_ADDRESS", f"127.0.0.1:{DEFAULT_PORT}")
        public = env.text("EGRET_PORTAL_PUBLIC_URL", f"http://{listen}")
        insecure_http = env.flag("EGRET_PORTAL_INSECURE_HTTP", False)
        _check_public_url(env, public, insecure_http)
        secrets_file = env.file("EGRET_PORTAL_SESSION_SECRET_FILE")
        client_secret_file = env.file("EGRET_PORTAL_OIDC_CLIENT_SECRET_FILE")
        oidc = OidcSettings(
            issuer=env.text("EGRET_PORTAL_OIDC_ISSUER").rstrip("/"),
            client_id=env.text("EGRET_PORTAL_OIDC_CLIENT_ID", "egret-portal"),
            client_secret=_read_text(env, "EGRET_PORTAL_OIDC_CLIENT_SECRET_FILE", client_secret_file),
            redirect_path=env.text("EGRET_PORTAL_OIDC_REDIRECT_PATH", "/auth/callback"),
            scope=env.text("EGRET_PORTAL_OIDC_SCOPE", "openid profile"),
            ca_file=_optional_file(env, "EGRET_PORTAL_OIDC_CA_FILE"),
            role_claim=env.text("EGRET_PORTAL_ROLE_CLAIM", "role"),
            subject_claim=env.text("EGRET_PORTAL_SUBJECT_CLAIM", "sub"),
        )
        if not oidc.redirect_path.startswith("/"):
            env.problems.append("EGRET_PORTAL_OIDC_REDIRECT_PATH must start with '/'")
        if oidc.issuer and not oidc.issuer.startswith(("https://", "http://127.0.0.1", "http://localhost")):
            env.problems.append("EGRET_PORTAL_OIDC_ISSUER must be an https:// URL (http only on loopback)")
        idle = env.number("EGRET_PORTAL_SESSION_IDLE_SECONDS", 900.0, minimum=60.0, maximum=86_400.0)
        absolute = env.number(
            "EGRET_PORTAL_SESSION_ABSOLUTE_SECONDS", 28_800.0, minimum=60.0, maximum=86_400.0
        )
        if absolute < idle:
            env.problems.append(
                "EGRET_PORTAL_SESSION_ABSOLUTE_SECONDS must be at least EGRET_PORTAL_SESSION_IDLE_SECONDS"
            )
        settings = cls(
            listen_address=listen,
            public_base_url=public.rstrip("/"),
            query_address=env.address("EGRET_QUERY_ADDRESS", "127.0.0.1:50054"),
            score_address=env.address("EGRET_SCORE_ADDRESS", "127.0.0.1:50053"),
            rules_address=env.address("EGRET_RULES_ADDRESS", "")
            if env.optional("EGRET_RULES_ADDRESS")
            else None,
            ingest_address=env.address("EGRET_INGEST_ADDRESS", "")
            if env.optional("EGRET_INGEST_ADDRESS")
            else None,
            oidc=oidc,
            session_secrets=_session_secrets(env, secrets_file),
            session_idle_s=idle,
            session_absolute_s=absolute,
            default_language=env.choice("EGRET_PORTAL_DEFAULT_LANGUAGE", "zh_Hans", LANGUAGES),
            tls_ca_file=_optional_file(env, "EGRET_TLS_CA_FILE"),
            tls_cert_file=_optional_file(env, "EGRET_TLS_CERT_FILE"),
            tls_key_file=_optional_file(env, "EGRET_TLS_KEY_FILE"),
            service_token_file=_optional_file(env, "EGRET_SERVICE_TOKEN_FILE"),
            deadline_s=env.number("EGRET_PORTAL_DEADLINE_SECONDS", 10.0, minimum=0.1, maximum=120.0),
            signin_rate_per_minute=env.number("EGRET_PORTAL_SIGNIN_PER_MINUTE", 10.0, minimum=0.1),
            signin_burst=env.number("EGRET_PORTAL_SIGNIN_BURST", 20.0, minimum=1.0),
            trusted_proxies=_networks(env, "EGRET_PORTAL_TRUSTED_PROXIES", "127.0.0.1"),
            timezone=_timezone(env),
            log_format=env.choice("EGRET_LOG_FORMAT", "json", ("json", "console")),
            log_level=env.choice("EGRET_LOG_LEVEL", "info", LOG_LEVELS),
            insecure_http=insecure_http,
        )
        insecure = env.flag("EGRET_INSECURE", False)
        if settings.tls_ca_file is None and not insecure:
            env.problems.append(
                "EGRET_TLS_CA_FILE is required to call query and score over TLS "
                "unless EGRET_INSECURE=true (never in production)"
            )
        if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
            env.problems.append("EGRET_TLS_CERT_FILE and EGRET_TLS_KEY_FILE go together")
        env.check()
        return settings


def _check_public_url(env: Env, url: str, insecure_http: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        env.problems.append(f"EGRET_PORTAL_PUBLIC_URL={url!r} is not an http(s) URL")
        return
    if parts.scheme == "http":
        if not insecure_http:
            env.problems.append(
                "EGRET_PORTAL_PUBLIC_URL is plain http: set EGRET_PORTAL_INSECURE_HTTP=true "
                "(loopback development only) or serve it over https"
            )
        elif parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            env.problems.append("EGRET_PORTAL_INSECURE_HTTP=true is allowed on a loopback URL only")


def _timezone(env: Env) -> str:
    name = env.text("EGRET_PORTAL_TIMEZONE", "Asia/Shanghai")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        env.problems.append(f"EGRET_PORTAL_TIMEZONE={name!r} is not a known time zone")
        return "UTC"
    return name


def _optional_file(env: Env, name: str) -> Path | None:
    raw = env.optional(name)
    if raw is None:
        return None
    if not Path(raw).is_file():
        env.problems.append(f"{name}={raw!r}: no such file")
    return Path(raw)


def _read_text(env: Env, name: str, path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""  # Env.file has recorded the problem


def _session_secrets(env: Env, path: Path) -> tuple[bytes, ...]:
    try:
        lines = [line.strip() for line in path.read_bytes().splitlines() if line.strip()]
    except OSError:
        return ()
    if not lines:
        env.problems.append("EGRET_PORTAL_SESSION_SECRET_FILE holds no secret")
    for line in lines:
        if len(line) < MIN_SECRET_BYTES:
            env.problems.append(
                f"EGRET_PORTAL_SESSION_SECRET_FILE: every secret must be at least {MIN_SECRET_BYTES} bytes"
            )
            break
    return tuple(lines)


__all__ = ["LANGUAGES", "OidcSettings", "PortalSettings", "SettingsError"]


def _networks(env: Env, name: str, default: str) -> tuple[str, ...]:
    """A comma-separated list of IP addresses or networks (CIDR)."""
    values = tuple(v.strip() for v in env.text(name, default).split(",") if v.strip())
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            env.problems.append(f"{name}: {value!r} is not an IP address or network")
    return values
