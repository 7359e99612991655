"""Per-principal rate limits: a token bucket each, bounded in memory."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class RateLimiter:
    """A token bucket per principal: it refills at `rate` tokens a second up to `burst`, and
    a call takes its cost in tokens (CallPolicy.cost), so an expensive RPC spends more of a
    principal's allowance than a cheap one.

    Memory is bounded whatever the population: a bucket untouched for burst / rate seconds
    is full again, the same as no bucket, so it is dropped; and at most `max_buckets` are
    held, the longest idle dropped first (at worst its principal gets a full bucket back a
    little early). Buckets are kept in order of last use, so both cost O(1) per call.
    """

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    max_buckets: int = 100_000
    # key -> (tokens, when last updated), least recently used first.
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)

    def acquire(self, key: str, cost: float = 1.0) -> float:
        """0 when the call may proceed (its cost is taken), else the seconds until it may be
        retried (nothing is taken)."""
        now = self.clock()
        tokens, updated = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        # A call never costs more than a full bucket, so every call passes once it has waited.
        cost = min(cost, self.burst)
        wait = 0.0 if tokens >= cost else (cost - tokens) / self.rate
        self._evict(now)
        self._buckets[key] = (tokens - cost if wait == 0.0 else tokens, now)
        return wait

    @property
    def held(self) -> int:
        """How many buckets are held now."""
        return len(self._buckets)

    def _evict(self, now: float) -> None:
        """Drop refilled buckets, then the longest idle until there is room for one more."""
        refilled_after = self.burst / self.rate
        while self._buckets:
            oldest, (_, updated) = next(iter(self._buckets.items()))
            if now - updated < refilled_after and len(self._buckets) < self.max_buckets:
                return
            del self._buckets[oldest]
