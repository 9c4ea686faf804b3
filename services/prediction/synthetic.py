"""Seeded synthetic tracked events with a known churn process, demand and seasonality.

Used by tests, benchmarks and `bilten-analytics` demos where no real tenant data is
available. Everything is columnar (numpy -> Arrow -> `DuckDBEventStore.append_table`):
no Python object per event, so a few million events take seconds.

The generative story (the ground truth the models must recover):
- Each user signs up on some day and has a base session rate (log-normal, sessions/day)
  and a lifetime; more engaged users live longer. Over the 28 days before the churn day
  the session rate fades linearly to 20 %: the "declining engagement" signal seen in
  real products. After the churn day the user sends nothing.
- Sessions per day are Poisson with the user's rate times a weekly profile (weekend
  peaks) and a yearly sine (spring high, late-summer low).
- A session has 1 + Poisson(3) events: page views, ticket views, clicks, some custom.
  A session converts (its last event becomes a `ticket_purchased` conversion) with the
  user's purchase propensity.
- Ticketed events (concerts) go on sale 45-120 days before their show; demand rises
  towards the show day. Ticket views and purchases name the concert on sale picked by
  demand; an always-on "season pass" keeps every day covered. Revenue = tickets x price.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.storage.event_store import EVENT_ARROW_SCHEMA

DAY_US = 86_400_000_000
# Monday..Sunday multipliers of the session rate (ISO weekday order).
WEEKLY_PROFILE = np.array([0.85, 0.8, 0.85, 0.95, 1.15, 1.35, 1.05])
YEARLY_AMPLITUDE = 0.25
FADE_DAYS = 28
SEASON_PASS = "season-pass"  # noqa: S105 - a ticket product name, not a secret

_PAGE_VIEW, _TRACK, _CLICK, _CUSTOM, _CONVERSION = range(5)
_TYPES = pa.array(["page_view", "track", "click", "custom", "conversion"])
_NAMES = pa.array(
    ["page_view", "ticket_viewed", "buy_clicked", "wishlist_added", "ticket_purchased"]
)
_SOURCES = pa.array(["web", "mobile"])


@dataclass(frozen=True, slots=True)
class SyntheticTenant:
    """What to generate. `end` is exclusive and should be a UTC midnight."""

    tenant_id: str = "demo"
    users: int = 2_000
    days: int = 180
    end: datetime = datetime(2026, 6, 1, tzinfo=UTC)
    ticketed_events: int = 24
    seed: int = 7
    # Scales every user's session rate (benchmarks use it to size the event count).
    activity: float = 1.0


@dataclass(frozen=True, slots=True)
class GroundTruth:
    """The hidden per-user facts behind the events (for checks, never for training)."""

    churn_day: np.ndarray  # day index (from the start) after which the user is silent
    signup_day: np.ndarray
    base_rate: np.ndarray
    log_hazard: np.ndarray
    ticket_prices: dict[str, float] = field(default_factory=dict)


def _decimal_from_cents(cents: np.ndarray) -> pa.Array:
    """Exact DECIMAL(18,6) from integer cents, built from its 128-bit buffer directly."""
    scaled = cents.astype(np.int64) * 10_000  # cents -> units of 10^-6
    words = np.empty((len(scaled), 2), dtype=np.int64)
    words[:, 0] = scaled
    words[:, 1] = np.where(scaled < 0, -1, 0)  # sign extension of the high word
    return pa.Array.from_buffers(
        pa.decimal128(18, 6), len(scaled), [None, pa.py_buffer(words.tobytes())]
    )


def _prefixed(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


def generate(spec: SyntheticTenant) -> tuple[pa.Table, GroundTruth]:
    """Events of one tenant in `EVENT_ARROW_SCHEMA`, sorted by time, plus the truth."""
    rng = np.random.default_rng(spec.seed)
    users, days = spec.users, spec.days
    start_us = int(spec.end.timestamp() * 1_000_000) - days * DAY_US

    # --- users ---------------------------------------------------------------------
    base_rate = np.clip(rng.lognormal(np.log(0.22), 0.8, users), 0.01, 3.0) * spec.activity
    engagement = np.argsort(np.argsort(base_rate)) / max(users - 1, 1)  # rank in [0, 1]
    signup_day = np.maximum(0, rng.uniform(-days, days * 0.9, users)).astype(np.int64)
    # Habits are bimodal, as in real products: app people and web people, buyers and
    # browsers.
    mobile = rng.random(users) < 0.5
    mobile_share = np.where(mobile, rng.beta(8, 2, users), rng.beta(2, 8, users))
    buyer = rng.random(users) < 0.5
    propensity = np.where(buyer, rng.beta(4, 12, users), rng.beta(1, 60, users))
    # Churn hazard from observable habits, through an interaction that a linear model
    # on the features only approximates: mobile browsers (app users who never buy)
    # leave far sooner than anyone else; casual users somewhat sooner.
    log_hazard = 2.2 * (mobile & ~buyer) + 1.4 * (~mobile & buyer) + 0.7 * (engagement < 0.35) - 0.8
    lifetime = rng.exponential(160 * np.exp(-log_hazard))
    churn_day = signup_day + lifetime.astype(np.int64) + 1
    # Only some users fade before leaving (to `fade_floor`); the rest stop abruptly.
    fade_floor = np.where(rng.random(users) < 0.6, 0.35, 1.0).astype(np.float32)
    # Half the users take one break (holidays, exams) and come back: a long silence
    # that is not churn, which recency alone mistakes for it.
    break_start = np.where(rng.random(users) < 0.5, rng.integers(0, days, users), days + 1)
    break_end = break_start + rng.integers(14, 45, users)

    # --- sessions per user and day -----------------------------------------------------
    day_index = np.arange(days)
    start_weekday = (spec.end - timedelta(days=days)).weekday()
    weekly = WEEKLY_PROFILE[(start_weekday + day_index) % 7]
    start_doy = (spec.end - timedelta(days=days)).timetuple().tm_yday
    yearly = 1 + YEARLY_AMPLITUDE * np.sin(2 * np.pi * (start_doy + day_index - 80) / 365.25)
    day_factor = (weekly * yearly).astype(np.float32)
    until_churn = churn_day[:, None] - day_index[None, :]
    fade = np.clip(until_churn / FADE_DAYS, fade_floor[:, None], 1.0).astype(np.float32)
    alive = (day_index[None, :] >= signup_day[:, None]) & (until_churn > 0)
    on_break = (day_index[None, :] >= break_start[:, None]) & (
        day_index[None, :] < break_end[:, None]
    )
    # Gamma day-to-day noise (mean 1): activity is bursty, so one quiet week means little.
    burst = rng.gamma(0.6, 1 / 0.6, (users, days)).astype(np.float32)
    rate = base_rate.astype(np.float32)[:, None] * day_factor[None, :] * fade * burst
    rate *= alive & ~on_break
    session_counts = rng.poisson(rate)
    session_user, session_day = np.nonzero(session_counts)
    repeat = session_counts[session_user, session_day]
    session_user = np.repeat(session_user, repeat)
    session_day = np.repeat(session_day, repeat)
    sessions = len(session_user)

    # Evening-heavy start hour; seconds inside the day.
    hour = np.clip(rng.normal(19.0, 3.5, sessions), 0, 23.9)
    session_start_us = start_us + session_day * DAY_US + (hour * 3_600_000_000).astype(np.int64)
    converts = rng.random(sessions) < propensity[session_user]
    is_mobile = rng.random(sessions) < mobile_share[session_user]

    # --- events ----------------------------------------------------------------------
    per_session = 1 + rng.poisson(3.0, sessions)
    event_session = np.repeat(np.arange(sessions), per_session)
    position = np.arange(len(event_session)) - np.repeat(
        np.cumsum(per_session) - per_session, per_session
    )
    n = len(event_session)
    kinds = rng.choice(
        [_PAGE_VIEW, _TRACK, _CLICK, _CUSTOM], size=n, p=[0.45, 0.3, 0.2, 0.05]
    ).astype(np.int64)
    last = position == per_session[event_session] - 1
    kinds[last & converts[event_session]] = _CONVERSION
    occurred_us = session_start_us[event_session] + position * rng.integers(
        20_000_000, 120_000_000, n
    )
    occurred_us = np.minimum(occurred_us, start_us + days * DAY_US - 1)
    event_day = (occurred_us - start_us) // DAY_US

    # --- ticketed events on sale ---------------------------------------------------------
    k = spec.ticketed_events
    show_day = rng.integers(10, days + 60, k)
    on_sale = show_day - rng.integers(45, 120, k)
    popularity = rng.lognormal(0, 0.6, k)
    prices = np.round(rng.uniform(20, 120, k), 2)
    names = [f"concert-{i + 1}" for i in range(k)] + [SEASON_PASS]
    prices = np.append(prices, 150.0)
    weights = np.zeros((days, k + 1))
    for j in range(k):
        selling = (day_index >= on_sale[j]) & (day_index < show_day[j])
        progress = np.clip((day_index - on_sale[j]) / max(show_day[j] - on_sale[j], 1), 0, 1)
        weights[:, j] = selling * popularity[j] * (1 + 3 * progress**2)
    weights[:, k] = 0.15  # the season pass, always on sale
    cdf = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    concert = np.full(n, -1, dtype=np.int64)
    names_concert = (kinds == _TRACK) | (kinds == _CONVERSION)
    draw = rng.random(n)
    for d in range(days):
        rows = np.flatnonzero(names_concert & (event_day == d))
        if len(rows):
            concert[rows] = np.minimum(np.searchsorted(cdf[d], draw[rows]), k)

    quantity = np.where(kinds == _CONVERSION, 1 + np.minimum(rng.poisson(0.8, n), 7), 0)
    price_cents = np.where(concert >= 0, np.round(prices[np.maximum(concert, 0)] * 100), 0)
    revenue_cents = (quantity * price_cents).astype(np.int64)

    order = np.argsort(occurred_us, kind="stable")
    kinds, occurred_us, event_session = kinds[order], occurred_us[order], event_session[order]
    concert, quantity, revenue_cents = concert[order], quantity[order], revenue_cents[order]
    user = session_user[event_session]
    is_conversion = kinds == _CONVERSION

    empty = pa.array([""] * 1)
    blank = pc.take(empty, pa.array(np.zeros(n, dtype=np.int64)))
    concert_names = pa.array(["", *names])
    columns: dict[str, pa.Array] = {
        "tenant_id": pc.take(pa.array([spec.tenant_id]), pa.array(np.zeros(n, dtype=np.int64))),
        "event_id": _prefixed(f"{spec.tenant_id}-e", np.arange(n)),
        "event_type": pc.take(_TYPES, pa.array(kinds)),
        "event_name": pc.take(_NAMES, pa.array(kinds)),
        "occurred_at": pa.array(occurred_us, pa.timestamp("us", tz="UTC")),
        "received_at": pa.array(occurred_us + 1_500_000, pa.timestamp("us", tz="UTC")),
        "source": pc.take(_SOURCES, pa.array(is_mobile[event_session].astype(np.int64))),
        "session_id": _prefixed("s", event_session),
        "user_id": _prefixed("u", user),
        "anonymous_id": blank,
        "page_url": blank,
        "page_title": blank,
        "referrer": blank,
        "ticketed_event_id": pc.take(concert_names, pa.array(concert + 1)),
        "campaign_id": blank,
        "order_id": pc.if_else(
            pa.array(is_conversion), _prefixed(f"{spec.tenant_id}-o", np.arange(n)), ""
        ),
        "revenue": _decimal_from_cents(revenue_cents),
        "currency": pc.if_else(pa.array(is_conversion), "EUR", ""),
        "quantity": pa.array(quantity.astype(np.int32)),
        "properties_json": pc.take(pa.array(["{}"]), pa.array(np.zeros(n, dtype=np.int64))),
        "schema_id": pa.array(np.zeros(n, dtype=np.int32)),
        "ip_hash": blank,
        "country_code": blank,
        "browser_family": blank,
        "browser_version": blank,
        "os_family": blank,
        "device_type": blank,
    }
    table = pa.Table.from_pydict(columns).cast(EVENT_ARROW_SCHEMA)
    truth = GroundTruth(
        churn_day=churn_day,
        signup_day=signup_day,
        base_rate=base_rate,
        log_hazard=log_hazard,
        ticket_prices=dict(zip(names, prices.tolist(), strict=True)),
    )
    return table, truth


def day_start(spec: SyntheticTenant, day: int) -> datetime:
    """The UTC midnight of day index `day` of the generated period."""
    return spec.end - timedelta(days=spec.days - day)
