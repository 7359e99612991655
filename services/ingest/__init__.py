"""The ingest service: departments submit behaviour events; each is validated, pseudonymised,
deduplicated and committed, together with its outbox row, before it is acknowledged."""
