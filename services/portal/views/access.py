"""*Who looked at my data*: the access log in words."""

from __future__ import annotations

from dataclasses import dataclass

from services.portal import records as r
from services.portal.i18n import Localiser
from services.portal.views import words


@dataclass(frozen=True)
class AccessRow:
    when: str
    who: str
    role: str
    purpose: str
    purpose_code: str
    note: str
    what: str


def access_row(t: Localiser, a: r.AccessRecord) -> AccessRow:
    # A subject's own reads carry a pseudonymous principal id; "you" says it plainly.
    who = t.gettext("You") if a.role == "subject" else a.actor
    return AccessRow(
        when=t.datetime(a.at),
        who=who,
        role=words.role(t, a.role),
        purpose=words.purpose(t, a.purpose),
        purpose_code=a.purpose,
        note=a.purpose_note,
        what=words.read_method(t, a.method),
    )
