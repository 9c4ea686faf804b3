"""One user's analytics: sessions, engagement, spending, preferences, funnel position.
Plain functions, no gRPC; docs/analytics.md is the user-facing definition.

The user is the signed-in `user_id` in one tenant (the actor `u:<user_id>` of
`services.storage.event_store`); their anonymous events before signing in are another
actor and are not included (no identity stitching, as in every metric). All of the
user's history counts; there is no time range.

Vocabulary shared with `ticketed_events`:
- a *view* of a ticketed event is a page view, or an event named `ticket_viewed`, that
  carries a `ticketed_event_id`;
- a *purchase* is an event named `ticket_purchased`, or any conversion with tickets
  (`quantity` > 0);
- money is summed per currency, over conversions with a currency; an order is a
  distinct non-empty `order_id`, or a conversion without one (as in metrics).

The standard purchase funnel, furthest stage reached at any time (order not required:
a purchase made through an API without tracked views is still a purchase):
`visit` (any event) < `ticket_view` (a view) < `checkout` (`checkout_started`,
`cart_opened` or `buy_clicked`) < `purchase`.

How: the user's actor key is looked up (see `_actor_key`), then their rows are read
with one narrow query (a scan of one integer column; the JSON `category` is extracted by
DuckDB for those rows only), sorted by time. Every figure is then a vectorised numpy /
pyarrow pass over that one person's rows: one small query instead of a dozen aggregates
whose planning alone costs more than the scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from services.query.metrics import EPOCH, CurrencyAmount, Scope
from services.query.scoped_sql import Params, property_text
from services.query.sessions import DEFAULT_TIMEOUT, check_timeout
from services.storage.event_store import ACTORS_TABLE, TABLE, DuckDBEventStore, EventStore

FUNNEL_STAGES = ("visit", "ticket_view", "checkout", "purchase")
CHECKOUT_EVENTS = ("checkout_started", "cart_opened", "buy_clicked")
MAX_CATEGORIES = 10
_MICROSECOND = timedelta(microseconds=1)
_MICRO_UNITS = Decimal("0.000001")

# SQL predicates of the shared vocabulary (see the module docstring).
VIEW_SQL = (
    "((event_type = 'page_view' OR event_name = 'ticket_viewed') AND ticketed_event_id <> '')"
)
PURCHASE_SQL = "(event_name = 'ticket_purchased' OR (event_type = 'conversion' AND quantity > 0))"
CHECKOUT_SQL = "event_name IN ({})".format(", ".join(f"'{name}'" for name in CHECKOUT_EVENTS))


class UserNotFoundError(LookupError):
    """The tenant has no events of this user."""


@dataclass(frozen=True, slots=True)
class UserAnalytics:
    user_id: str
    total_sessions: int
    average_session_duration_seconds: float
    last_session_start: datetime
    device_types: tuple[str, ...]  # most events first, then by name
    browsers: tuple[str, ...]
    page_views: int
    ticketed_events_viewed: int
    tickets_purchased: int
    total_spent: tuple[CurrencyAmount, ...]  # by currency
    average_order_values: tuple[CurrencyAmount, ...]  # by currency, rounded to 1e-6
    preferred_categories: tuple[str, ...]  # most events first, at most MAX_CATEGORIES
    hour_of_day_activity: dict[int, int]  # UTC hour -> events (hours with events)
    day_of_week_activity: dict[int, int]  # ISO weekday (1 = Monday) -> events
    funnel_position: str  # one of FUNNEL_STAGES


def _ranked(values: pa.ChunkedArray, limit: int | None = None) -> tuple[str, ...]:
    """Distinct non-empty values, most frequent first, then by value."""
    counts = pc.value_counts(pc.drop_null(values)).to_pylist()
    ranked = sorted(
        ((c["values"], c["counts"]) for c in counts if c["values"]), key=lambda x: (-x[1], x[0])
    )
    return tuple(value for value, _ in ranked[:limit])


def _sessions(t: npt.NDArray[np.int64], timeout_us: int) -> tuple[int, float, int]:
    """(sessions, mean duration in seconds, start of the last one in epoch us) of sorted
    event times (see `services.query.sessions` for the definition)."""
    opens = np.ones(len(t), dtype=bool)
    opens[1:] = np.diff(t) > timeout_us
    firsts = np.flatnonzero(opens)
    lasts = np.append(firsts[1:] - 1, len(t) - 1)
    durations = t[lasts] - t[firsts]
    return len(firsts), (int(durations.sum()) / len(firsts)) / 1_000_000, int(t[firsts[-1]])


def _money(rows: pa.Table) -> list[tuple[str, Decimal, int]]:
    """(currency, total, orders) of the paid conversions, by currency."""
    totals: dict[str, Decimal] = {}
    orders: dict[str, set[str]] = {}
    loose: dict[str, int] = {}
    paid = rows.filter(
        pc.and_(pc.equal(rows["event_type"], "conversion"), pc.not_equal(rows["currency"], ""))
    )
    for currency, amount, order in zip(
        paid["currency"].to_pylist(),
        paid["revenue"].to_pylist(),
        paid["order_id"].to_pylist(),
        strict=True,
    ):
        totals[currency] = totals.get(currency, Decimal(0)) + amount
        if order:
            orders.setdefault(currency, set()).add(order)
        else:
            loose[currency] = loose.get(currency, 0) + 1  # an order of its own
    return [(c, totals[c], len(orders.get(c, ())) + loose.get(c, 0)) for c in sorted(totals)]


def _actor_key(store: EventStore, tenant_id: str, actor_id: str) -> int | None:
    """The actor's dense key, None for an unknown actor.

    `DuckDBEventStore` answers from its in-memory actor map (`actor_key`), which saves a
    scan of the actor table, ~45 ms at 2 M actors: half of this call's budget. Any
    other store gets the table lookup.
    """
    if isinstance(store, DuckDBEventStore):
        return store.actor_key(tenant_id, actor_id)
    params = Params()
    found = store.read(
        f"SELECT actor_key FROM {ACTORS_TABLE} WHERE tenant_id = {params.bind(tenant_id, 't')}"
        f" AND actor_id = {params.bind(actor_id, 'actor')}",
        params.values,
    )
    return int(found.column(0)[0].as_py()) if found.num_rows else None


def user_analytics(
    store: EventStore, scope: Scope, user_id: str, session_timeout: timedelta = DEFAULT_TIMEOUT
) -> UserAnalytics:
    """Raises `UserNotFoundError` when the tenant has no events of the user."""
    check_timeout(session_timeout)
    if scope.tenant_id is None:
        # User ids belong to a tenant: across tenants one id is several people.
        raise ValueError("user analytics need a tenant")
    key = _actor_key(store, scope.tenant_id, f"u:{user_id}")
    if key is None:
        raise UserNotFoundError(user_id)
    params = Params()
    category = property_text(params, "category")
    rows = store.read(
        f"SELECT epoch_us(occurred_at) AS t, occurred_on, event_type, event_name,"
        f" ticketed_event_id, order_id, revenue, currency, quantity, device_type,"
        f" browser_family, {category} AS category, {VIEW_SQL} AS viewed,"
        f" {CHECKOUT_SQL} AS checkout, {PURCHASE_SQL} AS purchase"
        f" FROM {TABLE} WHERE tenant_id = {params.bind(scope.tenant_id, 'tenant')}"
        f" AND actor_key = {params.bind(key, 'key')} ORDER BY t",
        params.values,
    )
    if rows.num_rows == 0:
        raise UserNotFoundError(user_id)
    t = rows["t"].to_numpy().astype(np.int64)
    sessions, mean_duration, last_start = _sessions(t, session_timeout // _MICROSECOND)
    conversions = pc.equal(rows["event_type"], "conversion")
    days = rows["occurred_on"].to_numpy().astype("datetime64[D]").astype(np.int64)
    hours = np.bincount((t // 3_600_000_000) % 24, minlength=24)
    weekdays = np.bincount((days + 3) % 7 + 1, minlength=8)  # 1970-01-01 was a Thursday
    if pc.any(rows["purchase"]).as_py():
        stage = 4
    elif pc.any(rows["checkout"]).as_py():
        stage = 3
    else:
        stage = 2 if pc.any(rows["viewed"]).as_py() else 1
    money = _money(rows)
    return UserAnalytics(
        user_id=user_id,
        total_sessions=sessions,
        average_session_duration_seconds=mean_duration,
        last_session_start=EPOCH + last_start * _MICROSECOND,
        device_types=_ranked(rows["device_type"]),
        browsers=_ranked(rows["browser_family"]),
        page_views=int(pc.sum(pc.equal(rows["event_type"], "page_view")).as_py() or 0),
        ticketed_events_viewed=pc.count_distinct(
            pc.filter(rows["ticketed_event_id"], rows["viewed"])
        ).as_py(),
        tickets_purchased=int(pc.sum(pc.filter(rows["quantity"], conversions)).as_py() or 0),
        total_spent=tuple(CurrencyAmount(c, total) for c, total, _ in money),
        average_order_values=tuple(
            CurrencyAmount(c, (total / n).quantize(_MICRO_UNITS, ROUND_HALF_EVEN))
            for c, total, n in money
        ),
        preferred_categories=_ranked(rows["category"], MAX_CATEGORIES),
        hour_of_day_activity={h: int(n) for h, n in enumerate(hours) if n},
        day_of_week_activity={d: int(n) for d, n in enumerate(weekdays) if n},
        funnel_position=FUNNEL_STAGES[stage - 1],
    )
