"""Score's storage layer: one store per concern, on the tables contracts.score_store publishes."""
