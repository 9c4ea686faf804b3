"""Token-bucket rate limit per API key, counted in events (a batch of 500 costs 500)."""

from __future__ import annotations


class TokenBucketLimiter:
    def __init__(self, rate_per_second: float, burst: float) -> None:
        self.rate = rate_per_second
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, updated at)

    def try_take(self, key: str, cost: float, now: float) -> float:
        """Takes `cost` tokens; returns 0 on success, else seconds until it would succeed."""
        tokens, updated = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        if cost > self.burst:
            # Can never succeed in one go; tell the caller how long a full bucket takes.
            self._buckets[key] = (tokens, now)
            return cost / self.rate
        if tokens >= cost:
            self._buckets[key] = (tokens - cost, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (cost - tokens) / self.rate
