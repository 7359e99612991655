"""What the rules servicer delegates to: the rule-set lifecycle and dead letters, and backtests."""
