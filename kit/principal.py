"""Who is calling: Egret's roles, the scopes one service's token carries to call another, the
authenticated principal and the context variable the auth interceptor binds it to, so
servicers can make per-datum checks (a department may only submit its own event types, a
subject may only read its own data, ...)."""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


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


def acting_principal(claimed: str | None) -> str | None:
    """Who performs a change, for audit records: the authenticated principal when there is
    one (a claimed name is then ignored), else what the caller claims (insecure mode)."""
    principal = current_principal()
    if principal is not None:
        return principal.loggable_id
    return claimed
