"""In-process subscription to events as the stream processor commits them.

The interface the aggregation service's live-metric streams (`StreamLiveMetrics`,
`StreamTicketedEventLiveMetrics`) build on:

    feed = mesh.live_feed                      # one LiveFeed per process
    async with feed.subscribe(tenant_id) as subscription:
        async for batch in subscription:       # LiveBatch, in commit order
            delta = summarize(batch.rows)      # or any Arrow computation on batch.rows
            ...                                # render a MetricPoint, send it

Guarantees and limits:
- A subscriber sees only rows committed to the event store after it subscribed, each
  once, in commit order. `rows` has the columns of `EVENT_ARROW_SCHEMA` and only the
  subscribed tenant's events (`tenant_id=None`: every tenant, for platform admins).
- Live streams are for dashboards, so a slow subscriber never holds the processor back:
  each subscription buffers at most `max_pending_batches`; past that the oldest batch is
  dropped and the next one delivered has `gap=True` (the subscriber should reload the
  exact numbers from the query service). Nothing is lost from the store.
- `publish` is called from the processor's threads; subscribers live on an asyncio loop
  (the one current at `subscribe`), reached with `call_soon_threadsafe`.
- In the cluster shape Pinot serves the queries and the processor still runs for these
  live updates (and the dead-letter checks); with `--event-log embedded` there is no
  processor and no live feed (`Mesh.live_feed` is None).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from types import TracebackType

import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True, slots=True)
class LiveBatch:
    tenant_id: str | None  # the subscription's tenant (None: all tenants)
    rows: pa.Table  # the committed events of that scope, EVENT_ARROW_SCHEMA columns
    committed_at: datetime  # when the event store committed them (UTC)
    gap: bool = False  # True when batches before this one were dropped for this subscriber


@dataclass(frozen=True, slots=True)
class LiveDelta:
    """What a batch adds to a live dashboard; a convenience over `LiveBatch.rows`."""

    events: int
    by_event_name: dict[str, int]
    conversions: int
    revenue: dict[str, Decimal]  # per currency
    tickets: int
    actors: frozenset[str] = field(default_factory=frozenset)  # `u:<user>` / `a:<anon>`


def summarize(rows: pa.Table) -> LiveDelta:
    """Counts, conversions, revenue per currency, tickets and the distinct actors of rows."""
    names = pc.value_counts(rows.column("event_name")).to_pylist() if rows.num_rows else []
    conversions = rows.filter(pc.equal(rows.column("event_type"), "conversion"))
    money = conversions.filter(pc.not_equal(conversions.column("currency"), ""))
    revenue: dict[str, Decimal] = {}
    if money.num_rows:
        grouped = money.group_by("currency").aggregate([("revenue", "sum")])
        revenue = dict(
            zip(
                grouped.column("currency").to_pylist(),
                grouped.column("revenue_sum").to_pylist(),
                strict=True,
            )
        )
    actors = set()
    for user, anonymous in zip(
        rows.column("user_id").to_pylist(), rows.column("anonymous_id").to_pylist(), strict=True
    ):
        if user:
            actors.add(f"u:{user}")
        elif anonymous:
            actors.add(f"a:{anonymous}")
    tickets = pc.sum(conversions.column("quantity")).as_py() if conversions.num_rows else 0
    return LiveDelta(
        events=rows.num_rows,
        by_event_name={item["values"]: item["counts"] for item in names},
        conversions=conversions.num_rows,
        revenue=revenue,
        tickets=int(tickets or 0),
        actors=frozenset(actors),
    )


class LiveSubscription:
    """An async iterator of `LiveBatch`; close it (or use `async with`) when done."""

    def __init__(self, feed: LiveFeed, tenant_id: str | None, max_pending_batches: int) -> None:
        self.tenant_id = tenant_id
        self._feed = feed
        self._loop = asyncio.get_running_loop()
        self._pending: deque[LiveBatch] = deque()
        self._max = max_pending_batches
        self._wakeup = asyncio.Event()
        self._gap = False
        self._closed = False
        self.dropped_batches = 0

    # Called on the subscriber's loop (through call_soon_threadsafe).
    def _deliver(self, batch: LiveBatch) -> None:
        if self._closed:
            return
        if len(self._pending) >= self._max:
            # The oldest goes: the batch that then comes first follows a gap.
            self._pending.popleft()
            self.dropped_batches += 1
            self._gap = True
        self._pending.append(batch)
        self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[LiveBatch]:
        return self

    async def __anext__(self) -> LiveBatch:
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = self._pending.popleft()
        if self._gap:
            self._gap = False
            batch = LiveBatch(batch.tenant_id, batch.rows, batch.committed_at, gap=True)
        return batch

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._feed._remove(self)
            self._wakeup.set()

    async def __aenter__(self) -> LiveSubscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LiveFeed:
    """Fan-out of committed batches to subscribers; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: list[LiveSubscription] = []
        self.published_batches = 0

    def subscribe(
        self, tenant_id: str | None, *, max_pending_batches: int = 256
    ) -> LiveSubscription:
        """A subscription on the running event loop; `tenant_id=None` means all tenants."""
        if tenant_id == "":
            raise ValueError("tenant_id must not be empty; None subscribes to every tenant")
        subscription = LiveSubscription(self, tenant_id, max_pending_batches)
        with self._lock:
            self._subscriptions.append(subscription)
        return subscription

    def _remove(self, subscription: LiveSubscription) -> None:
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def publish(self, rows: pa.Table, committed_at: datetime | None = None) -> None:
        """Hands committed rows to the subscribers of their tenants. Costs nothing
        beyond a lock when nobody subscribed."""
        with self._lock:
            subscriptions = list(self._subscriptions)
        if not subscriptions or rows.num_rows == 0:
            return
        self.published_batches += 1
        at = committed_at or datetime.now(UTC)
        by_tenant: dict[str, pa.Table] = {}
        wanted = {s.tenant_id for s in subscriptions if s.tenant_id is not None}
        if wanted:
            tenant_column = rows.column("tenant_id")
            for tenant_id in wanted:
                subset = rows.filter(pc.equal(tenant_column, tenant_id))
                if subset.num_rows:
                    by_tenant[tenant_id] = subset
        for subscription in subscriptions:
            subset = (
                rows if subscription.tenant_id is None else by_tenant.get(subscription.tenant_id)
            )
            if subset is None:
                continue
            batch = LiveBatch(subscription.tenant_id, subset, at)
            try:
                subscription._loop.call_soon_threadsafe(subscription._deliver, batch)
            except RuntimeError:  # the subscriber's loop is closed
                self._remove(subscription)
