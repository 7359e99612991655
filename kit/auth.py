"""Who is calling, and may they: bearer-token authentication and per-RPC authorization.

Callers present a signed JWT in the `authorization: Bearer <token>` metadata. The token
names the principal (`sub`), its role and scopes. Keys come from a PEM public key or a
JWKS document on disk (a mounted Secret) or a JWKS URL, and are read again when they change
(kit.token_keys); only asymmetric algorithms are accepted, so `alg=none` and
HMAC-with-the-public-key forgeries are refused.

Authorization is default-deny: an RPC not in the service's policy is refused for every
role. The interceptor decides before any handler work and binds the principal to a
context variable, so servicers can make per-datum checks (a department may only submit
its own event types, a subject may only read its own data, ...).

Subject principals carry their raw identifier in the token (the city's identity
provider knows it); it is hashed into a subject key on arrival and never logged.

Each trusted issuer has its own keys and its own claim mapping: which claims carry the
role and the subject, and how the issuer's role values translate into Egret's roles
(EGRET_JWT_ROLE_CLAIM, _SUBJECT_CLAIM, _ROLE_MAP, _EXTRA_ISSUERS: docs/configuration.md).
"""

from __future__ import annotations

import contextvars
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from kit.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated, Violation
from kit.pseudonym import subject_violations
from kit.token_keys import KeySource, issuer_keys

ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA")


class Role(StrEnum):
    DEPARTMENT = "department"
    SUBJECT = "subject"
    REVIEWER = "reviewer"
    AUDITOR = "auditor"
    BENEFIT_PROVIDER = "benefit_provider"
    ADMIN = "admin"
    SERVICE = "service"


# What one Egret service may ask of another. The role `service` alone admits nothing: a
# service token must also carry the scope of each RPC it calls, so a leaked query token
# cannot deliver events to rules or outcomes to score.
SCOPE_EVALUATE_EVENTS = "egret.rules.evaluate"  # ingest → rules: EvaluateEvents
SCOPE_READ_RULE_SETS = "egret.rules.read"  # query → rules: GetActiveRuleSet, GetRuleSet (any version)
# rules → score: ApplyOutcomes, and GetActivePolicy (the policy rules' backtests score with)
SCOPE_APPLY_OUTCOMES = "egret.score.apply"
# The chart's config-apply Job (services.configapply) → rules and score: what a reviewer
# does to make a rule set active (validate, draft, publish, activate) and an admin's
# ActivatePolicy, with the reads to compare; its principal is named in every audit record.
SCOPE_APPLY_CONFIG = "egret.config.apply"
# The portal's public pages: published, non-personal data only (rules' GetActiveRuleSet,
# score's GetActivePolicy, query's ListBenefits); never a draft or another version.
SCOPE_PUBLIC_READ = "egret.public.read"

# The scopes each calling service's token carries (the identity provider issues them).
SERVICE_SCOPES: Mapping[str, tuple[str, ...]] = {
    "ingest": (SCOPE_EVALUATE_EVENTS,),
    "rules": (SCOPE_APPLY_OUTCOMES,),
    "query": (SCOPE_READ_RULE_SETS,),
    "score": (),
    "portal": (SCOPE_PUBLIC_READ,),
    "config-apply": (SCOPE_APPLY_CONFIG,),
}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. For subjects, `subject_key` replaces the raw id."""

    id: str
    role: Role
    scopes: frozenset[str] = frozenset()
    subject_key: str | None = None
    # For subjects: (key id, key) of every generation of the subject key, root first, the
    # last being `subject_key`, when the verifier can make them (GenerationKeysOf). A read
    # naming no subject finds the subject under any generation, as a read by raw id does.
    generation_keys: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    # When the token stops being accepted (its exp plus the verifier's leeway, on the
    # verifier's clock): an open stream ends then (Gate.readmit). None: no token.
    valid_until: float | None = field(default=None, compare=False)

    @property
    def loggable_id(self) -> str:
        """An identifier safe for logs and traces: never a subject's raw id."""
        return f"subject:{(self.subject_key or '')[:12]}" if self.role is Role.SUBJECT else self.id


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("egret_principal", default=None)


def current_principal() -> Principal | None:
    """The principal of the call being handled, bound by the auth interceptor."""
    return _current.get()


def bind_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _current.set(principal)


SubjectKeyOf = Callable[[str, str, str], str]
# (kind, scheme, value) -> (key id, key) of every generation, root first (Pseudonymiser.generation_keys).
GenerationKeysOf = Callable[[str, str, str], tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class ClaimMapping:
    """Where one issuer's tokens name Egret's role and a subject's identifier.

    A claim name is looked up as written first, so a namespaced claim such as
    `https://city.example/role` works; failing that, a dotted name walks into nested
    objects (`realm_access.roles`). A role claim may hold one value or a list.
    """

    role_claim: str = "role"
    # For role `subject`, the claim holding "<kind>:<scheme>:<value>". Other roles are
    # named by `sub`, the person's or system's stable id at the identity provider.
    subject_claim: str = "sub"
    # Issuer role value -> Egret role. When given, it is the complete list: a value it
    # does not name grants nothing, even one spelled like an Egret role.
    role_map: Mapping[str, Role] | None = None

    def role(self, claims: Mapping[str, Any]) -> Role:
        values = _claim_values(claims, self.role_claim)
        if self.role_map is not None:
            roles = {self.role_map[v] for v in values if v in self.role_map}
        else:
            roles = {Role(v) for v in values if v in _ROLE_VALUES}
        if not roles:
            raise Unauthenticated("token has no valid role")
        if len(roles) > 1:
            # Which one was meant cannot be known; taking the strongest would be a guess.
            raise Unauthenticated("token names more than one role")
        return roles.pop()

    def subject(self, claims: Mapping[str, Any]) -> str:
        """The raw "<kind>:<scheme>:<value>" of a subject token."""
        value = _claim(claims, self.subject_claim)
        if not isinstance(value, str):
            raise Unauthenticated("subject token does not name a subject")
        return value


_ROLE_VALUES = frozenset(role.value for role in Role)


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _claim_values(claims: Mapping[str, Any], name: str) -> list[str]:
    value = _claim(claims, name)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


# A verifier's keys: fixed (tests, code) or a KeySource kept current while serving.
Keys = Mapping[str | None, Any] | KeySource


def _key(keys: Keys, kid: str | None) -> Any | None:
    if isinstance(keys, Mapping):
        return keys.get(kid, keys.get(None))
    return keys.key(kid)


def _generation(keys: Keys) -> int:
    return 0 if isinstance(keys, Mapping) else keys.generation()


@dataclass(frozen=True)
class TrustedIssuer:
    """An issuer whose tokens are accepted: its keys and its claim mapping. A verifier may
    trust several (the city's sign-in service for people, a workload issuer for Egret's
    services); a token is checked against the keys of the issuer it names, and only those."""

    issuer: str
    keys: Keys
    claims: ClaimMapping = field(default_factory=ClaimMapping)

    @classmethod
    def from_files(
        cls,
        issuer: str,
        *,
        public_key_file: Path | None = None,
        jwks_file: Path | None = None,
        jwks_url: str | None = None,
        jwks_lifespan_s: float = 300.0,
        claims: ClaimMapping | None = None,
    ) -> TrustedIssuer:
        """Keys from files and/or a URL, read again when they change (kit.token_keys)."""
        keys = issuer_keys(
            what=f"token keys of {issuer}",
            public_key_file=public_key_file,
            jwks_file=jwks_file,
            jwks_url=jwks_url,
            jwks_lifespan_s=jwks_lifespan_s,
        )
        return cls(issuer, keys, claims or ClaimMapping())


@dataclass(frozen=True)
class TokenVerifier:
    """Verifies bearer tokens against configured keys, issuer and audience."""

    keys: Keys
    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    subject_key_of: SubjectKeyOf | None = None
    leeway_s: float = 30.0
    clock: Callable[[], float] = time.time
    # The longest lifetime (exp - iat) a token may have: a token minted for years is a
    # standing credential, whoever leaks it. None: no limit.
    max_lifetime_s: float | None = 86_400.0
    # Tokens already verified, by their exact text, with the instant they stop being
    # accepted. A caller sends the same token for its whole lifetime, and a signature check
    # costs far more than the call it guards; the cache changes no outcome, as issuer and
    # audience are fixed for the verifier's life, expiry is checked per call, and the cache
    # is emptied whenever any issuer's keys change (a removed key refuses its tokens).
    cache_size: int = 4096
    # How this issuer's tokens name role and subject.
    claims: ClaimMapping = field(default_factory=ClaimMapping)
    # Further issuers whose tokens are accepted, each with its own keys and mapping.
    more_issuers: tuple[TrustedIssuer, ...] = ()
    # Every generation's key of a subject (during a subject-key rotation, more than one);
    # when set, a subject principal carries them and its key is the last.
    generation_keys_of: GenerationKeysOf | None = None
    _verified: dict[str, tuple[Principal, float]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # The keys' generation the cache was filled under.
    _cached_under: list[int] = field(default_factory=lambda: [0], init=False, repr=False, compare=False)

    @classmethod
    def from_files(
        cls,
        *,
        issuer: str,
        audience: str,
        public_key_file: Path | None = None,
        jwks_file: Path | None = None,
        jwks_url: str | None = None,
        jwks_lifespan_s: float = 300.0,
        algorithms: tuple[str, ...] = ("RS256", "ES256"),
        subject_key_of: SubjectKeyOf | None = None,
        max_lifetime_s: float | None = 86_400.0,
        claims: ClaimMapping | None = None,
        more_issuers: Sequence[TrustedIssuer] = (),
        generation_keys_of: GenerationKeysOf | None = None,
    ) -> TokenVerifier:
        keys = issuer_keys(
            what=f"token keys of {issuer}",
            public_key_file=public_key_file,
            jwks_file=jwks_file,
            jwks_url=jwks_url,
            jwks_lifespan_s=jwks_lifespan_s,
        )
        bad = [a for a in algorithms if a not in ALLOWED_ALGORITHMS]
        if bad:
            raise ValueError(f"algorithms not allowed: {', '.join(bad)}")
        issuers = [issuer, *(more.issuer for more in more_issuers)]
        if len(set(issuers)) != len(issuers):
            raise ValueError(f"an issuer is trusted twice: {', '.join(issuers)}")
        return cls(
            keys,
            issuer,
            audience,
            algorithms,
            subject_key_of,
            max_lifetime_s=max_lifetime_s,
            claims=claims or ClaimMapping(),
            more_issuers=tuple(more_issuers),
            generation_keys_of=generation_keys_of,
        )

    def verify(self, token: str) -> Principal:
        generation = _generation(self.keys) + sum(_generation(more.keys) for more in self.more_issuers)
        if generation != self._cached_under[0]:
            # Generations only grow, so their sum changes whenever any issuer's keys do.
            self._verified.clear()
            self._cached_under[0] = generation
        cached = self._verified.get(token)
        if cached is not None:
            principal, valid_until = cached
            if self.clock() < valid_until:
                return principal
            # Expired since: forget it, and let the full check say why it is refused.
            self._verified.pop(token, None)
        principal, valid_until = self._verify(token)
        principal = replace(principal, valid_until=valid_until)
        if self.cache_size > 0:
            while len(self._verified) >= self.cache_size:
                # Oldest first: a bounded cache, whatever the number of distinct callers.
                self._verified.pop(next(iter(self._verified)), None)
            self._verified[token] = (principal, valid_until)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        """The principal of a fully checked token, and until when the token is accepted."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated("malformed token") from exc
        if header.get("alg") not in self.algorithms:
            raise Unauthenticated(f"token algorithm {header.get('alg')!r} is not accepted")
        trusted = self._trusted_issuer(token)
        kid = header.get("kid")
        key = _key(trusted.keys, None if kid is None else str(kid))
        if key is None:
            raise Unauthenticated("token signed with an unknown key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=trusted.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthenticated("token is for another audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthenticated("token from an unknown issuer") from exc
        except jwt.InvalidSignatureError as exc:
            raise Unauthenticated("token signature is invalid") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {type(exc).__name__}") from exc
        except (TypeError, ValueError) as exc:
            # A key of another type than the token's algorithm (e.g. kid of an RSA key on
            # an ES256 token) is a forgery attempt or a misconfiguration, never a pass.
            raise Unauthenticated("token key does not fit its algorithm") from exc
        # PyJWT refuses a token once `exp` lies more than the leeway in the past, and one
        # whose `iat` lies more than the leeway ahead, so exp - iat bounds what is left.
        lifetime = float(claims["exp"]) - float(claims["iat"])
        if self.max_lifetime_s is not None and lifetime > self.max_lifetime_s:
            raise Unauthenticated(
                f"token lifetime {lifetime:.0f} s exceeds the maximum of {self.max_lifetime_s:.0f} s"
            )
        return self._principal(claims, trusted.claims), float(claims["exp"]) + self.leeway_s

    def _trusted_issuer(self, token: str) -> TrustedIssuer:
        """The issuer whose keys may verify `token`: the one its `iss` names, if trusted.
        The unverified `iss` only chooses the keys; decoding then requires that issuer."""
        own = TrustedIssuer(self.issuer, self.keys, self.claims)
        if not self.more_issuers:
            return own
        try:
            named = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated("malformed token") from exc
        return next((more for more in self.more_issuers if more.issuer == named), own)

    def _principal(self, claims: Mapping[str, Any], mapping: ClaimMapping) -> Principal:
        role = mapping.role(claims)
        scopes = frozenset(str(claims.get("scope", "")).split())
        if role is not Role.SUBJECT:
            return Principal(id=str(claims["sub"]), role=role, scopes=scopes)
        subject = mapping.subject(claims)
        # A subject is named "<kind>:<scheme>:<value>"; it is hashed here and dropped.
        kind, _, rest = subject.partition(":")
        scheme, _, value = rest.partition(":")
        if not (kind and scheme and value):
            raise Unauthenticated("subject token does not name a subject")
        if subject_violations(kind, scheme, value):
            # An unknown kind or scheme, or an id its scheme refuses (a wrong check
            # character): no subject could ever match it. The message names no part of it.
            raise Unauthenticated("subject token does not name a valid subject")
        if self.generation_keys_of is not None:
            generations = self.generation_keys_of(kind, scheme, value)
            key = generations[-1][1]
            return Principal(id=key, role=role, scopes=scopes, subject_key=key, generation_keys=generations)
        if self.subject_key_of is None:
            # A service that serves no subject data cannot hash ids (it holds no key); the
            # token is valid, and the role check refuses what a subject may not call.
            return Principal(id="subject", role=role, scopes=scopes)
        key = self.subject_key_of(kind, scheme, value)
        return Principal(id=key, role=role, scopes=scopes, subject_key=key)


@dataclass
class RateLimiter:
    """A token bucket per principal: it refills at `rate` tokens a second up to `burst`, and
    a call takes its cost in tokens (CallPolicy.cost), so an expensive RPC spends more of a
    principal's allowance than a cheap one.

    Memory is bounded whatever the population: a bucket untouched for burst / rate seconds
    is full again, the same as no bucket, so it is dropped; and at most `max_buckets` are
    held, the longest idle dropped first (at worst its principal gets a full bucket back a
    little early). Buckets are kept in order of last use, so both cost O(1) per call.
    """

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    max_buckets: int = 100_000
    # key -> (tokens, when last updated), least recently used first.
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)

    def acquire(self, key: str, cost: float = 1.0) -> float:
        """0 when the call may proceed (its cost is taken), else the seconds until it may be
        retried (nothing is taken)."""
        now = self.clock()
        tokens, updated = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        # A call never costs more than a full bucket, so every call passes once it has waited.
        cost = min(cost, self.burst)
        wait = 0.0 if tokens >= cost else (cost - tokens) / self.rate
        self._evict(now)
        self._buckets[key] = (tokens - cost if wait == 0.0 else tokens, now)
        return wait

    @property
    def held(self) -> int:
        """How many buckets are held now."""
        return len(self._buckets)

    def _evict(self, now: float) -> None:
        """Drop refilled buckets, then the longest idle until there is room for one more."""
        refilled_after = self.burst / self.rate
        while self._buckets:
            oldest, (_, updated) = next(iter(self._buckets.items()))
            if now - updated < refilled_after and len(self._buckets) < self.max_buckets:
                return
            del self._buckets[oldest]


def issue_token(
    private_key: Any,
    *,
    issuer: str,
    audience: str,
    subject: str,
    role: Role,
    scopes: tuple[str, ...] = (),
    lifetime_s: float = 3600.0,
    algorithm: str = "RS256",
    key_id: str | None = None,
    now: float | None = None,
) -> str:
    """A signed token, for local development, tests and service credentials."""
    issued = time.time() if now is None else now
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "role": role.value,
        "scope": " ".join(scopes),
        "iat": int(issued),
        "exp": int(issued + lifetime_s),
    }
    headers = {"kid": key_id} if key_id else None
    return jwt.encode(claims, private_key, algorithm=algorithm, headers=headers)


def jwks_document(public_keys: Mapping[str, Any]) -> str:
    """A JWKS document for `public_keys` (kid → RSA or EC public key)."""
    keys = []
    for kid, key in public_keys.items():
        algorithm = (
            jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPublicKey) else jwt.algorithms.ECAlgorithm
        )
        jwk = json.loads(algorithm.to_jwk(key))
        jwk["kid"] = kid
        keys.append(jwk)
    return json.dumps({"keys": keys})


@dataclass(frozen=True)
class CallPolicy:
    """Who may call one RPC, and what else the call needs."""

    roles: frozenset[Role]
    # Ingest calls must carry a deadline, so a stuck department cannot hold work forever.
    require_deadline: bool = False
    # The scopes of which a `service` principal must hold one (SCOPE_* above).
    service_scopes: frozenset[str] = frozenset()
    # What one call takes from the caller's rate-limit bucket (RateLimiter), and each
    # further message of a request stream too: about the work it makes, in units of a
    # simple read of one subject (docs/security.md, "Limits").
    cost: float = 1.0


def allow(
    *roles: Role,
    require_deadline: bool = False,
    service_scope: str | tuple[str, ...] = (),
    cost: float = 1.0,
) -> CallPolicy:
    """`service_scope`: the scope (or any of the scopes) a `service` caller must hold."""
    scopes = frozenset((service_scope,) if isinstance(service_scope, str) else service_scope)
    if (Role.SERVICE in roles) != bool(scopes):
        raise ValueError("an RPC open to services names the scope they need, and only then")
    if not cost > 0:
        raise ValueError("an RPC costs something")
    return CallPolicy(frozenset(roles), require_deadline, scopes, cost)


# Health checks and reflection answer anyone: probes and tooling carry no tokens.
PUBLIC_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


@dataclass
class Gate:
    """Admits a call or refuses it before any handler work.

    `verifier=None` is insecure mode (explicitly configured, loudly logged): calls are
    admitted without a principal, but deadlines are still required where the policy
    says so.
    """

    verifier: TokenVerifier | None
    policy: Mapping[str, CallPolicy]
    limiter: RateLimiter | None = None

    def admit(
        self, method: str, metadata: Mapping[str, str | bytes], time_remaining: float | None
    ) -> Principal | None:
        """The caller's principal, checked in a fixed order so that what a refusal says
        never depends on what else is wrong with the call: the token
        (UNAUTHENTICATED), then the role and scope (PERMISSION_DENIED), then the call's
        own shape, its deadline (INVALID_ARGUMENT), then the rate (RESOURCE_EXHAUSTED).
        A caller without a valid token learns nothing about the RPC's other rules."""
        if method in PUBLIC_METHODS:
            return None
        principal = self._authenticated(metadata)
        rule = self.policy.get(method)
        if rule is None:
            raise PermissionDenied(f"{method} is not open to any caller")
        if principal is not None:
            self._authorize(principal, rule, method)
        if rule.require_deadline and time_remaining is None:
            raise InvalidArgument(
                f"a deadline is required: every {_service_of(method)} call must carry one "
                "(a timeout on the call, sent as grpc-timeout)",
                [Violation("grpc-timeout", "set a deadline (timeout) on the call", "REQUIRED")],
            )
        if principal is not None:
            self._charge(principal, rule.cost)
        return principal

    def _authenticated(self, metadata: Mapping[str, str | bytes]) -> Principal | None:
        """The principal of the call's bearer token; None in insecure mode only."""
        if self.verifier is None:
            return None
        header = metadata.get("authorization")
        if not isinstance(header, str) or not header.lower().startswith("bearer "):
            raise Unauthenticated("a bearer token is required")
        return self.verifier.verify(header[7:].strip())

    @staticmethod
    def _authorize(principal: Principal, rule: CallPolicy, method: str) -> None:
        name = method.rsplit("/", 1)[-1]
        if principal.role not in rule.roles:
            raise PermissionDenied(f"role {principal.role.value} may not call {name}")
        if principal.role is Role.SERVICE and not rule.service_scopes & set(principal.scopes):
            raise PermissionDenied(
                f"service {principal.id} lacks scope {' or '.join(sorted(rule.service_scopes))} for {name}"
            )

    def readmit(self, method: str, principal: Principal | None) -> None:
        """Before each message of a request stream after it opened: the token must still be
        accepted (UNAUTHENTICATED once it has expired) and the message is charged like a
        call (RESOURCE_EXHAUSTED beyond the rate)."""
        if principal is None:
            return
        left = self.seconds_left(principal)
        if left is not None and left <= 0:
            raise Unauthenticated("token expired")
        self._charge(principal, self.policy[method].cost)

    def seconds_left(self, principal: Principal | None) -> float | None:
        """How long `principal`'s token is still accepted; None when there is no token."""
        if principal is None or principal.valid_until is None or self.verifier is None:
            return None
        return principal.valid_until - self.verifier.clock()

    def _charge(self, principal: Principal, cost: float) -> None:
        if self.limiter is not None:
            wait = self.limiter.acquire(principal.loggable_id, cost)
            if wait > 0:
                raise ResourceExhausted(f"rate limit of {principal.loggable_id} reached", retry_after_s=wait)


def _service_of(method: str) -> str:
    """`IngestService` for `/egret.ingest.v1.IngestService/SubmitEvent`."""
    return method.lstrip("/").partition("/")[0].rsplit(".", 1)[-1]


def acting_principal(claimed: str | None) -> str | None:
    """Who performs a change, for audit records: the authenticated principal when there is
    one (a claimed name is then ignored), else what the caller claims (insecure mode)."""
    principal = current_principal()
    if principal is not None:
        return principal.loggable_id
    return claimed
