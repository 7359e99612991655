"""Bearer tokens: verifying them, and minting them for local development, tests and service
credentials.

Callers present a signed JWT in the `authorization: Bearer <token>` metadata. The token
names the principal (`sub`), its role and scopes. Keys come from a PEM public key or a
JWKS document on disk (a mounted Secret) or a JWKS URL, and are read again when they change
(kit.token_keys); only asymmetric algorithms are accepted, so `alg=none` and
HMAC-with-the-public-key forgeries are refused. Each trusted issuer has its own keys and its
own claim mapping (kit.claims).

Subject principals carry their raw identifier in the token (the city's identity
provider knows it); it is hashed into a subject key on arrival and never logged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from kit.claims import ClaimMapping
from kit.errors import Unauthenticated
from kit.principal import Principal, Role
from kit.pseudonym import subject_violations
from kit.token_keys import KeySource, issuer_keys

ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA")

SubjectKeyOf = Callable[[str, str, str], str]
# (kind, scheme, value) -> (key id, key) of every generation, root first (Pseudonymiser.generation_keys).
GenerationKeysOf = Callable[[str, str, str], tuple[tuple[str, str], ...]]

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
        keys = TrustedIssuer.from_files(
            issuer,
            public_key_file=public_key_file,
            jwks_file=jwks_file,
            jwks_url=jwks_url,
            jwks_lifespan_s=jwks_lifespan_s,
        ).keys
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
