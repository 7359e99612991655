"""The query service: read-only answers about subjects' scores and the ledger entries
behind them, served from the score service's store."""
