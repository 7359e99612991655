"""Where one issuer's tokens name Egret's role and a subject's identifier: each trusted issuer
has its own claim mapping, which claims carry the role and the subject, and how the issuer's
role values translate into Egret's roles (EGRET_JWT_ROLE_CLAIM, _SUBJECT_CLAIM, _ROLE_MAP,
_EXTRA_ISSUERS: docs/configuration.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kit.errors import Unauthenticated
from kit.principal import Role


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
