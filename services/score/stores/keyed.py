"""What the re-keying job moves (kit.rekey): every stored subject key of score but the audit log's."""

from __future__ import annotations

from contracts.score_store import (
    ScoreAuditHead,
    ScoreAuditLog,
    ScoreSubjectKeyGeneration,
    StoredCategory,
    StoredConsent,
    StoredDispute,
    StoredEntry,
    StoredHistory,
    StoredRepair,
    StoredReversal,
    StoredScore,
)
from kit.rekey import KeyedColumn, KeyedStore, rewrite_outcome

# What the re-keying job moves: every stored subject key but the audit log's.
KEYED = KeyedStore(
    ScoreSubjectKeyGeneration,
    [
        KeyedColumn(StoredEntry.__table__, payload="outcome", rewrite=rewrite_outcome),  # type: ignore[arg-type]
        KeyedColumn(StoredScore.__table__),  # type: ignore[arg-type]
        KeyedColumn(StoredCategory.__table__),  # type: ignore[arg-type]
        KeyedColumn(StoredHistory.__table__),  # type: ignore[arg-type]
        KeyedColumn(StoredDispute.__table__),  # type: ignore[arg-type]
        KeyedColumn(StoredRepair.__table__),  # type: ignore[arg-type]
        KeyedColumn(StoredReversal.__table__),  # type: ignore[arg-type]
        KeyedColumn(StoredConsent.__table__),  # type: ignore[arg-type]
    ],
    ScoreAuditLog,
    ScoreAuditHead,
)
