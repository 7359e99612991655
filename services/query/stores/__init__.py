"""Query's storage layer: score's store read through contracts.score_store, and query's own access log."""
