"""The portal application with a fake backend, for its unit tests: what the services would
answer and what the portal asked of them, and a signed-in session made without a provider
(the fixtures that build the application are in conftest.py)."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

import jwt
from starlette.testclient import TestClient

from services.portal import records as r
from services.portal.backend import ServiceError
from services.portal.sessions import COOKIE, EncryptedSessionMiddleware
from tests.support.portal.samples import NOW, entry, explanation

RAW_ID = "350200199001011230"
SECRET = b"a-session-secret-of-forty-bytes-or-more!"


class FakeBackend:
    """What the services would answer, and what the portal asked of them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail: dict[str, ServiceError] = {}
        self.stored = {"e1": entry(), "e2": entry("e2", 10, status="active")}
        self.consent_state = r.ConsentState(None, False, True)
        self.changes: tuple[r.ScoreChange, ...] = ()

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]

    async def explain(self, caller: Any) -> r.Explanation:
        self._record("explain", caller)
        return explanation()

    async def entries(self, caller: Any, page_token: str = "", page_size: int = 50) -> r.Page[r.Entry]:
        self._record("entries", page_token)
        return r.Page(tuple(self.stored.values()), "next-token")

    async def all_entries(self, caller: Any) -> tuple[r.Entry, ...]:
        self._record("all_entries")
        return tuple(self.stored.values())

    async def entry(self, caller: Any, entry_id: str) -> r.Entry:
        self._record("entry", entry_id)
        if entry_id not in self.stored:
            raise ServiceError("NOT_FOUND", f"no ledger entry {entry_id!r}")
        return self.stored[entry_id]

    async def history(self, caller: Any, *, as_corrected: bool) -> tuple[r.ScoreChange, ...]:
        self._record("history", as_corrected)
        return self.changes

    async def benefits(self, token: str | None) -> tuple[r.Benefit, ...]:
        self._record("benefits")
        return (
            r.Benefit("library.deposit_free", "Borrow books", "Library", ("civic",), False, ("person",), "A"),
        )

    async def eligibility(self, caller: Any, benefit_id: str) -> r.Eligibility:
        self._record("eligibility", benefit_id)
        return r.Eligibility(benefit_id, True, (), ("civic",), 1010, "A", (), NOW, "2026.2")

    async def access_log(
        self, caller: Any, page_token: str = "", page_size: int = 50
    ) -> r.Page[r.AccessRecord]:
        self._record("access_log", page_token)
        return r.Page((r.AccessRecord(NOW, "rev-1", "reviewer", "dispute-review", "GetEntry", ""),), "")

    async def all_access_records(self, caller: Any) -> tuple[r.AccessRecord, ...]:
        return (await self.access_log(caller)).items

    async def disputes(self, caller: Any) -> tuple[r.Dispute, ...]:
        self._record("disputes")
        return ()

    async def repairs(self, caller: Any) -> tuple[r.Repair, ...]:
        self._record("repairs")
        return ()

    async def file_dispute(self, caller: Any, entry_id: str, statement: str) -> r.Dispute:
        self._record("file_dispute", entry_id, statement)
        return r.Dispute("7", entry_id, statement, NOW, NOW + timedelta(days=20), "open")

    async def apply_for_repair(self, caller: Any, entry_id: str, evidence: str, uri: str) -> r.Repair:
        self._record("apply_for_repair", entry_id, evidence, uri)
        return r.Repair("3", entry_id, evidence, uri, NOW, NOW + timedelta(days=3), "pending")

    async def consent(self, caller: Any) -> r.ConsentState:
        self._record("consent")
        return self.consent_state

    async def set_consent(self, caller: Any, granted: bool) -> r.Consent:
        self._record("set_consent", granted)
        self.consent_state = r.ConsentState(r.Consent(granted, NOW, NOW), granted, True)
        return r.Consent(granted, NOW, NOW)

    async def rule_set(self) -> r.PublishedRuleSet:
        self._record("rule_set")
        raise ServiceError("PERMISSION_DENIED", "role subject may not call GetActiveRuleSet")

    async def policy(self) -> r.PublishedPolicy:
        self._record("policy")
        return r.PublishedPolicy("2026.2", NOW, 20, (("minor", 0),), 3, ())

    async def public_benefits(self) -> tuple[r.Benefit, ...]:
        return await self.benefits(None)

    async def close(self) -> None:
        """Nothing to close: no channels."""


def session_cookie(
    role: str = "subject", expires_in: float = 600, *, sub: str = f"person:resident-id:{RAW_ID}", **extra: Any
) -> str:
    token = jwt.encode(
        {"sub": sub, "role": role, "exp": int(time.time() + 3600)},
        "k" * 32,
        "HS256",
    )
    sessions = EncryptedSessionMiddleware(
        lambda *a: None,  # type: ignore[arg-type]
        secrets=(SECRET,),
        idle_s=900,
        absolute_s=28_800,
        secure=False,
    )
    return sessions.dump(
        {
            "access_token": token,
            "expires_at": time.time() + expires_in,
            "role": role,
            "name": "Alice",
            **extra,
        }
    )


def signed_in(
    client: TestClient, role: str = "subject", *, sub: str = f"person:resident-id:{RAW_ID}"
) -> TestClient:
    client.cookies.set(COOKIE, session_cookie(role, sub=sub))
    return client


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)
