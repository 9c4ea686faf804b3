"""Token-bucket rate limit per API key, counted in events (a batch of 500 costs 500).

Two implementations of `RateLimiter`:

- `TokenBucketLimiter` keeps the buckets in process. Every ingestion replica then has its
  own, so N replicas admit N times the configured rate.
- `RedisTokenBucketLimiter` keeps the same bucket in Redis (`BILTEN_REDIS_URL`), so all
  replicas draw from one budget per key. One Lua script reads, refills and takes
  atomically; it runs by EVALSHA (redis-py's `Script` loads it again after a Redis
  restart empties the script cache). The clock is Redis's `TIME`, not the replica's:
  replicas with skewed clocks would otherwise refill a shared bucket by their own idea
  of elapsed time. Keys are namespaced (`KEY_PREFIX`) and expire once a full refill has
  passed, so idle API keys leave nothing behind.

Redis outage: the Redis limiter fails open to an in-process `TokenBucketLimiter` with
the same rate and burst (a warning log, the counter `bilten_rate_limit_redis_fallbacks`)
rather than answering UNAVAILABLE. Why: the limiter only shields capacity from a runaway
sender; events refused here are analytics data that senders often cannot resend, while
the store keeps its own back-pressure (`max_pending_events`, the Kafka append timeout).
A cache outage should cost precision of the limit (per replica, as before Redis), not
ingestion. After a failure Redis is left alone for `RETRY_REDIS_AFTER_SECONDS`, so an
outage does not add a connect timeout to every call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import structlog
from opentelemetry import metrics

from services.platform.settings import PlatformSettings

# redis-py is imported only by processes that use it: every service imports this module
# through `services.mesh`, and most never talk to Redis.
if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger(__name__)

KEY_PREFIX = "bilten:ingestion:rate-limit:v1:"
# Redis sits next to the replicas: a healthy answer takes about a millisecond. The limit
# is on the path of every ingestion call, so a slow Redis is treated as a down one.
REDIS_TIMEOUT_SECONDS = 0.25
RETRY_REDIS_AFTER_SECONDS = 5.0
# A bucket idle for burst / rate seconds is full again, the same as no key at all; the
# margin keeps a key alive across one slow round trip.
TTL_MARGIN_MS = 1_000

_meter = metrics.get_meter("bilten.analytics.ingestion")
_fallbacks = _meter.create_counter(
    "bilten_rate_limit_redis_fallbacks",
    description="Rate-limit decisions taken by the in-process bucket because Redis failed "
    "(cause=redis_error) or is skipped after a failure (cause=redis_skipped)",
)

# KEYS[1]: the bucket (hash: tokens, s, us). ARGV: rate per second, burst, cost, TTL ms.
# Returns the seconds to wait as a string (0: taken); a Lua number would be truncated to
# an integer reply. The time is kept as TIME's two integers, because a double holding
# microseconds since 1970 would lose digits in `tostring`. Calling TIME before writing
# is fine: Redis >= 5 replicates a script's effects, not the script.
_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now = redis.call('TIME')
local now_s = tonumber(now[1])
local now_us = tonumber(now[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 's', 'us')
local tokens = tonumber(state[1])
if tokens == nil then
  tokens = burst
else
  local elapsed = (now_s - tonumber(state[2])) + (now_us - tonumber(state[3])) / 1000000
  if elapsed > 0 then
    tokens = math.min(burst, tokens + elapsed * rate)
  end
end
local wait = 0
if cost > burst then
  wait = cost / rate
elseif tokens >= cost then
  tokens = tokens - cost
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 's', now[1], 'us', now[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return string.format('%.17g', wait)
"""


class RateLimiter(Protocol):
    async def acquire(self, key: str, cost: float, now: float) -> float:
        """Takes `cost` tokens of `key`'s bucket; returns 0 on success, else the seconds
        until it would succeed. `now` is the caller's clock (in-process buckets use it)."""
        ...

    async def aclose(self) -> None: ...


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

    async def acquire(self, key: str, cost: float, now: float) -> float:
        return self.try_take(key, cost, now)

    async def aclose(self) -> None:
        return None


class RedisTokenBucketLimiter:
    """The token bucket of `TokenBucketLimiter`, shared through Redis (see the module doc)."""

    def __init__(
        self,
        client: Redis,
        rate_per_second: float,
        burst: float,
        *,
        key_prefix: str = KEY_PREFIX,
        retry_redis_after_seconds: float = RETRY_REDIS_AFTER_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        from redis.exceptions import RedisError

        self.rate = rate_per_second
        self.burst = burst
        self._client = client
        # OSError: socket errors and timeouts that reach us unwrapped.
        self._failures: tuple[type[Exception], ...] = (RedisError, OSError)
        self._script = client.register_script(_BUCKET_SCRIPT)
        self._key_prefix = key_prefix
        self._ttl_ms = math.ceil(burst / rate_per_second * 1000) + TTL_MARGIN_MS
        self._retry_after = retry_redis_after_seconds
        self._monotonic = monotonic
        self._skip_redis_until = 0.0
        self._degraded = False
        # Same rate and burst, per replica: the limit as it was before Redis.
        self.fallback = TokenBucketLimiter(rate_per_second, burst)
        self.fallback_decisions = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        rate_per_second: float,
        burst: float,
        *,
        password: str = "",
        timeout_seconds: float = REDIS_TIMEOUT_SECONDS,
        key_prefix: str = KEY_PREFIX,
        retry_redis_after_seconds: float = RETRY_REDIS_AFTER_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> RedisTokenBucketLimiter:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = Redis.from_url(
            url,
            # A password in the URL wins over this one (redis-py applies the URL last).
            password=password or None,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            # One immediate retry recovers a pooled connection that Redis closed (restart,
            # idle timeout); redis-py's default backs off for seconds, on the request path.
            retry=Retry(NoBackoff(), 1),
        )
        return cls(
            client,
            rate_per_second,
            burst,
            key_prefix=key_prefix,
            retry_redis_after_seconds=retry_redis_after_seconds,
            monotonic=monotonic,
        )

    async def acquire(self, key: str, cost: float, now: float) -> float:
        if self._monotonic() < self._skip_redis_until:
            return self._fall_back(key, cost, now, "redis_skipped")
        try:
            reply = await self._script(
                keys=[self._key_prefix + key],
                args=[
                    repr(float(self.rate)),
                    repr(float(self.burst)),
                    repr(float(cost)),
                    self._ttl_ms,
                ],
            )
        except self._failures as exc:
            self._skip_redis_until = self._monotonic() + self._retry_after
            log.warning(
                "rate_limit_redis_unavailable",
                error=f"{type(exc).__name__}: {exc}",
                fallback="in-process token bucket (limit per replica)",
                retry_redis_in_seconds=self._retry_after,
            )
            self._degraded = True
            return self._fall_back(key, cost, now, "redis_error")
        if self._degraded:
            self._degraded = False
            log.info("rate_limit_redis_recovered")
        return float(reply)

    def _fall_back(self, key: str, cost: float, now: float, cause: str) -> float:
        self.fallback_decisions += 1
        _fallbacks.add(1, {"cause": cause})
        return self.fallback.try_take(key, cost, now)

    async def aclose(self) -> None:
        await self._client.aclose()


def rate_limiter_for(settings: PlatformSettings) -> RateLimiter:
    """The Redis limiter when `redis_url` is set, else the in-process one."""
    if settings.redis_url:
        return RedisTokenBucketLimiter.from_url(
            settings.redis_url,
            settings.rate_limit_events_per_second,
            settings.rate_limit_burst_events,
            password=settings.redis_password,
        )
    return TokenBucketLimiter(
        settings.rate_limit_events_per_second, settings.rate_limit_burst_events
    )
