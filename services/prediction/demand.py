"""Ticket demand and revenue forecasts over the event store.

Series: per UTC day, tickets sold (sum of `quantity`) or revenue (sum of `revenue`) of
conversion events, zero-filled, for one of three scopes:
- a ticketed event (`ticketed_event_id`) of the caller's tenant;
- the organizer (the whole tenant);
- the platform (every tenant; platform admins without a tenant).
Revenue is never added across currencies: a revenue series is in the scope's main
currency (the one with the most revenue); the currency is recorded with the model.
The series ends at the last complete UTC day (today's partial day would read as a
drop), or the day after the scope's last event if that is earlier.

Training a forecast model version backtests every method on the scope's daily series
(horizon 28 days, 3 origins; see `services.prediction.forecasting`), picks the lowest
MASE, and stores the method, the interval table and the scores. Serving refits the
chosen method on the requested series (a tenant's or one ticketed event's) up to its
last complete day, then applies the stored interval table scaled to that series.
Seasonality: weekly in every method; yearly through Fourier terms (SARIMAX) and
day-of-year phase (gradient boosting) once the series spans two years / one year.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np

from services.prediction import forecasting
from services.prediction.errors import insufficient_data
from services.prediction.forecasting import Method, Series, SeriesSpec
from services.prediction.registry import PLATFORM
from services.storage.event_store import TABLE, EventStore

DAILY = SeriesSpec(period=7, long_period=365.25, nonnegative=True)
BACKTEST_HORIZON_DAYS = 28
BACKTEST_FOLDS = 3
# A forecast needs some history per step ahead: at most this many horizon days per
# day of history (and the contract's 365 at most).
MIN_HISTORY_DAYS = 28
MAX_HORIZON_PER_HISTORY_DAY = 1.0


class Target:
    TICKETS = "tickets"
    REVENUE = "revenue"


@dataclass(frozen=True, slots=True)
class DailySeries:
    start: date  # the day of values[0]
    values: Series
    currency: str = ""

    @property
    def end(self) -> date:
        """The day after the last value."""
        return self.start + timedelta(days=len(self.values))


@dataclass(frozen=True, slots=True)
class ForecastPoint:
    day_start: datetime
    value: float
    lower: float
    upper: float


def _main_currency(store: EventStore, tenant_id: str, ticketed_event_id: str) -> str:
    where, params = _where(tenant_id, ticketed_event_id)
    rows = store.read(
        f"SELECT currency, sum(revenue) AS total FROM {TABLE} WHERE {where} "
        "AND currency <> '' GROUP BY currency ORDER BY total DESC, currency LIMIT 1",
        params,
    ).to_pylist()
    return str(rows[0]["currency"]) if rows else ""


def _where(tenant_id: str, ticketed_event_id: str) -> tuple[str, dict[str, object]]:
    clauses = ["event_type = 'conversion'"]
    params: dict[str, object] = {}
    if tenant_id != PLATFORM:
        clauses.append("tenant_id = $tenant")
        params["tenant"] = tenant_id
    if ticketed_event_id:
        clauses.append("ticketed_event_id = $ticketed_event")
        params["ticketed_event"] = ticketed_event_id
    return " AND ".join(clauses), params


def daily_series(
    store: EventStore,
    tenant_id: str,
    target: str,
    ticketed_event_id: str = "",
    *,
    today: date | None = None,
    currency: str | None = None,
) -> DailySeries:
    """The zero-filled daily series of a scope (see the module docstring)."""
    where, params = _where(tenant_id, ticketed_event_id)
    if target == Target.REVENUE:
        currency = (
            currency
            if currency is not None
            else _main_currency(store, tenant_id, ticketed_event_id)
        )
        where += " AND currency = $currency"
        params["currency"] = currency
        measure = "CAST(sum(revenue) AS DOUBLE)"
    else:
        currency = ""
        measure = "CAST(sum(quantity) AS DOUBLE)"
    table = store.read(
        f"SELECT occurred_on AS day, {measure} AS value FROM {TABLE} WHERE {where} "
        "GROUP BY occurred_on ORDER BY occurred_on",
        params,
    )
    days = table.column("day").to_pylist()
    if not days:
        return DailySeries(today or datetime.now(UTC).date(), np.zeros(0), currency)
    today = today or datetime.now(UTC).date()
    end = min(today, days[-1] + timedelta(days=1))
    start = days[0]
    values = np.zeros(max((end - start).days, 0), dtype=np.float64)
    for day, value in zip(days, table.column("value").to_pylist(), strict=True):
        offset = (day - start).days
        if 0 <= offset < len(values):
            values[offset] = value or 0.0
    return DailySeries(start, values, currency)


def check_history(series: DailySeries, horizon_days: int, what: str) -> None:
    """Clear errors for empty or too short histories and too long horizons."""
    if len(series.values) == 0 or not np.any(series.values):
        raise insufficient_data(f"{what} has no sales to forecast from", field="ticketed_event_id")
    if len(series.values) < MIN_HISTORY_DAYS:
        raise insufficient_data(
            f"{what} has {len(series.values)} days of sales history; forecasts need "
            f"{MIN_HISTORY_DAYS}+",
            field="ticketed_event_id",
        )
    limit = int(len(series.values) * MAX_HORIZON_PER_HISTORY_DAY)
    if horizon_days > limit:
        raise insufficient_data(
            f"horizon_days {horizon_days} is too long for {what}: with "
            f"{len(series.values)} days of history at most {limit} days ahead can be "
            "forecast",
            field="horizon_days",
        )


@dataclass(frozen=True, slots=True)
class ForecastTraining:
    backtest: forecasting.Backtest
    series: DailySeries

    def config(self) -> dict[str, object]:
        return {
            "method": self.backtest.chosen.value,
            "interval_widths": self.backtest.interval_widths,
            "interval_level": self.backtest.level,
            "currency": self.series.currency,
            "period": DAILY.period,
            "long_period": DAILY.long_period,
        }


def train_forecast(
    store: EventStore,
    tenant_id: str,
    target: str,
    *,
    today: date | None = None,
    progress: forecasting.Progress | None = None,
) -> ForecastTraining:
    series = daily_series(store, tenant_id, target, today=today)
    needed = BACKTEST_FOLDS * BACKTEST_HORIZON_DAYS + 8 * 7
    if len(series.values) < needed or not np.any(series.values):
        raise insufficient_data(
            f"a {target} forecast model needs {needed}+ days of sales history to backtest "
            f"({BACKTEST_FOLDS} origins x {BACKTEST_HORIZON_DAYS} days, plus 8 weeks to fit "
            f"from); the scope has {len(series.values)}"
        )
    result = forecasting.backtest(
        series.values, DAILY, BACKTEST_HORIZON_DAYS, BACKTEST_FOLDS, progress=progress
    )
    return ForecastTraining(result, series)


def predict(
    series: DailySeries,
    method: Method,
    widths: list[float],
    trained_level: float,
    horizon_days: int,
    level: float,
) -> list[ForecastPoint]:
    """Point forecast and interval for each of the next `horizon_days` days."""
    values = forecasting.forecast(method, series.values, horizon_days, DAILY)
    scale = forecasting.mase_scale(series.values, DAILY)
    # The stored table is at the trained level; other levels rescale it by the ratio
    # of normal quantiles (an approximation, stated in docs/prediction.md).
    ratio = _z(level) / _z(trained_level)
    start = datetime(series.end.year, series.end.month, series.end.day, tzinfo=UTC)
    points = []
    for step, value in enumerate(values):
        half = forecasting.interval_width(widths, step) * scale * ratio
        points.append(
            ForecastPoint(
                start + timedelta(days=step),
                float(value),
                max(float(value - half), 0.0),
                float(value + half),
            )
        )
    return points


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)
