"""Forecasting methods and backtests, on real series shipped with statsmodels."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.datasets import co2, sunspots  # type: ignore[import-untyped]

from services.prediction import forecasting
from services.prediction.forecasting import Method, SeriesSpec

pytestmark = pytest.mark.unit


def monthly_co2() -> np.ndarray:
    weekly = co2.load_pandas().data["co2"]
    return weekly.resample("MS").mean().interpolate().to_numpy()


def test_backtest_picks_a_method_that_beats_seasonal_naive_on_co2() -> None:
    result = forecasting.backtest(monthly_co2(), SeriesSpec(period=12), horizon=12, folds=3)
    metrics = result.metrics()
    assert result.chosen is not Method.SEASONAL_NAIVE
    # Mauna Loa CO2 has a trend the seasonal naive forecast ignores.
    assert metrics["mase"] < 0.6 * metrics["baseline_mase"]
    assert metrics["smape"] < metrics["baseline_smape"]


def test_backtest_beats_seasonal_naive_on_sunspots_at_a_short_horizon() -> None:
    # Four years ahead, five origins: the 11-year cycle drifts, so repeating the last
    # cycle (seasonal naive) is poor; the lag model and the AR fit follow the phase.
    yearly = sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    result = forecasting.backtest(
        yearly,
        SeriesSpec(period=11),
        horizon=4,
        folds=5,
        # ETS (MASE 1.74 here, never chosen) left out to keep the test fast.
        methods=(Method.SEASONAL_NAIVE, Method.SARIMAX, Method.GBM_LAGS),
    )
    metrics = result.metrics()
    assert result.chosen is not Method.SEASONAL_NAIVE
    assert metrics["mase"] < 0.85 * metrics["baseline_mase"]  # 0.761 vs 1.097 measured


def daily_with_yearly_and_weekly_cycles(days: int = 840, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(days)
    weekly = np.array([0.8, 0.9, 1.0, 1.0, 1.1, 1.4, 1.3])
    return 100 + 40 * np.sin(2 * np.pi * t / 365.25) + 15 * weekly[t % 7] + rng.normal(0, 4, days)


def test_yearly_seasonality_of_a_daily_series_is_modelled() -> None:
    y = daily_with_yearly_and_weekly_cycles()
    # The tenants' own setting: daily data, weekly season, a 365.25-day cycle.
    result = forecasting.backtest(y, SeriesSpec(period=7, long_period=365.25), horizon=28, folds=3)
    scores = {m: s.mase for m, s in result.scores.items()}
    assert result.chosen in (Method.SARIMAX, Method.GBM_LAGS)
    # Seasonal naive repeats last week and ETS has no yearly term: both miss the slope
    # of the yearly cycle over four weeks (measured: 1.59 and 0.94 vs 0.68 for SARIMAX
    # with yearly Fourier terms).
    assert scores[result.chosen] < 0.6 * scores[Method.SEASONAL_NAIVE]
    assert scores[result.chosen] < 0.85 * scores[Method.ETS]


def test_seasonal_naive_repeats_the_last_season() -> None:
    y = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=float)
    out = forecasting.seasonal_naive(y, 5, SeriesSpec(period=3))
    assert out.tolist() == [8, 9, 10, 8, 9]


def test_intervals_widen_with_the_horizon() -> None:
    widths = [1.0, 1.5, 2.0]
    assert forecasting.interval_width(widths, 1) == 1.5
    assert forecasting.interval_width(widths, 11) == pytest.approx(2.0 * 2)


def test_mase_scale_of_a_flat_series_is_not_zero() -> None:
    assert forecasting.mase_scale(np.full(30, 5.0), SeriesSpec(period=7)) == 5.0
