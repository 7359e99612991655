"""The settings every service shares, each group a frozen object read from the environment
through a kit.env.Env: the common ones (address, database, logs, instance), token
verification and its trusted issuers, limits, the audit chain's anchors, peers and relays,
and the subject-key secrets. The services' own settings modules compose them.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kit.env import Env
from kit.principal import Role
from kit.token_keys import check_jwks_url

# An outbox lease's holder column (kit.outbox_table) holds at most this many characters.
MAX_INSTANCE_LENGTH = 200

# EGRET_GC_THRESHOLD's default: Python's own 700 made the cyclic collector walk a warm rules
# cache again and again, about a tenth of live evaluation's CPU (docs/benchmarks.md).
GC_THRESHOLD = 50_000


# The name of a further trusted issuer, as it appears in its settings' names.
_ISSUER_NAME = re.compile(r"^[A-Z][A-Z0-9]{0,31}$")
_ROLES = tuple(role.value for role in Role)


def _claim_mapping(env: Env, prefix: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """`prefix`_ROLE_CLAIM, _SUBJECT_CLAIM and _ROLE_MAP: where an issuer's tokens name
    Egret's role and a subject (kit.claims.ClaimMapping)."""
    name = f"{prefix}_ROLE_MAP"
    role_map: list[tuple[str, str]] = []
    for item in (env.optional(name) or "").split(","):
        if not item.strip():
            continue
        value, sep, role = (part.strip() for part in item.partition("="))
        if not sep or not value:
            env.problems.append(f"{name}: {item.strip()!r} is not ISSUER_VALUE=EGRET_ROLE")
        elif role not in _ROLES:
            env.problems.append(f"{name}: {role!r} is not a role (one of {', '.join(_ROLES)})")
        elif any(value == known for known, _ in role_map):
            env.problems.append(f"{name}: {value!r} is mapped twice")
        else:
            role_map.append((value, role))
    role_claim = env.text(f"{prefix}_ROLE_CLAIM", "role")
    return role_claim, env.text(f"{prefix}_SUBJECT_CLAIM", "sub"), tuple(role_map)


@dataclass(frozen=True)
class IssuerSettings:
    """A further issuer whose tokens the service accepts (EGRET_JWT_EXTRA_ISSUERS), e.g. the
    city's sign-in service for people: EGRET_JWT_<NAME>_* name its keys and claim mapping."""

    name: str
    issuer: str
    public_key_file: Path | None = None
    jwks_file: Path | None = None
    # Fetched, and fetched again after EGRET_JWT_JWKS_CACHE_S (kit.token_keys).
    jwks_url: str | None = None
    role_claim: str = "role"
    subject_claim: str = "sub"
    # (the issuer's role value, Egret role); empty: the role claim holds Egret's role names.
    role_map: tuple[tuple[str, str], ...] = ()

    def missing(self) -> list[str]:
        prefix = f"EGRET_JWT_{self.name}"
        missing = [] if self.issuer else [f"{prefix}_ISSUER"]
        if self.public_key_file is None and self.jwks_file is None and self.jwks_url is None:
            missing.append(f"{prefix}_PUBLIC_KEY_FILE, {prefix}_JWKS_FILE or {prefix}_JWKS_URL")
        return missing

    @classmethod
    def read(cls, env: Env, name: str) -> IssuerSettings:
        prefix = f"EGRET_JWT_{name}"
        role_claim, subject_claim, role_map = _claim_mapping(env, prefix)
        return cls(
            name=name,
            issuer=env.optional(f"{prefix}_ISSUER") or "",
            public_key_file=env.optional_file(f"{prefix}_PUBLIC_KEY_FILE"),
            jwks_file=env.optional_file(f"{prefix}_JWKS_FILE"),
            jwks_url=_jwks_url(env, f"{prefix}_JWKS_URL"),
            role_claim=role_claim,
            subject_claim=subject_claim,
            role_map=role_map,
        )


@dataclass(frozen=True)
class SecuritySettings:
    """TLS and token settings; production refuses to start without them (EGRET_INSECURE=true
    runs without, for local experiments only, and every service then says so loudly)."""

    insecure: bool
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Clients must present a certificate signed by this CA (mutual TLS).
    tls_client_ca_file: Path | None = None
    # CA that signs the other services' certificates, for outgoing calls.
    tls_ca_file: Path | None = None
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_public_key_file: Path | None = None
    jwt_jwks_file: Path | None = None
    # The identity provider's JWKS endpoint (https), instead of or besides the files.
    jwt_jwks_url: str | None = None
    # How long a fetched JWKS is used before it is fetched again (every issuer's URL).
    jwt_jwks_cache_s: float = 300.0
    jwt_algorithms: tuple[str, ...] = ("RS256", "ES256")
    # This service's own token for calls to other services.
    service_token_file: Path | None = None
    rate_per_second: float = 200.0
    rate_burst: float = 400.0
    # Tokens whose lifetime (exp - iat) is longer are refused (UNAUTHENTICATED).
    max_token_lifetime_s: float = 86_400.0
    # Where EGRET_JWT_ISSUER's tokens name Egret's role and a subject (kit.claims.ClaimMapping).
    jwt_role_claim: str = "role"
    jwt_subject_claim: str = "sub"
    jwt_role_map: tuple[tuple[str, str], ...] = ()
    # Further trusted issuers, each with its own keys and claim mapping.
    jwt_extra_issuers: tuple[IssuerSettings, ...] = ()

    def missing(self) -> list[str]:
        """What serving needs but is not configured; empty in insecure mode. Commands that
        do not serve (migrate, verify) run without TLS and token keys."""
        if self.insecure:
            return []
        missing = [
            name
            for name, value in (
                ("EGRET_TLS_CERT_FILE", self.tls_cert_file),
                ("EGRET_TLS_KEY_FILE", self.tls_key_file),
                ("EGRET_JWT_ISSUER", self.jwt_issuer),
            )
            if not value
        ]
        if self.jwt_public_key_file is None and self.jwt_jwks_file is None and self.jwt_jwks_url is None:
            missing.append("EGRET_JWT_PUBLIC_KEY_FILE, EGRET_JWT_JWKS_FILE or EGRET_JWT_JWKS_URL")
        for extra in self.jwt_extra_issuers:
            missing.extend(extra.missing())
        return [f"{name} is required unless EGRET_INSECURE=true (never in production)" for name in missing]

    @classmethod
    def read(cls, env: Env) -> SecuritySettings:
        insecure = env.flag("EGRET_INSECURE", False)
        path = env.optional_file
        role_claim, subject_claim, role_map = _claim_mapping(env, "EGRET_JWT")
        return cls(
            insecure=insecure,
            tls_cert_file=path("EGRET_TLS_CERT_FILE"),
            tls_key_file=path("EGRET_TLS_KEY_FILE"),
            tls_client_ca_file=path("EGRET_TLS_CLIENT_CA_FILE"),
            tls_ca_file=path("EGRET_TLS_CA_FILE"),
            jwt_issuer=env.optional("EGRET_JWT_ISSUER") or "",
            jwt_audience=env.optional("EGRET_JWT_AUDIENCE") or "egret",
            jwt_public_key_file=path("EGRET_JWT_PUBLIC_KEY_FILE"),
            jwt_jwks_file=path("EGRET_JWT_JWKS_FILE"),
            jwt_jwks_url=_jwks_url(env, "EGRET_JWT_JWKS_URL"),
            jwt_jwks_cache_s=env.number("EGRET_JWT_JWKS_CACHE_S", 300.0, minimum=1.0, maximum=86_400.0),
            jwt_algorithms=tuple(
                a.strip()
                for a in (env.optional("EGRET_JWT_ALGORITHMS") or "RS256,ES256").split(",")
                if a.strip()
            ),
            service_token_file=path("EGRET_SERVICE_TOKEN_FILE"),
            rate_per_second=env.number("EGRET_RATE_LIMIT_PER_SECOND", 200.0, minimum=0.1),
            rate_burst=env.number("EGRET_RATE_LIMIT_BURST", 400.0, minimum=1.0),
            max_token_lifetime_s=env.number(
                "EGRET_MAX_TOKEN_LIFETIME_S", 86_400.0, minimum=60.0, maximum=31 * 86_400.0
            ),
            jwt_role_claim=role_claim,
            jwt_subject_claim=subject_claim,
            jwt_role_map=role_map,
            jwt_extra_issuers=_extra_issuers(env),
        )


def _jwks_url(env: Env, name: str) -> str | None:
    url = env.optional(name)
    problem = None if url is None else check_jwks_url(url)
    if problem is not None:
        env.problems.append(f"{name}={url!r} {problem}")
    return url


def _extra_issuers(env: Env) -> tuple[IssuerSettings, ...]:
    listed = (env.optional("EGRET_JWT_EXTRA_ISSUERS") or "").split(",")
    names = [n.strip().upper() for n in listed if n.strip()]
    extras: list[IssuerSettings] = []
    for name in names:
        if not _ISSUER_NAME.match(name):
            env.problems.append(
                f"EGRET_JWT_EXTRA_ISSUERS: {name!r} is not a name of 1 to 32 upper-case letters and "
                "digits, starting with a letter"
            )
        elif any(extra.name == name for extra in extras):
            env.problems.append(f"EGRET_JWT_EXTRA_ISSUERS: {name!r} is listed twice")
        else:
            extras.append(IssuerSettings.read(env, name))
    issuers = [i for i in (env.optional("EGRET_JWT_ISSUER"), *(e.issuer for e in extras)) if i]
    if len(set(issuers)) != len(issuers):
        env.problems.append(f"an issuer is trusted twice: {', '.join(issuers)}")
    return tuple(extras)


@dataclass(frozen=True)
class LimitSettings:
    """What one process holds at once (kit.limits): the largest batch request message, calls
    in flight, unary batches decoded at once and open request streams. Derived from the
    pod's memory limit: docs/deploy.md, "Memory"."""

    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_rpcs: int = 16
    max_concurrent_batches: int = 2
    max_concurrent_streams: int = 8

    @classmethod
    def read(cls, env: Env) -> LimitSettings:
        rpcs = env.integer("EGRET_MAX_CONCURRENT_RPCS", cls.max_concurrent_rpcs, minimum=2, maximum=10000)
        streams = env.integer(
            "EGRET_MAX_CONCURRENT_STREAMS", cls.max_concurrent_streams, minimum=1, maximum=10000
        )
        if streams >= rpcs:
            env.problems.append(
                f"EGRET_MAX_CONCURRENT_STREAMS={streams} must be below EGRET_MAX_CONCURRENT_RPCS={rpcs}, "
                "so open streams never take every call slot (health checks included)"
            )
        return cls(
            max_message_bytes=env.integer(
                "EGRET_MAX_MESSAGE_BYTES", cls.max_message_bytes, minimum=64 * 1024, maximum=64 * 1024 * 1024
            ),
            max_concurrent_rpcs=rpcs,
            max_concurrent_batches=env.integer(
                "EGRET_MAX_CONCURRENT_BATCHES", cls.max_concurrent_batches, minimum=1, maximum=10000
            ),
            max_concurrent_streams=streams,
        )


_AUDIT_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")


@dataclass(frozen=True)
class AuditSettings:
    """The audit chain's MAC keys (files outside the database, by key id) and its automatic
    anchors (kit.audit, kit.audit_anchors; docs/security.md, "Audit log")."""

    # The id new records are MACed with ("" without a key: plain SHA-256, development only).
    key_id: str = ""
    # Every key by id: the current one and the older ones verification still accepts.
    keys: Mapping[str, bytes] = field(default_factory=dict)
    # Append-only file the service writes its head to every `anchor_interval_s`.
    anchor_file: Path | None = None
    anchor_interval_s: float = 300.0
    # How often the service walks its own chain for the egret_audit_chain_intact gauge (0: never).
    verify_interval_s: float = 3600.0

    def missing(self) -> list[str]:
        """What serving needs in production (EGRET_INSECURE=false)."""
        unset = [
            name
            for name, value in (
                ("EGRET_AUDIT_KEY_FILE", self.key_id),
                ("EGRET_AUDIT_ANCHOR_FILE", self.anchor_file),
            )
            if not value
        ]
        return [f"{name} is required unless EGRET_INSECURE=true (never in production)" for name in unset]

    @classmethod
    def read(cls, env: Env) -> AuditSettings:
        keys: dict[str, bytes] = {}

        def key(name: str, key_id: str, path: str) -> None:
            if not _AUDIT_KEY_ID.fullmatch(key_id):
                env.problems.append(f"{name}: key id {key_id!r} is not 1-32 of A-Z a-z 0-9 . _ -")
                return
            if key_id in keys:
                env.problems.append(f"{name}: key id {key_id!r} is given twice")
                return
            try:
                value = Path(path).read_bytes().strip()
            except OSError as exc:
                env.problems.append(f"{name}={path!r}: {exc.strerror}")
                return
            if len(value) < 32:
                env.problems.append(f"{name}={path!r}: an audit key must be at least 32 bytes long")
            keys[key_id] = value

        key_id = ""
        current = env.optional("EGRET_AUDIT_KEY_FILE")
        if current is not None:
            key_id = env.text("EGRET_AUDIT_KEY_ID", "a1")
            key("EGRET_AUDIT_KEY_FILE", key_id, current)
        # Older keys, still accepted on verification: "id=path,id=path".
        for item in (env.optional("EGRET_AUDIT_OLD_KEY_FILES") or "").split(","):
            if item.strip():
                old_id, sep, path = item.strip().partition("=")
                if not sep or not path:
                    env.problems.append(f"EGRET_AUDIT_OLD_KEY_FILES: {item.strip()!r} is not ID=PATH")
                else:
                    key("EGRET_AUDIT_OLD_KEY_FILES", old_id.strip(), path.strip())
        anchor_file = env.optional("EGRET_AUDIT_ANCHOR_FILE")
        return cls(
            key_id=key_id,
            keys=keys,
            anchor_file=None if anchor_file is None else Path(anchor_file),
            anchor_interval_s=env.number(
                "EGRET_AUDIT_ANCHOR_SECONDS", cls.anchor_interval_s, minimum=0.1, maximum=86_400.0
            ),
            verify_interval_s=env.number(
                "EGRET_AUDIT_VERIFY_SECONDS", cls.verify_interval_s, minimum=0.0, maximum=7 * 86_400.0
            ),
        )


@dataclass(frozen=True)
class SqliteTuning:
    """How a SQLite database is run (EGRET_SQLITE_*, docs/configuration.md).

    `synchronous`: FULL survives a power loss, NORMAL only a process crash. `cache_mib`: the
    page cache of each connection; SQLite's own 2 MiB held too little of a growing table's
    indexes, whose pages each batch then read again (rules' inserts took about twice the
    CPU at 300,000 events, docs/benchmarks.md). `checkpoint_pages`: WAL pages between two
    automatic checkpoints (4 KiB each); SQLite's own 1,000 copied the same index pages back
    to the database file again and again.
    """

    synchronous: str = "FULL"
    cache_mib: int = 16
    checkpoint_pages: int = 10_000


@dataclass(frozen=True)
class CommonSettings:
    """The settings every service has, read from EGRET_* variables.

    OpenTelemetry is configured by the standard OTEL_* variables, read by kit.tracing.
    """

    service: str
    listen_address: str
    database_url: str
    data_dir: Path
    log_format: str
    log_level: str
    shutdown_grace_s: float
    health_interval_s: float
    migrate_on_start: bool
    sqlite: SqliteTuning
    security: SecuritySettings
    # This replica's identity, recorded on the outbox rows its relays claim (kit.outbox):
    # stable across its restarts, unique across replicas. Empty: a fresh one per start.
    instance: str = ""
    limits: LimitSettings = field(default_factory=LimitSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    # The admin port's plaintext HTTP (kit.admin: /metrics, /healthz, /readyz). Port 0, the
    # default, picks a free port and logs it; the chart and `make run` set fixed ones.
    admin_address: str = "127.0.0.1:0"
    # Allocations between two runs of the cyclic garbage collector's youngest generation
    # once serving (kit.server.tune_collector).
    gc_threshold: int = GC_THRESHOLD

    @classmethod
    def read(cls, env: Env, *, service: str, default_port: int) -> CommonSettings:
        data_dir = Path(env.text("EGRET_DATA_DIR", "var"))
        listen_address = env.address("EGRET_LISTEN_ADDRESS", f"127.0.0.1:{default_port}")
        # The pod name (HOSTNAME in Kubernetes), and the port for replicas on one host.
        host = env.optional("HOSTNAME") or socket.gethostname()
        instance = env.text("EGRET_INSTANCE", f"{host}:{listen_address.rsplit(':', 1)[-1]}")
        if len(instance) > MAX_INSTANCE_LENGTH:
            env.problems.append(f"EGRET_INSTANCE is longer than {MAX_INSTANCE_LENGTH} characters")
        return cls(
            service=service,
            listen_address=listen_address,
            database_url=env.text("EGRET_DATABASE_URL", f"sqlite:///{data_dir / service}.db"),
            data_dir=data_dir,
            log_format=env.choice("EGRET_LOG_FORMAT", "json", ("json", "console")),
            log_level=env.choice(
                "EGRET_LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical")
            ),
            shutdown_grace_s=env.number("EGRET_SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0.0, maximum=300.0),
            health_interval_s=env.number("EGRET_HEALTH_INTERVAL_SECONDS", 2.0, minimum=0.1, maximum=60.0),
            migrate_on_start=env.flag("EGRET_MIGRATE_ON_START", True),
            sqlite=SqliteTuning(
                synchronous=env.choice("EGRET_SQLITE_SYNCHRONOUS", "FULL", ("FULL", "NORMAL")),
                cache_mib=env.integer(
                    "EGRET_SQLITE_CACHE_MIB", SqliteTuning.cache_mib, minimum=1, maximum=4096
                ),
                checkpoint_pages=env.integer(
                    "EGRET_SQLITE_CHECKPOINT_PAGES",
                    SqliteTuning.checkpoint_pages,
                    minimum=100,
                    maximum=1_000_000,
                ),
            ),
            security=SecuritySettings.read(env),
            instance=instance,
            limits=LimitSettings.read(env),
            audit=AuditSettings.read(env),
            admin_address=env.address("EGRET_ADMIN_ADDRESS", "127.0.0.1:0"),
            gc_threshold=env.integer("EGRET_GC_THRESHOLD", GC_THRESHOLD, minimum=700, maximum=10_000_000),
        )


@dataclass(frozen=True)
class PeerSettings:
    """How a service calls a downstream service: address and per-call deadline."""

    address: str
    deadline_s: float

    @classmethod
    def read(cls, env: Env, *, prefix: str, default_address: str) -> PeerSettings:
        return cls(
            address=env.address(f"{prefix}_ADDRESS", default_address),
            deadline_s=env.number(f"{prefix}_DEADLINE_SECONDS", 10.0, minimum=0.1, maximum=600.0),
        )


@dataclass(frozen=True)
class RelaySettings:
    """Tuning of an outbox relay: batch size, polling and retry backoff."""

    batch_size: int
    poll_interval_s: float
    backoff_initial_s: float
    backoff_max_s: float

    @classmethod
    def read(cls, env: Env, *, prefix: str) -> RelaySettings:
        return cls(
            batch_size=env.integer(f"{prefix}_BATCH_SIZE", 1000, minimum=1, maximum=10000),
            poll_interval_s=env.number(f"{prefix}_POLL_SECONDS", 1.0, minimum=0.01, maximum=60.0),
            backoff_initial_s=env.number(f"{prefix}_BACKOFF_INITIAL_SECONDS", 0.2, minimum=0.01),
            backoff_max_s=env.number(f"{prefix}_BACKOFF_MAX_SECONDS", 30.0, minimum=0.1),
        )


_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


@dataclass(frozen=True)
class PseudonymSettings:
    """The HMAC key that turns raw subject ids into subject keys, its id, and the rotations
    after it (docs/security.md, "Rotating the subject key").

    EGRET_SUBJECT_KEY_ROTATIONS (or the file EGRET_SUBJECT_KEY_ROTATIONS_FILE names) lists
    the rotations in order, `key_id:secret` separated by commas or new lines; the last is
    the current generation. Rules, which never hash raw ids, reads the rotations without
    the root key (`root_required=False`).
    """

    key: bytes
    key_id: str
    rotations: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def read(cls, env: Env, *, root_required: bool = True) -> PseudonymSettings:
        key = b""
        if root_required:
            key = _secret(env, "EGRET_SUBJECT_KEY") or b""
            if key and len(key) < 32:
                env.problems.append("the subject HMAC key must be at least 32 bytes long")
        key_id = env.text("EGRET_SUBJECT_KEY_ID", "k1")
        rotations: list[tuple[str, bytes]] = []
        listed = _secret(env, "EGRET_SUBJECT_KEY_ROTATIONS", required=False) or b""
        for item in re.split(r"[,\n]", listed.decode()):
            if not item.strip():
                continue
            rotation_id, _, secret = item.strip().partition(":")
            if not _KEY_ID.match(rotation_id) or len(secret.strip()) < 32:
                env.problems.append(
                    "EGRET_SUBJECT_KEY_ROTATIONS: each rotation must be key_id:secret, the id 1 to 32 "
                    "letters, digits, '.', '_' or '-', the secret at least 32 bytes"
                )
                continue
            rotations.append((rotation_id, secret.strip().encode()))
        ids = [key_id, *(rotation_id for rotation_id, _ in rotations)]
        if not _KEY_ID.match(key_id):
            env.problems.append("EGRET_SUBJECT_KEY_ID must be 1 to 32 letters, digits, '.', '_' or '-'")
        if len(set(ids)) != len(ids):
            env.problems.append(f"subject key ids must be distinct, got {', '.join(ids)}")
        return cls(key=key, key_id=key_id, rotations=tuple(rotations))


def _secret(env: Env, name: str, *, required: bool = True) -> bytes | None:
    """The value of `name`, or of the file `name`_FILE names (a mounted Secret), stripped."""
    path = env.optional(f"{name}_FILE")
    if path is not None:
        try:
            return Path(path).read_bytes().strip()
        except OSError as exc:
            env.problems.append(f"{name}_FILE={path!r}: {exc.strerror}")
            return None
    if required:
        return env.text(name).encode()
    value = env.optional(name)
    return value.encode() if value is not None else None
