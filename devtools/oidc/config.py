"""What the local provider knows: its issuer and signing key, the registered clients, the sample
accounts people sign in as, and the lifetimes of what it issues."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import rsa

from kit.principal import Role
from kit.pseudonym import subject_violations

# Subjects of the demo's synthetic population (devtools.population, seed 1, as `make run`
# streams it): subject 72 is a person with 44 events and subject 159 an organization with
# 60, so signing in as either shows a ledger. tests/integration/test_oidc_provider.py keeps
# these in step with the population.
SAMPLE_RESIDENT_ID = "350203198007220724"
SAMPLE_USCC = "913301060005H5EC3R"
# Public by design: the sign-in page shows it; the provider serves on loopback only.
DEFAULT_PASSWORD = "egret"  # noqa: S105
# The services refuse longer-lived tokens by default (EGRET_MAX_TOKEN_LIFETIME_S).
MAX_ACCESS_TOKEN_LIFETIME_S = 86_400
SCOPES = ("openid", "profile", "offline_access")


@dataclass(frozen=True)
class Account:
    """A person who can sign in. `principal` is who they are to Egret: for role subject
    "<kind>:<scheme>:<id>", for staff their id at the provider."""

    username: str
    display_name: str
    role: Role
    principal: str
    password: str = DEFAULT_PASSWORD

    def __post_init__(self) -> None:
        if self.role is Role.SUBJECT:
            kind, _, rest = self.principal.partition(":")
            scheme, _, value = rest.partition(":")
            if subject_violations(kind, scheme, value):
                raise ValueError(f"account {self.username}: {self.principal!r} is not a valid subject")
        if not self.username or not self.password:
            raise ValueError("an account needs a username and a password")


def sample_accounts(
    *, password: str = DEFAULT_PASSWORD, resident_id: str = SAMPLE_RESIDENT_ID, uscc: str = SAMPLE_USCC
) -> tuple[Account, ...]:
    """A resident, a business representative, a reviewer, an auditor, an admin and a benefit
    provider: the metro company, whose `sub` is the provider_id config/benefits.yaml gives
    metro.discount, so query answers it about that benefit alone."""
    return (
        Account(
            "resident", "Chen Jing, resident", Role.SUBJECT, f"person:resident-id:{resident_id}", password
        ),
        Account(
            "business",
            "Lin Wei, for a registered business",
            Role.SUBJECT,
            f"organization:uscc:{uscc}",
            password,
        ),
        Account("reviewer", "Wang Fang, credit office reviewer", Role.REVIEWER, "reviewer-wang", password),
        Account("auditor", "Zhao Lei, auditor", Role.AUDITOR, "auditor-zhao", password),
        Account("admin", "Liu Yang, administrator", Role.ADMIN, "admin-liu", password),
        Account(
            "metro", "Sun Li, metro company (benefit provider)", Role.BENEFIT_PROVIDER, "metro", password
        ),
    )


@dataclass(frozen=True)
class Client:
    """A registered relying party (the portal): a confidential client with a secret."""

    client_id: str
    secret: str
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.client_id or not self.secret:
            raise ValueError("a client needs an id and a secret")
        for uri in (*self.redirect_uris, *self.post_logout_redirect_uris):
            parts = urlsplit(uri)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
                raise ValueError(f"client {self.client_id}: {uri!r} is not an absolute URL without fragment")


@dataclass(frozen=True)
class ProviderConfig:
    issuer: str
    signing_key: rsa.RSAPrivateKey
    clients: tuple[Client, ...]
    accounts: tuple[Account, ...] = field(default_factory=sample_accounts)
    # The `aud` of access tokens: what the services expect (EGRET_JWT_AUDIENCE).
    audience: str = "egret"
    # The claims access tokens name Egret's role and a subject in (EGRET_JWT_*_ROLE_CLAIM,
    # _SUBJECT_CLAIM). With another subject claim than `sub`, `sub` is the account's username.
    role_claim: str = "role"
    subject_claim: str = "sub"
    access_token_lifetime_s: int = 900
    id_token_lifetime_s: int = 300
    refresh_token_lifetime_s: int = 28_800
    code_lifetime_s: int = 60
    # How long the sign-in page may stay open, and a sign-in is remembered (single sign-on).
    sign_in_lifetime_s: int = 600
    session_lifetime_s: int = 28_800

    def __post_init__(self) -> None:
        if not 60 <= self.access_token_lifetime_s <= MAX_ACCESS_TOKEN_LIFETIME_S:
            raise ValueError(f"the access token lifetime must be 60 to {MAX_ACCESS_TOKEN_LIFETIME_S} s")
        ids = [c.client_id for c in self.clients]
        if len(set(ids)) != len(ids):
            raise ValueError("client ids must be distinct")
        if self.audience in ids:
            # An ID token's audience is its client: one for the services would be an access token.
            raise ValueError(f"no client may be called {self.audience!r}, the services' audience")
        usernames = [a.username for a in self.accounts]
        if len(set(usernames)) != len(usernames):
            raise ValueError("usernames must be distinct")

    @property
    def secure(self) -> bool:
        return self.issuer.startswith("https://")

    def client(self, client_id: str | None) -> Client | None:
        return next((c for c in self.clients if c.client_id == client_id), None)

    def account(self, username: str | None) -> Account | None:
        return next((a for a in self.accounts if a.username == username), None)
