"""Why a service refused: the machine-readable reasons of FAILED_PRECONDITION refusals.

Each reaches the caller as a google.rpc.ErrorInfo (domain kit.errors.ERROR_DOMAIN) in the
status details, with the metadata named here, so a client (the portal) words the refusal
in its reader's language instead of showing the service's English message. The list is
the contract: the protos and docs/due-process.md describe each code.
"""

from __future__ import annotations

# FileDispute: the entry already has an open dispute.
DISPUTE_ALREADY_OPEN = "DISPUTE_ALREADY_OPEN"
# FileDispute: the entry no longer counts for good. Metadata `status`: reversed or repaired.
ENTRY_NOT_DISPUTABLE = "ENTRY_NOT_DISPUTABLE"
# ResolveDispute, DecideRepair: decided before. Metadata `status`: the decision taken.
ALREADY_DECIDED = "ALREADY_DECIDED"
# AssignDispute, ResolveDispute: another reviewer holds the dispute (AssignDispute); only
# they decide or release it, or an admin reassigns it. Metadata `assignee`: who holds it.
ASSIGNED_TO_ANOTHER = "ASSIGNED_TO_ANOTHER"
# ApplyForRepair: a positive (or zero) entry; only negative ones are repaired.
ENTRY_NOT_NEGATIVE = "ENTRY_NOT_NEGATIVE"
# ApplyForRepair: the entry does not count now. Metadata `why`: one of NOT_COUNTING_WHY.
ENTRY_NOT_COUNTING = "ENTRY_NOT_COUNTING"
# ApplyForRepair: an application for the entry is pending.
REPAIR_ALREADY_PENDING = "REPAIR_ALREADY_PENDING"
# ApplyForRepair: the policy allows no repair of the entry's severity. Metadata `severity`.
SEVERITY_NOT_REPAIRABLE = "SEVERITY_NOT_REPAIRABLE"
# ApplyForRepair: before the severity's minimum period. Metadata `earliest_date`
# (YYYY-MM-DD, UTC), `earliest_at` (RFC 3339), `min_period_days`, `severity`.
REPAIR_TOO_EARLY = "REPAIR_TOO_EARLY"
# SetConsent by a subject, or a subject's read naming no subject: the service holds no
# subject key, so it cannot tell which subject the token names.
SUBJECT_NOT_IDENTIFIED = "SUBJECT_NOT_IDENTIFIED"
# Score reads (GetScore, Explain, ListScoreHistory, CheckEligibility, BatchGetScores): the
# policy requires consent and none is in force. Metadata `as_of` (RFC 3339); for a batch,
# `positions` (comma-separated indexes of the subjects without it).
CONSENT_REQUIRED = "CONSENT_REQUIRED"

# Values of ENTRY_NOT_COUNTING's `why`.
WHY_REVERSED = "reversed"
WHY_REPAIRED = "repaired"
WHY_DISPUTE_PAST_DEADLINE = "dispute_past_deadline"
WHY_EXPIRED = "expired"

# Every reason above, for clients that must word each one (tests check the portal does).
ALL = (
    DISPUTE_ALREADY_OPEN,
    ENTRY_NOT_DISPUTABLE,
    ALREADY_DECIDED,
    ASSIGNED_TO_ANOTHER,
    ENTRY_NOT_NEGATIVE,
    ENTRY_NOT_COUNTING,
    REPAIR_ALREADY_PENDING,
    SEVERITY_NOT_REPAIRABLE,
    REPAIR_TOO_EARLY,
    SUBJECT_NOT_IDENTIFIED,
    CONSENT_REQUIRED,
)
