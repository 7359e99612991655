"""Who works in the staff console and where (docs/portal.md, "The staff console"): the
areas of the console, the roles each is open to, and the signed-in staff member.

The portal only arranges its pages by role; the services decide. Every staff page calls
them with the staff member's own token, so a page opened by the wrong role, or a call
made around the portal, is refused by the service all the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from kit.principal import Role
from services.portal.i18n import Localiser

STAFF_ROLES = frozenset({Role.REVIEWER, Role.AUDITOR, Role.ADMIN, Role.BENEFIT_PROVIDER})


def _(message: str) -> str:
    """Marks a label for the catalogues; it is translated when a page shows it."""
    return message


@dataclass(frozen=True)
class Area:
    path: str
    label: str  # a catalogue message id
    roles: frozenset[Role]


# In the order the navigation shows them.
AREAS: tuple[Area, ...] = (
    Area("/staff/disputes", _("Disputes"), frozenset({Role.REVIEWER})),
    Area("/staff/repairs", _("Credit repair"), frozenset({Role.REVIEWER})),
    Area("/staff/audit", _("Audit"), frozenset({Role.AUDITOR, Role.ADMIN})),
    Area("/staff/rule-sets", _("Rule sets"), frozenset({Role.REVIEWER, Role.AUDITOR, Role.ADMIN})),
    Area("/staff/policy", _("Scoring policy"), frozenset({Role.REVIEWER, Role.AUDITOR, Role.ADMIN})),
    Area("/staff/eligibility", _("Eligibility"), frozenset({Role.BENEFIT_PROVIDER})),
)


def areas_for(role: str) -> tuple[Area, ...]:
    return tuple(a for a in AREAS if role in a.roles)


def navigation(t: Localiser, role: str) -> tuple[tuple[str, str], ...]:
    """(path, label) of the areas open to `role`, in the reader's language."""
    return tuple((a.path, t.gettext(a.label)) for a in areas_for(role))


@dataclass(frozen=True)
class Staff:
    """The signed-in staff member: their access token, role, display name and principal id
    (the token's `sub`, as the services name them, e.g. in a dispute's assignee)."""

    token: str
    role: Role
    name: str
    principal_id: str = ""

    def __repr__(self) -> str:
        return f"Staff(role={self.role.value!r}, token=<hidden>)"


class NotAllowed(Exception):
    """The signed-in person's role has no part in this page."""
