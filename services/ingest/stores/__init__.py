"""Ingest's storage layer: events, retractions, the outbox to rules and the audit log."""
