"""The score service: keeps the ledger of rule outcomes and every subject's score,
recomputed from the ledger in the transaction that changes it."""
