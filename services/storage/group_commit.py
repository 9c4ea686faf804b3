"""The embedded event log: many concurrent appends, one durable commit per group.

Each `append` queues its events and waits. One background task takes everything queued,
commits it with a single `EventStore.append` in a worker thread (one transaction, one
fsync), then answers every waiter of that group. While a commit runs, new requests pile
up and form the next group, so the commit rate adapts to load: an idle log commits a
lone request at once, a busy one commits large groups.

Linger: a commit costs a fixed ~13 ms of CPU in DuckDB whatever its size, so under many
concurrent small writes (single-event RPCs) the group size decides the throughput.
Without a pause, the first request to arrive after a commit starts the next commit
alone and the rest of the wave waits a whole commit behind it. So when the previous
group held more than one request (there is concurrency) and fewer than
`linger_until_events` events wait, the writer pauses up to `max_linger_seconds` (at
most the last commit's duration) to let the wave join. An idle log, or one fed
large batches, never lingers. (20 ms and one commit rather than 10 ms and half a commit:
with 32 single-event callers, ~15 % less server CPU per call and a lower median latency,
because fewer, larger commits serve the same callers; docs/benchmarks.md.) Durability
is unchanged: nobody is answered before the commit that holds their events returned.

Guarantees:
- `append` returns only after its events are durable in the store; if the commit fails,
  every waiter of that group gets the same exception and nothing of it is acknowledged
  (the store rolled the transaction back).
- Back-pressure: events accepted but not yet committed (queued or in the commit under
  way) never exceed `max_pending_events`; past it `append` raises `EventLogFullError` at
  once, before queuing, so the caller can answer RESOURCE_EXHAUSTED with retry advice.
- A waiter that is cancelled (client gone) may still see its events committed: the
  log is at-least-once, and event_id dedup makes the client's retry harmless.

`EventLog` is the seam where the cluster shape swaps in a Kafka producer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.events.model import TrackedEvent
from services.storage.event_store import EventStore


class EventLog(Protocol):
    """Where ingestion hands accepted events; durable when `append` returns."""

    async def append(self, events: Sequence[TrackedEvent]) -> None: ...

    async def close(self) -> None: ...


class EventLogFullError(Exception):
    """Too many events await a commit; retry after `retry_after_seconds`."""

    def __init__(self, pending_events: int, max_pending_events: int, retry_after_seconds: float):
        super().__init__(
            f"event log is full: {pending_events} events await a commit "
            f"(limit {max_pending_events}); retry in {retry_after_seconds:.2f} s"
        )
        self.pending_events = pending_events
        self.max_pending_events = max_pending_events
        self.retry_after_seconds = retry_after_seconds


class EventLogClosedError(Exception):
    """`append` after `close()`: the process is shutting down."""


@dataclass(slots=True)
class _Request:
    events: Sequence[TrackedEvent]
    done: asyncio.Future[None]


class GroupCommitter:
    """`EventLog` over an `EventStore` with group commit. Use from one event loop.

    Telemetry reads the plain counters: `batches_committed`, `events_committed`,
    `batches_failed`, `last_commit_seconds`, `last_batch_events` and `pending_events`.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        max_pending_events: int = 200_000,
        max_linger_seconds: float = 0.020,
        linger_until_events: int = 256,
    ) -> None:
        if max_pending_events <= 0:
            raise ValueError("max_pending_events must be positive")
        if max_linger_seconds < 0:
            raise ValueError("max_linger_seconds must not be negative")
        self._store = store
        self.max_pending_events = max_pending_events
        self.max_linger_seconds = max_linger_seconds
        self.linger_until_events = linger_until_events
        self._last_group_requests = 0
        self.batches_committed = 0
        self.events_committed = 0
        self.batches_failed = 0
        self.last_commit_seconds = 0.0
        self.last_batch_events = 0
        self.pending_events = 0  # queued + in the commit under way
        self._queue: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None

    async def append(self, events: Sequence[TrackedEvent]) -> None:
        """Returns once `events` are durable; raises the commit's error otherwise."""
        if self._closing:
            raise EventLogClosedError("event log is closed")
        if not events:
            return
        if len(events) > self.max_pending_events:
            # Retrying could never help: this is a sizing bug, not load.
            raise ValueError(
                f"a batch of {len(events)} events exceeds max_pending_events "
                f"({self.max_pending_events})"
            )
        if self.pending_events + len(events) > self.max_pending_events:
            raise EventLogFullError(
                self.pending_events, self.max_pending_events, self._retry_after_seconds()
            )
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._run(), name="group-commit-writer"
            )
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(events, done))
        self.pending_events += len(events)
        self._wakeup.set()
        await done

    def _retry_after_seconds(self) -> float:
        # About the time to commit what is already pending, from the last commit's
        # speed; clamped so clients neither hammer nor stall.
        if self.last_batch_events and self.last_commit_seconds:
            per_event = self.last_commit_seconds / self.last_batch_events
            return min(5.0, max(0.05, per_event * self.pending_events))
        return 0.1

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._linger()
                await self._commit_group()
            if self._closing:
                return

    async def _linger(self) -> None:
        """Under concurrent small writes, waits briefly so the wave forms one group."""
        if self._closing or self.max_linger_seconds <= 0 or self._last_group_requests < 2:
            return
        if self.pending_events >= self.linger_until_events:
            return
        linger = min(self.max_linger_seconds, self.last_commit_seconds)
        if linger <= 0:
            return
        try:
            await asyncio.sleep(linger)
        except BaseException:
            # Cancelled while waiting (loop shutting down): as for a commit cut short,
            # the queued waiters must not hang; none of their events were committed.
            self._fail_queued(EventLogClosedError("commit interrupted"))
            raise

    def _fail_queued(self, error: Exception) -> None:
        for request in self._queue:
            self.pending_events -= len(request.events)
            if not request.done.done():
                request.done.set_exception(error)
        self._queue.clear()

    async def _commit_group(self) -> None:
        group = list(self._queue)
        self._queue.clear()
        self._last_group_requests = len(group)
        events = [event for request in group for event in request.events]
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._store.append, events)
        except BaseException as exc:
            self.batches_failed += 1
            # Cancelled mid-commit (loop shutting down): the thread may still commit,
            # but the waiters must not hang nor be told it worked.
            error = exc if isinstance(exc, Exception) else EventLogClosedError("commit interrupted")
            for request in group:
                if not request.done.done():
                    request.done.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        else:
            self.batches_committed += 1
            self.events_committed += len(events)
            self.last_batch_events = len(events)
            for request in group:
                if not request.done.done():
                    request.done.set_result(None)
        finally:
            self.last_commit_seconds = time.perf_counter() - started
            self.pending_events -= len(events)

    async def close(self) -> None:
        """Refuses new appends, commits everything queued, then stops the writer."""
        self._closing = True
        if self._writer is None:
            return
        self._wakeup.set()
        await self._writer
