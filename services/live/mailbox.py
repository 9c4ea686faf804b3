"""The buffer between a hub (one producer) and one subscriber, on one event loop.

Bounded and never blocking the producer: `offer` on a full mailbox drops the *oldest*
item and counts it, so a slow reader always gets the most recent items (for live
metrics, whose every update is a full state, capacity 1 means "the latest state") and
`dropped` tells it how many it missed (`dropped_update_count` in the streams).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a mailbox holds at least one item")
        self._items: deque[T] = deque()
        self._capacity = capacity
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def offer(self, item: T) -> None:
        """Never waits: when full, the oldest item is dropped (and counted)."""
        if self._closed:
            return
        if len(self._items) >= self._capacity:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._ready.set()

    async def get(self) -> T:
        """The oldest item kept; `StopAsyncIteration` once closed and drained."""
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    @property
    def closed(self) -> bool:
        return self._closed


class Subscription(Generic[T]):
    """An async iterator over a mailbox; closing it unregisters it from its hub."""

    def __init__(self, mailbox: Mailbox[T], unregister: Callable[[], None]) -> None:
        self._mailbox = mailbox
        self._unregister = unregister

    @property
    def dropped(self) -> int:
        """Items this subscriber missed because it read too slowly."""
        return self._mailbox.dropped

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self._mailbox.get()

    def close(self) -> None:
        if not self._mailbox.closed:
            self._mailbox.close()
            self._unregister()

    async def __aenter__(self) -> Subscription[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
