"""One Redis pub/sub channel relayed to a handler, for as long as the process runs.

Shared by the buses that cross processes over Redis: anomaly alerts
(services/live/alerts.py) and API key revocations (services/platform/key_revocations.py).
The listener subscribes, hands each message's payload to the handler, and after a Redis
failure logs it and subscribes again a second later. Pub/sub is at most once: what is
published while the listener is disconnected is not delivered; each bus says what
stands behind that.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger(__name__)

RETRY_LISTEN_AFTER_SECONDS = 1.0


def redis_failures() -> tuple[type[Exception], ...]:
    """What a Redis call raises when Redis is down, slow or gone (imported lazily: the
    embedded shape runs without Redis)."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


class ChannelListener:
    """Relays `channel` to `handle(payload)`; `name` prefixes its log events."""

    def __init__(
        self,
        client: Redis,
        channel: str,
        handle: Callable[[bytes], Awaitable[None]],
        name: str,
    ) -> None:
        self._client = client
        self.channel = channel
        self._handle = handle
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def start(self, wait_seconds: float) -> None:
        """Starts listening; returns once subscribed, or after `wait_seconds` when Redis
        does not answer (the listener keeps retrying in the background)."""
        if self._task is not None:
            return
        self._task = asyncio.ensure_future(self._listen())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_seconds):
                await self.subscribed.wait()

    async def _listen(self) -> None:
        failures = redis_failures()
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await self._handle(message["data"])
            except failures as exc:
                log.warning(
                    f"{self._name}_listen_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_seconds=RETRY_LISTEN_AFTER_SECONDS,
                )
                await asyncio.sleep(RETRY_LISTEN_AFTER_SECONDS)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        """Stops listening (the client is the caller's to close)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
