"""Live metrics per tenant and per ticketed event, pushed to subscribers within a second.

Definitions (the numbers of `StreamLiveMetrics` / `StreamTicketedEventLiveMetrics`):
- Times are the events' `occurred_at`, clamped to the hub's clock (a client clock a few
  minutes ahead must not make an event count in the future); one-second resolution.
- Active sessions: distinct non-empty `session_id`s of the tenant whose last event is
  in the last 30 minutes. Active visitors of a ticketed event: distinct actors
  (`user_id`, else `anonymous_id`, as everywhere) with an event of it in that window.
- Events last minute: events in the last 60 seconds.
- Today: since 00:00 UTC of the hub's clock, by `occurred_at`; a late event of
  yesterday does not count. Tickets: sum of `quantity` of conversions (free tickets
  included); revenue: sum of `revenue` of conversions with a currency, per currency
  (as in `services.query.metrics`); views: `page_view` events of the ticketed event.
- All tenants (platform admins): the sum over tenants (sessions and users are tenant
  scoped, so the sum is the distinct count).

How it runs:
- Input (`EventObserver`, any thread): a batch is appended to an inbox and the hub's
  task is woken; nothing else happens on the producer's thread.
- The task (on the server's event loop) folds the inbox into the state, then publishes:
  for each subscribed scope whose numbers changed, one snapshot, offered to each
  subscriber's mailbox. An event after a quiet spell is published at once; within
  `min_interval_seconds` (default 0.5 s) of the last such pass, batches wait for the
  interval's end and share one pass. So the delay from acknowledgement to subscriber
  is at most that interval plus the pass, and usually milliseconds.
  Every `tick_seconds` a pass runs anyway (sessions age out without new events), and a
  scope whose numbers did not change is re-sent every `heartbeat_seconds` so proxies
  (Envoy's stream idle timeout) and clients see the stream is alive.
- Subscribers read from a `Mailbox` of capacity `mailbox_capacity` (1: latest state
  only); a slow one loses intermediate updates, counted in its `dropped`, and never
  slows the task or ingestion.
- `seed(store)` loads today's totals and the last 30 minutes from the event store at
  start, before the server takes events (so nothing is counted twice or missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

import pyarrow as pa
import structlog

from services.events.model import TrackedEvent, TrackedEventType
from services.live.mailbox import Mailbox, Subscription
from services.query.metrics import CurrencyAmount
from services.storage.event_store import TABLE, EventStore

log = structlog.get_logger(__name__)

SESSION_WINDOW_SECONDS = 30 * 60
EVENT_WINDOW_SECONDS = 60
_CONVERSION = TrackedEventType.CONVERSION.value
_PAGE_VIEW = TrackedEventType.PAGE_VIEW.value

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LiveMetrics:
    computed_at: datetime
    active_sessions: int
    events_last_minute: int
    tickets_sold_today: int
    revenue_today: tuple[CurrencyAmount, ...]  # sorted by currency

    def values(self) -> tuple[object, ...]:
        """Everything but the time: what decides whether an update is news."""
        return (
            self.active_sessions,
            self.events_last_minute,
            self.tickets_sold_today,
            self.revenue_today,
        )


@dataclass(frozen=True, slots=True)
class TicketedEventLiveMetrics:
    computed_at: datetime
    views_today: int
    active_visitors: int
    tickets_sold_today: int
    revenue_today: tuple[CurrencyAmount, ...]

    def values(self) -> tuple[object, ...]:
        return (self.views_today, self.active_visitors, self.tickets_sold_today, self.revenue_today)


# --- state ---------------------------------------------------------------------------


class _RecentSet:
    """Keys with the second of their latest activity; counts the ones in the window.

    Keys are filed under their last second, and a heap of those seconds lets `count`
    drop whole expired seconds, so each key costs O(log n) once, not per count.
    """

    __slots__ = ("_by_second", "_heap", "_last", "_window")

    def __init__(self, window_seconds: int) -> None:
        self._window = window_seconds
        self._last: dict[str, int] = {}
        self._by_second: dict[int, set[str]] = {}
        self._heap: list[int] = []

    def touch(self, key: str, second: int) -> None:
        old = self._last.get(key)
        if old is not None:
            if old >= second:
                return
            keys = self._by_second[old]
            keys.discard(key)
        self._last[key] = second
        keys_now = self._by_second.get(second)
        if keys_now is None:
            keys_now = self._by_second[second] = set()
            heapq.heappush(self._heap, second)
        keys_now.add(key)

    def count(self, now_second: int) -> int:
        """Keys whose last second is in (now - window, now]."""
        cutoff = now_second - self._window
        while self._heap and self._heap[0] <= cutoff:
            for key in self._by_second.pop(heapq.heappop(self._heap)):
                del self._last[key]
        return len(self._last)


class _SecondCounts:
    """Events per second with a running total of the window (now - window, now]."""

    __slots__ = ("_counts", "_heap", "_total", "_window")

    def __init__(self, window_seconds: int) -> None:
        self._window = window_seconds
        self._counts: dict[int, int] = {}
        self._heap: list[int] = []
        self._total = 0

    def add(self, second: int, events: int = 1) -> None:
        if second not in self._counts:
            self._counts[second] = 0
            heapq.heappush(self._heap, second)
        self._counts[second] += events
        self._total += events

    def total(self, now_second: int) -> int:
        cutoff = now_second - self._window
        while self._heap and self._heap[0] <= cutoff:
            self._total -= self._counts.pop(heapq.heappop(self._heap))
        return self._total


@dataclass(slots=True)
class _Today:
    tickets: int = 0
    views: int = 0
    revenue: dict[str, Decimal] = field(default_factory=dict)

    def money(self) -> tuple[CurrencyAmount, ...]:
        return tuple(CurrencyAmount(c, a) for c, a in sorted(self.revenue.items()))


@dataclass(slots=True)
class _TicketedState:
    today: _Today = field(default_factory=_Today)
    visitors: _RecentSet = field(default_factory=lambda: _RecentSet(SESSION_WINDOW_SECONDS))


@dataclass(slots=True)
class _TenantState:
    day: date
    today: _Today = field(default_factory=_Today)
    sessions: _RecentSet = field(default_factory=lambda: _RecentSet(SESSION_WINDOW_SECONDS))
    events: _SecondCounts = field(default_factory=lambda: _SecondCounts(EVENT_WINDOW_SECONDS))
    ticketed: dict[str, _TicketedState] = field(default_factory=dict)

    def roll_to(self, day: date, now_second: int) -> None:
        """A new UTC day: today's totals restart; idle ticketed events are forgotten."""
        self.day = day
        self.today = _Today()
        for ticketed_event_id in list(self.ticketed):
            state = self.ticketed[ticketed_event_id]
            state.today = _Today()
            if state.visitors.count(now_second) == 0:
                del self.ticketed[ticketed_event_id]


@dataclass(slots=True)
class _Topic(Generic[T]):
    """One subscribed scope: its subscribers and what they were last sent."""

    compute: Callable[[datetime], T]
    mailboxes: set[Mailbox[T]] = field(default_factory=set)
    last_values: tuple[object, ...] | None = None
    last_sent: float = 0.0


# --- the hub -------------------------------------------------------------------------


class LiveMetricsHub:
    """See the module docstring. Input methods are thread-safe; everything else runs
    on the event loop of `start()`."""

    def __init__(
        self,
        *,
        min_interval_seconds: float = 0.5,
        tick_seconds: float = 1.0,
        heartbeat_seconds: float = 15.0,
        mailbox_capacity: int = 1,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._min_interval = min_interval_seconds
        self._tick = tick_seconds
        self._heartbeat = heartbeat_seconds
        self._capacity = mailbox_capacity
        self._clock = clock
        self._tenants: dict[str, _TenantState] = {}
        self._topics: dict[Hashable, _Topic[Any]] = {}
        self._inbox: deque[Sequence[TrackedEvent] | pa.Table] = deque()
        self._inbox_lock = threading.Lock()
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[set[str]], Awaitable[object]]] = []
        self._changed: set[str] = set()
        self.published_updates = 0

    # --- input (any thread) -----------------------------------------------------------

    def observe_events(self, events: Sequence[TrackedEvent]) -> None:
        if events:
            self._enqueue(events)

    def observe_rows(self, rows: pa.Table) -> None:
        if rows.num_rows:
            self._enqueue(rows)

    def _enqueue(self, batch: Sequence[TrackedEvent] | pa.Table) -> None:
        with self._inbox_lock:
            self._inbox.append(batch)
            if self._wake_pending or self._loop is None:
                return
            self._wake_pending = True
            loop = self._loop
        with contextlib.suppress(RuntimeError):  # the loop closed: the hub stopped
            loop.call_soon_threadsafe(self._wake_up)

    def _wake_up(self) -> None:
        with self._inbox_lock:
            self._wake_pending = False
        if self._wake is not None:
            self._wake.set()

    # --- folding (loop) ---------------------------------------------------------------

    def _drain(self) -> None:
        with self._inbox_lock:
            batches = list(self._inbox)
            self._inbox.clear()
        if not batches:
            return
        now = self._clock()
        now_second = int(now.timestamp())
        today = now.date()
        for batch in batches:
            if isinstance(batch, pa.Table):
                self._fold_rows(batch, now, now_second, today)
            else:
                for event in batch:
                    self._fold(
                        event.tenant_id,
                        event.event_type.value,
                        event.occurred_at,
                        event.session_id,
                        _actor(event.user_id, event.anonymous_id),
                        event.ticketed_event_id,
                        event.revenue,
                        event.currency,
                        event.quantity,
                        now,
                        now_second,
                        today,
                    )

    def _fold_rows(self, rows: pa.Table, now: datetime, now_second: int, today: date) -> None:
        columns = [
            rows.column(name).to_pylist()
            for name in (
                "tenant_id",
                "event_type",
                "occurred_at",
                "session_id",
                "user_id",
                "anonymous_id",
                "ticketed_event_id",
                "revenue",
                "currency",
                "quantity",
            )
        ]
        for (
            tenant_id,
            event_type,
            occurred_at,
            session_id,
            user_id,
            anonymous_id,
            ticketed_event_id,
            revenue,
            currency,
            quantity,
        ) in zip(*columns, strict=True):
            self._fold(
                tenant_id,
                event_type,
                occurred_at,
                session_id,
                _actor(user_id, anonymous_id),
                ticketed_event_id,
                revenue,
                currency,
                quantity,
                now,
                now_second,
                today,
            )

    def _tenant(self, tenant_id: str, today: date, now_second: int) -> _TenantState:
        state = self._tenants.get(tenant_id)
        if state is None:
            state = self._tenants[tenant_id] = _TenantState(today)
        elif state.day != today:
            state.roll_to(today, now_second)
        return state

    def _fold(
        self,
        tenant_id: str,
        event_type: str,
        occurred_at: datetime,
        session_id: str,
        actor: str,
        ticketed_event_id: str,
        revenue: Decimal,
        currency: str,
        quantity: int,
        now: datetime,
        now_second: int,
        today: date,
    ) -> None:
        state = self._tenant(tenant_id, today, now_second)
        occurred_at = min(occurred_at, now)
        second = int(occurred_at.timestamp())
        counts_today = occurred_at.date() == today
        self._changed.add(tenant_id)
        state.events.add(second)
        if session_id:
            state.sessions.touch(session_id, second)
        conversion = event_type == _CONVERSION
        if counts_today and conversion:
            state.today.tickets += quantity
            if currency:
                state.today.revenue[currency] = (
                    state.today.revenue.get(currency, Decimal(0)) + revenue
                )
        if not ticketed_event_id:
            return
        ticketed = state.ticketed.get(ticketed_event_id)
        if ticketed is None:
            ticketed = state.ticketed[ticketed_event_id] = _TicketedState()
        if actor:
            ticketed.visitors.touch(actor, second)
        if counts_today:
            if event_type == _PAGE_VIEW:
                ticketed.today.views += 1
            elif conversion:
                ticketed.today.tickets += quantity
                if currency:
                    ticketed.today.revenue[currency] = (
                        ticketed.today.revenue.get(currency, Decimal(0)) + revenue
                    )

    # --- reading (loop) ---------------------------------------------------------------

    def snapshot(self, tenant_id: str | None) -> LiveMetrics:
        """The live numbers of one tenant, or of all (`None`), as of the hub's clock."""
        self._drain()
        return self._snapshot(tenant_id, self._clock())

    def _snapshot(self, tenant_id: str | None, now: datetime) -> LiveMetrics:
        now_second = int(now.timestamp())
        today = now.date()
        states = self._states(tenant_id, today, now_second)
        revenue: dict[str, Decimal] = {}
        for state in states:
            for currency, amount in state.today.revenue.items():
                revenue[currency] = revenue.get(currency, Decimal(0)) + amount
        return LiveMetrics(
            computed_at=now,
            active_sessions=sum(s.sessions.count(now_second) for s in states),
            events_last_minute=sum(s.events.total(now_second) for s in states),
            tickets_sold_today=sum(s.today.tickets for s in states),
            revenue_today=_Today(revenue=revenue).money(),
        )

    def ticketed_snapshot(
        self, tenant_id: str | None, ticketed_event_id: str
    ) -> TicketedEventLiveMetrics:
        self._drain()
        return self._ticketed_snapshot(tenant_id, ticketed_event_id, self._clock())

    def _ticketed_snapshot(
        self, tenant_id: str | None, ticketed_event_id: str, now: datetime
    ) -> TicketedEventLiveMetrics:
        now_second = int(now.timestamp())
        found = [
            s.ticketed[ticketed_event_id]
            for s in self._states(tenant_id, now.date(), now_second)
            if ticketed_event_id in s.ticketed
        ]
        revenue: dict[str, Decimal] = {}
        for state in found:
            for currency, amount in state.today.revenue.items():
                revenue[currency] = revenue.get(currency, Decimal(0)) + amount
        return TicketedEventLiveMetrics(
            computed_at=now,
            views_today=sum(s.today.views for s in found),
            active_visitors=sum(s.visitors.count(now_second) for s in found),
            tickets_sold_today=sum(s.today.tickets for s in found),
            revenue_today=_Today(revenue=revenue).money(),
        )

    def _states(self, tenant_id: str | None, today: date, now_second: int) -> list[_TenantState]:
        if tenant_id is None:
            states = list(self._tenants.values())
        else:
            state = self._tenants.get(tenant_id)
            states = [] if state is None else [state]
        for state in states:
            if state.day != today:
                state.roll_to(today, now_second)
        return states

    # --- subscriptions (loop) ---------------------------------------------------------

    def subscribe(self, tenant_id: str | None) -> Subscription[LiveMetrics]:
        """Updates of one tenant (or all, `None`); the current numbers come first."""
        return self._subscribe(("tenant", tenant_id), lambda now: self._snapshot(tenant_id, now))

    def subscribe_ticketed(
        self, tenant_id: str | None, ticketed_event_id: str
    ) -> Subscription[TicketedEventLiveMetrics]:
        return self._subscribe(
            ("ticketed", tenant_id, ticketed_event_id),
            lambda now: self._ticketed_snapshot(tenant_id, ticketed_event_id, now),
        )

    def _subscribe(self, key: Hashable, compute: Callable[[datetime], T]) -> Subscription[T]:
        self._drain()
        topic: _Topic[T] | None = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = _Topic(compute)
        mailbox: Mailbox[T] = Mailbox(self._capacity)
        topic.mailboxes.add(mailbox)
        mailbox.offer(compute(self._clock()))

        def unregister() -> None:
            topic.mailboxes.discard(mailbox)
            if not topic.mailboxes and self._topics.get(key) is topic:
                del self._topics[key]

        return Subscription(mailbox, unregister)

    @property
    def subscriber_count(self) -> int:
        return sum(len(t.mailboxes) for t in self._topics.values())

    def add_listener(self, listener: Callable[[set[str]], Awaitable[object]]) -> None:
        """Called after every publishing pass with the tenants that got events since the
        previous one (threshold alerts evaluate there)."""
        self._listeners.append(listener)

    # --- the task ---------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Starts the publishing task on the running loop (after `seed`)."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        with self._inbox_lock:
            self._loop = loop
        self._task = loop.create_task(self._run(), name="live-metrics-hub")
        return self._task

    async def stop(self) -> None:
        """Stops the task and ends every subscription (their streams finish)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with self._inbox_lock:
            self._loop = None
        for topic in list(self._topics.values()):
            for mailbox in list(topic.mailboxes):
                mailbox.close()
        self._topics.clear()

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        last_pass = last_news_pass = float("-inf")
        while True:
            self._wake.clear()
            self._drain()
            now = loop.time()
            # New events publish at once unless a pass for news ran less than
            # `min_interval` ago (then they wait for its end: bursts coalesce); the
            # periodic pass only ages the windows and must not delay news.
            news_due = bool(self._changed) and now - last_news_pass >= self._min_interval
            if news_due or now - last_pass >= self._tick:
                if news_due:
                    last_news_pass = now
                last_pass = now
                try:
                    await self._publish(now)
                except Exception:
                    log.exception("live_publish_failed")
            with self._inbox_lock:
                busy = bool(self._inbox)
            now = loop.time()
            delay = last_pass + self._tick - now
            if busy or self._changed:
                delay = min(delay, last_news_pass + self._min_interval - now)
            if delay > 0:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that races its timeout, and `stop` would hang.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    async def _publish(self, loop_now: float) -> None:
        now = self._clock()
        changed, self._changed = self._changed, set()
        for topic in list(self._topics.values()):
            snapshot = topic.compute(now)
            values = snapshot.values()
            if values == topic.last_values and loop_now - topic.last_sent < self._heartbeat:
                continue
            topic.last_values = values
            topic.last_sent = loop_now
            for mailbox in list(topic.mailboxes):
                mailbox.offer(snapshot)
            self.published_updates += 1
        for listener in self._listeners:
            await listener(changed)

    # --- seeding ----------------------------------------------------------------------

    def seed(self, store: EventStore) -> None:
        """Loads today's totals and the recent windows from the store (see docstring).

        Call before `start` and before the server takes events: it replaces the state.
        """
        now = self._clock()
        now_second = int(now.timestamp())
        today = now.date()
        day_start = datetime(today.year, today.month, today.day, tzinfo=UTC)
        recent = datetime.fromtimestamp(now_second - SESSION_WINDOW_SECONDS, UTC)
        minute = datetime.fromtimestamp(now_second - EVENT_WINDOW_SECONDS, UTC)
        self._tenants = {}
        # Times past `now` are clamped to it, as in `_fold`.
        second = "least(epoch_us(occurred_at), epoch_us($now)) // 1000000"
        today_rows = store.read(
            f"""SELECT tenant_id, ticketed_event_id, currency,
                   count(*) FILTER (WHERE event_type = '{_PAGE_VIEW}') AS views,
                   coalesce(sum(quantity) FILTER (WHERE event_type = '{_CONVERSION}'), 0)
                     AS tickets,
                   coalesce(sum(revenue) FILTER (WHERE event_type = '{_CONVERSION}'), 0)
                     AS revenue
                FROM {TABLE} WHERE occurred_at >= $day_start GROUP BY ALL""",
            {"day_start": day_start},
        ).to_pylist()
        for row in today_rows:
            state = self._tenant(row["tenant_id"], today, now_second)
            targets = [state.today]
            if row["ticketed_event_id"]:
                ticketed = state.ticketed.setdefault(row["ticketed_event_id"], _TicketedState())
                targets.append(ticketed.today)
                ticketed.today.views += int(row["views"])
            for target in targets:
                target.tickets += int(row["tickets"])
                if row["currency"]:
                    target.revenue[row["currency"]] = target.revenue.get(
                        row["currency"], Decimal(0)
                    ) + Decimal(row["revenue"])
        for row in store.read(
            f"SELECT tenant_id, session_id, max({second}) AS last FROM {TABLE}"
            " WHERE occurred_at >= $recent AND session_id <> '' GROUP BY ALL",
            {"recent": recent, "now": now},
        ).to_pylist():
            self._tenant(row["tenant_id"], today, now_second).sessions.touch(
                row["session_id"], int(row["last"])
            )
        for row in store.read(
            f"""SELECT tenant_id, ticketed_event_id,
                   CASE WHEN user_id <> '' THEN 'u:' || user_id
                        ELSE 'a:' || anonymous_id END AS actor,
                   max({second}) AS last
                FROM {TABLE}
                WHERE occurred_at >= $recent AND ticketed_event_id <> ''
                  AND (user_id <> '' OR anonymous_id <> '')
                GROUP BY ALL""",
            {"recent": recent, "now": now},
        ).to_pylist():
            state = self._tenant(row["tenant_id"], today, now_second)
            ticketed = state.ticketed.setdefault(row["ticketed_event_id"], _TicketedState())
            ticketed.visitors.touch(row["actor"], int(row["last"]))
        for row in store.read(
            f"SELECT tenant_id, {second} AS second, count(*) AS events FROM {TABLE}"
            " WHERE occurred_at >= $minute GROUP BY ALL",
            {"minute": minute, "now": now},
        ).to_pylist():
            self._tenant(row["tenant_id"], today, now_second).events.add(
                int(row["second"]), int(row["events"])
            )
        log.info("live_metrics_seeded", tenants=len(self._tenants))


def _actor(user_id: str, anonymous_id: str) -> str:
    if user_id:
        return f"u:{user_id}"
    return f"a:{anonymous_id}" if anonymous_id else ""
