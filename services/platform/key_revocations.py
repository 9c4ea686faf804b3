"""API key revocations and rotations, pushed to every process over Redis pub/sub.

Each process caches verified API keys for `Authenticator.cache_seconds` (30 s) so the
ingestion hot path does not read the metadata store per call. The process that revokes
or rotates a key drops its own cache entries at once; without this bus every other pod
(ingestion replicas, the query pods) would go on accepting the revoked key until its
entry expired. With `redis_url` set, the revoking process announces the key id on
`CHANNEL` and every process listening drops its cached verifications of that key, so a
revocation reaches the whole cluster within a Redis round trip.

Only the key id crosses Redis (never a secret or a hash): a forged message can at worst
make a process re-read a key from the metadata store.

Pub/sub is at most once: an announcement made while Redis is down or while a listener is
reconnecting is lost, and that process falls back to the cache expiry (≤ 30 s). A failed
announcement never fails the revocation itself, which is already durable in the
metadata store; it is logged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from services.platform.redis_channel import ChannelListener, redis_failures

if TYPE_CHECKING:
    from redis import Redis as SyncRedis
    from redis.asyncio import Redis

log = structlog.get_logger(__name__)

CHANNEL = "bilten:api-keys:revoked:v1"
# Announcing runs in the revoking RPC's worker thread: a slow Redis counts as a down one.
REDIS_TIMEOUT_SECONDS = 1.0
MAX_KEY_ID_LENGTH = 128


class RedisKeyRevocations:
    """Announces revoked or rotated key ids, and forgets the ones others announce."""

    def __init__(
        self,
        publisher: SyncRedis,
        subscriber: Redis,
        forget: Callable[[str], None],
        channel: str = CHANNEL,
    ) -> None:
        self._publisher = publisher
        self._subscriber = subscriber
        self._forget = forget
        self._channel = channel
        self._failures = redis_failures()
        self._listener = ChannelListener(subscriber, channel, self._relay, "api_key_revocation")
        self.received = 0
        self.failed_announcements = 0

    @classmethod
    def from_url(
        cls, url: str, forget: Callable[[str], None], *, password: str = "", channel: str = CHANNEL
    ) -> RedisKeyRevocations:
        from redis import Redis as SyncRedis
        from redis.asyncio import Redis

        publisher = SyncRedis.from_url(
            url,
            password=password or None,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
        )
        # No socket timeout: the listener waits for messages indefinitely.
        subscriber = Redis.from_url(
            url,
            password=password or None,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            health_check_interval=30,
        )
        return cls(publisher, subscriber, forget, channel)

    @property
    def channel(self) -> str:
        return self._channel

    def announce(self, key_id: str) -> None:
        """Tells every listening process that `key_id` was revoked or rotated.
        Synchronous: called from the revoking RPC's worker thread. Never raises."""
        try:
            self._publisher.publish(self._channel, key_id)
        except self._failures as exc:
            self.failed_announcements += 1
            log.warning(
                "api_key_revocation_announce_failed",
                key_id=key_id,
                error=f"{type(exc).__name__}: {exc}",
                fallback="other processes' caches expire within their cache_seconds",
            )

    async def start(self) -> None:
        """Starts listening; returns once subscribed (or after a bounded wait, when Redis
        is down: the listener keeps retrying and the cache expiry is the fallback)."""
        await self._listener.start(REDIS_TIMEOUT_SECONDS * 5)

    async def _relay(self, payload: bytes) -> None:
        if not isinstance(payload, bytes) or not 0 < len(payload) <= MAX_KEY_ID_LENGTH:
            log.warning("api_key_revocation_bad_message", size=len(payload or b""))
            return
        self.received += 1
        self._forget(payload.decode("utf-8", errors="replace"))

    async def aclose(self) -> None:
        await self._listener.aclose()
        await self._subscriber.aclose()
        self._publisher.close()
