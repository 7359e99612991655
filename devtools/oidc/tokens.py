"""The tokens the local provider signs: ID tokens for the client, access tokens for Egret's
services (RFC 9068 JWTs the services verify like any other), both with the token key of the
local PKI and its key id."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from devtools.oidc.config import Account, ProviderConfig
from kit.tokens import jwks_document

ALGORITHM = "RS256"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def key_id(public_key: rsa.RSAPublicKey) -> str:
    """The RFC 7638 thumbprint of an RSA key: the same key always has the same id."""
    numbers = public_key.public_numbers()
    members = {
        "e": _b64(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
        "kty": "RSA",
        "n": _b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
    }
    return _b64(hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest())


def jwks(public_key: rsa.RSAPublicKey) -> str:
    """The JWKS document of the provider's key, as it serves it and services read it from a file."""
    return jwks_document({key_id(public_key): public_key})


def at_hash(access_token: str) -> str:
    """OpenID Connect Core 3.1.3.6: the left half of the SHA-256 of the access token."""
    return _b64(hashlib.sha256(access_token.encode()).digest()[:16])


@dataclass(frozen=True)
class Signed:
    """What a token endpoint answer carries: both tokens and when the access token ends."""

    access_token: str
    id_token: str | None
    expires_in: int


@dataclass(frozen=True)
class Signer:
    config: ProviderConfig

    @property
    def kid(self) -> str:
        return key_id(self.config.signing_key.public_key())

    def identity(self, account: Account) -> dict[str, Any]:
        """The claims that say who `account` is, in every token and in userinfo."""
        config = self.config
        if config.subject_claim == "sub":
            return {"sub": account.principal, config.role_claim: account.role.value}
        return {
            "sub": account.username,
            config.role_claim: account.role.value,
            config.subject_claim: account.principal,
        }

    def profile(self, account: Account) -> dict[str, Any]:
        return {"name": account.display_name, "preferred_username": account.username}

    def issue(
        self,
        account: Account,
        *,
        client_id: str,
        scope: tuple[str, ...],
        auth_time: int,
        sid: str,
        nonce: str | None = None,
        with_id_token: bool = True,
    ) -> Signed:
        config = self.config
        now = int(time.time())
        identity = self.identity(account)
        access = {
            "iss": config.issuer,
            "aud": config.audience,
            "iat": now,
            "exp": now + config.access_token_lifetime_s,
            "jti": secrets.token_urlsafe(16),
            "client_id": client_id,
            "scope": " ".join(scope),
            "auth_time": auth_time,
            **identity,
        }
        access_token = self._sign(access, "at+jwt")
        if not with_id_token:
            return Signed(access_token, None, config.access_token_lifetime_s)
        id_claims = {
            "iss": config.issuer,
            "aud": client_id,
            "azp": client_id,
            "iat": now,
            "exp": now + config.id_token_lifetime_s,
            "auth_time": auth_time,
            "sid": sid,
            "at_hash": at_hash(access_token),
            **identity,
            **(self.profile(account) if "profile" in scope else {}),
        }
        if nonce is not None:
            id_claims["nonce"] = nonce
        return Signed(access_token, self._sign(id_claims, "JWT"), config.access_token_lifetime_s)

    def _sign(self, claims: dict[str, Any], typ: str) -> str:
        return jwt.encode(
            claims, self.config.signing_key, algorithm=ALGORITHM, headers={"kid": self.kid, "typ": typ}
        )

    def read_access_token(self, token: str) -> dict[str, Any]:
        """The claims of a current access token of this provider; jwt.InvalidTokenError if not."""
        if jwt.get_unverified_header(token).get("typ") != "at+jwt":
            raise jwt.InvalidTokenError("not an access token")
        return jwt.decode(
            token,
            self.config.signing_key.public_key(),
            algorithms=[ALGORITHM],
            audience=self.config.audience,
            issuer=self.config.issuer,
        )

    def read_id_token_hint(self, token: str) -> dict[str, Any]:
        """The claims of an ID token this provider issued, expired or not (a logout hint)."""
        claims: dict[str, Any] = jwt.decode(
            token,
            self.config.signing_key.public_key(),
            algorithms=[ALGORITHM],
            issuer=self.config.issuer,
            options={"verify_exp": False, "verify_aud": False, "require": ["aud", "sub"]},
        )
        if self.config.client(claims.get("aud")) is None:
            raise jwt.InvalidAudienceError("not an ID token of a registered client")
        return claims
