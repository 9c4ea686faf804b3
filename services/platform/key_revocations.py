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

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from redis import Redis as SyncRedis
    from redis.asyncio import Redis

log = structlog.get_logger(__name__)

CHANNEL = "bilten:api-keys:revoked:v1"
# Announcing runs in the revoking RPC's worker thread: a slow Redis counts as a down one.
REDIS_TIMEOUT_SECONDS = 1.0
RETRY_LISTEN_AFTER_SECONDS = 1.0
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
        from redis.exceptions import RedisError

        self._publisher = publisher
        self._subscriber = subscriber
        self._forget = forget
        self._channel = channel
        self._failures: tuple[type[Exception], ...] = (RedisError, OSError, TimeoutError)
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
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
        if self._listener is not None:
            return
        self._listener = asyncio.ensure_future(self._listen())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS * 5):
                await self._subscribed.wait()

    async def _listen(self) -> None:
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = message.get("data")
                    if not isinstance(data, bytes) or not 0 < len(data) <= MAX_KEY_ID_LENGTH:
                        log.warning("api_key_revocation_bad_message", size=len(data or b""))
                        continue
                    self.received += 1
                    self._forget(data.decode("utf-8", errors="replace"))
            except self._failures as exc:
                log.warning(
                    "api_key_revocation_listen_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_seconds=RETRY_LISTEN_AFTER_SECONDS,
                )
                await asyncio.sleep(RETRY_LISTEN_AFTER_SECONDS)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        await self._subscriber.aclose()
        self._publisher.close()
